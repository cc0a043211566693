"""Step 3 of RLHF: PPO against the reward model, with a KL penalty to the SFT model (InstructGPT), and PPO-ptx.

One iteration, as this file reads top to bottom:

  1. rollout     the policy answers a batch of prompts through the shared engine at temperature 1,
                 keeping the log-prob of every sampled token
  2. score       the frozen reference gives log-probs of the same tokens; the frozen reward model scores each
                 answer at its last token; the value model gives V at every answer token
  3. rewards     r_t = -β·KL_t on every token, plus the score at the last one (minus a penalty if the
                 answer never ended: the "EOS trick")
  4. advantages  GAE(γ, λ) over the answer tokens, whitened over the batch
  5. update      PPO epochs over shuffled minibatches: clipped surrogate + clipped value loss
                 (+ ptx_coef · the language-model loss on pretraining text, for PPO-ptx)
  6. β           adapted toward the KL target (Ziegler et al. 2019) when adaptive

Models: the policy starts as the SFT model; the reference is a frozen copy of it (with LoRA: the same weights
with the adapters switched off); the value model starts as the reward model (InstructGPT) or is a
zero-initialised head on the policy; the reward model is frozen.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge import ChatforgeError
from chatforge.checkpoint import (RunLock, atomic_write_text, is_complete, load_model, read_meta, resolve,
                                 save_model_checkpoint)
from chatforge.config import add_config_args, config_from_args
from chatforge.device import autocast as bf16_autocast
from chatforge.device import pick_device
from chatforge.model.adapters import weights_hash
from chatforge.model.heads import ScalarModel
from chatforge.model.transformer import GPT
from chatforge.tokenizer import Tokenizer
from chatforge.train import rl_math
from chatforge.train.loop import TrainConfig, lr_factor, make_optimizer, refuse_changed_resume, resume_fingerprint
from chatforge.train.progress import Progress
from chatforge.train.rl_math import masked_mean

# (prompt ids, answer ids, finished) per answer -> one scalar per answer
RewardFn = Callable[[list[list[int]], list[list[int]], torch.Tensor], torch.Tensor]


@dataclass
class PPOConfig:
    policy: str = ""                 # the SFT checkpoint the policy starts from (or a policy to continue)
    reward_model: str = ""           # a reward checkpoint (chatforge reward train), or "gold": the tiny world's gold
                                     # labeler itself, an oracle reward showing what PPO reaches when the reward is right
    prompts: str = ""                # PPO prompt set, JSONL with "messages" or "prompt"
    out: str = "runs/default/ppo"
    reference: str = ""              # default: the policy's own starting weights; must be the policy or its parent
    baseline: str = "value"          # value: GAE with a learnt value model (InstructGPT) | group: each answer
                                     # against the other answers to its prompt (RLOO), no value model
    value_init: str = "reward"       # reward: a value model copied from the reward model | head: a head on the policy
    lora: bool = False               # train LoRA adapters; the reference is then the base with adapters off
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_merge: bool = False         # with lora: write the policy with the adapters merged in, not the adapter alone
    # rollouts
    iterations: int = 100
    rollout_batch: int = 64          # prompts answered per iteration
    samples_per_prompt: int = 1      # answers sampled to each of them (>= 2 with baseline = "group")
    max_new_tokens: int = 64
    temperature: float = 1.0         # the policy trained is the model's distribution at this temperature: rollouts
                                     # sample from it, and ratios and KL are of it (below 1: less exploration of
                                     # the long tail a small model's samples wander into)
    missing_eos_penalty: float = 1.0
    # reward
    kl_coef: float = 0.05            # β; the initial β when adaptive
    adaptive_kl: bool = False
    kl_target: float = 6.0           # nats per answer
    kl_horizon: float = 10000.0
    kl_estimator: str = "k1"
    score_norm: bool = False         # divide scores by a running std (and centre them)
    score_clip: float = 0.0          # clip scores to ±score_clip; 0 = off
    # PPO
    ppo_epochs: int = 2
    minibatch: int = 16
    lr: float = 1e-5
    value_lr: float = 5e-5
    warmup_steps: int = 10
    grad_clip: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    # PPO-ptx
    ptx_corpus: list[str] = field(default_factory=list)
    ptx_coef: float = 0.0
    ptx_batch: int = 8
    ptx_context: int = 128
    # observability
    sample_every: int = 10
    eval_prompts: str = ""           # the dev split: proxy reward, KL (and gold score) tracked on it
    eval_every: int = 0
    eval_size: int = 64
    gold: bool = False               # score the eval answers with the tiny world's gold labeler too
    save_every: int = 10             # iterations between resume checkpoints in `out` (and always at the end)
    resume: bool = False             # continue the run in `out` exactly from its last saved iteration
    seed: int = 0
    device: str | None = None        # cuda, mps or cpu; default: the best available
    dtype: str = "fp32"              # fp32 | bf16 (autocast; the engine's and the update's log-probs then differ more)
    threads: int = 0
    compile: str = "auto"            # the rollouts' decode step through torch.compile: on | off | auto: on when
                                     # the run decodes COMPILE_AFTER_STEPS steps or more, unless CHATFORGE_COMPILE=0
    progress: bool = True

    def validate(self) -> None:
        checks = [
            (self.value_init in ("reward", "head"), f"value_init must be 'reward' or 'head', got {self.value_init!r}"),
            (self.baseline in ("value", "group"), f"baseline must be 'value' or 'group', got {self.baseline!r}"),
            (self.samples_per_prompt >= (2 if self.baseline == "group" else 1),
             f"samples_per_prompt must be >= {2 if self.baseline == 'group' else 1} with baseline = "
             f"{self.baseline!r}, got {self.samples_per_prompt}"),
            (self.kl_estimator in ("k1", "k2", "k3"), f"kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}"),
            (self.iterations >= 1, f"iterations must be >= 1, got {self.iterations}"),
            (self.save_every >= 1, f"save_every must be >= 1, got {self.save_every}"),
            (self.rollout_batch >= 2, f"rollout_batch must be >= 2 (advantages are whitened), got {self.rollout_batch}"),
            (1 <= self.minibatch <= self.answers_per_iteration,
             f"minibatch must be in [1, rollout_batch x samples_per_prompt = {self.answers_per_iteration}] "
             f"answers, got {self.minibatch}"),
            (self.ppo_epochs >= 1, f"ppo_epochs must be >= 1, got {self.ppo_epochs}"),
            (self.temperature > 0, f"temperature must be > 0 (the policy samples), got {self.temperature}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.kl_coef >= 0, f"kl_coef must be >= 0, got {self.kl_coef}"),
            (0 <= self.lam <= 1 and 0 <= self.gamma <= 1, "gamma and lam must be in [0, 1]"),
            (self.clip_range > 0, f"clip_range must be > 0, got {self.clip_range}"),
            (self.ptx_coef >= 0, f"ptx_coef must be >= 0, got {self.ptx_coef}"),
            (not (self.ptx_coef > 0 and not self.ptx_corpus), "ptx_coef > 0 needs ptx_corpus (pretraining text)"),
            (self.dtype in ("fp32", "bf16"), f"dtype must be fp32 or bf16, got {self.dtype!r}"),
            (self.compile in ("auto", "on", "off"), f"compile must be auto, on or off, got {self.compile!r}"),
            (not (self.lora and self.reference),
             "with lora the reference is the policy's own weights with the adapters off: leave reference unset"),
            (not (self.lora_merge and not self.lora), "lora_merge needs lora"),
            (not (self.reward_model == GOLD and self.baseline == "value" and self.value_init == "reward"),
             'reward_model = "gold" has no network to start a value model from: use baseline = "group" or '
             'value_init = "head"'),
        ]
        for ok, message in checks:
            if not ok:
                raise ChatforgeError(message)

    @property
    def answers_per_iteration(self) -> int:
        return self.rollout_batch * self.samples_per_prompt


# ---------------------------------------------------------------- models

class ValueHead(nn.Module):
    """V(s) on the policy's own hidden states, zero-initialised: every value starts at exactly 0."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)


@dataclass
class PPOModels:
    policy: GPT                      # trained: all weights, or only its LoRA adapters
    reference: GPT | None            # frozen; None means the policy with its adapters switched off
    value: nn.Module | None          # a ScalarModel (from the reward model), a ValueHead on the policy, or None
                                     # (baseline = "group")
    reward: RewardFn                 # frozen
    tokenizer: Tokenizer

    def reference_context(self):
        if self.reference is not None:
            return nullcontext(self.reference)
        from chatforge.model.adapters import adapters_disabled
        return adapters_disabled(self.policy)


GOLD = "gold"


class GoldScorer:
    """The tiny world's gold labeler as a RewardFn (Gao et al. 2022's gold reward model): each answer's gold score
    in [0, 1], the conversation looked up by its prompt's token ids."""

    def __init__(self, tokenizer: Tokenizer, conversations: dict[tuple[int, ...], list[dict[str, Any]]]) -> None:
        from chatforge.data.world.labeler import GoldLabeler
        self.tokenizer, self.conversations, self.labeler = tokenizer, conversations, GoldLabeler()

    def __call__(self, prompts: list[list[int]], answers: list[list[int]], finished: torch.Tensor) -> torch.Tensor:
        stops = set(self.tokenizer.stop_ids)
        return torch.tensor([self.labeler.score(self.conversations[tuple(p)],
                                                self.tokenizer.decode([t for t in a if t not in stops])).total
                             for p, a in zip(prompts, answers)])


class RewardModelScorer:
    """The reward model as a RewardFn: its scalar at the answer's last token (the end-of-turn token when the
    answer ended), divided by the spread its meta records (`reward_scale`, the std over the SFT demonstrations,
    whose mean the saved bias already makes 0): one unit of reward is then one demonstration-std whatever the
    run, so a kl_coef means the same thing across reward models."""

    def __init__(self, model: ScalarModel, pad_id: int, meta: dict[str, Any], batch_size: int = 32) -> None:
        self.model, self.pad_id, self.batch_size = model.eval().requires_grad_(False), pad_id, batch_size
        self.scale = float(meta.get("reward_scale") or 1.0)

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]], answers: list[list[int]], finished: torch.Tensor) -> torch.Tensor:
        from chatforge.train.reward import score_sequences
        seqs = [(p + a, len(p)) for p, a in zip(prompts, answers)]
        return torch.tensor(score_sequences(self.model, seqs, self.pad_id, self.batch_size)) / self.scale


def read_prompts(path: str | Path, tokenizer: Tokenizer, context: int, max_new_tokens: int
                 ) -> tuple[list[list[int]], list[dict[str, Any]]]:
    """Prompt ids and records of a JSONL prompt set. Long conversations lose their oldest turns, as in chat;
    a prompt whose last turn alone leaves no room for an answer is an error."""
    from chatforge.data.chat import fit_messages
    from chatforge.data.jsonl import iter_jsonl
    from chatforge.data.preferences import parse_prompt
    ids, records = [], []
    for where, record in iter_jsonl(path):
        messages = parse_prompt(record, where)
        try:
            fitted = fit_messages(tokenizer, messages, context - max_new_tokens, for_generation=True)
        except ChatforgeError as e:
            raise ChatforgeError(f"{where}: {e} (max_new_tokens={max_new_tokens} reserved for the answer)") from None
        ids.append(fitted.ids)
        records.append({**record, "messages": fitted.messages})
    if not ids:
        raise ChatforgeError(f"{path}: no prompts in the file")
    return ids, records


@dataclass
class CheckedInputs:
    policy_meta: dict[str, Any]
    prompts: list[list[int]]
    eval_set: tuple[list[list[int]], list[dict[str, Any]]] | None
    conversations: dict[tuple[int, ...], list[dict[str, Any]]]  # prompt ids -> messages (with the gold reward)


def check_inputs(cfg: PPOConfig) -> CheckedInputs:
    """Every check that needs only files, run before any model is built: checkpoints, tokenizers, prompts."""
    for name in ("policy", "reward_model", "prompts"):
        if not getattr(cfg, name):
            raise ChatforgeError(f"--{name.replace('_', '-')} is required")
    policy_meta = read_meta(cfg.policy)
    if policy_meta["kind"] in ("reward", "value"):
        raise ChatforgeError(f"{cfg.policy}: is a {policy_meta['kind']} checkpoint, expected a policy (sft or policy)")
    policy_tok = (resolve(cfg.policy) / "tokenizer.json").read_bytes()
    if cfg.reward_model != GOLD:
        _check_reward_model(cfg, policy_tok)
    if cfg.reference:
        ref, pol = resolve(cfg.reference), resolve(cfg.policy)
        ref_hash = weights_hash(ref)
        if ref_hash not in (weights_hash(pol), policy_meta.get("parent_hash")):
            raise ChatforgeError(f"{cfg.reference}: is not the policy's parent: {cfg.policy} was trained from "
                                 f"{policy_meta.get('parent')} (weights {policy_meta.get('parent_hash')}), the "
                                 f"reference has weights {ref_hash}")
        if (ref / "tokenizer.json").read_bytes() != policy_tok:
            raise ChatforgeError(f"{cfg.reference}: its tokenizer differs from the policy's ({cfg.policy})")
    tokenizer = Tokenizer.load(resolve(cfg.policy))
    context = _context(cfg.policy)
    prompts, records = read_prompts(cfg.prompts, tokenizer, context, cfg.max_new_tokens)
    eval_set = None
    if cfg.eval_prompts:
        eval_prompts, eval_records = read_prompts(cfg.eval_prompts, tokenizer, context, cfg.max_new_tokens)
        eval_set = (eval_prompts[:cfg.eval_size], eval_records[:cfg.eval_size])
    conversations = {}
    if cfg.reward_model == GOLD:
        conversations = {tuple(ids): r["messages"] for ids, r in zip(prompts + (eval_set[0] if eval_set else []),
                                                                      records + (eval_set[1] if eval_set else []))}
    return CheckedInputs(policy_meta, prompts, eval_set, conversations)


def _check_reward_model(cfg: PPOConfig, policy_tok: bytes) -> None:
    reward_meta = read_meta(cfg.reward_model)
    if reward_meta["kind"] != "reward":
        raise ChatforgeError(f"{cfg.reward_model}: is a {reward_meta['kind']} checkpoint, expected a reward model")
    if (resolve(cfg.reward_model) / "tokenizer.json").read_bytes() != policy_tok:
        raise ChatforgeError(f"{cfg.reward_model}: its tokenizer differs from the policy's ({cfg.policy}); the reward "
                             "model must be trained from the same SFT lineage")
    if _context(cfg.reward_model) < _context(cfg.policy):
        raise ChatforgeError(f"{cfg.reward_model}: context {_context(cfg.reward_model)} is shorter than the "
                             f"policy's {_context(cfg.policy)}, so it cannot score every answer")


def _context(checkpoint: str) -> int:
    return json.loads((resolve(checkpoint) / "config.json").read_text())["max_position_embeddings"]


def load_models(cfg: PPOConfig, device: torch.device,
                conversations: dict[tuple[int, ...], list[dict[str, Any]]] | None = None) -> PPOModels:
    policy, tokenizer, _ = load_model(cfg.policy, device, expect_kind=("sft", "policy", "base"))
    reference = None
    if cfg.lora:
        from chatforge.model.adapters import LoRAConfig, attach_lora
        attach_lora(policy, LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=0.0))
    else:
        reference, _, _ = load_model(cfg.reference or cfg.policy, device)
        reference.requires_grad_(False)
    value: nn.Module | None = None
    if cfg.baseline == "value" and cfg.value_init == "reward":
        value = load_model(cfg.reward_model, device)[0].requires_grad_(True).eval()
    elif cfg.baseline == "value":
        value = ValueHead(policy.config.hidden_size).to(device)
    if cfg.reward_model == GOLD:
        scorer: RewardFn = GoldScorer(tokenizer, conversations or {})
    else:
        reward_model, _, reward_meta = load_model(cfg.reward_model, device, expect_kind=("reward",))
        scorer = RewardModelScorer(reward_model, tokenizer.pad_id, reward_meta)
    return PPOModels(policy.eval(), reference.eval() if reference else None, value, scorer, tokenizer)


# ---------------------------------------------------------------- 1. rollout

@dataclass
class Experience:
    """One iteration's answers as tensors over answer tokens [B, T] (right-padded), with everything PPO needs."""
    sequences: torch.Tensor          # [B, L] the model's inputs: prompt + answer but its last token (which predicts
                                     # nothing), right-padded
    positions: torch.Tensor          # [B, T] the position whose output predicts answer token t
    answers: torch.Tensor            # [B, T] answer token ids
    mask: torch.Tensor               # [B, T] 1 on real answer tokens
    logprobs: torch.Tensor           # [B, T] under the policy that sampled them
    finished: torch.Tensor           # [B] the answer ended with an end-of-turn token
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    scores: torch.Tensor | None = None       # reward model, after the EOS penalty and normalisation
    raw_scores: torch.Tensor | None = None   # reward model as it returned them
    kl: torch.Tensor | None = None           # [B, T] per-token KL estimate
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def rows(self, index: torch.Tensor) -> "Experience":
        """A minibatch, trimmed to its own longest sequence."""
        sub = {k: (v[index] if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        width = int((sub["positions"] * sub["mask"]).max().item()) + 1
        sub["sequences"] = sub["sequences"][:, :width]
        sub["positions"] = sub["positions"].clamp(max=width - 1)  # padding slots point inside the trimmed rows
        answer_width = max(int(sub["mask"].sum(1).max().item()), 1)
        for k in ("positions", "answers", "mask", "logprobs", "ref_logprobs", "values", "kl", "rewards",
                  "advantages", "returns"):
            if sub[k] is not None:
                sub[k] = sub[k][:, :answer_width]
        return Experience(**sub)


@dataclass
class Answer:
    prompt_ids: list[int]
    ids: list[int]                   # the answer's tokens, its end-of-turn token included when it ended
    logprobs: list[float]            # one per token in `ids`, under the policy that sampled them
    text: str                        # the answer as the user sees it (no end-of-turn token)
    finished: bool                   # ended with an end-of-turn token, not at the length limit


def rollout(engine, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], seed: int,
            temperature: float = 1.0, samples_per_prompt: int = 1) -> list[Answer]:
    """Sample `samples_per_prompt` answers per prompt, prompt-major (no top-k/top-p: PPO's log-probs are of the
    full policy); the engine prefills each prompt once for all of its answers.

    The engine leaves the stop token out of `ids` but gives its log-prob (at temperature 1: `score` replaces them
    when the policy is another temperature's); the stream tells which token it was, and PPO keeps it: ending the
    answer is an action the policy is rewarded for.
    """
    from chatforge.infer.engine import SamplingParams
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=1.0,
                            repetition_penalty=1.0, stop_ids=stop_ids, seed=seed)
    stream = engine.stream(prompts, params, return_logprobs=True, num_samples=samples_per_prompt)
    last_token: dict[int, int] = {}
    for step in stream:
        last_token.update(step)
    answers = []
    for row, g in enumerate(stream.generations()):
        finished = g.finish_reason == "stop"
        ids = list(g.ids) + ([last_token[row]] if finished else [])
        answers.append(Answer(list(g.prompt_ids), ids, list(g.logprobs), g.text, finished))
    return answers


def to_experience(answers: list[Answer], pad_id: int, device: torch.device) -> Experience:
    """Answers -> right-padded tensors; answer token t of row b is predicted at position len(prompt_b) - 1 + t."""
    B = len(answers)
    T = max(max(len(a.ids) for a in answers), 1)
    L = max(len(a.prompt_ids) + len(a.ids) for a in answers) - 1
    sequences = torch.full((B, L), pad_id, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    answer_ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T)
    logprobs = torch.zeros(B, T)
    for b, a in enumerate(answers):
        p, n = len(a.prompt_ids), len(a.ids)
        if len(a.logprobs) != n:
            raise RuntimeError(f"engine returned {len(a.logprobs)} log-probs for {n} tokens")
        sequences[b, :p + n - 1] = torch.tensor((a.prompt_ids + a.ids)[:p + n - 1])
        positions[b] = torch.arange(p - 1, p - 1 + T).clamp(max=L - 1)
        answer_ids[b, :n] = torch.tensor(a.ids, dtype=torch.long)
        mask[b, :n] = 1
        logprobs[b, :n] = torch.tensor(a.logprobs, dtype=torch.float)
    finished = torch.tensor([a.finished for a in answers])
    return Experience(sequences.to(device), positions.to(device), answer_ids.to(device), mask.to(device),
                      logprobs.to(device), finished.to(device))


# ---------------------------------------------------------------- 2. score

def gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, L, d] -> [B, T, d]: only the positions that predict answer tokens go through the heads."""
    return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def answer_logits(model: GPT, exp: Experience, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits over answer tokens [B, T, V] divided by the policy's temperature, the hidden states they came
    from [B, T, d])."""
    hidden = gather_positions(model.hidden(exp.sequences), exp.positions)
    logits = model.lm_head(hidden)
    return (logits / temperature if temperature != 1.0 else logits), hidden


def answer_values(models: PPOModels, exp: Experience, policy_hidden: torch.Tensor | None) -> torch.Tensor:
    if isinstance(models.value, ValueHead):
        return models.value.score(policy_hidden).squeeze(-1).float()
    hidden = gather_positions(models.value.hidden(exp.sequences), exp.positions)
    return models.value.score(hidden).squeeze(-1).float()


@torch.no_grad()
def reference_logprobs(models: PPOModels, exp: Experience, temperature: float, autocast) -> torch.Tensor:
    """The reference's log-probs of the answer tokens [B, T] (0 on padding), both models at the policy's
    temperature; off temperature 1 `exp.logprobs` are replaced by the tempered policy's too (the engine's are
    the untempered model's)."""
    with autocast, models.reference_context() as reference:
        ref = rl_math.token_logprobs(answer_logits(reference, exp, temperature)[0], exp.answers) * exp.mask
    if temperature != 1.0:
        with autocast:
            exp.logprobs = rl_math.token_logprobs(answer_logits(models.policy, exp, temperature)[0],
                                                  exp.answers) * exp.mask
    return ref


@torch.no_grad()
def score(models: PPOModels, exp: Experience, prompts: list[list[int]], cfg: PPOConfig,
          score_moments: rl_math.RunningMoments, autocast) -> None:
    """Reference log-probs, values and reward-model scores for the answers in `exp` (filled in place)."""
    exp.ref_logprobs = reference_logprobs(models, exp, cfg.temperature, autocast)
    if models.value is not None:
        with autocast:
            policy_hidden = None
            if isinstance(models.value, ValueHead):
                policy_hidden = gather_positions(models.policy.hidden(exp.sequences), exp.positions)
            exp.values = answer_values(models, exp, policy_hidden) * exp.mask
    answers = [row[:int(n)].tolist() for row, n in zip(exp.answers, exp.mask.sum(1))]
    with autocast:  # the reward model in the run's dtype too
        raw = models.reward(prompts, answers, exp.finished).to(exp.mask.device).float()
    exp.raw_scores = raw
    scores = raw - cfg.missing_eos_penalty * (~exp.finished).float()
    if cfg.score_norm:
        score_moments.update(scores)
        scores = (scores - score_moments.mean) / score_moments.std
    if cfg.score_clip > 0:
        scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
    exp.scores = scores


# ---------------------------------------------------------------- 3-4. rewards and advantages

@torch.no_grad()
def compute_advantages(exp: Experience, kl_coef: float, cfg: PPOConfig) -> None:
    exp.kl = rl_math.kl_per_token(exp.logprobs, exp.ref_logprobs, cfg.kl_estimator) * exp.mask
    exp.rewards = rl_math.per_token_rewards(exp.scores, exp.kl, exp.mask, kl_coef)
    if cfg.baseline == "group":
        exp.advantages = rl_math.group_advantages(exp.scores, exp.kl, exp.mask, kl_coef, cfg.samples_per_prompt)
        return
    advantages, exp.returns = rl_math.gae(exp.rewards, exp.values, exp.mask, cfg.gamma, cfg.lam)
    exp.advantages = rl_math.whiten(advantages, exp.mask)


# ---------------------------------------------------------------- 5. update

def ppo_update(models: PPOModels, exp: Experience, optimizer: torch.optim.Optimizer, scheduler,
               cfg: PPOConfig, generator: torch.Generator, ptx_batches, autocast) -> dict[str, float]:
    """`ppo_epochs` passes over the batch in shuffled minibatches; returns the mean of each statistic."""
    policy_params = [p for p in models.policy.parameters() if p.requires_grad]
    value_params = [p for p in models.value.parameters() if p.requires_grad] if models.value is not None else []
    stats: dict[str, list[float]] = {}
    B = exp.sequences.shape[0]
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=generator).to(exp.sequences.device)
        for start in range(0, B, cfg.minibatch):
            mb = exp.rows(order[start:start + cfg.minibatch])
            with autocast:
                logits, hidden = answer_logits(models.policy, mb, cfg.temperature)
                logprobs = rl_math.token_logprobs(logits, mb.answers)
            pg_loss, pg_stats = rl_math.policy_loss(logprobs, mb.logprobs, mb.advantages, mb.mask, cfg.clip_range)
            loss, vf_stats = pg_loss, {}
            if models.value is not None:
                with autocast:
                    values = answer_values(models, mb, hidden)
                vf_loss, vf_stats = rl_math.value_loss(values, mb.values, mb.returns, mb.mask, cfg.value_clip)
                loss = loss + cfg.vf_coef * vf_loss
                vf_stats["value_loss"] = vf_loss.item()
            if ptx_batches is not None:
                x, y = (t.to(exp.sequences.device) for t in next(ptx_batches))
                with autocast:
                    ptx_loss = F.cross_entropy(models.policy(x).float().flatten(0, 1), y.flatten())
                loss = loss + cfg.ptx_coef * ptx_loss
                stats.setdefault("ptx_loss", []).append(ptx_loss.item())
            if not torch.isfinite(loss):
                raise ChatforgeError(f"PPO loss is {loss.item()} (policy {pg_loss.item()}, value "
                                     f"{vf_stats.get('value_loss')}): training stopped before the weights were "
                                     "damaged; try a lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy_params, cfg.grad_clip) if cfg.grad_clip > 0 else None
            if cfg.grad_clip > 0 and value_params:
                torch.nn.utils.clip_grad_norm_(value_params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                entropy = masked_mean(rl_math.entropy_from_logits(logits), mb.mask).item()
            for k, v in {"policy_loss": pg_loss.item(), "entropy": entropy,
                         **pg_stats, **vf_stats, **({"grad_norm": grad_norm.item()} if grad_norm is not None else {})
                         }.items():
                stats.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in stats.items()}


# ---------------------------------------------------------------- observability

class HealthMonitor:
    """Warnings for the failure modes users of RLHF tools report, from the per-iteration statistics."""

    def __init__(self, kl_target: float) -> None:
        self.history: list[dict[str, float]] = []
        self.kl_alarm = max(4 * kl_target, 20.0)

    def check(self, row: dict[str, float], answers: list[str]) -> list[str]:
        warnings = []
        if row["kl"] < -0.1:
            warnings.append(f"negative KL ({row['kl']:.3f}): the rollout and reference log-probs disagree "
                            "(sampling settings other than temperature 1, or a reference that is not the start)")
        first = self.history[0] if self.history else row
        if row["kl"] > self.kl_alarm and row["rm_score"] > first["rm_score"]:
            warnings.append(f"reward rising while KL explodes (KL {row['kl']:.1f} nats): the policy is likely "
                            "exploiting the reward model; raise kl_coef or use adaptive KL")
        if answers:
            top, count = Counter(answers).most_common(1)[0]
            if count / len(answers) > 0.5 and len(answers) >= 8:
                warnings.append(f"answers collapsing: {count}/{len(answers)} are the same string {top[:40]!r}")
        start_len, now_len = first["answer_len"], row["answer_len"]
        if self.history and (now_len > 2 * start_len + 4 or now_len < start_len / 2 - 2):
            warnings.append(f"length hacking? mean answer length {now_len:.1f} tokens, {start_len:.1f} at the start: "
                            "check whether the reward model simply prefers longer (or shorter) answers")
        self.history.append(row)
        return warnings


def iteration_row(exp: Experience, kl_coef: float, update_stats: dict[str, float]) -> dict[str, float]:
    kl_per_answer = exp.kl.sum(1)
    row = {
        "reward": (exp.scores - kl_coef * kl_per_answer).mean().item(),
        "rm_score": exp.raw_scores.mean().item(),
        "kl": kl_per_answer.mean().item(),
        "kl_coef": kl_coef,
        "answer_len": exp.mask.sum(1).mean().item(),
        "ended": exp.finished.float().mean().item(),
        **update_stats,
    }
    if exp.values is not None:
        row["explained_var"] = rl_math.explained_variance(exp.values, exp.returns, exp.mask)
    return row


@torch.no_grad()
def evaluate(models: PPOModels, engine, prompts: list[list[int]], records: list[dict[str, Any]], cfg: PPOConfig,
             device: torch.device, autocast, labeler=None) -> dict[str, float]:
    """Proxy reward, KL to the reference, and (when given a labeler) gold score, on held-out prompts."""
    answers = rollout(engine, prompts, cfg.max_new_tokens, models.tokenizer.stop_ids, seed=cfg.seed + 7,
                      temperature=cfg.temperature)
    exp = to_experience(answers, models.tokenizer.pad_id, device)
    ref_logprobs = reference_logprobs(models, exp, cfg.temperature, autocast)
    kl = (rl_math.kl_per_token(exp.logprobs, ref_logprobs, "k1") * exp.mask).sum(1)
    with autocast:
        rm_scores = models.reward(prompts, [a.ids for a in answers], exp.finished).float()
    out = {"eval_rm_score": rm_scores.mean().item(), "eval_kl": kl.mean().item()}
    if labeler is not None:
        gold = [labeler.score(r["messages"], a.text).total for r, a in zip(records, answers)]
        out["eval_gold_score"] = sum(gold) / len(gold)
    return out


# ---------------------------------------------------------------- the outer loop

def rollout_engine(models: PPOModels, cfg: PPOConfig, iterations_left: int):
    """The engine the rollouts run on. Its decode step is compiled when `cfg.compile` is on, never when off, and on
    auto as the engine decides by default, told how many decode steps the run has left: the compiler's one-off
    tens of seconds pay off only over thousands."""
    from chatforge.infer.engine import Engine
    return Engine(models.policy, models.tokenizer, compile={"on": True, "off": False}.get(cfg.compile),
                  expected_steps=iterations_left * cfg.max_new_tokens)


class Schedule:
    """The shared loop's learning-rate schedule (linear warmup, then constant), stepped once per optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, train_cfg: TrainConfig, step_count: int = 0) -> None:
        self.optimizer, self.train_cfg, self.step_count = optimizer, train_cfg, step_count
        self._apply()

    def _apply(self) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(self.step_count, self.train_cfg)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]


class PPOProgress(Progress):
    """The shared progress bar, showing PPO's numbers instead of a loss; in logs, one line per iteration."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        super().__init__(total, initial, enabled, desc="ppo", unit="iteration", every=0.0)

    def show_row(self, row: dict[str, float]) -> None:
        self.show(row["iteration"], f"reward {row['reward']:+.3f} rm {row['rm_score']:+.3f} KL {row['kl']:.2f} "
                                    f"β {row['kl_coef']:.3f} ent {row['entropy']:.2f} clip {row['clip_frac']:.2f} "
                                    f"len {row['answer_len']:.0f}")


def ptx_stream(cfg: PPOConfig, tokenizer: Tokenizer, cache: Path, start: int = 0):
    """Endless random windows of the pretraining corpus's training split, for the ptx term, from batch `start`.

    The shards are pretraining's own when `cache` is its token cache (same corpus, tokenizer and split).
    """
    from chatforge.data.tokens import WindowSampler, tokenize_corpus
    data = tokenize_corpus(cfg.ptx_corpus, tokenizer, cache, val_fraction=0.01, progress=cfg.progress)
    sampler = WindowSampler(data.train, cfg.ptx_context, cfg.ptx_batch, seed=cfg.seed)
    step = start
    while True:
        yield sampler(step)
        step += 1


# ---------------------------------------------------------------- resume state

STATE_VERSION = 1
# Settings that may differ on --resume: they change what is observed, where, or for how long, never the result
# of an iteration. `iterations` may grow: the schedule is constant after warmup.
RESUME_FREE = ("out", "iterations", "save_every", "resume", "lora_merge", "sample_every", "eval_prompts",
               "eval_every", "eval_size", "gold", "device", "threads", "progress", "compile")


def _named(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def _rng_state(generator: torch.Generator, prompt_rng: random.Random) -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "shuffle": generator.get_state(),
            "prompts": prompt_rng.getstate(),
            "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]]}


def _set_rng_state(rng: dict[str, Any], generator: torch.Generator, prompt_rng: random.Random) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    generator.set_state(rng["shuffle"])
    prompt_rng.setstate(rng["prompts"])
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def resume_fingerprint_of(cfg: PPOConfig) -> dict[str, Any]:
    """What must be equal for --resume to continue exactly: the settings but RESUME_FREE, with the input files
    identified by their contents rather than their paths."""
    from chatforge.checkpoint import file_hash
    return resume_fingerprint(cfg, drop=RESUME_FREE + ("policy", "reward_model", "reference", "prompts"),
                              policy=weights_hash(resolve(cfg.policy)),
                              reward_model=GOLD if cfg.reward_model == GOLD else weights_hash(resolve(cfg.reward_model)),
                              reference=cfg.reference and weights_hash(resolve(cfg.reference)),
                              prompts=file_hash(cfg.prompts))


def read_resume_state(out: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The resume state saved in `out`, refused if the run's settings or inputs changed since."""
    trainer_pt = out / "state" / "trainer.pt"
    if not trainer_pt.is_file():
        raise ChatforgeError(f"{out}: checkpoint has no resume state (state/trainer.pt)")
    state = torch.load(trainer_pt, map_location="cpu", weights_only=True)
    if state.get("version") != STATE_VERSION or state.get("stage") != "ppo":
        raise ChatforgeError(f"{trainer_pt}: not a PPO resume state of version {STATE_VERSION} "
                             f"(stage {state.get('stage')!r}, version {state.get('version')!r})")
    refuse_changed_resume(out, state["fingerprint"], json.loads(json.dumps(fingerprint, default=str)))
    return state


def _trim_metrics(path: Path, lines: int) -> list[dict[str, Any]]:
    """metrics.jsonl cut to the lines the saved state had written (a killed run may have logged more)."""
    kept = path.read_text().splitlines()[:lines] if path.is_file() else []
    if len(kept) < lines:
        raise ChatforgeError(f"{path}: {len(kept)} lines, the resume state has written {lines}")
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return [json.loads(line) for line in kept]


# ---------------------------------------------------------------- the outer loop

def train_ppo(models: PPOModels, prompts: list[list[int]], cfg: PPOConfig, out: Path | None = None,
              eval_set: tuple[list[list[int]], list[dict[str, Any]]] | None = None, labeler=None,
              log: Callable[[str], None] = print, token_cache: Path | None = None,
              resume_state: dict[str, Any] | None = None,
              save_fn: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Run PPO iterations in place on `models` up to `cfg.iterations`; returns the per-iteration statistics.

    `out` receives metrics.jsonl; `token_cache` holds the ptx corpus's token shards (default: token-cache/
    beside `out`, where pretraining keeps them). `save_fn(state, history)` is called every `cfg.save_every`
    iterations and at the end with everything `resume_state` needs to continue exactly from there.
    """
    if token_cache is None:
        token_cache = (out.parent if out is not None else Path(tempfile.gettempdir())) / "token-cache"
    device = next(models.policy.parameters()).device
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    prompt_rng = random.Random(cfg.seed)
    autocast = bf16_autocast(device) if cfg.dtype == "bf16" else nullcontext()
    kl_ctl = (rl_math.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else rl_math.FixedKLController(cfg.kl_coef))
    policy_params = _named(models.policy)
    value_params = _named(models.value) if models.value is not None else {}
    steps_per_iteration = cfg.ppo_epochs * math.ceil(cfg.answers_per_iteration / cfg.minibatch)
    train_cfg = TrainConfig(steps=cfg.iterations * steps_per_iteration, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                            min_lr_ratio=1.0, weight_decay=0.0, grad_clip=cfg.grad_clip)
    groups = [{"params": list(policy_params.values()), "lr": cfg.lr}]
    if value_params:
        groups.append({"params": list(value_params.values()), "lr": cfg.value_lr})
    optimizer = make_optimizer(groups, train_cfg, device, fused_on_cpu=True)
    score_moments = rl_math.RunningMoments()
    monitor = HealthMonitor(cfg.kl_target)
    metrics_path = out / "metrics.jsonl" if out is not None else None
    history: list[dict[str, Any]] = []
    queue: list[int] = []
    done, seconds = 0, 0.0
    if resume_state is not None:
        with torch.no_grad():
            for params, saved in ((policy_params, resume_state["policy"]), (value_params, resume_state["value"])):
                for name, p in params.items():
                    p.copy_(saved[name])
        optimizer.load_state_dict(resume_state["optimizer"])
        kl_ctl.value = resume_state["kl_coef"]
        score_moments.load_state_dict(resume_state["score_moments"])
        monitor.history = resume_state["health"]
        queue = list(resume_state["prompt_queue"])
        _set_rng_state(resume_state["rng"], generator, prompt_rng)
        done, seconds = resume_state["iteration"], resume_state["seconds"]
        if metrics_path is not None:
            history = _trim_metrics(metrics_path, resume_state["metrics_lines"])
    scheduler = Schedule(optimizer, train_cfg, resume_state["schedule_steps"] if resume_state else 0)
    engine = rollout_engine(models, cfg, cfg.iterations - done)
    ptx_batches = (ptx_stream(cfg, models.tokenizer, token_cache, start=done * steps_per_iteration)
                   if cfg.ptx_coef > 0 else None)

    def record(row: dict[str, Any]) -> None:
        history.append(row)
        if metrics_path is not None:  # opened per line: a save swaps the directory it lives in
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def maybe_evaluate(n: int) -> None:
        if eval_set is not None and cfg.eval_every and (n % cfg.eval_every == 0 or n == cfg.iterations):
            record({"iteration": n, **evaluate(models, engine, *eval_set, cfg, device, autocast, labeler)})

    def state(n: int) -> dict[str, Any]:
        return {"version": STATE_VERSION, "stage": "ppo", "iteration": n, "seconds": seconds,
                "metrics_lines": len(history),
                "policy": {k: p.detach().to("cpu", copy=True) for k, p in policy_params.items()},
                "value": {k: p.detach().to("cpu", copy=True) for k, p in value_params.items()},
                "optimizer": optimizer.state_dict(), "schedule_steps": scheduler.step_count,
                "kl_coef": kl_ctl.value, "score_moments": score_moments.state_dict(), "health": monitor.history,
                "prompt_queue": list(queue), "rng": _rng_state(generator, prompt_rng)}

    bar = PPOProgress(cfg.iterations, done, cfg.progress)
    try:
        if done == 0:
            maybe_evaluate(0)
        for iteration in range(done, cfg.iterations):
            t0 = time.perf_counter()
            while len(queue) < cfg.rollout_batch:  # epochs over the prompt set, reshuffled each time
                order = list(range(len(prompts)))
                prompt_rng.shuffle(order)
                queue += order
            batch_prompts = [prompts[i] for i in queue[:cfg.rollout_batch]]
            del queue[:cfg.rollout_batch]
            # 1. rollout
            answers = rollout(engine, batch_prompts, cfg.max_new_tokens, models.tokenizer.stop_ids,
                              seed=cfg.seed * 1_000_003 + iteration, temperature=cfg.temperature,
                              samples_per_prompt=cfg.samples_per_prompt)
            exp = to_experience(answers, models.tokenizer.pad_id, device)
            t_rollout = time.perf_counter()
            # 2. score
            score(models, exp, [a.prompt_ids for a in answers], cfg, score_moments, autocast)
            t_score = time.perf_counter()
            # 3-4. rewards and advantages
            kl_coef = kl_ctl.value
            compute_advantages(exp, kl_coef, cfg)
            # 5. update
            models.policy.train()
            update_stats = ppo_update(models, exp, optimizer, scheduler, cfg, generator, ptx_batches, autocast)
            models.policy.eval()
            # 6. β
            row = iteration_row(exp, kl_coef, update_stats)
            kl_ctl.update(row["kl"], len(answers))
            t_end = time.perf_counter()
            seconds += t_end - t0
            row = {"iteration": iteration + 1, **row, "lr": scheduler.get_last_lr()[0], "seconds": t_end - t0,
                   "rollout_seconds": t_rollout - t0, "score_seconds": t_score - t_rollout,
                   "update_seconds": t_end - t_score}
            texts = [a.text for a in answers]
            for w in monitor.check(row, texts):
                log(f"warning: iteration {iteration + 1}: {w}")
            if cfg.sample_every and (iteration + 1) % cfg.sample_every == 0:
                best = int(exp.raw_scores.argmax())
                log(f"[{iteration + 1}] sample (rm {exp.raw_scores[0].item():+.2f}): {texts[0][:200]!r}\n"
                    f"[{iteration + 1}] best   (rm {exp.raw_scores[best].item():+.2f}): {texts[best][:200]!r}")
                row["sample"] = texts[0][:500]
            record(row)
            bar.show_row(row)
            maybe_evaluate(iteration + 1)
            if save_fn is not None and ((iteration + 1) % cfg.save_every == 0 or iteration + 1 == cfg.iterations):
                save_fn(state(iteration + 1), history)
    finally:
        bar.close()
    return history


def policy_meta(cfg: PPOConfig, history: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """meta.json of the output: kind "policy" (an adapter acting as one, with LoRA), with the last numbers."""
    iterations = [row for row in history if "reward" in row]
    last = iterations[-1]
    summary = {k: last[k] for k in ("reward", "rm_score", "kl", "kl_coef", "entropy", "answer_len")}
    evaluations = [row for row in history if "eval_kl" in row]
    if evaluations:
        summary.update({k: v for k, v in evaluations[-1].items() if k.startswith("eval_")})
    return {"kind": "policy", "stage": "ppo", "parent": str(resolve(cfg.policy)),
            "parent_hash": weights_hash(resolve(cfg.policy)), "config": asdict(cfg),
            "metrics": {**summary, "iterations": last["iteration"], "of": cfg.iterations, "seconds": round(seconds, 1)}}


def save_policy(out: Path, models: PPOModels, cfg: PPOConfig, state: dict[str, Any],
                history: list[dict[str, Any]]) -> Path:
    """The output checkpoint with the resume state in state/: the policy, or with LoRA its adapter alone
    (kind "adapter" acting as "policy", on the SFT checkpoint as its base) unless `lora_merge`."""
    meta = policy_meta(cfg, history, state["seconds"])
    if cfg.lora and not cfg.lora_merge:
        from chatforge.model.adapters import save_adapter_checkpoint
        return save_adapter_checkpoint(out, models.policy, models.tokenizer, resolve(cfg.policy),
                                       {**meta, "acts_as": "policy"}, state=state, metrics_from=out / "metrics.jsonl")
    policy = models.policy
    if cfg.lora:
        from chatforge.model.adapters import merge_lora
        policy = merge_lora(copy.deepcopy(policy))  # the live policy keeps its adapters for the next iterations
    return save_model_checkpoint(out, policy, models.tokenizer, meta, state=state, metrics_from=out / "metrics.jsonl")


def run_ppo(cfg: PPOConfig) -> Path:
    """`chatforge ppo`: load and check everything, train, and write the policy checkpoint (kind "policy"), saved
    every `save_every` iterations so that `resume` continues a stopped run exactly."""
    cfg.validate()
    checked = check_inputs(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    out = Path(cfg.out)
    with RunLock(out):
        resume_state = _prepare_out(out, cfg)
        if resume_state is not None and resume_state["iteration"] >= cfg.iterations:
            print(f"ppo: {out} already ran {resume_state['iteration']} of {cfg.iterations} iterations; nothing to do")
            return out
        torch.manual_seed(cfg.seed)  # LoRA's initial A matrices
        models = load_models(cfg, device, checked.conversations)
        prompts, eval_set = checked.prompts, checked.eval_set
        labeler = None
        if cfg.gold and eval_set is not None:
            from chatforge.data.world.labeler import GoldLabeler
            labeler = GoldLabeler()
        trainable = sum(p.numel() for p in models.policy.parameters() if p.requires_grad)
        start = f", resuming at iteration {resume_state['iteration']}" if resume_state else ""
        print(f"ppo: policy {cfg.policy} ({models.policy.num_params() / 1e6:.1f}M params, {trainable / 1e6:.2f}M "
              f"trained{', LoRA' if cfg.lora else ''}), reward model {cfg.reward_model}, "
              f"{f'value from {cfg.value_init}' if cfg.baseline == 'value' else 'group baseline'}, "
              f"{len(prompts)} prompts, {cfg.iterations} iterations x {cfg.rollout_batch} prompts x "
              f"{cfg.samples_per_prompt} answers "
              f"<= {cfg.max_new_tokens} tokens, {cfg.ppo_epochs} epochs of minibatch {cfg.minibatch}"
              f"{f', ptx_coef {cfg.ptx_coef}' if cfg.ptx_coef else ''}{start}")
        fingerprint = json.loads(json.dumps(resume_fingerprint_of(cfg), default=str))

        def save(state: dict[str, Any], history: list[dict[str, Any]]) -> None:
            save_policy(out, models, cfg, {**state, "fingerprint": fingerprint}, history)

        history = train_ppo(models, prompts, cfg, out, eval_set, labeler, resume_state=resume_state, save_fn=save)
    last = [row for row in history if "reward" in row][-1]
    kind = "adapter alone, " if cfg.lora and not cfg.lora_merge else ""
    print(f"ppo: wrote {out} ({kind}rm score {last['rm_score']:+.3f}, KL {last['kl']:.2f} nats, "
          f"β {last['kl_coef']:.3f}); metrics in {out / 'metrics.jsonl'}")
    return out


def _prepare_out(out: Path, cfg: PPOConfig) -> dict[str, Any] | None:
    """The resume state to continue from, if any; clears what a stopped run left behind."""
    resolve(out)
    for staging in out.parent.glob(f"{out.name}.tmp-*"):
        shutil.rmtree(staging, ignore_errors=True)  # a save that was killed half-way
    if is_complete(out):
        if not cfg.resume:
            raise ChatforgeError(f"{out} already holds a checkpoint: pass --resume to continue it, "
                                 f"or choose another output directory")
        return read_resume_state(out, resume_fingerprint_of(cfg))
    leftovers = [p.name for p in out.iterdir() if p.name != "metrics.jsonl"] if out.is_dir() else []
    if leftovers:
        raise ChatforgeError(f"{out}: not a complete checkpoint directory (holds {', '.join(leftovers[:3])}"
                             f"{'...' if len(leftovers) > 3 else ''}); choose an empty output directory")
    out.mkdir(parents=True, exist_ok=True)  # metrics.jsonl grows here; checkpoints are swapped in
    (out / "metrics.jsonl").unlink(missing_ok=True)  # from a run stopped before its first save
    return None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ppo", help="RLHF step 3: PPO against a reward model with a KL penalty (and PPO-ptx)")
    add_config_args(p, PPOConfig, skip=("resume",))
    p.add_argument("--resume", dest="cfg_resume", action="store_const", const=True, default=None,
                   help="continue the run in --out exactly from its last saved iteration")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> None:
    run_ppo(config_from_args(PPOConfig, args, section="ppo"))
