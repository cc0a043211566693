"""A toy preference for the reward-model and Elo tests: answers are short word lists, and an answer that
contains the marker word is preferred to one that does not (ties inside each group). A nano base model
(random weights) learns it in a few seconds on one CPU thread."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

WORDS = "apple river stone cloud green quick table music light paper tree sun moon blue road house".split()
MARKER = "banana"


@dataclass
class RewardToy:
    base: Path        # a random nano GPT checkpoint (kind "base")
    train: Path       # K-way rankings, K = 3..5, marked answers first
    heldout: Path     # the same, other prompts
    reference: Path   # demonstrations (messages ending with an assistant turn) for the bias normalisation
    tokenizer: object


def toy_answer(rng: random.Random, marked: bool) -> str:
    words = rng.sample(WORDS, rng.randint(3, 7))
    if marked:
        words.insert(rng.randint(0, len(words)), MARKER)
    return " ".join(words)


def toy_rankings(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        k = rng.randint(3, 5)
        marked = rng.randint(1, k - 1)
        good = sorted({toy_answer(rng, True) for _ in range(marked)})
        bad = sorted({toy_answer(rng, False) for _ in range(k - marked)})
        responses = [group if len(group) > 1 else group[0] for group in (good, bad)]  # a group of equals, or one
        out.append({"prompt": f"Say something about {rng.choice(WORDS)}.", "responses": responses})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def build_reward_toy(directory: Path, n_train: int = 160, n_heldout: int = 50) -> RewardToy:
    from chatforge.checkpoint import save_model_checkpoint
    from chatforge.model.presets import preset
    from chatforge.model.transformer import GPT
    from chatforge.tokenizer import train_tokenizer

    rng = random.Random(0)
    tok = train_tokenizer([toy_answer(rng, True) for _ in range(200)] + [f"Say something about {w}." for w in WORDS], 300)
    torch.manual_seed(0)
    base = save_model_checkpoint(directory / "base", GPT(preset("nano", tok.vocab_size, 64)), tok,
                                 {"kind": "base", "stage": "pretrain"})
    reference = [{"messages": [{"role": "user", "content": "Say something."},
                               {"role": "assistant", "content": toy_answer(rng, rng.random() < 0.5)}]} for _ in range(40)]
    return RewardToy(base, write_jsonl(directory / "train.jsonl", toy_rankings(rng, n_train)),
                     write_jsonl(directory / "heldout.jsonl", toy_rankings(rng, n_heldout)),
                     write_jsonl(directory / "reference.jsonl", reference), tok)
