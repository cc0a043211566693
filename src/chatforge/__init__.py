"""chatforge: build your own ChatGPT end to end."""

__version__ = "0.1.0"


class ChatforgeError(Exception):
    """An error caused by the user's input or environment: printed as one line, never a traceback."""
