"""Generation: the batched KV-cache engine and the `chatforge generate` command."""
