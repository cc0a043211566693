"""`chatforge serve CKPT`: the OpenAI-compatible API and the web chat, on localhost unless told otherwise."""
from __future__ import annotations

import argparse
import os

from chatforge import ChatforgeError

API_KEY_ENV = "CHATFORGE_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint: OpenAI-compatible API, web chat, moderation")
    p.add_argument("ckpt", help="checkpoint directory (base, sft, policy or adapter)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 (repeatable; or set {API_KEY_ENV}, "
                        f"which keeps the key out of the process list)")
    p.add_argument("--moderation", metavar="DIR", help="a classifier from `chatforge moderation train`: enables "
                                                       "/v1/moderations and screens chat input and output")
    p.add_argument("--no-screen", action="store_true", help="load the classifier for /v1/moderations only")
    p.add_argument("--model-name", help="the model id clients see (default: the checkpoint directory's name)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--max-batch-rows", type=int, default=32, help="sequences decoded together at most")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 503")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the context window minus one")
    p.add_argument("--max-output-tokens", type=int, default=512)
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-messages", type=int, default=256)
    p.add_argument("--max-n", type=int, default=8)
    p.add_argument("--max-connections", type=int, default=256, help="open connections before answering 503")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="compile the decode step before serving (about 2x faster decoding at batch 1, a one-time "
                        "wait at start); auto: on unless CHATFORGE_COMPILE=0. Never mid-request either way")
    p.set_defaults(func=_serve)


def warm_up(engine) -> float:
    """Compile the decode step for one row and for several (its two graphs) before the first request, so no
    client waits for the compiler; returns the seconds it took."""
    import time

    from chatforge.infer.engine import SamplingParams
    start = time.perf_counter()
    prompt = engine.tokenizer.prompt([{"role": "user", "content": "Hello"}])
    for rows in (1, 2):
        engine.generate([prompt] * rows, SamplingParams(max_new_tokens=2, temperature=0.0))
    seconds = time.perf_counter() - start
    print(f"chatforge serve: decode step compiled in {seconds:.0f}s")
    return seconds


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from chatforge.infer.engine import Engine
    from chatforge.serve.app import ServeSettings, create_app
    from chatforge.serve.scheduler import Scheduler

    for name in ("max_batch_rows", "max_queue", "max_output_tokens", "max_body_bytes", "max_messages", "max_n",
                 "max_connections"):
        if getattr(args, name) < 1:
            raise ChatforgeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 < args.port < 65536:
        raise ChatforgeError(f"--port must be in 1..65535, got {args.port}")
    keys = tuple(k for k in (args.api_key or [os.environ.get(API_KEY_ENV, "")]) if k)
    moderator = None
    if args.moderation:
        from chatforge.safety import Moderator
        moderator = Moderator.load(args.moderation)
    engine = Engine.load(args.ckpt, device=args.device)
    compile_now = args.compile == "on" or (args.compile == "auto" and os.environ.get("CHATFORGE_COMPILE") != "0")
    engine.compile = compile_now
    if compile_now:
        warm_up(engine)
    name = args.model_name or os.path.basename(os.path.normpath(args.ckpt))
    settings = ServeSettings(model_name=name, api_keys=keys, max_prompt_tokens=args.max_prompt_tokens,
                             max_output_tokens=args.max_output_tokens, max_body_bytes=args.max_body_bytes,
                             max_messages=args.max_messages, max_n=args.max_n, screen=not args.no_screen)
    scheduler = Scheduler(engine, max_batch_rows=args.max_batch_rows, max_queue=args.max_queue)
    app = create_app(scheduler, settings, moderator)
    cfg = engine.config
    url = f"http://{args.host if ':' not in args.host else f'[{args.host}]'}:{args.port}"
    print(f"chatforge serve: {args.ckpt} as {name!r} ({cfg.num_params() / 1e6:.1f}M params, context "
          f"{cfg.max_position_embeddings}) on {engine.device}")
    print(f"  web chat {url}/   API {url}/v1   health {url}/health")
    print(f"  API keys: {f'required ({len(keys)})' if keys else 'off'}   moderation: "
          f"{'off' if moderator is None else args.moderation + (' (screening chat)' if settings.screen else '')}")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not keys:
        print(f"  warning: listening on {args.host} without an API key: anyone who can reach it can use it")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", limit_concurrency=args.max_connections,
                    timeout_graceful_shutdown=5)
    finally:
        scheduler.close()
