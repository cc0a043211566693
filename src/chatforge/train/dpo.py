"""Direct preference optimisation (Rafailov et al. 2023): RLHF without a reward model or sampling.

On the same comparison files the reward model learns from (K-way rankings expanded to pairs), the policy
(initialised from SFT) is trained on

    loss = -log σ(β · [(log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))])

where π_ref is the frozen SFT model and log π(y|x) sums over the answer's tokens only (its end token
included). The reference log-probs never change, so they are computed once before training; the policy then
trains on the shared loop like any other stage. β·(log π - log π_ref) is the implicit reward: its margin
between chosen and rejected, and how often that margin is positive, are logged.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from chatforge import ChatforgeError
from chatforge.checkpoint import load_model, read_meta, resolve, save_model_checkpoint
from chatforge.config import add_config_args, config_from_args
from chatforge.device import pick_device
from chatforge.data.preferences import PreferencePair, read_comparisons, to_pairs
from chatforge.model.adapters import weights_hash
from chatforge.tokenizer import Tokenizer
from chatforge.train.loop import TrainConfig, resume_fingerprint, train
from chatforge.train.rl_math import token_logprobs


@dataclass
class DPOConfig:
    policy: str = ""                 # the SFT checkpoint: the policy starts from it and it is the reference
    data: list[str] = field(default_factory=list)  # comparison JSONL files (pairs or rankings)
    out: str = "runs/default/dpo"
    beta: float = 0.1
    val_fraction: float = 0.05       # held-out pairs (by prompt) for the validation margin and accuracy
    max_len: int = 0                 # tokens per prompt + answer; 0 = the model's context
    epochs: float = 1.0              # passes over the pairs (ignored when steps > 0)
    steps: int = 0
    batch_size: int = 16             # pairs per optimizer step
    grad_accum: int = 1
    lr: float = 5e-6
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 50
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    seed: int = 0
    device: str | None = None
    dtype: str = "auto"              # auto | bf16 | fp32
    resume: bool = False

    def validate(self) -> None:
        if self.beta <= 0:
            raise ChatforgeError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.val_fraction < 1:
            raise ChatforgeError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.batch_size < 1 or self.batch_size % self.grad_accum:
            raise ChatforgeError(f"batch_size {self.batch_size} must be a positive multiple of grad_accum {self.grad_accum}")


@dataclass
class EncodedPair:
    chosen: list[int]
    rejected: list[int]
    prompt_len: int                  # the answers start here in both sequences


def encode_pair(tokenizer: Tokenizer, pair: PreferencePair, max_len: int) -> EncodedPair | None:
    """Prompt + each answer as the chat template renders them; a long prompt loses its oldest tokens.

    Returns None when an answer alone does not fit (the pair is skipped and counted by the caller).
    """
    prompt = tokenizer.prompt(pair.messages)
    seqs = []
    for answer in (pair.chosen, pair.rejected):
        ids, _ = tokenizer.render(pair.messages + [{"role": "assistant", "content": answer}])
        if ids[:len(prompt)] != prompt:
            raise ChatforgeError(f"{pair.where}: the chat template does not render the answer after its prompt")
        seqs.append(ids[len(prompt):])
    room = max_len - max(len(s) for s in seqs)
    if room < 2:
        return None
    prompt = prompt[-room:]
    return EncodedPair(prompt + seqs[0], prompt + seqs[1], len(prompt))


def collate_pairs(pairs: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded; `answer_mask` marks the tokens whose log-prob counts."""
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    starts = [p.prompt_len for p in pairs] * 2
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, start:len(s)] = 1
    return {"input_ids": ids, "answer_mask": mask}


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Σ log p(answer token) per row: position t's logits predict token t + 1."""
    per_token = token_logprobs(logits[:, :-1], input_ids[:, 1:])
    return (per_token * answer_mask[:, 1:]).sum(1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    stats = {"margin": margin.mean().detach(), "accuracy": (margin > 0).float().mean(),
             "chosen_reward": chosen_reward.mean().detach(), "rejected_reward": rejected_reward.mean().detach()}
    return loss, stats


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, pairs: list[EncodedPair], pad_id: int, batch_size: int = 16
                       ) -> torch.Tensor:
    """[N, 2] (chosen, rejected) summed answer log-probs under the frozen reference, computed once."""
    device = next(model.parameters()).device
    out = torch.zeros(len(pairs), 2)
    was_training = model.training
    model.eval()
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
        logps = sequence_logprobs(model(batch["input_ids"]), batch["input_ids"], batch["answer_mask"]).float().cpu()
        out[start:start + len(chunk), 0] = logps[:len(chunk)]
        out[start:start + len(chunk), 1] = logps[len(chunk):]
    model.train(was_training)
    return out


def split_by_prompt(pairs: list[PreferencePair], val_fraction: float) -> tuple[list[int], list[int]]:
    """Indices of training and held-out pairs; all pairs of one prompt fall on the same side."""
    train_idx, val_idx = [], []
    for i, p in enumerate(pairs):
        key = json.dumps(p.messages, sort_keys=True).encode()
        held_out = int(hashlib.sha256(key).hexdigest()[:8], 16) / 0xFFFFFFFF < val_fraction
        (val_idx if held_out else train_idx).append(i)
    return train_idx, val_idx


class PairBatches:
    """`batches(step, micro)`: a pure function of its arguments, so resume needs no data state.

    A step's `batch_size` pairs are dealt out as `grad_accum` micro-batches x ranks (under torchrun).
    """

    def __init__(self, pairs: list[EncodedPair], ref: torch.Tensor, batch_size: int, grad_accum: int,
                 pad_id: int, seed: int) -> None:
        self.pairs, self.ref, self.pad_id, self.seed = pairs, ref, pad_id, seed
        self.batch_size, self.grad_accum = batch_size, grad_accum

    def indices(self, step: int) -> np.ndarray:
        flat = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs = flat // len(self.pairs)
        out = np.empty_like(flat)
        for epoch in np.unique(epochs):
            perm = np.random.default_rng([self.seed, int(epoch)]).permutation(len(self.pairs))
            sel = epochs == epoch
            out[sel] = perm[flat[sel] % len(self.pairs)]
        return out

    def __call__(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        import torch.distributed as dist
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        parts = self.grad_accum * world
        if self.batch_size % parts:
            raise ChatforgeError(f"batch_size {self.batch_size} does not split into grad_accum {self.grad_accum} "
                                 f"x {world} rank(s)")
        n = self.batch_size // parts
        first = (micro * world + rank) * n
        rows = self.indices(step)[first:first + n]
        batch = collate_pairs([self.pairs[i] for i in rows], self.pad_id)
        batch["ref_logprobs"] = self.ref[rows]
        return batch


def make_loss_fn(beta: float):
    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        n = batch["ref_logprobs"].shape[0]
        logps = sequence_logprobs(model(batch["input_ids"]), batch["input_ids"], batch["answer_mask"])
        loss, stats = dpo_loss(logps[:n], logps[n:], batch["ref_logprobs"][:, 0], batch["ref_logprobs"][:, 1], beta)
        stats["tokens"] = batch["answer_mask"].sum()
        return loss, stats
    return loss_fn


def make_eval_fn(pairs: list[EncodedPair], ref: torch.Tensor, beta: float, pad_id: int, batch_size: int = 16):
    """Held-out DPO loss, implicit-reward margin and accuracy."""
    def eval_fn(model: torch.nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        policy = reference_logprobs(model, pairs, pad_id, batch_size).to(device)
        loss, stats = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0].to(device), ref[:, 1].to(device), beta)
        return {"val_loss": loss.item(), "val_margin": stats["margin"].item(), "val_accuracy": stats["accuracy"].item()}
    return eval_fn


def run_dpo(cfg: DPOConfig) -> Path:
    """`chatforge dpo`: read and check the pairs, compute the reference once, train, write kind "policy"."""
    cfg.validate()
    if not cfg.policy:
        raise ChatforgeError("--policy is required (the SFT checkpoint)")
    if not cfg.data:
        raise ChatforgeError("--data is required (comparison JSONL files)")
    meta = read_meta(cfg.policy)
    if meta["kind"] in ("reward", "value"):
        raise ChatforgeError(f"{cfg.policy}: is a {meta['kind']} checkpoint, expected a policy (sft or policy)")
    comparisons = [c for path in cfg.data for c in read_comparisons(path)]
    pairs = to_pairs(comparisons)
    device = pick_device(cfg.device)
    policy, tokenizer, _ = load_model(cfg.policy, device, expect_kind=("sft", "policy", "base"))
    max_len = cfg.max_len or policy.config.max_position_embeddings
    encoded, kept = [], []
    for i, p in enumerate(pairs):
        e = encode_pair(tokenizer, p, max_len)
        if e is not None:
            encoded.append(e)
            kept.append(i)
    skipped = len(pairs) - len(encoded)
    if not encoded:
        raise ChatforgeError(f"{cfg.data[0]}: no pair fits in max_len={max_len} tokens")
    train_idx, val_idx = split_by_prompt([pairs[i] for i in kept], cfg.val_fraction)
    if not train_idx:
        raise ChatforgeError(f"val_fraction={cfg.val_fraction} left no pair for training")
    print(f"dpo: {len(comparisons)} comparisons -> {len(pairs)} pairs ({len(train_idx)} train, {len(val_idx)} held out"
          f"{f', {skipped} longer than {max_len} tokens skipped' if skipped else ''}); reference log-probs ...", flush=True)
    ref = reference_logprobs(policy, encoded, tokenizer.pad_id)  # before any training: π_ref = SFT
    train_pairs, val_pairs = [encoded[i] for i in train_idx], [encoded[i] for i in val_idx]
    steps = cfg.steps or max(1, round(cfg.epochs * len(train_pairs) / cfg.batch_size))
    train_cfg = TrainConfig(steps=steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, lr=cfg.lr,
                            min_lr_ratio=0.0, warmup_steps=min(cfg.warmup_steps, steps - 1 if steps > 1 else 0),
                            weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                            eval_every=cfg.eval_every, save_every=steps, log_every=1, seed=cfg.seed,
                            device=cfg.device, dtype=cfg.dtype)
    if cfg.lora:
        from chatforge.model.adapters import LoRAConfig, attach_lora
        attach_lora(policy, LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=0.0))
    params = [p for p in policy.parameters() if p.requires_grad]
    parent = resolve(cfg.policy)
    out_meta = {"kind": "policy", "stage": "dpo", "parent": str(parent), "parent_hash": weights_hash(parent),
                "config": asdict(cfg), "pairs": {"train": len(train_pairs), "val": len(val_pairs), "skipped": skipped}}
    batches = PairBatches(train_pairs, ref[train_idx], cfg.batch_size, cfg.grad_accum, tokenizer.pad_id, cfg.seed)
    eval_fn = make_eval_fn(val_pairs, ref[val_idx], cfg.beta, tokenizer.pad_id) if val_pairs else None
    data_hash = hashlib.sha256(json.dumps([[p.chosen, p.rejected] for p in train_pairs]).encode()).hexdigest()[:16]
    summary = train(policy, params, make_loss_fn(cfg.beta), batches, cfg.out, train_cfg,
                    save_fn=_saver(tokenizer, out_meta, cfg.lora), eval_fn=eval_fn, resume=cfg.resume,
                    fingerprint=resume_fingerprint(train_cfg, beta=cfg.beta, policy=weights_hash(parent),
                                                   data=data_hash, lora=cfg.lora),
                    weight_fn=lambda b: float(b["ref_logprobs"].shape[0]), desc="dpo")
    print(f"dpo: wrote {summary['checkpoint']}" + "".join(
        f", {k} {summary[k]:.4f}" for k in ("val_margin", "val_accuracy") if k in summary))
    return Path(summary["checkpoint"])


def _saver(tokenizer: Tokenizer, meta: dict[str, Any], lora: bool):
    """A full policy checkpoint; LoRA adapters are merged into a copy so the output loads as a plain GPT."""
    def save(out: Path, model: torch.nn.Module, state: dict[str, Any], metrics: dict[str, Any]) -> None:
        if lora:
            from chatforge.model.adapters import merge_lora
            model = merge_lora(copy.deepcopy(model))
        save_model_checkpoint(out, model, tokenizer, {**meta, "metrics": metrics}, state=state,
                              metrics_from=out / "metrics.jsonl")
    return save


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dpo", help="direct preference optimisation on comparison files (reference = SFT)")
    add_config_args(p, DPOConfig)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> None:
    run_dpo(config_from_args(DPOConfig, args, section="dpo"))
