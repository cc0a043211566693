"""Supervised fine-tuning: a pretrained model learns to answer from demonstration conversations.

    chatforge sft --base runs/x/base --world world/ --method full|lora|ptuning --out runs/x/sft

The batches are conversations rendered by the chat template, the loss is next-token cross-entropy on the
assistant tokens only (mean over those tokens), and everything else is the shared loop (train/loop.py):
optimizer, schedule, accumulation, clipping, autocast, logging, checkpoint/resume, DDP. A held-out split is
evaluated once an epoch; the best step by validation loss (or, with --select gold, by the gold labeler's
score on the world's dev split) becomes the output, the last step stays in state/ for --resume.
The output is a full checkpoint (kind "sft"), or for LoRA/P-tuning the adapter alone (kind "adapter",
loadable wherever a checkpoint is: chatforge.checkpoint.load_model applies it to its base).
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge import ChatforgeError
from chatforge.checkpoint import file_hash, load_model, read_meta, resolve
from chatforge.config import add_config_args, config_from_args
from chatforge.data.chat import (IGNORE, Example, bucket_batches, collate, encode_conversations, read_conversations)
from chatforge.model.adapters import (PROJECTIONS, LoRAConfig, PromptTunedGPT, PTuningConfig, adapter_state,
                                      attach_lora, attach_ptuning, chat_token_ids, save_adapter_checkpoint,
                                      train_token_rows, trainable_parameters, weights_hash)
from chatforge.tokenizer import Tokenizer
from chatforge.train.loop import TrainConfig, checkpoint_saver, resume_fingerprint, train

METHODS = ("full", "lora", "ptuning")
DEFAULT_LR = {"full": 3e-4, "lora": 2e-3, "ptuning": 1e-2}


@dataclass
class SFTConfig:
    base: str = ""                   # the checkpoint to fine-tune (pretrained, or an earlier SFT)
    data: list[str] = field(default_factory=list)  # conversation JSONL (messages or Alpaca); default: WORLD/sft.jsonl
    world: str = ""                  # a tiny-world directory: its sft.jsonl, and eval/dev.jsonl for --select gold
    out: str = "runs/default/sft"
    method: str = "full"             # full | lora | ptuning
    val_data: str = ""               # held-out conversations; default: val_fraction of the data
    val_fraction: float = 0.05
    context: int = 0                 # tokens per conversation; 0 = the model's context window
    # LoRA
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(PROJECTIONS))
    # P-tuning
    ptuning_tokens: int = 20
    ptuning_encoder: str = "mlp"     # mlp | lstm
    ptuning_hidden: int = 256
    train_chat_tokens: bool = True   # LoRA/P-tuning also learn the chat tokens' embedding rows (new to a base)
    # training (the shared loop's settings)
    epochs: float = 3.0              # used when steps is 0
    steps: int = 0
    batch_size: int = 32             # conversations per optimizer step
    grad_accum: int = 1
    lr: float = 0.0                  # 0 = the method's default: full 3e-4, lora 2e-3, ptuning 1e-2
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 0              # steps between validations; 0 = once per epoch
    save_every: int = 0              # steps between resume checkpoints; 0 = at every validation
    select: str = "val_loss"         # the output is the best step by: val_loss | gold (dev split score)
    gold_limit: int = 200            # dev items answered per gold validation
    seed: int = 0
    device: str | None = None
    dtype: str = "auto"              # auto | bf16 | fp32
    threads: int = 0                 # torch CPU threads; 0 = torch's default
    resume: bool = False

    def validate(self) -> None:
        checks = [
            (self.method in METHODS, f"method: expected one of {', '.join(METHODS)}, got {self.method!r}"),
            (self.select in ("val_loss", "gold"), f"select: expected val_loss or gold, got {self.select!r}"),
            (0 <= self.val_fraction < 1, f"val_fraction: must be in [0, 1), got {self.val_fraction}"),
            (self.epochs > 0 or self.steps > 0, "set epochs or steps to a positive number"),
            (self.context >= 0 and self.lr >= 0, "context and lr must not be negative"),
            (not (self.select == "gold" and not self.world), "select = gold needs --world (its eval/dev.jsonl)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ChatforgeError(message)
        self.lora().validate()
        self.ptuning().validate()

    def lora(self) -> LoRAConfig:
        return LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, list(self.lora_targets))

    def ptuning(self) -> PTuningConfig:
        return PTuningConfig(self.ptuning_tokens, self.ptuning_encoder, self.ptuning_hidden)

    def learning_rate(self) -> float:
        return self.lr or DEFAULT_LR[self.method]


# ---------------------------------------------------------------- model and data

def prepare_model(model: nn.Module, cfg: SFTConfig, tokenizer: Tokenizer) -> nn.Module:
    """The model with what this method trains made trainable (and everything else frozen)."""
    if cfg.method == "full":
        return model.requires_grad_(True)
    model = attach_lora(model, cfg.lora()) if cfg.method == "lora" else attach_ptuning(model, cfg.ptuning(), cfg.seed)
    if cfg.train_chat_tokens:
        model = train_token_rows(model, chat_token_ids(tokenizer))
    return model


def param_groups(model: nn.Module, cfg: SFTConfig) -> list[dict[str, Any]]:
    """Trainable parameters; an embedding trained only in some rows gets no weight decay (frozen rows stay)."""
    emb = model.model.embed_tokens.weight
    rest = [p for p in model.parameters() if p.requires_grad and p is not emb]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    if emb.requires_grad:
        groups.append({"params": [emb], "weight_decay": cfg.weight_decay if cfg.method == "full" else 0.0})
    return [g for g in groups if g["params"]]


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded held-out split; at least one example on each side when there are two or more."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(fraction * len(examples))), len(examples) - 1)
    held = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


class SFTBatches:
    """`batches(step, micro)` for the loop: length-bucketed micro-batches, a new order every epoch.

    Global micro-batch g = (step x grad_accum + micro) x world_size + rank walks through epoch g // per_epoch.
    """

    def __init__(self, examples: list[Example], rows: int, pad_id: int, seed: int, grad_accum: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.examples, self.rows, self.pad_id, self.seed = examples, rows, pad_id, seed
        self.grad_accum, self.rank, self.world_size = grad_accum, rank, world_size
        self.lengths = [len(e.ids) for e in examples]
        self.per_epoch = len(self._epoch(0))
        self._cache: dict[int, list[list[int]]] = {}

    def _epoch(self, epoch: int) -> list[list[int]]:
        return bucket_batches(self.lengths, self.rows, seed=self.seed * 1000 + epoch)

    def __call__(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        g = (step * self.grad_accum + micro) * self.world_size + self.rank
        epoch, i = divmod(g, self.per_epoch)
        if epoch not in self._cache:
            self._cache = {epoch: self._epoch(epoch)}
        return collate([self.examples[j] for j in self._cache[epoch][i]], self.pad_id)


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean cross-entropy over the assistant tokens of the micro-batch."""
    logits = model(batch["input_ids"])
    targets = batch["targets"]
    n = (targets != IGNORE).sum()
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum") / n.clamp(min=1)
    return loss, {"tokens": batch["input_ids"].numel(), "loss_tokens": n.float()}


def loss_tokens(batch: dict[str, torch.Tensor]) -> float:
    return float((batch["targets"] != IGNORE).sum())


@torch.no_grad()
def validation_loss(model: nn.Module, examples: list[Example], pad_id: int, rows: int = 32) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    for start in range(0, len(order), rows):
        batch = collate([examples[i] for i in order[start:start + rows]], pad_id)
        logits = model(batch["input_ids"].to(device)).float()
        targets = batch["targets"].to(device)
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum").item()
        count += int((targets != IGNORE).sum())
    return total / max(count, 1)


def gold_dev_score(model: nn.Module, tokenizer: Tokenizer, world: str | Path, limit: int) -> dict[str, float]:
    """The gold labeler's view of greedy answers to the world's dev split (used to select the best step)."""
    from chatforge.eval.cli import answer_split
    summary = answer_split(model, tokenizer, world, "dev", limit=limit)[1]
    return {"gold_score": summary["mean_score"]["mean"],
            **{f"gold_{k}": v for k, v in summary["metrics"].items() if v is not None}}


# ---------------------------------------------------------------- the stage

def run_sft(cfg: SFTConfig) -> Path:
    """`chatforge sft`: fine-tune `cfg.base` on conversations; returns the output checkpoint directory."""
    cfg.validate()
    if not cfg.base:
        raise ChatforgeError("--base is required: the checkpoint to fine-tune")
    data = [Path(p) for p in cfg.data] or ([Path(cfg.world) / "sft.jsonl"] if cfg.world else [])
    if not data:
        raise ChatforgeError("--data (conversation JSONL files) or --world (a tiny-world directory) is required")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base = resolve(cfg.base)
    base_meta = read_meta(base)
    if base_meta["kind"] in ("reward", "value"):
        raise ChatforgeError(f"{base}: is a {base_meta['kind']} checkpoint; SFT starts from a language model")
    torch.manual_seed(cfg.seed)
    model, tokenizer, _ = load_model(base)
    if cfg.method == "full" and isinstance(model, PromptTunedGPT):
        raise ChatforgeError(f"{base}: full fine-tuning of a P-tuned checkpoint is not supported; use its base")
    model = prepare_model(model, cfg, tokenizer)
    trainable, total = trainable_parameters(model)
    if cfg.method != "full":  # an embedding trained in a few rows counts those rows
        trainable = sum(t.numel() for t in adapter_state(model).values())
    virtual = cfg.ptuning_tokens if cfg.method == "ptuning" else 0
    context = min(cfg.context or model.config.max_position_embeddings, model.config.max_position_embeddings) - virtual

    conversations = [c for path in data for c in read_conversations(path)]
    examples, stats = encode_conversations(tokenizer, conversations, context)
    if cfg.val_data:
        val, val_stats = encode_conversations(tokenizer, read_conversations(cfg.val_data), context)
        stats.skipped += val_stats.skipped
        train_set = examples
    else:
        train_set, val = split_examples(examples, cfg.val_fraction, cfg.seed)
    if not train_set:
        raise ChatforgeError(f"{', '.join(map(str, data))}: no conversation fits the context window of {context} tokens")

    from chatforge.train.distributed import setup
    dist = setup(cfg.device)
    parts = cfg.grad_accum * dist.world_size
    if cfg.batch_size % parts:
        raise ChatforgeError(f"batch_size {cfg.batch_size} does not split into grad_accum {cfg.grad_accum} x "
                             f"{dist.world_size} rank(s)")
    batches = SFTBatches(train_set, cfg.batch_size // parts, tokenizer.pad_id, cfg.seed, cfg.grad_accum,
                         dist.rank, dist.world_size)
    steps_per_epoch = max(1, math.ceil(batches.per_epoch / parts))
    steps = cfg.steps or max(1, round(cfg.epochs * steps_per_epoch))
    eval_every = cfg.eval_every or min(steps_per_epoch, steps)
    tcfg = TrainConfig(steps=steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, lr=cfg.learning_rate(),
                       min_lr_ratio=cfg.min_lr_ratio, warmup_steps=min(cfg.warmup_steps, steps // 2),
                       weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                       eval_every=eval_every if val or cfg.select == "gold" else 0,
                       save_every=cfg.save_every or eval_every, log_every=max(1, min(10, steps // 20)),
                       seed=cfg.seed, device=cfg.device, dtype=cfg.dtype,
                       keep="best" if val or cfg.select == "gold" else "last",
                       best_metric="gold_score" if cfg.select == "gold" else "val_loss",
                       best_mode="max" if cfg.select == "gold" else "min")

    def evaluate(m: nn.Module) -> dict[str, float]:
        metrics = {"val_loss": validation_loss(m, val, tokenizer.pad_id)} if val else {}
        if cfg.select == "gold":
            metrics.update(gold_dev_score(m, tokenizer, cfg.world, cfg.gold_limit))
        return metrics

    meta = {"kind": "sft", "stage": "sft", "parent": str(base), "parent_hash": weights_hash(base),
            "method": cfg.method, "trainable_params": trainable, "total_params": total,
            "data": [str(p) for p in data], "config": asdict(cfg)}
    if cfg.method == "full":
        save_fn = checkpoint_saver(tokenizer, meta)
    else:
        def save_fn(out: Path, m: nn.Module, state: dict[str, Any], metrics: dict[str, Any]) -> None:
            save_adapter_checkpoint(out, m, tokenizer, base, {**meta, "acts_as": "sft", "metrics": metrics},
                                    state=state, metrics_from=out / "metrics.jsonl")

    fingerprint = resume_fingerprint(tcfg, method=cfg.method, base=weights_hash(base), lora=asdict(cfg.lora()),
                                     ptuning=asdict(cfg.ptuning()), chat_tokens=cfg.train_chat_tokens, context=context,
                                     select=cfg.select, data=[file_hash(p) for p in data],
                                     val_data=cfg.val_data and file_hash(cfg.val_data), val_fraction=cfg.val_fraction)
    if dist.is_main:
        where = f"{len(val)} held out" + (f" from {cfg.val_data}" if cfg.val_data else f" ({cfg.val_fraction:.0%})")
        print(f"sft: {cfg.method} fine-tuning of {base} ({total / 1e6:.2f}M params, {trainable:,} trained = "
              f"{100 * trainable / total:.2f}%)\n"
              f"sft: data {', '.join(map(str, data))}: {stats.summary()}; {len(train_set)} for training, {where}; "
              f"context {context} tokens\n"
              f"sft: {steps} steps ({steps / steps_per_epoch:.1f} epochs of {steps_per_epoch}), best step by "
              f"{tcfg.best_metric} -> {cfg.out}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    summary = train(model, param_groups(model, cfg), sft_loss, batches, cfg.out, tcfg,
                    save_fn=save_fn, eval_fn=evaluate if tcfg.keep == "best" else None, weight_fn=loss_tokens,
                    resume=cfg.resume, fingerprint=fingerprint, flops_per_token=model.config.flops_per_token(context),
                    desc=f"sft {cfg.method}")
    out = Path(summary["checkpoint"])
    if dist.is_main:
        best = summary.get("best") or {}
        chosen = f"best step {best.get('step')} ({best.get('metric')} {best.get('value'):.4f})" if best.get("step") else "last step"
        print(f"sft: wrote {out} ({'adapter alone, ' if cfg.method != 'full' else ''}{chosen}) in "
              f"{time.perf_counter() - start:.0f}s\n"
              f"sft: try it: chatforge chat {out}   |   chatforge eval gold {out}"
              + (f" --world {cfg.world}" if cfg.world else ""), file=sys.stderr, flush=True)
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning on conversations: full, LoRA or P-tuning")
    add_config_args(p, SFTConfig, skip=("resume",))
    p.add_argument("--resume", dest="cfg_resume", action="store_const", const=True, default=None,
                   help="continue the checkpoint in --out")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> None:
    run_sft(config_from_args(SFTConfig, args, section="sft"))
