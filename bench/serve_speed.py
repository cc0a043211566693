"""Serving speed: N concurrent streaming clients against `chatforge serve` and against the same model served by a
plain transformers `generate` loop behind the same API.

    python bench/serve_speed.py                          # babbage preset (~7M params), 8 clients, ~2 minutes
    python bench/serve_speed.py --clients 16 --ckpt runs/tiny/sft

Both servers are this same FastAPI app (`chatforge.serve.app.create_app`, same validation, SSE and stop
handling); only the backend behind it differs:
- chatforge: the batching scheduler over `Engine.stream` (concurrent requests share decode steps);
- transformers: `LlamaForCausalLM.generate` with a streamer, one request at a time in arrival order, which is
  what a server built on `generate` does without a batching layer.
Each server runs in its own process (`--serve-backend`, started by this script); the clients run here, with
httpx, each sending `--requests` streaming chat requests one after another (greedy, `--max-tokens` each,
prompts of varied length). Backends alternate over `--rounds` so a busy machine slows both alike; medians
are reported. Time to first token counts from sending the request to the first chunk with text. Greedy
outputs of the two backends are compared before timing. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PROMPTS = ["What is the capital of France?", "Tell me about the animals that live in the sea and what they eat.",
           "Add 12 and 30.", "Write three sentences about a small robot who learns to paint with its friends.",
           "Hello!", "Which continent is Peru on, and what is its capital city?", "Name two colours.",
           "Explain, step by step, how a model generates one token at a time and why caching keys helps."]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint to serve (default: a random babbage-sized model built here)")
    p.add_argument("--preset", default="babbage")
    p.add_argument("--clients", type=int, default=8, help="concurrent streaming clients")
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="timed runs per backend, alternating")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each server process")
    p.add_argument("--serve-backend", choices=("chatforge", "transformers"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args()


# --- the baseline backend: transformers generate, one request at a time --------------------------------------

class TransformersBackend:
    """The scheduler interface (`submit`, `snapshot`, `tokenizer`, `context_length`, `close`) over
    `LlamaForCausalLM.generate`: a worker thread serves one request at a time, streaming its tokens."""

    def __init__(self, ckpt: Path) -> None:
        import queue

        import torch
        from transformers import LlamaForCausalLM
        from transformers.utils import logging as hf_logging

        from chatforge.tokenizer import Tokenizer
        hf_logging.disable_progress_bar()
        self.torch = torch
        self.model = LlamaForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
        self.tokenizer = Tokenizer.load(ckpt)
        self.context_length = self.model.config.max_position_embeddings
        self.queue: queue.Queue = queue.Queue()
        self.served = 0
        threading.Thread(target=self._run, daemon=True).start()

    def submit(self, request):
        from chatforge.serve.scheduler import Ticket
        ticket = Ticket(request, asyncio.get_running_loop())
        self.queue.put(ticket)
        return ticket

    def snapshot(self) -> dict:
        return {"waiting": self.queue.qsize(), "requests": self.served}

    def close(self) -> None:
        self.queue.put(None)

    def _run(self) -> None:
        while (ticket := self.queue.get()) is not None:
            try:
                for index in range(ticket.request.n):
                    self._generate(ticket, index)
            except Exception as e:  # noqa: BLE001 - reported to the client
                ticket.fail(e)
            self.served += 1

    def _generate(self, ticket, index: int) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        from chatforge.serve.scheduler import ChoiceDelta, IncrementalText
        req, tok, torch = ticket.request, self.tokenizer, self.torch
        text = IncrementalText(tok, req.stop)
        state = {"prompt_seen": False, "count": 0, "stopped": False, "done": False}

        class Push(BaseStreamer):
            def put(self, value):
                if not state["prompt_seen"]:  # generate() first pushes the prompt
                    state["prompt_seen"] = True
                    return
                for token in value.reshape(-1).tolist():
                    if state["done"]:
                        return
                    if token in tok.stop_ids:
                        ticket.push([ChoiceDelta(index, text.flush(), 0, "stop")])
                        state["done"] = True
                        return
                    state["count"] += 1
                    piece, stopped = text.add(token)
                    if stopped or state["count"] >= req.max_tokens:
                        ticket.push([ChoiceDelta(index, piece + ("" if stopped else text.flush()), 1,
                                                 "stop" if stopped else "length")])
                        state["done"] = state["stopped"] = True
                    else:
                        ticket.push([ChoiceDelta(index, piece, 1)])

            def end(self):
                if not state["done"]:
                    ticket.push([ChoiceDelta(index, text.flush(), 0, "length")])
                    state["done"] = True

        class Halt(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                halt = state["stopped"] or ticket.cancelled.is_set()
                return torch.full((input_ids.shape[0],), halt, dtype=torch.bool)

        ids = torch.tensor([req.prompt_ids])
        sampling = dict(do_sample=True, temperature=req.temperature, top_p=req.top_p) if req.temperature > 0 else \
            dict(do_sample=False)
        if req.seed is not None:
            torch.manual_seed(req.seed + index)
        with torch.no_grad():
            self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=req.max_tokens,
                                eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id, streamer=Push(),
                                stopping_criteria=StoppingCriteriaList([Halt()]), **sampling)


def serve_process(args: argparse.Namespace) -> None:
    """The child: one backend behind the chatforge app on localhost:PORT until killed."""
    import torch
    import uvicorn

    from chatforge.serve.app import ServeSettings, create_app
    torch.set_num_threads(args.threads)
    if args.serve_backend == "chatforge":
        from chatforge.infer.engine import Engine
        from chatforge.serve.scheduler import Scheduler
        backend = Scheduler(Engine.load(args.ckpt, device="cpu"), max_batch_rows=64, max_queue=256)
    else:
        backend = TransformersBackend(Path(args.ckpt))
    app = create_app(backend, ServeSettings(model_name=args.serve_backend, max_output_tokens=4096))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


# --- the driver ---------------------------------------------------------------------------------------------

def build_checkpoint(preset_name: str, out: Path) -> Path:
    """A random model of the preset's size, with weights spread wide enough that greedy decoding has no
    near-ties (so both backends must say exactly the same thing), and a tokenizer trained on the prompts."""
    import torch

    from chatforge.checkpoint import save_model_checkpoint
    from chatforge.model.presets import preset
    from chatforge.model.transformer import GPT
    from chatforge.tokenizer import train_tokenizer
    tok = train_tokenizer(PROMPTS * 50, vocab_size=512)
    torch.manual_seed(0)
    model = GPT(preset(preset_name, tok.vocab_size, 512))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return save_model_checkpoint(out, model, tok, {"kind": "sft", "stage": "bench"})


class Server:
    def __init__(self, backend: str, ckpt: Path, threads: int) -> None:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-backend", backend, "--ckpt", str(ckpt),
                                      "--port", str(self.port), "--threads", str(threads)])

    def __enter__(self) -> "Server":
        import httpx
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start (exit code {self.proc.poll()})")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_request(client, prompt: str, max_tokens: int) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, text, tokens = None, "", 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    text += choice["delta"]["content"]
    return {"ttft": ttft if ttft is not None else time.perf_counter() - start,
            "latency": time.perf_counter() - start, "tokens": tokens, "text": text}


async def load(url: str, clients: int, per_client: int, max_tokens: int) -> dict:
    import httpx

    async def client_loop(c, k: int) -> list[dict]:
        return [await one_request(c, PROMPTS[(k + i) % len(PROMPTS)], max_tokens) for i in range(per_client)]

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as c:
        start = time.perf_counter()
        results = [r for batch in await asyncio.gather(*(client_loop(c, k) for k in range(clients))) for r in batch]
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {"wall_s": wall, "requests_per_s": len(results) / wall, "tokens_per_s": tokens / wall,
            "ttft_median_s": statistics.median(r["ttft"] for r in results),
            "ttft_p90_s": sorted(r["ttft"] for r in results)[int(0.9 * (len(results) - 1))],
            "latency_median_s": statistics.median(r["latency"] for r in results), "tokens": tokens}


async def greedy_texts(url: str, max_tokens: int) -> list[str]:
    import httpx
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        return [(await one_request(c, p, max_tokens))["text"] for p in PROMPTS]


def main() -> None:
    args = parse_args()
    if args.serve_backend:
        serve_process(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else build_checkpoint(args.preset, Path(tmp) / "model")
        from chatforge.checkpoint import load_model
        cfg = load_model(ckpt)[0].config
        print(f"serve_speed: {ckpt} ({cfg.num_params() / 1e6:.1f}M params), {args.clients} concurrent streaming "
              f"clients x {args.requests} requests, {args.max_tokens} tokens each, greedy, {args.threads} "
              f"torch thread(s) per server, {args.rounds} rounds; cpu count {os.cpu_count()}")
        runs: dict[str, list[dict]] = {"transformers": [], "chatforge": []}
        texts: dict[str, list[str]] = {}
        for backend in runs:
            with Server(backend, ckpt, args.threads) as server:
                texts[backend] = asyncio.run(greedy_texts(server.url, args.max_tokens))  # also warms up
        same = texts["chatforge"] == texts["transformers"]
        print(f"greedy outputs identical across backends: {same}")
        for r in range(args.rounds):
            for backend in (("transformers", "chatforge") if r % 2 == 0 else ("chatforge", "transformers")):
                with Server(backend, ckpt, args.threads) as server:
                    asyncio.run(one_request_warm(server.url, args.max_tokens))
                    result = asyncio.run(load(server.url, args.clients, args.requests, args.max_tokens))
                runs[backend].append(result)
                print(f"  round {r + 1} {backend:<12} {result['requests_per_s']:6.2f} req/s  "
                      f"{result['tokens_per_s']:7.1f} tok/s  ttft median {result['ttft_median_s'] * 1000:7.1f} ms  "
                      f"p90 {result['ttft_p90_s'] * 1000:7.1f} ms  latency median {result['latency_median_s']:.2f} s")
    summary = {b: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for b, rs in runs.items()}
    cf, hf = summary["chatforge"], summary["transformers"]
    result = {"clients": args.clients, "requests": args.clients * args.requests, "max_tokens": args.max_tokens,
              "params_m": round(cfg.num_params() / 1e6, 2), "threads": args.threads,
              "outputs_identical": same,
              "chatforge": {k: round(v, 4) for k, v in cf.items()},
              "transformers": {k: round(v, 4) for k, v in hf.items()},
              "throughput_speedup": round(cf["tokens_per_s"] / hf["tokens_per_s"], 3),
              "requests_per_s_speedup": round(cf["requests_per_s"] / hf["requests_per_s"], 3),
              "ttft_speedup": round(hf["ttft_median_s"] / cf["ttft_median_s"], 3)}
    print(f"chatforge vs transformers: throughput x{result['throughput_speedup']}, "
          f"time to first token x{result['ttft_speedup']} (median), requests/s x{result['requests_per_s_speedup']}")
    print(json.dumps(result))


async def one_request_warm(url: str, max_tokens: int) -> None:
    import httpx
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        await one_request(c, PROMPTS[0], max_tokens)


if __name__ == "__main__":
    main()
