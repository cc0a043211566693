"""Conversations for fine-tuning: validated readers, fitting into the context window, length-bucketed batches.

Formats, detected per record from its keys (as TRL does):
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}        OpenAI chat
    {"instruction": "...", "input": "...", "output": "..."}                              Alpaca (input optional)
Every error names the file and line. Training uses the tokenizer's chat template and its loss mask, so only
assistant tokens are learned; a conversation longer than the context window loses its oldest turns (the
system message is kept), and one whose assistant tokens would all be cut is skipped and counted.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chatforge import ChatforgeError
from chatforge.data.jsonl import iter_jsonl
from chatforge.tokenizer import Message, Tokenizer, validate_messages

IGNORE = -100  # target id that cross-entropy skips


@dataclass
class Conversation:
    messages: list[Message]
    where: str  # "file:line", for messages about this record


def conversation_from_record(record: dict[str, Any], where: str) -> list[Message]:
    """One JSONL record as messages, in either format; raises naming `where` and the field."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise ChatforgeError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        validate_messages(messages, f"{where}: messages")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif "instruction" in record or "output" in record:
        for key in ("instruction", "output"):
            if key not in record:
                raise ChatforgeError(f"{where}: Alpaca record has no '{key}'")
        for key in ("instruction", "input", "output"):
            if key in record and not isinstance(record[key], str):
                raise ChatforgeError(f"{where}: Alpaca '{key}' must be a string, got {type(record[key]).__name__}")
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    else:
        raise ChatforgeError(f"{where}: record has neither 'messages' nor Alpaca 'instruction'/'output' "
                             f"(keys: {', '.join(sorted(record)) or 'none'})")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatforgeError(f"{where}: conversation has no assistant turn to learn from")
    return messages


def read_conversations(path: str | Path) -> list[Conversation]:
    out = [Conversation(conversation_from_record(record, where), where)
           for where, record in iter_jsonl(path, "conversation file")]
    if not out:
        raise ChatforgeError(f"{path}: no conversations in the file")
    return out


# ---------------------------------------------------------------- the context window

@dataclass
class Fitted:
    messages: list[Message]  # what was kept
    ids: list[int]
    mask: list[int]          # 1 on assistant tokens
    dropped_turns: int = 0   # oldest turns removed to fit
    cut_tokens: int = 0      # tokens cut from the end when even the newest turns did not fit


def fit_messages(tokenizer: Tokenizer, messages: list[Message], max_tokens: int,
                 for_generation: bool = False) -> Fitted | None:
    """Drop the oldest turns (keeping a leading system message) until the conversation fits `max_tokens`.

    For training, at least one assistant turn is kept and what still does not fit is cut from the end;
    None if no assistant token would remain. For generation (`for_generation`), the prompt keeps at least
    its last turn and must fit whole, else a ChatforgeError says how long it is.
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = list(messages[len(system):])
    dropped = 0

    def droppable() -> bool:
        rest = turns[1:]
        return bool(rest) if for_generation else any(m["role"] == "assistant" for m in rest)

    ids, mask = tokenizer.render(system + turns, add_generation_prompt=for_generation)
    while len(ids) > max_tokens and droppable():
        turns.pop(0)
        dropped += 1
        while turns and turns[0]["role"] == "assistant" and droppable():  # an answer to a dropped question
            turns.pop(0)
            dropped += 1
        ids, mask = tokenizer.render(system + turns, add_generation_prompt=for_generation)
    if len(ids) <= max_tokens:
        return Fitted(system + turns, ids, mask, dropped)
    if for_generation:
        raise ChatforgeError(f"the conversation needs {len(ids)} tokens even with only its last turn, "
                             f"more than the {max_tokens} the context window leaves")
    cut = len(ids) - max_tokens
    ids, mask = ids[:max_tokens], mask[:max_tokens]
    if not any(mask[1:]):  # the first token is never a target
        return None
    return Fitted(system + turns, ids, mask, dropped, cut)


# ---------------------------------------------------------------- examples and batches

@dataclass
class Example:
    ids: list[int]
    mask: list[int]
    where: str = ""


@dataclass
class EncodeStats:
    conversations: int = 0
    truncated: int = 0              # lost old turns or had their end cut
    skipped: list[str] = field(default_factory=list)  # where: no assistant token fits

    def summary(self) -> str:
        s = f"{self.conversations} conversations, {self.truncated} truncated to fit the context window"
        if self.skipped:
            s += f", {len(self.skipped)} skipped (no assistant token fits; first: {self.skipped[0]})"
        return s


def encode_conversations(tokenizer: Tokenizer, conversations: list[Conversation],
                         max_tokens: int) -> tuple[list[Example], EncodeStats]:
    stats = EncodeStats(conversations=len(conversations))
    examples = []
    for conv in conversations:
        fitted = fit_messages(tokenizer, conv.messages, max_tokens)
        if fitted is None:
            stats.skipped.append(conv.where)
            continue
        if fitted.dropped_turns or fitted.cut_tokens:
            stats.truncated += 1
        examples.append(Example(fitted.ids, fitted.mask, conv.where))
    return examples, stats


def bucket_batches(lengths: list[int], rows: int, seed: int, shuffle: bool = True, pool: int = 32) -> list[list[int]]:
    """Batches of `rows` example indices of similar length, so little compute is spent on padding.

    Examples are shuffled, sorted by length within pools of `pool` batches, cut into batches, and the
    batches shuffled again: a different order every epoch (seed), each example exactly once.
    """
    if rows < 1:
        raise ChatforgeError(f"batch rows must be >= 1, got {rows}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    batches: list[list[int]] = []
    for start in range(0, len(order), pool * rows):
        chunk = sorted(order[start:start + pool * rows], key=lambda i: lengths[i])
        batches += [chunk[i:i + rows] for i in range(0, len(chunk), rows)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded inputs and next-token targets, IGNORE wherever the target is not an assistant token."""
    width = max(len(e.ids) for e in examples) - 1
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        ids = torch.tensor(e.ids, dtype=torch.long)
        trained = torch.tensor(e.mask[1:], dtype=torch.bool)
        n = len(e.ids) - 1
        inputs[row, :n] = ids[:-1]
        targets[row, :n] = torch.where(trained, ids[1:], torch.full_like(ids[1:], IGNORE))
    return {"input_ids": inputs, "targets": targets}
