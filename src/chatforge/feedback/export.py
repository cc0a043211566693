"""Submissions as the JSONL records training reads.

    chatforge feedback export --db runs/demo/feedback.db --kind sft --out demos.jsonl
    chatforge feedback export --db runs/demo/feedback.db --kind comparisons --out comparisons.jsonl

sft:          {"messages": [...]}                    one per demonstration (SFT's reader, data/chat.py)
comparisons:  {"messages": [...], "responses": [best, [tied, tied], ..., worst]}   one per ranking
              {"messages": [...], "chosen": "...", "rejected": "..."}             one per chat pair
              (the reward model's readers, data/preferences.py)

Rankings keep "unsafe" (the answers flagged) and "task" (its id: several labelers' rankings of one task
share it). A ranking with every answer tied teaches nothing and is left out, as is a thumb with no
counterpart answer to the same conversation; both are counted in the summary.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from chatforge import ChatforgeError
from chatforge.data.jsonl import write_jsonl
from chatforge.feedback.store import FeedbackStore, Submission, Task

KINDS = ("sft", "comparisons")


def ranking_record(task: Task, payload: dict[str, Any]) -> dict[str, Any] | None:
    """A K-way record from a ranking submission; None when all answers are tied."""
    tiers = payload["ranking"]
    if len(tiers) < 2:
        return None
    responses = [task.answers[t[0]] if len(t) == 1 else [task.answers[i] for i in t] for t in tiers]
    record: dict[str, Any] = {"messages": task.messages, "responses": responses, "task": task.id}
    if payload.get("unsafe"):
        record["unsafe"] = [task.answers[i] for i in payload["unsafe"]]
    return record


def chat_records(task: Task, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Chat feedback as comparisons: the preferred answer over each other one ("regenerate and compare"),
    and every thumbs-up answer over every thumbs-down one to the same conversation."""
    answers, preferred = task.answers, payload.get("preferred")
    if preferred is not None:
        return [{"messages": task.messages, "chosen": answers[preferred], "rejected": a}
                for i, a in enumerate(answers) if i != preferred]
    ratings = payload.get("ratings") or []
    up = [a for a, r in zip(answers, ratings) if r > 0]
    down = [a for a, r in zip(answers, ratings) if r < 0]
    return [{"messages": task.messages, "chosen": u, "rejected": d} for u in up for d in down]


def sft_records(rows: list[tuple[Submission, Task, str]]) -> list[dict[str, Any]]:
    return [{"messages": sub.payload["messages"]} for sub, _, _ in rows if sub.kind == "demonstration"]


def comparison_records(rows: list[tuple[Submission, Task, str]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The records and what was left out: {"all_tied": n, "unpaired_chat": n}."""
    records, skipped = [], {"all_tied": 0, "unpaired_chat": 0}
    for sub, task, _ in rows:
        if sub.kind == "ranking":
            record = ranking_record(task, sub.payload)
            if record is None:
                skipped["all_tied"] += 1
            else:
                records.append(record)
        elif sub.kind == "chat":
            pairs = chat_records(task, sub.payload)
            skipped["unpaired_chat"] += not pairs
            records += pairs
    return records, skipped


def export_records(store: FeedbackStore, kind: str, after_id: int = 0) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(records, skipped counts) of submissions with id > after_id."""
    if kind not in KINDS:
        raise ChatforgeError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    rows = store.submissions(after_id=after_id)
    if kind == "sft":
        return sft_records(rows), {}
    return comparison_records(rows)


def export(store: FeedbackStore, kind: str, out: str | Path, after_id: int = 0) -> tuple[int, dict[str, int]]:
    """Write the records atomically; returns (records written, skipped counts)."""
    records, skipped = export_records(store, kind, after_id)
    write_jsonl(out, records)
    return len(records), skipped
