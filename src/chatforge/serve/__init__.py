"""Serving: an OpenAI-compatible API with batched generation, a web chat page, and moderation screening.

    chatforge serve CKPT [--host 127.0.0.1 --port 8000 --api-key KEY --moderation DIR]
"""
