"""`chatforge eval`: measure a checkpoint.

    chatforge eval fewshot CKPT --task FILE --k 0,1,3,8     in-context learning: accuracy with k examples shown
    chatforge eval perplexity CKPT FILE                      perplexity of a text file
    chatforge eval gold CKPT [--baseline CKPT] --world DIR   the tiny world's gold labeler on greedy answers

Every generation goes through the engine (chatforge.infer.engine).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

from chatforge import ChatforgeError
from chatforge.checkpoint import atomic_write_text, read_meta, resolve
from chatforge.data.chat import fit_messages, read_conversations
from chatforge.data.jsonl import write_jsonl
from chatforge.tokenizer import Message, Tokenizer


def _engine(checkpoint: str, device: str | None):
    from chatforge.infer.engine import Engine
    return Engine.load(checkpoint, device=device) if device else Engine.load(checkpoint)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- fewshot

def fewshot_cli(args: argparse.Namespace) -> None:
    from chatforge.eval.fewshot import evaluate_fewshot, read_task
    try:
        ks = sorted({int(k) for k in args.k.split(",") if k.strip()})
    except ValueError:
        raise ChatforgeError(f"--k: expected comma-separated integers, got {args.k!r}") from None
    if not ks or ks[0] < 0:
        raise ChatforgeError(f"--k: expected numbers >= 0, got {args.k!r}")
    items = read_task(args.task)
    pool = read_task(args.examples) if args.examples else None
    if args.limit:
        items = random.Random(args.seed).sample(items, min(args.limit, len(items)))
    kind = read_meta(args.checkpoint)["kind"]
    fmt = args.format if args.format != "auto" else ("plain" if kind == "base" else "chat")
    engine = _engine(args.checkpoint, args.device)
    start = time.perf_counter()
    result = evaluate_fewshot(engine, items, ks, fmt=fmt, pool=pool, seed=args.seed,
                              max_new_tokens=args.max_new_tokens)
    print(f"few-shot {args.task} on {args.checkpoint} ({kind}, {fmt} prompts, {len(items)} items, "
          f"{time.perf_counter() - start:.0f}s)")
    print(f"{'k':>3}  {'accuracy':>8}  {'correct':>7}  mentions the answer")
    for k in ks:
        r = result["k"][k]
        note = f"  ({r['fewer_examples']} prompts had fewer examples to fit the context)" if r["fewer_examples"] else ""
        print(f"{k:>3}  {100 * r['accuracy']:7.1f}%  {r['correct']:>7}  {100 * r['mentions_answer']:5.1f}%{note}")
    if args.out:
        _write_json(Path(args.out), {"checkpoint": args.checkpoint, "task": args.task, **result})
        print(f"predictions: {args.out}")


# ---------------------------------------------------------------- perplexity

def perplexity_cli(args: argparse.Namespace) -> None:
    from chatforge.checkpoint import load_model
    from chatforge.device import pick_device
    from chatforge.eval.perplexity import perplexity
    model, tokenizer, meta = load_model(args.checkpoint, device=pick_device(args.device))
    r = perplexity(model, tokenizer, args.file, context=args.context, stride=args.stride)
    print(f"{args.file}: perplexity {r.ppl:.3f} ({r.nll:.4f} nats, {r.bits_per_token:.4f} bits per token) "
          f"over {r.tokens:,} tokens, {args.checkpoint} ({meta['kind']})")


# ---------------------------------------------------------------- gold

def world_of(checkpoint: str | Path, world: str | None) -> Path:
    """The world to evaluate on: --world, else the one the checkpoint (or an ancestor) was trained with."""
    if world:
        return Path(world)
    path: Path | None = resolve(checkpoint)
    while path is not None and path.is_dir():
        meta = read_meta(path)
        found = (meta.get("config") or {}).get("world")
        if found:
            return Path(found)
        path = Path(meta["parent"]) if meta.get("parent") else None
    raise ChatforgeError(f"{checkpoint}: no --world given and its training config names none")


def demonstrations(world: Path, shots: int, seed: int) -> list[Message]:
    """`shots` demonstration conversations from the world's sft.jsonl, as one few-shot prefix."""
    if shots <= 0:
        return []
    convs = read_conversations(world / "sft.jsonl")
    picked = random.Random(seed).sample(convs, min(shots, len(convs)))
    return [m for c in picked for m in c.messages if m["role"] != "system"]


PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def plain_prompt_ids(tokenizer: Tokenizer, messages: list[Message], budget: int) -> list[int]:
    """A conversation as plain "User: ... / Assistant: ..." text, the way a base model has seen dialogue;
    the oldest turns are dropped to fit `budget` tokens."""
    for start in range(len(messages)):
        text = "".join(f"{PLAIN_ROLES[m['role']]}: {m['content']}\n" + ("\n" if m["role"] == "assistant" else "")
                       for m in messages[start:]) + "Assistant:"
        ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(text)
        if len(ids) <= budget:
            return ids
    raise ChatforgeError(f"the last turn alone needs more than the {budget} tokens the context leaves")


def plain_answer(text: str) -> str:
    """A plain-format answer ends where the text starts the next turn."""
    for marker in ("\nUser:", "\nAssistant:", "\n\n"):
        text = text.split(marker, 1)[0]
    return text


def answer_split(model_or_engine, tokenizer: Tokenizer | None, world: str | Path, split: str, limit: int = 0,
                 samples: int = 1, temperature: float = 0.0, shots: int = 0, seed: int = 0,
                 max_new_tokens: int = 96, prompt_format: str = "chat") -> tuple[list[dict], dict]:
    """Answer the world's `split` through the engine and score the answers with the gold labeler.

    Returns (rows, summary): one row per answer, and `chatforge.eval.gold.evaluate`'s summary (with
    `samples` answers per prompt, its rates count every answer). `prompt_format` "plain" writes the
    conversation as User:/Assistant: text instead of the chat template (for base models).
    """
    from chatforge.data.world.labeler import GoldLabeler
    from chatforge.eval.gold import evaluate, load_eval
    from chatforge.infer.engine import Engine, SamplingParams
    engine = model_or_engine if isinstance(model_or_engine, Engine) else Engine(model_or_engine, tokenizer)
    tokenizer = engine.tokenizer
    records = load_eval(world, split)
    if limit:
        records = records[:limit]
    prefix = demonstrations(Path(world), shots, seed)
    context = engine.model.config.max_position_embeddings - getattr(engine.model, "num_virtual_tokens", 0)
    max_new_tokens = min(max_new_tokens, context // 2)  # a small context still leaves room for the prompt
    if prompt_format == "plain":
        prompts = [plain_prompt_ids(tokenizer, prefix + r["messages"], context - max_new_tokens) for r in records]
    else:
        prompts = [fit_messages(tokenizer, prefix + r["messages"], context - max_new_tokens, for_generation=True).ids
                   for r in records]
    stops = list(tokenizer.stop_ids)
    if prompt_format == "plain" and tokenizer.bos_id is not None:
        stops.append(tokenizer.bos_id)  # a base model ends a document by starting the next one
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop_ids=stops, seed=seed)
    generations = engine.generate(prompts, params, num_samples=samples)
    clean = plain_answer if prompt_format == "plain" else (lambda t: t)
    answers = [[clean(g.text).strip() for g in generations[i * samples:(i + 1) * samples]] for i in range(len(records))]
    summary = evaluate(records, answers, GoldLabeler())
    rows = [{"id": r.get("id"), "sample": s, "category": r.get("category"), "messages": r["messages"], "answer": a,
             "reference": r.get("reference"), "score": score, "refused": refused}
            for r, outs, scored in zip(records, answers, summary["rows"])
            for s, (a, score, refused) in enumerate(zip(outs, scored["scores"], scored["refused"]))]
    return rows, summary


def gold_cli(args: argparse.Namespace) -> None:
    world = world_of(args.checkpoint, args.world)
    out = Path(args.out) if args.out else resolve(args.checkpoint) / "eval" / f"gold-{args.split}"
    results = {}
    for name, ckpt in (("model", args.checkpoint), ("baseline", args.baseline)):
        if not ckpt:
            continue
        start = time.perf_counter()
        fmt = args.format if args.format != "auto" else ("plain" if read_meta(ckpt)["kind"] == "base" else "chat")
        engine = _engine(ckpt, args.device)
        rows, summary = answer_split(engine, None, world, args.split, limit=args.limit, samples=args.samples,
                                     temperature=args.temperature, shots=args.shots, seed=args.seed,
                                     max_new_tokens=args.max_new_tokens, prompt_format=fmt)
        summary = {"checkpoint": str(ckpt), "split": args.split, "world": str(world), "format": fmt, "shots": args.shots,
                   "samples": args.samples, "temperature": args.temperature,
                   "seconds": round(time.perf_counter() - start, 1), **summary}
        write_jsonl(out / f"{name}_answers.jsonl", rows)
        results[name] = summary
        _print_summary(name, summary)
    if args.baseline:
        from chatforge.eval.gold import compare
        results["comparison"] = compare(results["model"], results["baseline"])
        c = results["comparison"]
        print(f"model vs baseline on {c['prompts']} prompts: " + ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items() if k != "prompts"))
    _write_json(out / "summary.json", {k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in results.items()})
    print(f"answers and summary: {out}")


def _print_summary(name: str, summary: dict) -> None:
    score = summary["mean_score"]
    print(f"{name} {summary['checkpoint']}: {summary['prompts']} prompts x {summary['samples']} "
          f"({summary['seconds']:.0f}s), mean gold score {score['mean']:.3f} "
          f"[{score['ci_low']:.3f}, {score['ci_high']:.3f}]")
    for metric, value in summary["metrics"].items():
        print(f"  {metric:<26} {'-' if value is None else f'{100 * value:5.1f}%'}")


# ---------------------------------------------------------------- the command group

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="measure a checkpoint: few-shot, perplexity, gold", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    esub = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")

    f = esub.add_parser("fewshot", help="accuracy on a question/answer task with k examples in the prompt")
    f.add_argument("checkpoint")
    f.add_argument("--task", required=True, help="JSONL of {question, answer} or {question, choices, answer}")
    f.add_argument("--k", default="0,1,3,8", help="numbers of examples shown (default: 0,1,3,8)")
    f.add_argument("--format", choices=("auto", "plain", "chat"), default="auto",
                   help="plain Q:/A: text or chat turns; auto: plain for base models, chat otherwise")
    f.add_argument("--examples", help="draw the examples from this task file instead of the other items")
    f.add_argument("--limit", type=int, default=0, help="evaluate a seeded sample of this many items")
    f.add_argument("--max-new-tokens", type=int, default=24)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", help="write accuracies and predictions to this JSON file")
    f.add_argument("--device")
    f.set_defaults(func=fewshot_cli)

    q = esub.add_parser("perplexity", help="perplexity of a text file (.txt, .jsonl with text)")
    q.add_argument("checkpoint")
    q.add_argument("file")
    q.add_argument("--context", type=int, default=None, help="window length (default: the model's context)")
    q.add_argument("--stride", type=int, default=None, help="window step (default: half the window)")
    q.add_argument("--device")
    q.set_defaults(func=perplexity_cli)

    g = esub.add_parser("gold", help="the tiny world's gold labeler on the model's answers to an eval split")
    g.add_argument("checkpoint")
    g.add_argument("--baseline", help="a second checkpoint answered and compared (win rate)")
    g.add_argument("--split", choices=("dev", "test"), default="test")
    g.add_argument("--world", help="the world directory (default: the one the checkpoint was trained with)")
    g.add_argument("--samples", type=int, default=1, help="answers per prompt (with --temperature)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--shots", type=int, default=0, help="demonstration conversations put before each prompt "
                                                         "(few-shot prompting, e.g. for a base model)")
    g.add_argument("--format", choices=("auto", "plain", "chat"), default="auto",
                   help="chat template, or plain User:/Assistant: text; auto: plain for base models")
    g.add_argument("--limit", type=int, default=0, help="only the first N prompts")
    g.add_argument("--max-new-tokens", type=int, default=96)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", help="directory for answers JSONL and summary.json (default: CKPT/eval/gold-SPLIT)")
    g.add_argument("--device")
    g.set_defaults(func=gold_cli)

    from chatforge.eval.elo import register_elo  # the reward-model engineer's command (issue 5)
    register_elo(esub)
