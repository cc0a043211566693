"""`chatforge pretrain`: a GPT learns to predict the next token of raw text.

corpus -> tokenizer (given, or trained on the corpus) -> token shards (cached) -> random windows -> the loop.
The stage defines only its batches, its loss, its evaluation and what it saves; `train.loop` does the rest.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge import ChatforgeError
from chatforge.checkpoint import is_complete
from chatforge.config import add_config_args, config_from_args, to_dict
from chatforge.data.corpus import corpus_files
from chatforge.data.tokens import (TokenData, WindowSampler, corpus_hash, eval_batches, tokenize_corpus,
                                   tokenizer_hash)
from chatforge.model.presets import PRESETS, preset
from chatforge.model.transformer import GPT, ModelConfig
from chatforge.tokenizer import Tokenizer, train_tokenizer
from chatforge.train.distributed import Dist, setup, teardown
from chatforge.train.loop import TrainConfig, checkpoint_saver, resume_fingerprint, train


@dataclass
class PretrainConfig(TrainConfig):
    data: list[str] = field(default_factory=list)  # text/JSONL files or directories
    tokenizer: str | None = None   # a directory with tokenizer.json; default: train one on the corpus
    vocab_size: int = 4096         # of the tokenizer trained when none is given
    preset: str = "ada"
    context: int = 256
    val_fraction: float = 0.01     # share of documents held out for validation
    cache: str | None = None       # token shards; default: token-cache/ beside the output directory

    def validate(self) -> None:
        super().validate()
        if not self.data:
            raise ChatforgeError("data: no corpus given (--data PATH...)")
        if self.preset not in PRESETS:
            raise ChatforgeError(f"preset: unknown model preset {self.preset!r} (known: {', '.join(PRESETS)})")
        if self.context < 2:
            raise ChatforgeError(f"context: must be at least 2, got {self.context}")
        if not 0 <= self.val_fraction < 1:
            raise ChatforgeError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")


def next_token_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    inputs, targets = batch
    logits = model(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return loss, {"tokens": targets.numel()}


def validation_loss(batches: list[tuple[torch.Tensor, torch.Tensor]]):
    """An eval_fn: mean next-token loss and perplexity over fixed held-out windows."""
    def evaluate(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for inputs, targets in batches:
            logits = model(inputs.to(device))
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), targets.to(device).flatten(), reduction="sum"))
            count += targets.numel()
        loss = total / count
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    return evaluate


def pretrain(cfg: PretrainConfig, out: str | Path, resume: bool = False) -> dict[str, Any]:
    """Pretrain a model of `cfg.preset` on `cfg.data`, writing the base checkpoint `out`; returns the summary."""
    out = Path(out)
    dist = setup(cfg.device)
    cache = Path(cfg.cache) if cfg.cache else out.parent / "token-cache"
    with dist.main_first():  # rank 0 trains the tokenizer and tokenizes; the others then read its cache
        tokenizer = _tokenizer(cfg, out, resume, cache)
        data = tokenize_corpus(cfg.data, tokenizer, cache, cfg.val_fraction, progress=dist.is_main)

    model_cfg = preset(cfg.preset, tokenizer.vocab_size, cfg.context, bos_token_id=tokenizer.bos_id,
                       eos_token_id=tokenizer.stop_ids[0] if tokenizer.stop_ids else None,
                       pad_token_id=tokenizer.pad_id)
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg)
    batches = WindowSampler(data.train, cfg.context, cfg.batch_size, cfg.grad_accum, cfg.seed,
                            dist.rank, dist.world_size)
    # eval_batches x batch_size held-out windows, the same however the run is split, read `rows` at a time
    held_out = (eval_batches(data.val, cfg.context, batches.rows, cfg.eval_batches * cfg.batch_size)
                if data.val else [])
    _say_plan(dist, cfg, model_cfg, data)

    meta = {"kind": "base", "stage": "pretrain", "parent": None, "parent_hash": None,
            "config": {**to_dict(cfg), "data_key": data.index["key"]}}
    fingerprint = resume_fingerprint(cfg, drop=("data", "cache", "vocab_size"), tokenizer=tokenizer_hash(tokenizer),
                                     corpus=corpus_hash(cfg.data), model=model_cfg.to_hf())
    summary = train(model, model.parameters(), next_token_loss, batches, out, cfg,
                    save_fn=checkpoint_saver(tokenizer, meta),
                    eval_fn=validation_loss(held_out) if held_out else None,
                    resume=resume, fingerprint=fingerprint,
                    flops_per_token=model_cfg.flops_per_token(cfg.context), desc="pretrain")
    if dist.is_main:
        _say_result(summary, cfg, out)
    return summary


def _tokenizer(cfg: PretrainConfig, out: Path, resume: bool, cache: Path) -> Tokenizer:
    """The given tokenizer; on --resume the checkpoint's; else one trained on the corpus (cached by content)."""
    if cfg.tokenizer:
        return Tokenizer.load(cfg.tokenizer)
    if resume and is_complete(out):
        return Tokenizer.load(out)
    trained = cache / f"tokenizer-{corpus_hash(cfg.data)}-{cfg.vocab_size}"
    if (trained / "tokenizer.json").is_file():
        return Tokenizer.load(trained)
    from chatforge.data.corpus import iter_corpus
    print(f"training a {cfg.vocab_size}-token BPE tokenizer on the corpus", file=sys.stderr, flush=True)
    tokenizer = train_tokenizer(iter_corpus(cfg.data), cfg.vocab_size)
    tokenizer.save(trained)
    return tokenizer


def _say_plan(dist: Dist, cfg: PretrainConfig, model_cfg: ModelConfig, data: TokenData) -> None:
    if not dist.is_main:
        return
    params = model_cfg.num_params()
    embedding = model_cfg.vocab_size * model_cfg.hidden_size
    index = data.index
    tokens_per_step = cfg.batch_size * cfg.context
    files = len(corpus_files(cfg.data))
    print(f"model: {cfg.preset}, {params / 1e6:.2f}M parameters ({(params - embedding) / 1e6:.2f}M without the "
          f"embedding), {model_cfg.num_hidden_layers} layers x {model_cfg.hidden_size}, context {cfg.context}, "
          f"vocabulary {model_cfg.vocab_size}", file=sys.stderr)
    print(f"data: {index['train_tokens']:,} training and {index['val_tokens']:,} validation tokens from {files} "
          f"file(s), {index['bytes'] / 1e6:.1f} MB (shards in {data.root})", file=sys.stderr)
    print(f"plan: {cfg.steps} steps x {tokens_per_step:,} tokens = {cfg.steps * tokens_per_step / 1e6:.1f}M tokens "
          f"({cfg.steps * tokens_per_step / max(index['train_tokens'], 1):.1f} passes over the training split)",
          file=sys.stderr, flush=True)


def command_line(cfg: PretrainConfig, out: Path) -> str:
    """The `chatforge pretrain` command that reproduces this run: its output and every non-default setting."""
    defaults = to_dict(PretrainConfig())
    words = ["chatforge pretrain --data", *map(shlex.quote, cfg.data), "--out", shlex.quote(str(out))]
    for key, value in to_dict(cfg).items():
        if key != "data" and value != defaults[key]:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            words += [f"--{key.replace('_', '-')}", shlex.quote(text)]
    return " ".join(words)


def _say_result(summary: dict[str, Any], cfg: PretrainConfig, out: Path) -> None:
    parts = [f"train loss {summary['train_loss']:.4f}"] if "train_loss" in summary else []
    if "val_loss" in summary:
        parts.append(f"validation loss {summary['val_loss']:.4f} (perplexity {summary['val_ppl']:.2f})")
    if summary.get("tokens_per_s"):
        parts.append(f"{summary['tokens_per_s']:,.0f} tokens/s")
    print(f"wrote {summary['checkpoint']} (step {summary['step']}): {', '.join(parts)}")
    print(f"reproduce: {command_line(cfg, out)}")
    print(f"try it: chatforge generate {shlex.quote(summary['checkpoint'])} --prompt \"Once upon a time\"")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain a GPT on raw text (next-token prediction)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, PretrainConfig, skip=("data",))
    p.add_argument("--data", nargs="+", dest="cfg_data", metavar="PATH", help="text/JSONL files or directories")
    p.add_argument("--out", required=True, help="the checkpoint directory to write")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> None:
    cfg = config_from_args(PretrainConfig, args, section="pretrain")
    try:
        pretrain(cfg, args.out, resume=args.resume)
    finally:
        teardown()
