"""The arithmetic of PPO, small and testable on its own.

Every tensor here is over answer tokens, [batch, answer_len], right-padded; `mask` is 1 on real answer tokens
(the end-of-turn token included) and 0 on padding. Nothing here knows about models or text.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    centred = (x - masked_mean(x, mask)) * mask
    return (centred ** 2).sum() / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Zero mean (unless `shift_mean` is False), unit variance over the masked entries; padding is set to 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under `logits` [..., vocab], without materialising the full log-softmax twice."""
    flat = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1), reduction="none")
    return flat.view(tokens.shape)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position, in nats."""
    logits = logits.float()
    probs = logits.softmax(-1)
    return torch.logsumexp(logits, -1) - (probs * logits).sum(-1)


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """KL(policy || reference) estimated from tokens sampled from the policy (Schulman's k1/k2/k3).

    k1 = log p - log q is unbiased but can be negative per token; k3 = (r - 1) - log r with r = q/p is unbiased
    and never negative; k2 = (log r)^2 / 2 is biased but low-variance. All are exactly 0 when p == q.
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (known: k1, k2, k3)")


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -β·KL_t on every answer token, plus the reward model's score on the last real token."""
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    last = mask.long().sum(1).clamp(min=1) - 1
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
        gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) -> (advantages, returns).

    δ_t = r_t + γ·V_{t+1} - V_t and A_t = δ_t + γλ·A_{t+1}; the answer ends at its last real token, so the
    value after it is 0 and nothing flows back from padding.
    """
    mask = mask.to(values.dtype)
    T = rewards.shape[1]
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        alive_next = mask[:, t + 1] if t + 1 < T else torch.zeros_like(mask[:, 0])
        delta = rewards[:, t] + gamma * next_value * alive_next - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage * alive_next
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def group_advantages(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                     group_size: int) -> torch.Tensor:
    """Leave-one-out advantages (RLOO, Ahmadian et al. 2024) for answers sampled `group_size` at a time per prompt,
    rows [g·k, (g+1)·k) answering one prompt: each answer's return R = score - β·Σ_t KL_t minus the mean return
    of the other answers to the same prompt, the same for every token of the answer, divided by the batch's std.

    The baseline is the prompt's own difficulty, measured instead of learnt: a value model that has not learnt it
    yet turns how easy a prompt was into noise in the policy's update. Answers identical to the rest of their
    group get exactly 0: the policy is not pushed where it has nothing to compare.
    """
    if group_size < 2 or scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} answers do not form groups of {group_size} >= 2")
    returns = (scores - kl_coef * (kl * mask.to(kl.dtype)).sum(1)).view(-1, group_size)
    others = (returns.sum(1, keepdim=True) - returns) / (group_size - 1)
    advantages = (returns - others).flatten()
    advantages = advantages / (advantages.std() + 1e-8) if advantages.numel() > 1 else advantages
    return advantages.unsqueeze(1) * mask.to(advantages.dtype)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate, to minimise: mean of max(-A·ratio, -A·clip(ratio, 1±ε)).

    Where the ratio has left [1-ε, 1+ε] in the direction the advantage favours, the clipped term wins and its
    gradient is zero: one batch of rollouts cannot push the policy arbitrarily far.
    """
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clip_frac": masked_mean((clipped > unclipped).float(), mask).item(),
                 "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask).item()}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss: 0.5·max((V - R)², (V_clipped - R)²) with V_clipped within ±clip of the old value."""
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        stats = {"value_clip_frac": masked_mean((clipped_err > unclipped_err).float(), mask).item()}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R): 1 for a perfect value model, 0 for a constant, negative for worse."""
    var_returns = masked_var(returns, mask)
    if var_returns.item() == 0:
        return float("nan")
    return (1 - masked_var(returns - values, mask) / var_returns).item()


class AdaptiveKLController:
    """Ziegler et al. (2019): β_{t+1} = β_t·(1 + K·e_t), e_t = clip(KL_t / target - 1, ±0.2), K = n / horizon.

    `kl` is the mean per-answer KL (summed over tokens), the quantity the target is stated in.
    """

    def __init__(self, init: float = 0.15, target: float = 6.0, horizon: float = 10000.0) -> None:
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_answers: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_answers / self.horizon
        return self.value


class FixedKLController:
    def __init__(self, value: float) -> None:
        self.value = value

    def update(self, kl: float, n_answers: int) -> float:
        return self.value


class RunningMoments:
    """Running mean and standard deviation of reward-model scores (Chan et al.'s parallel update)."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        if n == 0:
            return
        batch_mean, batch_var = x.float().mean().item(), x.float().var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta ** 2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return max(self.var, 1e-8) ** 0.5

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.mean, self.var, self.count = d["mean"], d["var"], int(d["count"])
