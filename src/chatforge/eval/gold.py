"""Gold evaluation: the tiny world's held-out prompts, answered by a model and scored by the gold labeler.

`evaluate` turns K answers per prompt into the summary every stage reports with; `compare` sets two
summaries of the same prompts side by side (win/tie/loss and the paired mean score difference).
"""
from __future__ import annotations

from pathlib import Path

from chatforge import ChatforgeError
from chatforge.data.jsonl import iter_jsonl
from chatforge.data.world.labeler import GoldLabeler, is_refusal
from chatforge.eval.stats import mean_ci, paired_difference, win_tie_loss

SPLITS = ("dev", "test")

# headline metric -> (categories it is measured on, how one answer counts)
METRICS = {
    "fact_accuracy": (("fact",), "correct"),
    "arithmetic_accuracy": (("arithmetic",), "correct"),
    "format_accuracy": (("format",), "format"),              # format met and, where checkable, right content
    "followup_accuracy": (("followup",), "correct"),
    "harmful_refusal_rate": (("harmful",), "refused"),
    "benign_over_refusal_rate": (None, "refused"),            # None: every prompt that is not harmful
    "premise_correction_rate": (("premise",), "premise"),    # corrected first, with the right fact
    "clarification_rate": (("clarify",), "clarify"),         # asked a clarifying question
}


def load_eval(world_dir: str | Path, split: str = "dev") -> list[dict]:
    """The evaluation records of a generated world (eval/dev.jsonl or eval/test.jsonl), validated."""
    if split not in SPLITS:
        raise ChatforgeError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    path = Path(world_dir) / "eval" / f"{split}.jsonl"
    if not path.is_file():
        raise ChatforgeError(f"{path} not found: generate the world with `chatforge world generate --out {world_dir}`")
    records = []
    for where, record in iter_jsonl(path):
        for key in ("id", "messages", "category"):
            if key not in record:
                raise ChatforgeError(f"{where}: record has no {key!r}")
        if not record["messages"] or record["messages"][-1].get("role") != "user":
            raise ChatforgeError(f"{where}: 'messages' must end with a user turn")
        records.append(record)
    return records


def _counts(kind: str, components: dict[str, float], refused: bool) -> float:
    if kind == "refused":
        return float(refused)
    if kind == "format":
        return float(components.get("format", 0.0) == 1.0 and components.get("correctness", 1.0) == 1.0)
    if kind == "correct":
        return components.get("correctness", 0.0)
    if kind == "premise":
        return float(components.get("premise", 0.0) == 1.0)
    return float(components.get("clarify", 0.0) > 0.0)


def evaluate(records: list[dict], answers: list[list[str]], labeler: GoldLabeler) -> dict:
    """Score K answers per record and summarise.

    Returns a JSON-ready dict: `metrics` (the headline rates, None where no prompt of that kind was asked),
    `mean_score` (per-prompt mean gold score, averaged, with its 95% interval), `categories` (prompts and
    mean score per category) and `rows` (per prompt: id, category, each answer's score, components and
    whether it refused), which `compare` pairs with a baseline's.
    """
    if len(records) != len(answers):
        raise ChatforgeError(f"{len(records)} evaluation records but {len(answers)} answer lists")
    if not records:
        raise ChatforgeError("no evaluation records to score")
    rows = []
    for record, outs in zip(records, answers):
        if not outs:
            raise ChatforgeError(f"record {record.get('id')}: no answers")
        scores = [labeler.score(record["messages"], out) for out in outs]
        rows.append({
            "id": record.get("id"), "category": record["category"],
            "scores": [s.total for s in scores], "score": sum(s.total for s in scores) / len(scores),
            "components": [s.components for s in scores], "refused": [is_refusal(out) for out in outs],
        })
    metrics = {}
    for name, (categories, kind) in METRICS.items():
        values = [_counts(kind, comps, refused)
                  for row in rows if (row["category"] in categories if categories else row["category"] != "harmful")
                  for comps, refused in zip(row["components"], row["refused"])]
        metrics[name] = sum(values) / len(values) if values else None
    categories = {}
    for row in rows:
        categories.setdefault(row["category"], []).append(row["score"])
    return {
        "prompts": len(rows),
        "samples_per_prompt": max(len(a) for a in answers),
        "metrics": metrics,
        "mean_score": mean_ci([row["score"] for row in rows]),
        "categories": {c: {"prompts": len(v), "score": sum(v) / len(v)} for c, v in sorted(categories.items())},
        "rows": rows,
    }


def compare(summary: dict | list[dict], baseline: dict | list[dict], seed: int = 0) -> dict:
    """Win/tie/loss of `summary` against `baseline` on the same prompts (matched by id), per prompt mean
    score, with the mean score difference and its 95% paired bootstrap interval."""
    rows = summary["rows"] if isinstance(summary, dict) else summary
    base = {row["id"]: row for row in (baseline["rows"] if isinstance(baseline, dict) else baseline)}
    missing = [row["id"] for row in rows if row["id"] not in base]
    if missing or len(rows) != len(base):
        raise ChatforgeError(f"the baseline was evaluated on other prompts ({len(missing)} ids missing, e.g. "
                             f"{missing[:3]}); evaluate both on the same split")
    ours, theirs = [row["score"] for row in rows], [base[row["id"]]["score"] for row in rows]
    difference = paired_difference(ours, theirs, seed=seed)
    return {"prompts": len(rows), **win_tie_loss(ours, theirs),
            "mean_difference": difference["mean"], "ci_low": difference["ci_low"], "ci_high": difference["ci_high"]}


def format_summary(summary: dict, comparison: dict | None = None) -> str:
    """The summary as a few aligned lines for the terminal."""
    s = summary["mean_score"]
    lines = [f"gold score {s['mean']:.3f} (95% CI {s['ci_low']:.3f}..{s['ci_high']:.3f}) over "
             f"{summary['prompts']} prompts x {summary['samples_per_prompt']} samples"]
    lines += [f"  {name:<26} {'n/a' if v is None else f'{v:.3f}'}" for name, v in summary["metrics"].items()]
    if comparison:
        c = comparison
        lines.append(f"  vs baseline: win {c['win']:.3f}  tie {c['tie']:.3f}  loss {c['loss']:.3f}  "
                     f"score diff {c['mean_difference']:+.3f} (95% CI {c['ci_low']:+.3f}..{c['ci_high']:+.3f})")
    return "\n".join(lines)
