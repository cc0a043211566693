"""`chatforge generate`: complete one prompt (streamed to the terminal) or a JSONL file of prompts (batched).

    chatforge generate CKPT --prompt "Once upon a time"
    chatforge generate CKPT --input in.jsonl --output out.jsonl

An input line is {"prompt": "..."} (plain continuation from the beginning-of-text token) or
{"messages": [...]} (the next assistant turn, through the checkpoint's chat template). Each output line is
the input object plus "completion". The output file appears whole or not at all.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from chatforge import ChatforgeError
from chatforge.data.jsonl import read_jsonl, write_jsonl
from chatforge.tokenizer import Tokenizer, validate_messages


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete a prompt, or a JSONL file of prompts, with a checkpoint")
    p.add_argument("checkpoint", help="checkpoint directory (base, sft, policy or adapter)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="text to continue; the completion is printed as it is generated")
    source.add_argument("--input", help='JSONL file: one {"prompt": ...} or {"messages": [...]} per line')
    p.add_argument("--output", help="JSONL file to write (each input line plus \"completion\"); needed with --input")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating tokens")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts generated together in batch mode")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> None:
    from chatforge.infer.engine import Engine, SamplingParams
    if args.input and not args.output:
        raise ChatforgeError("--input needs --output (the JSONL file to write)")
    if args.batch_size < 1:
        raise ChatforgeError(f"--batch-size must be >= 1, got {args.batch_size}")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    params.validate()
    records = read_requests(Path(args.input)) if args.input else None
    engine = Engine.load(args.checkpoint, device=args.device)
    if records is None:
        _complete_one(engine, args.prompt, params)
    else:
        _complete_file(engine, records, Path(args.input), Path(args.output), params, args.batch_size)


def read_requests(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line; the first bad line raises, naming file:line."""
    records = []
    for number, record in read_jsonl(path, "input file"):
        where = f"{path}:{number}"
        if ("prompt" in record) == ("messages" in record):
            raise ChatforgeError(f"{where}: needs exactly one of \"prompt\" (text) or \"messages\" (a conversation)")
        if "prompt" in record and not isinstance(record["prompt"], str):
            raise ChatforgeError(f"{where}: \"prompt\" must be a string, got {type(record['prompt']).__name__}")
        if "messages" in record:
            validate_messages(record["messages"], where=f"{where}: messages")
        records.append((number, record))
    if not records:
        raise ChatforgeError(f"{path}: no requests (the file is empty)")
    return records


def prompt_ids(tokenizer: Tokenizer, record: dict[str, Any]) -> list[int]:
    """Chat records go through the chat template; plain prompts continue from the beginning-of-text token."""
    if "messages" in record:
        return tokenizer.prompt(record["messages"])
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return bos + tokenizer.encode(record["prompt"])


def _check_fits(ids: list[int], context: int, where: str) -> None:
    if not ids:
        raise ChatforgeError(f"{where}: the prompt is empty (this tokenizer has no beginning-of-text token)")
    if len(ids) >= context:
        raise ChatforgeError(f"{where}: the prompt is {len(ids)} tokens; the model's context is {context} tokens "
                             f"(max_position_embeddings), so it must be at most {context - 1}")


def _complete_one(engine, text: str, params) -> None:
    tokenizer = engine.tokenizer
    ids = prompt_ids(tokenizer, {"prompt": text})
    _check_fits(ids, engine.config.max_position_embeddings, "--prompt")
    stops = set(tokenizer.stop_ids if params.stop_ids is None else params.stop_ids)
    generated: list[int] = []
    shown = ""
    for step in engine.stream([ids], params):
        generated += [token for _, token in step if token not in stops]
        now = tokenizer.decode(generated)
        if not now.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(now[len(shown):])
            sys.stdout.flush()
            shown = now
    sys.stdout.write(tokenizer.decode(generated)[len(shown):] + "\n")
    sys.stdout.flush()


def _complete_file(engine, records: list[tuple[int, dict[str, Any]]], path: Path, out: Path, params,
                   batch_size: int) -> None:
    context = engine.config.max_position_embeddings
    prompts = []
    for number, record in records:
        ids = prompt_ids(engine.tokenizer, record)
        _check_fits(ids, context, f"{path}:{number}")
        prompts.append(ids)
    mode = "greedy" if params.temperature == 0 else f"temperature {params.temperature:g}"
    print(f"generate: {len(prompts)} prompts from {path}, batches of {batch_size}, {mode}, "
          f"up to {params.max_new_tokens} new tokens, on {engine.device}", file=sys.stderr)
    # Similar lengths share a batch, so little compute goes to padding; the output keeps the input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    completions: list[str] = [""] * len(prompts)
    tokens, start = 0, time.perf_counter()
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        for i, gen in zip(batch, engine.generate([prompts[i] for i in batch], params)):
            completions[i] = gen.text
            tokens += len(gen.ids)
        print(f"  {min(first + batch_size, len(order))}/{len(order)} prompts", file=sys.stderr)
    seconds = time.perf_counter() - start
    write_jsonl(out, [{**record, "completion": completion} for (_, record), completion in zip(records, completions)])
    print(f"wrote {len(records)} completions to {out} ({tokens} tokens in {seconds:.1f} s, "
          f"{tokens / max(seconds, 1e-9):.0f} tokens/s)")
