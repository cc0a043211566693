"""Inter-labeler agreement on rankings of the same answers (InstructGPT reports ~73% between its labelers).

For every task ranked by two or more labelers, every two of them, and every two answers of the task: the
pair is *compared* when both labelers ordered it (neither tied it) and *agrees* when they ordered it the
same way. Agreement is agreeing / compared, pooled over tasks; pairs tied by either labeler are counted
apart. The 95% interval resamples whole tasks, since the pairs of one task are not independent.
"""
from __future__ import annotations

from collections import defaultdict
from itertools import combinations

import numpy as np


def pair_order(tiers: list[list[int]]) -> dict[tuple[int, int], int]:
    """(i, j) with i < j -> +1 if answer i is ranked above j, -1 below, 0 tied."""
    tier_of = {i: t for t, tier in enumerate(tiers) for i in tier}
    return {(i, j): int(np.sign(tier_of[j] - tier_of[i])) for i, j in combinations(sorted(tier_of), 2)}


def agreement(rankings: list[tuple[int, str, list[list[int]]]], confidence: float = 0.95,
              bootstrap: int = 2000, seed: int = 0) -> dict:
    """Agreement from (task id, labeler name, ranking as tiers of answer indices) triples."""
    by_task: dict[int, dict[str, list[list[int]]]] = defaultdict(dict)
    for task, labeler, tiers in rankings:
        by_task[task][labeler] = tiers
    per_task = []  # (agreeing, compared) of each task labelled by two or more
    per_labeler: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    tied = labeler_pairs = 0
    for labels in by_task.values():
        if len(labels) < 2:
            continue
        orders = {name: pair_order(tiers) for name, tiers in labels.items()}
        agree = compared = 0
        for a, b in combinations(sorted(orders), 2):
            labeler_pairs += 1
            for pair, oa in orders[a].items():
                ob = orders[b].get(pair)
                if ob is None:
                    continue  # the two rankings cover different answers (not possible through the API)
                if oa == 0 or ob == 0:
                    tied += 1
                    continue
                same = int(oa == ob)
                agree, compared = agree + same, compared + 1
                for name in (a, b):
                    per_labeler[name][0] += same
                    per_labeler[name][1] += 1
        per_task.append((agree, compared))
    counts = np.array(per_task, dtype=float).reshape(-1, 2)
    total_agree, total_compared = counts.sum(0) if len(counts) else (0.0, 0.0)
    result = {"tasks": len(per_task), "labeler_pairs": labeler_pairs, "compared_pairs": int(total_compared),
              "tied_pairs": tied, "agreement": None, "ci_low": None, "ci_high": None,
              "per_labeler": {name: {"agreement": a / c if c else None, "compared_pairs": c}
                              for name, (a, c) in sorted(per_labeler.items())}}
    if total_compared:
        result["agreement"] = float(total_agree / total_compared)
        rng = np.random.default_rng(seed)
        draws = counts[rng.integers(0, len(counts), size=(bootstrap, len(counts)))].sum(1)
        shares = draws[:, 0] / np.maximum(draws[:, 1], 1)
        tail = (1 - confidence) / 2 * 100
        result["ci_low"], result["ci_high"] = (float(x) for x in np.percentile(shares, [tail, 100 - tail]))
    return result
