"""Work for labelers: ranking tasks (K sampled answers to order) and demonstration tasks (a prompt and
model-written suggestions to start from), queued from a prompt set; and the sampler the pages call.

    chatforge feedback add-tasks --db DB --kind ranking --policy CKPT --prompts FILE [--min-answers 4 --max-answers 9]
    chatforge feedback add-tasks --db DB --kind ranking --answers FILE    # {"messages", "answers": [...]} unranked
"""
from __future__ import annotations

import random
import sys
import threading
from pathlib import Path
from typing import Any

from chatforge import ChatforgeError
from chatforge.data.jsonl import iter_jsonl
from chatforge.data.preferences import parse_answer, parse_prompt
from chatforge.feedback.store import FeedbackStore
from chatforge.tokenizer import Message


class EngineSampler:
    """Answers from the generation engine for the pages (suggestions, regenerate); one request at a time."""

    def __init__(self, engine: Any, max_new_tokens: int = 96, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0) -> None:
        self.engine, self.max_new_tokens, self.temperature, self.top_p = engine, max_new_tokens, temperature, top_p
        self.context = engine.model.config.max_position_embeddings - getattr(engine.model, "num_virtual_tokens", 0)
        self.calls, self.seed, self.lock = 0, seed, threading.Lock()

    def __call__(self, messages: list[Message], n: int) -> list[str]:
        from chatforge.data.chat import fit_messages
        from chatforge.infer.engine import SamplingParams
        prompt = fit_messages(self.engine.tokenizer, messages, self.context - self.max_new_tokens,
                              for_generation=True).ids
        with self.lock:
            self.calls += 1
            params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                    top_p=self.top_p, seed=self.seed * 1_000_003 + self.calls)
            return [g.text.strip() for g in self.engine.generate([prompt], params, num_samples=n)]


def read_prompt_file(path: str | Path, limit: int = 0, offset: int = 0) -> list[list[Message]]:
    """The prompts of a JSONL file; with `offset`, starting there and wrapping around (rounds take turns)."""
    conversations = [parse_prompt(record, where) for where, record in iter_jsonl(path)]
    if conversations and offset:
        offset %= len(conversations)
        conversations = conversations[offset:] + conversations[:offset]
    conversations = conversations[:limit] if limit else conversations
    if not conversations:
        raise ChatforgeError(f"{path}: no prompts in the file")
    return conversations


def read_answer_sets(path: str | Path, limit: int = 0) -> list[tuple[list[Message], list[str]]]:
    """(conversation, answers) from unranked records {"messages"|"prompt", "answers": [...]}."""
    out = []
    for where, record in iter_jsonl(path):
        answers = record.get("answers")
        if not isinstance(answers, list) or not 2 <= len(answers) <= 9:
            raise ChatforgeError(f"{where}: 'answers' must be a list of 2 to 9 answers to rank")
        texts = [parse_answer(a, f"{where}: answers[{i}]") for i, a in enumerate(answers)]
        if len(set(texts)) != len(texts):
            raise ChatforgeError(f"{where}: the same answer appears twice in 'answers'")
        out.append((parse_prompt(record, where), texts))
    out = out[:limit] if limit else out
    if not out:
        raise ChatforgeError(f"{path}: no answer sets in the file")
    return out


def sample_tasks(policy: str | Path, conversations: list[list[Message]], kind: str, min_answers: int,
                 max_answers: int, max_new_tokens: int = 96, temperature: float = 1.0, seed: int = 0,
                 device: str | None = None) -> list[tuple[list[Message], list[str]]]:
    """(conversation, answers): K in [min, max] distinct answers to rank, or `max_answers` suggestions."""
    from chatforge.data.chat import fit_messages
    from chatforge.infer.engine import Engine
    from chatforge.train.reward import CollectConfig, sample_answers
    if not 1 <= min_answers <= max_answers <= 9 or (kind == "ranking" and min_answers < 2):
        raise ChatforgeError(f"answers per task: need {'2' if kind == 'ranking' else '1'} <= {min_answers} <= "
                             f"{max_answers} <= 9")
    engine = Engine.load(policy, device=device)
    context = engine.model.config.max_position_embeddings
    prompts = [fit_messages(engine.tokenizer, m, context - max_new_tokens, for_generation=True).ids
               for m in conversations]
    rng = random.Random(seed)
    wanted = [rng.randint(min_answers, max_answers) for _ in conversations]
    cfg = CollectConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    answers, _ = sample_answers(engine, prompts, wanted, cfg)
    least = 2 if kind == "ranking" else 1
    return [(m, a) for m, a in zip(conversations, answers) if len(a) >= least]


def add_tasks(store: FeedbackStore, kind: str, prompts: str = "", answers: str = "", policy: str = "",
              min_answers: int = 4, max_answers: int = 9, limit: int = 0, labels_per_task: int = 1,
              max_new_tokens: int = 96, temperature: float = 1.0, seed: int = 0, device: str | None = None,
              offset: int = 0) -> tuple[int, int]:
    """Queue tasks from a prompt file (answers sampled from `policy`) or a file of answer sets; returns
    (added, already queued)."""
    if labels_per_task < 1:
        raise ChatforgeError(f"--labels-per-task must be >= 1, got {labels_per_task}")
    if answers:
        if kind != "ranking":
            raise ChatforgeError("--answers gives answers to rank: use it with --kind ranking")
        items, source, origin = read_answer_sets(answers, limit), str(answers), ""
    elif prompts:
        conversations = read_prompt_file(prompts, limit, offset)
        if kind == "demonstration" and not policy:
            items = [(m, []) for m in conversations]
        elif not policy:
            raise ChatforgeError("--policy is required to sample the answers of ranking tasks (or give --answers)")
        else:
            items = sample_tasks(policy, conversations, kind, min_answers if kind == "ranking" else max_answers,
                                 max_answers, max_new_tokens, temperature, seed, device)
        source, origin = str(prompts), str(policy)
    else:
        raise ChatforgeError("--prompts (a prompt JSONL) or --answers (answer sets to rank) is required")
    added, existing = store.add_tasks(kind, items, source=source, origin=origin, labels_wanted=labels_per_task)
    print(f"feedback: queued {added} {kind} tasks from {source}"
          f"{f' with answers from {origin}' if origin else ''} ({existing} already queued)", file=sys.stderr)
    return added, existing
