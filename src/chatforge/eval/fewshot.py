"""In-context learning: a task asked with k = 0, 1, 3, 8 worked examples in the prompt (GPT-3's evaluation).

A task is JSONL, one item a line:
    {"question": "...", "answer": "..." | ["...", "..."]}                 open answer (any listed is right)
    {"question": "...", "choices": ["...", ...], "answer": 2 | "..."}      multiple choice
Open answers are generated greedily through the engine until the end of the line and compared after
normalisation (case, accents, surrounding punctuation), and also counted when the line merely mentions
an accepted answer (knowledge without the shown form); multiple choice picks the choice with the highest
mean log-probability per token. The examples for an item are drawn from the other items (or --examples),
the same first examples at every k, so accuracy can only differ by how many are shown.

Prompts are plain text ("Q: ...\\nA: ...", one line each) for base models and chat turns for fine-tuned ones (--format).
"""
from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from chatforge import ChatforgeError
from chatforge.data.chat import fit_messages
from chatforge.data.jsonl import iter_jsonl
from chatforge.tokenizer import Tokenizer


@dataclass
class Item:
    question: str
    answers: list[str]                 # acceptable answers (open), or [the right choice]
    choices: list[str] | None = None
    where: str = ""

    def shown_answer(self) -> str:
        return self.answers[0]


def read_task(path: str | Path) -> list[Item]:
    items = []
    for where, r in iter_jsonl(path, "task file"):
        if not isinstance(r.get("question"), str) or "answer" not in r:
            raise ChatforgeError(f"{where}: an item needs a string 'question' and an 'answer'")
        answer, choices = r["answer"], r.get("choices")
        if choices is not None:
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise ChatforgeError(f"{where}: 'choices' must be a list of at least two strings")
            if isinstance(answer, int) and not isinstance(answer, bool):
                if not 0 <= answer < len(choices):
                    raise ChatforgeError(f"{where}: answer index {answer} is outside the {len(choices)} choices")
                answer = choices[answer]
            if answer not in choices:
                raise ChatforgeError(f"{where}: answer {answer!r} is not one of the choices")
        answers = answer if isinstance(answer, list) else [answer]
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise ChatforgeError(f"{where}: 'answer' must be a non-empty string (or a list of them)")
        items.append(Item(r["question"], answers, choices, where))
    if not items:
        raise ChatforgeError(f"{path}: no items")
    return items


def normalize(text: str) -> str:
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return re.sub(r"\s+", " ", text.lower()).strip(" .,;:!?\"'")


def is_correct(prediction: str, item: Item) -> bool:
    """Exact match of the first line: the answer, and only the answer, as the examples show it."""
    got = normalize(prediction.split("\n")[0])
    return any(got == normalize(a) for a in item.answers)


def mentions_answer(prediction: str, item: Item) -> bool:
    """The first line contains an accepted answer (knowledge, whatever the form)."""
    got = f" {normalize(prediction.split(chr(10))[0])} "
    return any(re.search(rf"(?<!\w){re.escape(normalize(a))}(?!\w)", got) for a in item.answers)


# ---------------------------------------------------------------- prompts

def plain_prompt(examples: list[Item], question: str) -> str:
    # One line per question and answer: a blank line ends a document in the corpora chatforge trains on.
    shots = "".join(f"Q: {e.question}\nA: {e.shown_answer()}\n" for e in examples)
    return f"{shots}Q: {question}\nA:"


def chat_messages(examples: list[Item], question: str) -> list[dict[str, str]]:
    messages = []
    for e in examples:
        messages += [{"role": "user", "content": e.question}, {"role": "assistant", "content": e.shown_answer()}]
    return messages + [{"role": "user", "content": question}]


def choose_examples(items: list[Item], pool: list[Item], k_max: int, seed: int, same_pool: bool) -> list[list[Item]]:
    """For each item, k_max examples from the pool (never the item itself); a prefix of them is used for each k."""
    out = []
    for i, item in enumerate(items):
        rng = random.Random(f"{seed}:{i}")
        candidates = [e for e in pool if e is not item] if same_pool else pool
        out.append(rng.sample(candidates, min(k_max, len(candidates))))
    return out


# ---------------------------------------------------------------- scoring

def newline_ids(tokenizer: Tokenizer) -> list[int]:
    """Every token whose text holds a newline: the end of a plain-text answer."""
    return [i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([i], skip_special=False)]


@torch.no_grad()
def choice_scores(model: torch.nn.Module, prompt: list[int], continuations: list[list[int]]) -> list[float]:
    """Mean log-probability per token of each continuation after `prompt`."""
    device = next(model.parameters()).device
    width = len(prompt) + max(len(c) for c in continuations)
    x = torch.zeros(len(continuations), width, dtype=torch.long)
    for row, c in enumerate(continuations):
        seq = prompt + c
        x[row, :len(seq)] = torch.tensor(seq)
    logp = F.log_softmax(model(x.to(device)).float(), dim=-1)
    scores = []
    for row, c in enumerate(continuations):
        targets = torch.tensor(c, device=device)
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(c), device=device)
        scores.append(logp[row, positions, targets].mean().item())
    return scores


def evaluate_fewshot(engine, items: list[Item], ks: list[int], fmt: str = "plain", pool: list[Item] | None = None,
                     seed: int = 0, max_new_tokens: int = 24, batch_size: int = 32) -> dict:
    """Accuracy for each k, and the per-item predictions, generating through `engine` (greedy)."""
    from chatforge.infer.engine import SamplingParams
    if fmt not in ("plain", "chat"):
        raise ChatforgeError(f"--format must be plain or chat, got {fmt!r}")
    model, tokenizer = engine.model, engine.tokenizer
    context = model.config.max_position_embeddings
    shots = choose_examples(items, pool or items, max(ks), seed, same_pool=pool is None)
    stops = list(tokenizer.stop_ids)
    if fmt == "plain":  # the end of the line, or of the document (a base model starts the next with BOS)
        stops += newline_ids(tokenizer) + ([tokenizer.bos_id] if tokenizer.bos_id is not None else [])
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=stops)
    results: dict = {"format": fmt, "items": len(items), "k": {}}
    for k in ks:
        prompts, fewer = [], 0
        for item, examples in zip(items, shots):
            ids, used = _prompt_ids(tokenizer, examples[:k], item, fmt, context - max_new_tokens)
            fewer += used < k
            prompts.append(ids)
        correct, mentioned, records = 0, 0, []
        if items[0].choices is None:
            for start in range(0, len(prompts), batch_size):
                gens = engine.generate(prompts[start:start + batch_size], params)
                for item, gen in zip(items[start:start + batch_size], gens):
                    ok, knows = is_correct(gen.text, item), mentions_answer(gen.text, item)
                    correct += ok
                    mentioned += knows
                    records.append({"question": item.question, "prediction": gen.text.strip(), "correct": ok,
                                    "mentions_answer": knows})
        else:
            for item, ids in zip(items, prompts):
                conts = [tokenizer.encode(" " + c if fmt == "plain" else c) for c in item.choices]
                scores = choice_scores(model, ids, conts)
                pick = item.choices[max(range(len(scores)), key=scores.__getitem__)]
                ok = pick in item.answers
                correct += ok
                mentioned += ok
                records.append({"question": item.question, "prediction": pick, "correct": ok})
        results["k"][k] = {"accuracy": correct / len(items), "correct": correct,
                           "mentions_answer": mentioned / len(items), "fewer_examples": fewer, "predictions": records}
    return results


def _prompt_ids(tokenizer: Tokenizer, examples: list[Item], item: Item, fmt: str, budget: int) -> tuple[list[int], int]:
    """Prompt ids with as many of `examples` as fit `budget` tokens (the oldest are dropped first)."""
    if fmt == "chat":
        fitted = fit_messages(tokenizer, chat_messages(examples, item.question), budget, for_generation=True)
        return fitted.ids, (len(fitted.messages) - 1) // 2
    for used in range(len(examples), -1, -1):
        text = plain_prompt(examples[len(examples) - used:], item.question)
        ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(text)
        if len(ids) <= budget:
            return ids, used
    raise ChatforgeError(f"{item.where}: the question alone needs more than the {budget} tokens the context leaves")
