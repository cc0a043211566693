"""How good is a reward model? Held-out pairwise accuracy, calibration, correlations, and health warnings.

Accuracy is measured against the noise-free gold ranking when a labeler is given (the training rankings
carry the labeler's disagreement; the test must not), else against the file's own ranking.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from chatforge.data.preferences import Comparison, ranking_pairs
from chatforge.tokenizer import Tokenizer

CALIBRATION_BINS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
NEAR_CHANCE = 0.6           # held-out accuracy below this is barely better than a coin
COLLAPSED_STD = 1e-2        # rewards this close to a constant carry no signal for PPO
LENGTH_CORRELATION = 0.5    # |Spearman(reward, length)| above this, beyond what gold shows, is a length bias


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation (ties get their mean rank); nan when either side is constant."""
    return pearson(_ranks(x), _ranks(y))


def pearson(x: list[float] | np.ndarray, y: list[float] | np.ndarray) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(values: list[float]) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=float)
    for v in np.unique(values):  # ties share the mean of their ranks
        tied = values == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def calibration(margins: list[float]) -> tuple[list[dict[str, float]], float]:
    """Predicted P(preferred) = sigmoid(|margin|) for the answer the model prefers, against how often it is right.

    `margins` are r(better) - r(worse) under the reference ranking. Returns per-bin rows and the expected
    calibration error (bin-size-weighted |predicted - observed|).
    """
    confidence = [1 / (1 + math.exp(-abs(m))) for m in margins]
    right = [m > 0 for m in margins]
    rows, error = [], 0.0
    for low, high in zip(CALIBRATION_BINS, CALIBRATION_BINS[1:]):
        idx = [i for i, c in enumerate(confidence) if low <= c < high or (high == 1.0 and c == 1.0)]
        if not idx:
            continue
        predicted = float(np.mean([confidence[i] for i in idx]))
        observed = float(np.mean([right[i] for i in idx]))
        rows.append({"bin": f"{low:.1f}-{high:.1f}", "pairs": len(idx), "predicted": predicted, "observed": observed})
        error += len(idx) / len(margins) * abs(predicted - observed)
    return rows, error


def reference_pairs(comparisons: list[Comparison], labeler: Any = None) -> list[list[tuple[int, int]]]:
    """Each prompt's (better, worse) answer indices: by the labeler's ranking when given (use a noise-free one),
    else by the file's own ranking."""
    if labeler is None:
        return [c.pairs() for c in comparisons]
    out = []
    for c in comparisons:
        tiers = labeler.rank(c.messages, c.answers)
        order = [i for tier in tiers for i in tier]
        out.append([(order[i], order[j]) for i, j in ranking_pairs([len(t) for t in tiers])])
    return out


def evaluate_reward_model(model: torch.nn.Module, tokenizer: Tokenizer, comparisons: list[Comparison],
                          labeler: Any = None, batch_size: int = 32) -> dict[str, Any]:
    """Score every answer once, then compare the rewards with the reference ranking of each prompt.

    With a `labeler` (chatforge.data.world.labeler.GoldLabeler) the reference is its ranking, and the reward
    is also correlated with its score. The result holds the metrics and a list of `warnings`.
    """
    from chatforge.train.reward import score_answers
    items = [(c.messages, a) for c in comparisons for a in c.answers]
    rewards = score_answers(model, tokenizer, items, batch_size)
    lengths = [len(tokenizer.encode(a)) for _, a in items]
    gold_scores: list[float] = []
    margins, longer_worse_right = [], []
    by_category: dict[str, list[bool]] = defaultdict(list)
    offset = 0
    for c, pairs in zip(comparisons, reference_pairs(comparisons, labeler)):
        answers = c.answers
        r = rewards[offset:offset + len(answers)]
        if labeler is not None:
            gold_scores += [labeler.score(c.messages, a).total for a in answers]
        for i, j in pairs:
            margin = r[i] - r[j]
            margins.append(margin)
            by_category[str(c.fields.get("category", "all"))].append(margin > 0)
            if lengths[offset + i] < lengths[offset + j]:
                longer_worse_right.append(margin > 0)
        offset += len(answers)

    accuracy = float(np.mean([m > 0 for m in margins])) if margins else float("nan")
    bins, ece = calibration(margins)
    report: dict[str, Any] = {
        "prompts": len(comparisons), "answers": len(items), "pairs": len(margins),
        "accuracy": accuracy,
        "accuracy_by_category": {k: {"accuracy": float(np.mean(v)), "pairs": len(v)} for k, v in sorted(by_category.items())},
        "accuracy_when_longer_is_worse": float(np.mean(longer_worse_right)) if longer_worse_right else float("nan"),
        "calibration": bins, "calibration_error": ece,
        "reward_mean": float(np.mean(rewards)), "reward_std": float(np.std(rewards)),
        "length_correlation": spearman(rewards, lengths),
    }
    if labeler is not None:
        report["gold_correlation"] = spearman(rewards, gold_scores)
        report["gold_pearson"] = pearson(rewards, gold_scores)
        report["gold_length_correlation"] = spearman(gold_scores, lengths)
    report["warnings"] = health_warnings(report)
    return report


def health_warnings(report: dict[str, Any]) -> list[str]:
    """The failures users of RLHF tools most often miss, in words."""
    warnings = []
    if report["reward_std"] < COLLAPSED_STD:
        warnings.append(f"rewards have collapsed to a constant (std {report['reward_std']:.2g}): "
                        "the model gives every answer the same score; check the data and learning rate")
    if report["pairs"] and report["accuracy"] < NEAR_CHANCE:
        warnings.append(f"held-out accuracy {report['accuracy']:.1%} is near chance (50%): the reward model has "
                        "learned little; more comparisons, a better initial checkpoint, or a lower learning rate")
    length, gold_length = report["length_correlation"], report.get("gold_length_correlation", 0.0)
    if not math.isnan(length) and abs(length) > LENGTH_CORRELATION and abs(length - (gold_length or 0.0)) > 0.2:
        side = "longer" if length > 0 else "shorter"
        warnings.append(f"the reward model prefers {side} answers (Spearman {length:+.2f} between reward and length"
                        + (f", gold shows {gold_length:+.2f}" if "gold_length_correlation" in report else "")
                        + f"; accuracy when the longer answer is worse: {report['accuracy_when_longer_is_worse']:.1%})")
    return warnings


def format_report(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    judge = "the noise-free gold ranking" if "gold_correlation" in report else "the file's ranking"
    lines = [f"pairwise accuracy {report['accuracy']:.1%} against {judge} over {report['pairs']} pairs "
             f"({report['prompts']} prompts, {report['answers']} answers)"]
    for name, row in report["accuracy_by_category"].items():
        lines.append(f"  {name:<16} {row['accuracy']:.1%}  ({row['pairs']} pairs)")
    lines.append(f"calibration error {report['calibration_error']:.3f}: " + ", ".join(
        f"{b['bin']}: {b['observed']:.0%} of {b['pairs']}" for b in report["calibration"]))
    if "gold_correlation" in report:
        lines.append(f"Spearman with gold score {report['gold_correlation']:+.2f}")
    lines.append(f"Spearman with length {report['length_correlation']:+.2f}"
                 + (f" (gold {report['gold_length_correlation']:+.2f})" if "gold_length_correlation" in report else ""))
    lines.append(f"reward mean {report['reward_mean']:+.3f}, std {report['reward_std']:.3f}")
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
