"""Training: one loop (`loop.train`) shared by every stage; each stage file is its batches, loss and saving."""
