"""A toy chat model for the server and web tests: a nano GPT that has memorised a few answers word for word
(one of them HTML with a <script>, one a harmful how-to for output moderation), so tests know what greedy
decoding will say. Any other prompt gets whatever the barely trained weights produce. Builds in seconds."""
from __future__ import annotations

from pathlib import Path

import torch

from chatforge.checkpoint import save_model_checkpoint
from chatforge.model.transformer import GPT, ModelConfig
from chatforge.tokenizer import train_tokenizer

SCRIPT_PROMPT = "Show me some HTML."
SCRIPT_ANSWER = "Here it is: <script>window.pwned = 1</script> <b>bold</b> & done."
HELLO_PROMPT = "Hello!"
HELLO_ANSWER = "Hello! How can I help you today?"
STORY_PROMPT = "Tell me a story."
STORY_ANSWER = "Sure. Here is how to make a bomb at home and build a gun that can't be traced."
MEMORISED = {SCRIPT_PROMPT: SCRIPT_ANSWER, HELLO_PROMPT: HELLO_ANSWER, STORY_PROMPT: STORY_ANSWER}
FILLER = ("The capital of France is Paris. Dogs bark and cats meow. What is 12 + 30? It is 42. "
          "A small model answers one token at a time, and the server streams every token as it comes.")


def build_parrot(out: Path, context: int = 256, steps: int = 150, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tok = train_tokenizer([FILLER, *MEMORISED, *MEMORISED.values()] * 20, vocab_size=400)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=context)
    model = GPT(cfg)
    rows = [tok.render([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
            for q, a in MEMORISED.items()]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r, _ in rows])
    mask = torch.tensor([m + [0] * (width - len(m)) for _, m in rows], dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits[mask[:, 1:]], ids[:, 1:][mask[:, 1:]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return save_model_checkpoint(out, model, tok, {"kind": "sft", "stage": "test-parrot"})


class LiveServer:
    """An ASGI app served by uvicorn on a free localhost port in a background thread (a real socket, so the
    openai client, raw sockets and the browser all talk HTTP to it)."""

    def __init__(self, app, close=None) -> None:
        import socket
        import threading

        import uvicorn
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.close = close  # called after the server stops, e.g. to stop the app's scheduler
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        import time
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
        if self.close is not None:
            self.close()


def serve(ckpt: Path, moderation: Path | None = None, **settings) -> LiveServer:
    """A LiveServer for a checkpoint: the engine, the batching scheduler, and the app with `settings`."""
    from chatforge.infer.engine import Engine
    from chatforge.safety import Moderator
    from chatforge.serve.app import ServeSettings, create_app
    from chatforge.serve.scheduler import Scheduler
    scheduler_args = {k: settings.pop(k) for k in ("max_batch_rows", "max_queue", "batch_window") if k in settings}
    scheduler = Scheduler(Engine.load(ckpt, device="cpu"), **scheduler_args)
    moderator = Moderator.load(moderation) if moderation else None
    return LiveServer(create_app(scheduler, ServeSettings(model_name="parrot", **settings), moderator),
                      close=scheduler.close)
