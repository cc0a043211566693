"""Step 2 of RLHF: a reward model that learns from ranked answers which answer people prefer.

    chatforge reward collect   sample K answers per prompt from the SFT model; the gold labeler ranks them
    chatforge reward train     the SFT transformer with a scalar head, InstructGPT's ranking loss
    chatforge reward eval      held-out accuracy, calibration, correlations, health checks
    chatforge reward score     add "reward" to every answer of a JSONL file

The reward is the scalar head's output at the end-of-turn token that closes the answer. The loss is
-log sigmoid(r(x, y_w) - r(x, y_l)) averaged over all ranked pairs of one prompt, and that average is one
batch element: a prompt with K = 9 answers weighs as much as one with K = 4, and each answer is scored once.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from chatforge import ChatforgeError
from chatforge.checkpoint import atomic_write_text, file_hash, load_model, resolve, save_model_checkpoint
from chatforge.config import add_config_args, config_from_args
from chatforge.data.chat import fit_messages, read_conversations
from chatforge.data.jsonl import iter_jsonl, write_jsonl
from chatforge.data.preferences import Comparison, parse_answer, parse_prompt, read_comparisons
from chatforge.eval.reward_eval import evaluate_reward_model, format_report, reference_pairs
from chatforge.model.adapters import PROJECTIONS, LoRAConfig, attach_lora
from chatforge.model.heads import ScalarModel
from chatforge.tokenizer import Message, Tokenizer
from chatforge.train.loop import TrainConfig, resume_fingerprint, train
from chatforge.train.progress import Progress


Scored = tuple[list[int], int]  # prompt + answer ids, and the index of the answer's first token


def encode_answer(tokenizer: Tokenizer, messages: list[Message], answer: str, max_len: int) -> Scored:
    """Prompt + answer as the chat template renders them, ending at the answer's end-of-turn token (where PPO's
    rollouts end, and where the reward is read), with the answer's start; a long prompt loses its start, never
    the answer's end."""
    ids, mask = tokenizer.render(messages + [{"role": "assistant", "content": answer}])
    end = max(i for i, m in enumerate(mask) if m) + 1  # a template may add formatting after the turn
    start = next(i for i in range(end - 1, -1, -1) if not mask[i]) + 1  # the last assistant turn's first token
    cut = max(0, end - max_len)
    return ids[cut:end], max(start - cut, 0)


def pad_right(seqs: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """[N, T] ids right-padded, and each row's last real index: the model is causal, so padding is never seen."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    last = torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)
    return ids.to(device), last.to(device)


def pad_scored(seqs: list[Scored], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Scored sequences as the reward model reads them: right-padded ids, last real index, answer start."""
    ids, last = pad_right([s for s, _ in seqs], pad_id, device)
    return {"input_ids": ids, "last": last, "starts": torch.tensor([a for _, a in seqs], device=ids.device)}


@torch.no_grad()
def score_sequences(model: torch.nn.Module, seqs: list[Scored], pad_id: int, batch_size: int = 32) -> list[float]:
    """The reward of every sequence, in input order; batches group similar lengths to waste little on padding."""
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    rewards = [0.0] * len(seqs)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = pad_scored([seqs[i] for i in chunk], pad_id, device)
        for i, r in zip(chunk, model.score_last(batch["input_ids"], batch["last"], batch["starts"]).tolist()):
            rewards[i] = r
    model.train(was_training)
    return rewards


def score_answers(model: torch.nn.Module, tokenizer: Tokenizer, items: list[tuple[list[Message], str]],
                  batch_size: int = 32, max_len: int | None = None) -> list[float]:
    """The reward of each (conversation, answer)."""
    max_len = max_len or model.config.max_position_embeddings
    seqs = [encode_answer(tokenizer, m, a, max_len) for m, a in items]
    return score_sequences(model, seqs, tokenizer.pad_id, batch_size)


@dataclass
class EncodedComparison:
    seqs: list[Scored]            # one per answer, in the comparison's answer order
    pairs: list[tuple[int, int]]  # (better, worse) indices into seqs


def encode_comparison(tokenizer: Tokenizer, comparison: Comparison, max_len: int) -> EncodedComparison:
    seqs = [encode_answer(tokenizer, comparison.messages, a, max_len) for a in comparison.answers]
    return EncodedComparison(seqs, comparison.pairs())


def ranked_pairs(items: list[EncodedComparison]) -> dict[str, torch.Tensor]:
    """The pairs of `items` as rows of their answers stacked in order: `better`/`worse` rows of each pair, and
    `weight` 1 / (pairs of its prompt x prompts), so each prompt weighs the same and the weights sum to 1."""
    better, worse, weight = [], [], []
    offset = 0
    for item in items:
        better += [offset + i for i, _ in item.pairs]
        worse += [offset + j for _, j in item.pairs]
        weight += [1.0 / (len(item.pairs) * len(items))] * len(item.pairs)
        offset += len(item.seqs)
    return {"better": torch.tensor(better), "worse": torch.tensor(worse), "weight": torch.tensor(weight)}


def collate_rankings(items: list[EncodedComparison], pad_id: int) -> dict[str, torch.Tensor]:
    """Every answer of a few prompts in one padded tensor (each answer once), and the ranked pairs among them."""
    return {**pad_scored([s for item in items for s in item.seqs], pad_id), **ranked_pairs(items),
            "prompts": torch.tensor(len(items))}


def ranking_loss(rewards: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT's loss (mean over each prompt's pairs, then over prompts) and the share of pairs ordered right."""
    margin = rewards[batch["better"]] - rewards[batch["worse"]]
    loss = (-F.logsigmoid(margin) * batch["weight"]).sum()
    return loss, (margin > 0).float().mean()


def reward_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The loop's loss_fn: one forward over all answers of the micro-batch, rewards read at their last token."""
    values = model(batch["input_ids"], batch["starts"])  # called as the module, so DDP sees the forward
    rewards = values.gather(1, batch["last"].view(-1, 1)).squeeze(1)
    loss, accuracy = ranking_loss(rewards, batch)
    return loss, {"accuracy": accuracy, "tokens": batch["input_ids"].numel()}


class RankingBatches:
    """`batches(step, micro)` for the loop: `rows` prompts per micro-batch, a new order every epoch.

    Global micro-batch g = (step x grad_accum + micro) x world_size + rank walks through epoch g // per_epoch.
    """

    def __init__(self, items: list[EncodedComparison], rows: int, pad_id: int, seed: int, grad_accum: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.items, self.rows, self.pad_id, self.seed = items, rows, pad_id, seed
        self.grad_accum, self.rank, self.world_size = grad_accum, rank, world_size
        self.per_epoch = math.ceil(len(items) / rows)
        self._order: tuple[int, list[int]] = (-1, [])

    def __call__(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        g = (step * self.grad_accum + micro) * self.world_size + self.rank
        epoch, i = divmod(g, self.per_epoch)
        if self._order[0] != epoch:
            order = list(range(len(self.items)))
            random.Random(self.seed * 1000 + epoch).shuffle(order)
            self._order = (epoch, order)
        chunk = self._order[1][i * self.rows:(i + 1) * self.rows]
        return collate_rankings([self.items[j] for j in chunk], self.pad_id)


# ---------------------------------------------------------------- collect: comparisons for the tiny world

@dataclass
class CollectConfig:
    policy: str = ""                 # the SFT checkpoint whose answers are ranked
    world: str = ""                  # a tiny-world directory: prompts/reward.jsonl is the default prompt set
    prompts: str = ""                # JSONL of {"prompt"|"messages", ...}; other fields are kept
    out: str = "runs/default/rankings.jsonl"
    min_answers: int = 4             # K is drawn per prompt from [min_answers, max_answers] (InstructGPT: 4..9)
    max_answers: int = 9
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 96
    resample_rounds: int = 3         # extra sampling rounds for prompts whose answers were duplicates
    disagreement: float = 0.25       # share of pairs the simulated labeler orders wrongly (people agree ~73%)
    unranked: bool = False           # write the answers unranked ({"answers": [...]}) for human labelers
    limit: int = 0                   # only the first N prompts
    batch_size: int = 32             # prompts per generation call
    seed: int = 0
    device: str | None = None
    threads: int = 0

    def validate(self) -> None:
        checks = [
            (2 <= self.min_answers <= self.max_answers, f"min_answers/max_answers: need 2 <= {self.min_answers} <= "
                                                        f"{self.max_answers}"),
            (self.temperature > 0, f"temperature: answers must be sampled (> 0), got {self.temperature}"),
            (0 <= self.disagreement <= 1, f"disagreement: must be in [0, 1], got {self.disagreement}"),
            (self.resample_rounds >= 0 and self.limit >= 0, "resample_rounds and limit must not be negative"),
            (self.max_new_tokens > 0 and self.batch_size > 0, "max_new_tokens and batch_size must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ChatforgeError(message)


def _dedup_key(text: str) -> str:
    return " ".join(text.split())


def sample_answers(engine: Any, prompts: list[list[int]], wanted: list[int], cfg: CollectConfig
                   ) -> tuple[list[list[str]], int]:
    """Up to `wanted[i]` distinct answers per prompt, and the number of duplicates dropped.

    Each round samples, for every prompt still short, as many answers as the most any of them misses;
    a bounded number of rounds re-samples what duplicates took away.
    """
    from chatforge.infer.engine import SamplingParams
    answers: list[list[str]] = [[] for _ in prompts]
    seen: list[set[str]] = [set() for _ in prompts]
    duplicates = sampled = 0
    bar = Progress(len(prompts), 0, True, desc="reward collect", unit="prompt")
    started = time.monotonic()

    def show(final: bool = False) -> None:
        complete = sum(len(a) == w for a, w in zip(answers, wanted))
        rate = sampled / max(time.monotonic() - started, 1e-9)
        bar.show(complete, f"{sum(map(len, answers))}/{sum(wanted)} answers, {rate:.1f} answers/s", final)

    for round_ in range(1 + cfg.resample_rounds):
        todo = [i for i in range(len(prompts)) if len(answers[i]) < wanted[i]]
        for start in range(0, len(todo), cfg.batch_size):
            chunk = todo[start:start + cfg.batch_size]
            n = max(wanted[i] - len(answers[i]) for i in chunk)
            params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                    top_p=cfg.top_p, stop_ids=list(engine.tokenizer.stop_ids),
                                    seed=cfg.seed * 1_000_003 + round_ * 10_007 + start)
            generations = engine.generate([prompts[i] for i in chunk], params, num_samples=n)
            sampled += len(generations)
            for row, i in enumerate(chunk):
                for g in generations[row * n:(row + 1) * n]:
                    if len(answers[i]) == wanted[i]:
                        break
                    text = g.text.strip()
                    if _dedup_key(text) in seen[i]:
                        duplicates += 1
                        continue
                    seen[i].add(_dedup_key(text))
                    answers[i].append(text)
            show()
    if any(len(a) < w for a, w in zip(answers, wanted)):
        show(final=True)  # some prompts stayed short of K: the log still says where collecting ended
    bar.close()
    return answers, duplicates


def collect(cfg: CollectConfig) -> Path:
    """`chatforge reward collect`: K sampled answers per prompt, ranked by the gold labeler; returns the JSONL path."""
    from chatforge.data.world.labeler import GoldLabeler
    from chatforge.device import pick_device
    from chatforge.infer.engine import Engine
    cfg.validate()
    if not cfg.policy:
        raise ChatforgeError("--policy is required: the SFT checkpoint whose answers are ranked")
    if not (cfg.prompts or cfg.world):
        raise ChatforgeError("--prompts (a JSONL of prompts) or --world (a tiny-world directory) is required")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    prompts_path = Path(cfg.prompts) if cfg.prompts else Path(cfg.world) / "prompts" / "reward.jsonl"
    records = [(where, record, parse_prompt(record, where)) for where, record in iter_jsonl(prompts_path)]
    records = records[:cfg.limit] if cfg.limit else records
    if not records:
        raise ChatforgeError(f"{prompts_path}: no prompts in the file")
    model, tokenizer, _ = load_model(cfg.policy, pick_device(cfg.device), expect_kind=("base", "sft", "policy"))
    engine = Engine(model.eval(), tokenizer)
    context = model.config.max_position_embeddings
    prompt_ids = []
    for where, _, messages in records:  # a long conversation loses its oldest turns, as in chat
        try:
            prompt_ids.append(fit_messages(tokenizer, messages, context - cfg.max_new_tokens, for_generation=True).ids)
        except ChatforgeError as e:
            raise ChatforgeError(f"{where}: {e} (max_new_tokens={cfg.max_new_tokens})") from None
    rng = random.Random(cfg.seed)
    wanted = [rng.randint(cfg.min_answers, cfg.max_answers) for _ in records]
    print(f"reward collect: {len(records)} prompts from {prompts_path}, K = {cfg.min_answers}..{cfg.max_answers} "
          f"answers each from {cfg.policy} at temperature {cfg.temperature:g}, "
          + ("unranked" if cfg.unranked else f"ranked by the gold labeler (disagreement {cfg.disagreement:g})"),
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    answers, duplicates = sample_answers(engine, prompt_ids, wanted, cfg)
    labeler = GoldLabeler(disagreement=cfg.disagreement, seed=cfg.seed)
    lines, too_few, all_tied = [], 0, 0
    for (_, record, messages), found in zip(records, answers):
        if len(found) < 2:
            too_few += 1
            continue
        kept = {k: v for k, v in record.items() if k not in ("prompt", "messages")}
        if cfg.unranked:
            lines.append({"messages": messages, "answers": found, **kept})
            continue
        tiers = labeler.rank(messages, found)
        if len(tiers) < 2:
            all_tied += 1
            continue
        responses = [found[t[0]] if len(t) == 1 else [found[i] for i in t] for t in tiers]
        lines.append({"messages": messages, "responses": responses, **kept})
    if not lines:
        raise ChatforgeError(f"no prompt got two distinct answers{' ranked apart' if all_tied else ''}: "
                             "raise --temperature or --resample-rounds")
    out = Path(cfg.out)
    write_jsonl(out, lines)
    n_answers = sum(len(r.get("answers") or [a for t in r["responses"] for a in (t if isinstance(t, list) else [t])])
                    for r in lines)
    short = sum(1 for w, found in zip(wanted, answers) if 2 <= len(found) < w)
    print(f"reward collect: wrote {len(lines)} {'answer sets' if cfg.unranked else 'rankings'} "
          f"({n_answers} answers, {n_answers / len(lines):.1f} per prompt) to {out} in "
          f"{time.perf_counter() - start:.0f}s; {duplicates} duplicate answers dropped, {short} prompts kept with "
          f"fewer than K distinct answers, {too_few} skipped with fewer than two"
          + (f", {all_tied} skipped with all answers ranked equal" if not cfg.unranked else ""),
          file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------- train

@dataclass
class RewardConfig:
    init: str = ""                   # the checkpoint to start from: the SFT model (any LM or reward checkpoint)
    data: list[str] = field(default_factory=list)  # comparison JSONL files (pairs or rankings)
    world: str = ""                  # a tiny-world directory: sft.jsonl is the reference; gold judges held-out
    heldout: str = ""                # held-out comparisons; default: heldout_fraction of the data
    heldout_fraction: float = 0.1
    fraction: float = 1.0            # train on this share of the training comparisons (a data-size curve)
    reference: str = ""              # demonstrations (messages JSONL) that score mean 0 after training
    reference_limit: int = 1000
    out: str = "runs/default/reward"
    method: str = "full"             # full | lora
    likelihood: float = 0.0          # > 0: the score adds λ x the answer's log-likelihood under the model's own LM
                                     # head (kept from init), λ learnt from this start; 0: InstructGPT's head alone
    context: int = 0                 # tokens per answer with its prompt; 0 = the model's context window
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(PROJECTIONS))
    epochs: float = 1.0              # InstructGPT: one epoch, more overfits
    steps: int = 0                   # overrides epochs when positive
    batch_size: int = 8              # prompts per optimizer step, each with all its ranked answers
    grad_accum: int = 1
    lr: float = 0.0                  # 0 = the method's default: full 3e-4, lora 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 0              # steps between held-out evaluations; 0 = at the end only
    save_every: int = 0              # steps between resume checkpoints; 0 = at the end only
    seed: int = 0
    device: str | None = None
    dtype: str = "auto"              # auto | bf16 | fp32
    threads: int = 0
    resume: bool = False

    def validate(self) -> None:
        checks = [
            (self.method in ("full", "lora"), f"method: expected full or lora, got {self.method!r}"),
            (0 <= self.heldout_fraction < 1, f"heldout_fraction: must be in [0, 1), got {self.heldout_fraction}"),
            (0 < self.fraction <= 1, f"fraction: must be in (0, 1], got {self.fraction}"),
            (self.likelihood >= 0, f"likelihood: must be >= 0, got {self.likelihood}"),
            (self.epochs > 0 or self.steps > 0, "set epochs or steps to a positive number"),
            (min(self.context, self.lr, self.eval_every, self.save_every, self.reference_limit) >= 0,
             "context, lr, eval_every, save_every and reference_limit must not be negative"),
        ]
        for ok, message in checks:
            if not ok:
                raise ChatforgeError(message)
        self.lora().validate()

    def lora(self) -> LoRAConfig:
        return LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, list(self.lora_targets))

    def learning_rate(self) -> float:
        return self.lr or DEFAULT_LR[self.method]


DEFAULT_LR = {"full": 3e-4, "lora": 1e-3}


def reward_model_from(init: str | Path, cfg: RewardConfig) -> tuple[ScalarModel, Tokenizer, dict[str, Any]]:
    """A ScalarModel on the backbone of `init` (its head kept if it is a reward model), ready for `cfg.method`."""
    from chatforge.model.adapters import PromptTunedGPT
    model, tokenizer, meta = load_model(init, expect_kind=("base", "sft", "policy", "reward"))
    if isinstance(model, PromptTunedGPT):
        raise ChatforgeError(f"{init}: a P-tuned model's virtual prompt cannot carry a reward head; start from its base")
    if not isinstance(model, ScalarModel):
        model = ScalarModel.from_lm(model, cfg.likelihood)  # the head is drawn from torch's RNG: seed first
    elif cfg.likelihood and not model.reads_likelihood:  # continuing a reward model keeps its form
        raise ChatforgeError(f"{init}: a reward model without an LM head cannot add likelihood = {cfg.likelihood}")
    if cfg.method == "lora":
        attach_lora(model, cfg.lora())
        model.score.requires_grad_(True)
        if model.reads_likelihood:
            model.likelihood_weight.requires_grad_(True)
    else:
        model.requires_grad_(True)
    return model, tokenizer, meta


def reference_sequences(cfg: RewardConfig, init_meta: dict[str, Any], tokenizer: Tokenizer, context: int,
                        train: list[Comparison]) -> tuple[list[Scored], str]:
    """The demonstrations whose mean reward is set to 0: --reference, the world's or the SFT run's sft data,
    else the best answer of each training comparison. Returns (sequences, where they came from)."""
    candidates = [cfg.reference] if cfg.reference else (
        [str(Path(cfg.world) / "sft.jsonl")] if cfg.world else list(init_meta.get("data") or []))
    paths = [Path(p) for p in candidates if p]
    if cfg.reference and not paths[0].is_file():
        raise ChatforgeError(f"--reference {cfg.reference}: file not found")
    if paths and all(p.is_file() for p in paths):
        pairs = []
        for conv in (c for p in paths for c in read_conversations(p)):
            last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
            pairs.append((conv.messages[:last], conv.messages[last]["content"]))
        source = ", ".join(map(str, paths))
    else:
        pairs = [(c.messages, c.tiers[0][0]) for c in train]
        source = "the best answer of each training comparison"
    if cfg.reference_limit and len(pairs) > cfg.reference_limit:
        pairs = random.Random(cfg.seed).sample(pairs, cfg.reference_limit)
    return [encode_answer(tokenizer, m, a, context) for m, a in pairs], source


def heldout_metrics(model: torch.nn.Module, items: list[EncodedComparison], pad_id: int) -> dict[str, float]:
    """Held-out ranking loss and pairwise accuracy (the loop's eval_fn)."""
    rewards = torch.tensor(score_sequences(model, [s for item in items for s in item.seqs], pad_id))
    loss, accuracy = ranking_loss(rewards, ranked_pairs(items))
    return {"val_loss": loss.item(), "val_accuracy": accuracy.item()}


def normalisation(model: torch.nn.Module, reference: list[Scored], pad_id: int) -> tuple[float, float]:
    """(mean, std) of the reward over the reference demonstrations."""
    rewards = torch.tensor(score_sequences(model, reference, pad_id), dtype=torch.float64)
    return rewards.mean().item(), rewards.std(correction=0).item()


def reward_saver(tokenizer: Tokenizer, meta: dict[str, Any], reference: list[Scored]) -> Any:
    """The loop's save_fn: the reward model with LoRA merged and the head's bias shifted so the reference
    demonstrations score mean 0; the shift and the reference's reward std (`reward_scale`) go to meta.json.
    The training model is left as it is (resume continues from the unshifted weights)."""
    from chatforge.model.adapters import adapter_method, merge_lora

    def save(out: Path, model: torch.nn.Module, state: dict[str, Any], metrics: dict[str, Any]) -> None:
        mean, std = normalisation(model, reference, tokenizer.pad_id)
        if adapter_method(model) == "lora":
            model = merge_lora(copy.deepcopy(model))
        bias = (model.score.bias.detach() - mean).cpu()
        norm = {"reward_offset": mean, "reward_scale": std, "reward_reference_count": len(reference)}
        save_model_checkpoint(out, model, tokenizer, {**meta, **norm, "metrics": metrics}, state=state,
                              metrics_from=out / "metrics.jsonl", extra_tensors={"score.bias": bias})
    return save


def train_reward(cfg: RewardConfig) -> Path:
    """`chatforge reward train`: a reward model from comparisons; returns the checkpoint directory."""
    from chatforge.data.world.labeler import GoldLabeler
    from chatforge.model.adapters import trainable_parameters, weights_hash
    from chatforge.train.distributed import setup
    from chatforge.train.sft import split_examples
    cfg.validate()
    if not cfg.init:
        raise ChatforgeError("--init is required: the checkpoint to start from (the SFT model)")
    if not cfg.data:
        raise ChatforgeError("--data is required: comparison JSONL files (`chatforge reward collect` writes one)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    init = resolve(cfg.init)
    torch.manual_seed(cfg.seed)
    model, tokenizer, init_meta = reward_model_from(init, cfg)
    trainable, total = trainable_parameters(model)
    context = min(cfg.context or model.config.max_position_embeddings, model.config.max_position_embeddings)

    comparisons = [c for path in cfg.data for c in read_comparisons(path)]
    if cfg.heldout:
        train_set, heldout = comparisons, read_comparisons(cfg.heldout)
    else:
        train_set, heldout = split_examples(comparisons, cfg.heldout_fraction, cfg.seed)  # a seeded share of the prompts
    if cfg.fraction < 1:
        train_set = random.Random(cfg.seed + 1).sample(train_set, max(1, round(cfg.fraction * len(train_set))))
    labeler = GoldLabeler(disagreement=0.0) if cfg.world else None
    items = [encode_comparison(tokenizer, c, context) for c in train_set]
    heldout_items = [EncodedComparison(encode_comparison(tokenizer, c, context).seqs, pairs)
                     for c, pairs in zip(heldout, reference_pairs(heldout, labeler)) if pairs]
    reference, reference_source = reference_sequences(cfg, init_meta, tokenizer, context, train_set)

    dist = setup(cfg.device)
    parts = cfg.grad_accum * dist.world_size
    if cfg.batch_size % parts:
        raise ChatforgeError(f"batch_size {cfg.batch_size} does not split into grad_accum {cfg.grad_accum} x "
                             f"{dist.world_size} rank(s)")
    rows = cfg.batch_size // parts
    batches = RankingBatches(items, rows, tokenizer.pad_id, cfg.seed, cfg.grad_accum, dist.rank, dist.world_size)
    steps_per_epoch = max(1, math.ceil(len(items) / cfg.batch_size))
    steps = cfg.steps or max(1, round(cfg.epochs * steps_per_epoch))
    tcfg = TrainConfig(steps=steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, lr=cfg.learning_rate(),
                       min_lr_ratio=cfg.min_lr_ratio, warmup_steps=min(cfg.warmup_steps, steps // 2),
                       weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, eval_every=cfg.eval_every,
                       save_every=cfg.save_every or steps, log_every=max(1, min(10, steps // 20)), seed=cfg.seed,
                       device=cfg.device, dtype=cfg.dtype)
    init_hash = weights_hash(init)
    meta = {"kind": "reward", "stage": "reward", "parent": str(init), "parent_hash": init_hash,
            "method": cfg.method, "trainable_params": trainable, "total_params": total, "data": list(cfg.data),
            "reward_reference": reference_source, "config": asdict(cfg)}
    fingerprint = resume_fingerprint(tcfg, init=init_hash, method=cfg.method, lora=asdict(cfg.lora()),
                                     context=context, data=[file_hash(p) for p in cfg.data], fraction=cfg.fraction,
                                     heldout=cfg.heldout and file_hash(cfg.heldout),
                                     heldout_fraction=cfg.heldout_fraction)
    n_pairs = sum(len(i.pairs) for i in items)
    n_answers = sum(len(i.seqs) for i in items)
    if dist.is_main:
        print(f"reward: {cfg.method} training of a reward model from {init} ({total / 1e6:.2f}M params, "
              f"{trainable:,} trained)\n"
              f"reward: {len(items)} prompts, {n_answers} answers, {n_pairs} ranked pairs for training"
              f"{f' ({cfg.fraction:.0%} of the data)' if cfg.fraction < 1 else ''}; {len(heldout_items)} held out"
              f"{' (judged by the noise-free gold labeler)' if labeler else ''}; context {context} tokens\n"
              f"reward: {steps} steps of {cfg.batch_size} prompts ({steps / steps_per_epoch:.2f} epochs); "
              f"bias set so {len(reference)} demonstrations from {reference_source} score mean 0 -> {cfg.out}",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    summary = train(model, [p for p in model.parameters() if p.requires_grad], reward_loss, batches, cfg.out, tcfg,
                    save_fn=reward_saver(tokenizer, meta, reference),
                    eval_fn=(lambda m: heldout_metrics(m, heldout_items, tokenizer.pad_id)) if heldout_items else None,
                    weight_fn=lambda b: float(b["prompts"]), resume=cfg.resume, fingerprint=fingerprint,
                    flops_per_token=model.config.flops_per_token(context), desc=f"reward {cfg.method}")
    out = Path(summary["checkpoint"])
    if dist.is_main and heldout:
        trained, _, saved_meta = load_model(out, dist.device)
        report = evaluate_reward_model(trained, tokenizer, heldout, labeler)
        saved_meta["metrics"] = {**saved_meta.get("metrics", {}), "heldout": report}
        atomic_write_text(out / "meta.json", json.dumps(saved_meta, indent=2, default=str))
        print("reward: held-out evaluation\n" + format_report(report), file=sys.stderr)
    if dist.is_main:
        print(f"reward: wrote {out} in {time.perf_counter() - start:.0f}s\n"
              f"reward: score answers with: chatforge reward score {out} --input answers.jsonl --output scored.jsonl",
              file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------- score and eval

@dataclass
class ScoreConfig:
    reward_model: str = ""
    input: str = ""                  # JSONL of {"prompt"|"messages", "response"|"completion", ...}
    output: str = ""
    batch_size: int = 32
    device: str | None = None
    threads: int = 0


def read_answers(path: str | Path) -> list[tuple[dict[str, Any], list[Message], str]]:
    """(record, conversation, answer) for each line of a file of answers to score."""
    out = []
    for where, record in iter_jsonl(path):
        messages = parse_prompt(record, where)
        key = next((k for k in ("response", "completion") if k in record), None)
        if key is None:
            raise ChatforgeError(f"{where}: missing answer: the record needs 'response' or 'completion'")
        out.append((record, messages, parse_answer(record[key], f"{where}: {key}")))
    if not out:
        raise ChatforgeError(f"{path}: no answers in the file")
    return out


def score_file(cfg: ScoreConfig) -> Path:
    """`chatforge reward score`: every line of the input with "reward" added; returns the output path."""
    from chatforge.device import pick_device
    for name in ("reward_model", "input", "output"):
        if not getattr(cfg, name):
            raise ChatforgeError(f"--{name.replace('_', '-')} is required")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rows = read_answers(cfg.input)
    model, tokenizer, _ = load_model(cfg.reward_model, pick_device(cfg.device), expect_kind=("reward",))
    rewards = score_answers(model, tokenizer, [(m, a) for _, m, a in rows], cfg.batch_size)
    out = Path(cfg.output)
    write_jsonl(out, ({**record, "reward": round(r, 6)} for (record, _, _), r in zip(rows, rewards)))
    print(f"reward score: {len(rows)} answers scored by {cfg.reward_model} (mean {sum(rewards) / len(rewards):+.3f}) "
          f"-> {out}", file=sys.stderr)
    return out


def eval_cli(args: argparse.Namespace) -> None:
    from chatforge.data.world.labeler import GoldLabeler
    from chatforge.device import pick_device
    if args.threads:
        torch.set_num_threads(args.threads)
    comparisons = read_comparisons(args.data)
    model, tokenizer, _ = load_model(args.reward_model, pick_device(args.device), expect_kind=("reward",))
    report = evaluate_reward_model(model, tokenizer, comparisons, GoldLabeler() if args.gold else None)
    print(format_report(report))
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")


def _command(run: Any, cls: type, section: str | None = None) -> Any:
    """A subcommand's function: the config from TOML and flags, then the stage (its return value is for Python)."""
    def call(args: argparse.Namespace) -> None:
        run(config_from_args(cls, args, section=section))
    return call


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reward", help="RLHF step 2: collect rankings, train a reward model, score answers",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rsub = p.add_subparsers(dest="reward_command", required=True, metavar="ACTION")
    c = rsub.add_parser("collect", help="sample K answers per prompt from the SFT model; the gold labeler ranks them")
    add_config_args(c, CollectConfig, skip=("unranked",))
    c.add_argument("--unranked", dest="cfg_unranked", action="store_const", const=True, default=None,
                   help="write the answers unranked, for human labelers to rank")
    c.set_defaults(func=_command(collect, CollectConfig, "reward_collect"))

    t = rsub.add_parser("train", help="train a reward model on pairwise or K-way comparisons")
    add_config_args(t, RewardConfig, skip=("resume",))
    t.add_argument("--resume", dest="cfg_resume", action="store_const", const=True, default=None,
                   help="continue the checkpoint in --out")
    t.set_defaults(func=_command(train_reward, RewardConfig, "reward"))

    s = rsub.add_parser("score", help="add \"reward\" to every answer of a JSONL file")
    s.add_argument("cfg_reward_model", metavar="REWARD_MODEL")
    add_config_args(s, ScoreConfig, skip=("reward_model",))
    s.set_defaults(func=_command(score_file, ScoreConfig))

    e = rsub.add_parser("eval", help="held-out accuracy, calibration, correlations and health checks")
    e.add_argument("reward_model")
    e.add_argument("--data", required=True, help="comparison JSONL (pairs or rankings)")
    e.add_argument("--gold", action="store_true",
                   help="judge by the tiny world's noise-free gold labeler instead of the file's ranking")
    e.add_argument("--out", help="write the report to this JSON file")
    e.add_argument("--device")
    e.add_argument("--threads", type=int, default=0)
    e.set_defaults(func=eval_cli)
