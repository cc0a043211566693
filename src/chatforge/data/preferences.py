"""Human preference data: pairwise comparisons and K-way rankings, read and checked line by line.

Two forms users already have, detected from the keys of each JSONL record:

    {"prompt" | "messages": ..., "chosen": "...", "rejected": "..."}           a pair (TRL's form)
    {"prompt" | "messages": ..., "responses": [best, ..., worst]}               a ranking (InstructGPT's form)

A `responses` element may itself be a list of answers ranked equal; tied answers are never paired.
"prompt" is a string (one user turn) or a list of messages; "messages" is an OpenAI-style conversation that
the answers continue. An answer is a string or a one-message list `[{"role": "assistant", "content": ...}]`.
Every record becomes a `Comparison`: the conversation and its answers grouped into tiers, best first.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from chatforge import ChatforgeError
from chatforge.data.jsonl import iter_jsonl
from chatforge.tokenizer import Message, validate_messages


@dataclass
class Comparison:
    """One prompt and its answers ranked best first; answers in one tier are ranked equal."""
    messages: list[Message]
    tiers: list[list[str]]
    where: str = ""
    fields: dict[str, Any] = field(default_factory=dict)  # the record's other keys (category, id, ...)

    @property
    def answers(self) -> list[str]:
        return [a for tier in self.tiers for a in tier]

    def pairs(self) -> list[tuple[int, int]]:
        """(better, worse) indices into `answers` for every pair ranked differently."""
        return ranking_pairs([len(t) for t in self.tiers])


@dataclass
class PreferencePair:
    messages: list[Message]
    chosen: str
    rejected: str
    where: str = ""


def ranking_pairs(tier_sizes: list[int]) -> list[tuple[int, int]]:
    """All C(K, 2) pairs of a ranking whose tiers have these sizes, minus the tied ones, as flat indices."""
    tier_of = [t for t, size in enumerate(tier_sizes) for _ in range(size)]
    return [(i, j) for i, j in combinations(range(len(tier_of)), 2) if tier_of[i] != tier_of[j]]


def to_pairs(comparisons: list[Comparison]) -> list[PreferencePair]:
    """Rankings expanded to (chosen, rejected) pairs, e.g. for DPO."""
    out = []
    for c in comparisons:
        answers = c.answers
        out += [PreferencePair(c.messages, answers[i], answers[j], c.where) for i, j in c.pairs()]
    return out


def parse_prompt(record: dict[str, Any], where: str) -> list[Message]:
    """The conversation an answer continues, from "prompt" (text or messages) or "messages"."""
    if "prompt" in record and "messages" in record:
        raise ChatforgeError(f"{where}: give either 'prompt' or 'messages', not both")
    if "messages" in record:
        messages = validate_messages(record["messages"], f"{where}: messages")
    elif isinstance(record.get("prompt"), str):
        if not record["prompt"].strip():
            raise ChatforgeError(f"{where}: 'prompt' is empty")
        return [{"role": "user", "content": record["prompt"]}]
    elif isinstance(record.get("prompt"), list):
        messages = validate_messages(record["prompt"], f"{where}: prompt")
    elif "prompt" in record:
        raise ChatforgeError(f"{where}: 'prompt' must be a string or a list of messages")
    else:
        raise ChatforgeError(f"{where}: missing prompt: the record needs 'prompt' or 'messages'")
    if messages[-1]["role"] == "assistant":
        raise ChatforgeError(f"{where}: the conversation ends with an assistant turn; the answers are that turn, "
                             "so leave it out")
    return messages


def parse_answer(value: Any, where: str) -> str:
    """An answer as text: a string, or TRL's conversational `[{"role": "assistant", "content": ...}]`."""
    if isinstance(value, str):
        return value
    if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
        return value[0]["content"]
    raise ChatforgeError(f"{where}: an answer must be a string or [{{\"role\": \"assistant\", \"content\": ...}}], "
                         f"got {json.dumps(value)[:60]}")


def parse_comparison(record: dict[str, Any], where: str) -> Comparison:
    """One JSONL record, pairwise or K-way, checked: every problem names `where`."""
    pairwise = "chosen" in record or "rejected" in record
    if pairwise and "responses" in record:
        raise ChatforgeError(f"{where}: give either 'chosen'/'rejected' or 'responses', not both")
    if not pairwise and "responses" not in record:
        hint = " ('answers' holds unranked answers: order them best first into 'responses')" if "answers" in record else ""
        raise ChatforgeError(f"{where}: needs 'chosen' and 'rejected', or a ranked list 'responses'{hint}")
    messages = parse_prompt(record, where)
    if pairwise:
        for key in ("chosen", "rejected"):
            if key not in record:
                raise ChatforgeError(f"{where}: missing '{key}'")
        chosen = parse_answer(record["chosen"], f"{where}: chosen")
        rejected = parse_answer(record["rejected"], f"{where}: rejected")
        if chosen == rejected:
            raise ChatforgeError(f"{where}: 'chosen' and 'rejected' are the same answer")
        tiers = [[chosen], [rejected]]
        known = ("prompt", "messages", "chosen", "rejected")
    else:
        tiers = _parse_ranking(record["responses"], where)
        known = ("prompt", "messages", "responses")
    return Comparison(messages, tiers, where, {k: v for k, v in record.items() if k not in known})


def _parse_ranking(responses: Any, where: str) -> list[list[str]]:
    if not isinstance(responses, list):
        raise ChatforgeError(f"{where}: 'responses' must be a list of answers, best first")
    tiers = []
    for i, item in enumerate(responses):
        # a list of strings (or of conversational answers) is a group ranked equal; a one-dict list is one answer
        tie = isinstance(item, list) and not (item and isinstance(item[0], dict))
        tier = [parse_answer(a, f"{where}: responses[{i}][{j}]") for j, a in enumerate(item)] if tie \
            else [parse_answer(item, f"{where}: responses[{i}]")]
        if not tier:
            raise ChatforgeError(f"{where}: responses[{i}] is an empty group")
        tiers.append(tier)
    answers = [a for t in tiers for a in t]
    if len(answers) < 2:
        raise ChatforgeError(f"{where}: a ranking needs at least two answers, got {len(answers)}")
    seen: dict[str, int] = {}
    for i, tier in enumerate(tiers):
        for a in tier:
            if a in seen:
                raise ChatforgeError(f"{where}: the same answer appears twice in 'responses' "
                                     f"(at {seen[a]} and {i}): {a[:40]!r}")
            seen[a] = i
    if len(tiers) < 2:
        raise ChatforgeError(f"{where}: all {len(answers)} answers are ranked equal, so there is nothing to learn")
    return tiers


def read_comparisons(path: str | Path) -> list[Comparison]:
    """Every record of a preference JSONL file, checked; an empty file is an error."""
    comparisons = [parse_comparison(record, where) for where, record in iter_jsonl(path)]
    if not comparisons:
        raise ChatforgeError(f"{path}: no comparisons in the file")
    return comparisons
