"""chatforge's GPT against Hugging Face transformers' LlamaForCausalLM: training and generation speed.

    python bench/model_speed.py                      # the babbage preset (~7M parameters), a few minutes
    python bench/model_speed.py --threads 1 --cpu-time      # on a machine busy with other jobs

Both models have the identical configuration and weights (copied across by name; they already match), run in
the same process with the same dtype and threads, and are timed alternately so that a busy machine slows both
alike. Before any timing, the logits are checked equal and the greedy generations identical.

Training is one forward + next-token cross-entropy + backward on a batch of full-context windows (the
optimizer step, identical for both, is left out), in bf16 autocast and in fp32. Generation is greedy from
32-token prompts, batch 1 and batch 8, prefill included; chatforge through its engine (`Engine.generate`, its
decode step compiled by torch.compile unless --eager; the first call's seconds, compilation included, are
reported as `gen_first_call_s_b*`), transformers through `model.generate`. MFU is tokens/s x FLOPs/token (ModelConfig.flops_per_token: 6 x
matmul parameters + 12·layers·width·context) over the fastest large-matmul rate measured here in that dtype.
The last line is the result as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from chatforge.infer.engine import Engine, SamplingParams  # noqa: E402
from chatforge.model.presets import preset  # noqa: E402
from chatforge.model.transformer import GPT  # noqa: E402
from chatforge.tokenizer import train_tokenizer  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="babbage")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--context", type=int, default=256, help="training window = the model's context")
    p.add_argument("--batch-size", type=int, default=8, help="training windows per step")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64, help="generated per row")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (median reported)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--compile", action="store_true", help="also time chatforge training under torch.compile")
    p.add_argument("--eager", action="store_true", help="generate without compiling the engine's decode step")
    p.add_argument("--only", choices=("generation", "training"), help="run one half of the benchmark")
    p.add_argument("--cpu-time", action="store_true",
                   help="time by this process's CPU seconds instead of wall seconds (with --threads 1): on a "
                        "machine shared with other jobs, their load does not count against either model")
    args = p.parse_args()
    if args.cpu_time and args.threads != 1:
        p.error("--cpu-time needs --threads 1 (with more threads, CPU seconds add up across threads)")
    return args


def build(args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = preset(args.preset, args.vocab_size, args.context)
    torch.manual_seed(0)
    ours = GPT(cfg)
    with torch.no_grad():  # wider than the init so that greedy decoding has no near-ties to break differently
        for name, p in ours.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    theirs = LlamaForCausalLM(LlamaConfig(**cfg.to_hf(), attn_implementation="sdpa"))
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    if unexpected or any("rotary" not in k for k in missing):
        raise SystemExit(f"weights do not map by name: missing {missing}, unexpected {unexpected}")
    return cfg, ours, theirs


def matmul_peak(dtype: torch.dtype, reps: int, clock: Callable[[], float]) -> float:
    """The fastest FLOP/s of large square matmuls in `dtype`: the ceiling MFU is measured against."""
    best = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        for _ in range(reps):
            t = clock()
            a @ b
            best = max(best, 2 * n ** 3 / (clock() - t))
    return best


def timed_alternately(fns: dict[str, Callable[[], object]], reps: int, clock: Callable[[], float],
                      warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function; the functions take turns so load noise hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = clock()
            fn()
            times[name].append(clock() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def train_step(model: torch.nn.Module, ids: torch.Tensor, bf16: bool, hf: bool) -> Callable[[], None]:
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(inputs).logits if hf else model(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
    return step


def check_logits(ours: GPT, theirs, ids: torch.Tensor) -> float:
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    if diff > 1e-3:
        raise SystemExit(f"logits differ by {diff:.2e}: the models are not the same")
    return diff


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    cfg, ours, theirs = build(args)
    fpt = cfg.flops_per_token(args.context)
    print(f"{args.preset}: {cfg.num_params() / 1e6:.2f}M parameters, context {args.context}, vocabulary "
          f"{args.vocab_size}, {cfg.num_hidden_layers} layers x {cfg.hidden_size}, heads "
          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads}; {fpt / 1e6:.1f} MFLOPs/token; torch "
          f"{torch.__version__}, {args.threads} threads, timed in {'CPU' if args.cpu_time else 'wall'} seconds",
          flush=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.context + 1), generator=g)
    print(f"logits equal (max difference {check_logits(ours.eval(), theirs.eval(), ids[:2, :64]):.1e})", flush=True)

    results: dict[str, float] = {}
    rows = []
    if args.only != "training":
        generation(args, ours, theirs, g, clock, results, rows)
    if args.only != "generation":
        training(args, cfg, ours, theirs, ids, clock, results, rows)
    print(f"\n{'':28s} {'chatforge':>12s} {'transformers':>13s} {'ratio':>7s} {'MFU':>6s} {'HF MFU':>7s}")
    for name, a, b, mfu, hf_mfu in rows:
        extra = f" {mfu:6.1%} {hf_mfu:7.1%}" if mfu is not None else ""
        print(f"{name:28s} {a:8.0f} tok/s {b:7.0f} tok/s {a / b:6.2f}x{extra}")
    results.update(threads=args.threads, clock="cpu" if args.cpu_time else "wall", compiled_generation=not args.eager,
                   preset=args.preset, params=cfg.num_params(), context=args.context)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in results.items()}))


def generation(args, ours: GPT, theirs, g: torch.Generator, clock: Callable[[], float], results: dict,
               rows: list) -> None:
    """Identical greedy tokens first, then speed."""
    engine = Engine(ours, train_tokenizer(["bench"], 300), compile=not args.eager)
    for batch in (1, 8):
        prompts = torch.randint(0, args.vocab_size, (batch, args.prompt_tokens), generator=g)
        params = SamplingParams(max_new_tokens=args.new_tokens, stop_ids=[])

        def ours_gen() -> list[list[int]]:
            return [x.ids for x in engine.generate(prompts.tolist(), params)]

        def theirs_gen() -> list[list[int]]:
            with torch.no_grad():
                out = theirs.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                      max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)
            return out[:, args.prompt_tokens:].tolist()

        start = time.perf_counter()
        first = ours_gen()
        results[f"gen_first_call_s_b{batch}"] = time.perf_counter() - start
        print(f"batch {batch}: first generation {results[f'gen_first_call_s_b{batch}']:.1f} s (wall, compilation "
              f"included)", flush=True)
        if first != theirs_gen():
            raise SystemExit(f"greedy generations differ at batch {batch}")
        t = timed_alternately({"chatforge": ours_gen, "transformers": theirs_gen}, args.reps, clock)
        tokens = batch * args.new_tokens
        results[f"gen_tok_s_b{batch}"] = tokens / t["chatforge"]
        results[f"hf_gen_tok_s_b{batch}"] = tokens / t["transformers"]
        results[f"gen_speedup_b{batch}"] = t["transformers"] / t["chatforge"]
        rows.append((f"generation, batch {batch}", tokens / t["chatforge"], tokens / t["transformers"], None, None))
        print(f"greedy generations identical at batch {batch}; timed", flush=True)


def training(args, cfg, ours: GPT, theirs, ids: torch.Tensor, clock: Callable[[], float], results: dict,
             rows: list) -> None:
    fpt = cfg.flops_per_token(args.context)
    ours.train()
    theirs.train()
    peaks = {"bf16": matmul_peak(torch.bfloat16, max(args.reps, 10), clock),
             "fp32": matmul_peak(torch.float32, max(args.reps, 10), clock)}
    print(f"matmul peak: bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s, fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s", flush=True)
    tokens = args.batch_size * args.context
    compiled = torch.compile(ours) if args.compile else None
    for dtype in ("bf16", "fp32"):
        bf16 = dtype == "bf16"
        fns = {"chatforge": train_step(ours, ids, bf16, hf=False), "transformers": train_step(theirs, ids, bf16, hf=True)}
        if compiled is not None:
            fns["compiled"] = train_step(compiled, ids, bf16, hf=False)
        t = timed_alternately(fns, args.reps, clock)
        ours_tps, theirs_tps = tokens / t["chatforge"], tokens / t["transformers"]
        mfu, hf_mfu = ours_tps * fpt / peaks[dtype], theirs_tps * fpt / peaks[dtype]
        results[f"train_tok_s_{dtype}"], results[f"hf_train_tok_s_{dtype}"] = ours_tps, theirs_tps
        results[f"train_speedup_{dtype}"] = t["transformers"] / t["chatforge"]
        results[f"mfu_{dtype}"], results[f"hf_mfu_{dtype}"] = mfu, hf_mfu
        rows.append((f"training, {'bf16 autocast' if bf16 else 'fp32'}", ours_tps, theirs_tps, mfu, hf_mfu))
        if compiled is not None:
            results[f"compiled_train_tok_s_{dtype}"] = tokens / t["compiled"]
            results[f"compiled_train_speedup_{dtype}"] = t["transformers"] / t["compiled"]
            results[f"compiled_mfu_{dtype}"] = tokens / t["compiled"] * fpt / peaks[dtype]
            rows.append((f"training, {dtype}, torch.compile", tokens / t["compiled"], theirs_tps,
                         results[f"compiled_mfu_{dtype}"], hf_mfu))
    results.update(peak_bf16_gflops=peaks["bf16"] / 1e9, peak_fp32_gflops=peaks["fp32"] / 1e9)


if __name__ == "__main__":
    main()
