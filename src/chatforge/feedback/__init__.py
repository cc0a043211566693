"""Human feedback: the labeling app, its store, export to training formats, simulated labelers, RLHF rounds."""
