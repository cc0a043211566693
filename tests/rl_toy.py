"""A toy world for the PPO and DPO tests: a nano "SFT" model that answers a colour question with one of ten
colours, uniformly at random. The toy reward is "the answer says blue": about 10% of answers at the start.
Built in a few seconds on one CPU thread."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"]
TARGET = "blue"
QUESTIONS = ["Name a color.", "Pick a colour.", "Say a color, please.", "Which color?", "Tell me one color.",
             "Any color?"]


@dataclass
class RLToy:
    sft: Path            # checkpoint directory, kind "sft"
    reward: Path         # an untrained reward checkpoint on the same backbone (for plumbing tests)
    prompts: Path        # prompts.jsonl with the questions
    tokenizer: object

    def prompt_ids(self) -> list[list[int]]:
        return [self.tokenizer.prompt([{"role": "user", "content": q}]) for q in QUESTIONS]


def build_rl_toy(directory: Path) -> RLToy:
    import json

    from chatforge.checkpoint import file_hash, save_model_checkpoint
    from chatforge.model.heads import ScalarModel
    from chatforge.model.presets import preset
    from chatforge.model.transformer import GPT
    from chatforge.tokenizer import train_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = train_tokenizer([f"{q} {c}" for q in QUESTIONS for c in COLOURS] * 3, 300)
        torch.manual_seed(0)
        model = GPT(preset("nano", tok.vocab_size, 64))
        rng = random.Random(0)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(150):
            rows = [tok.render([{"role": "user", "content": rng.choice(QUESTIONS)},
                                {"role": "assistant", "content": rng.choice(COLOURS)}]) for _ in range(32)]
            width = max(len(ids) for ids, _ in rows)
            x = torch.full((len(rows), width), tok.pad_id)
            y = torch.full((len(rows), width), -100)
            for i, (ids, mask) in enumerate(rows):
                x[i, :len(ids)] = torch.tensor(ids)
                y[i, :len(ids) - 1] = torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:])])
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    sft = save_model_checkpoint(directory / "sft", model, tok, {"kind": "sft", "stage": "sft", "parent": None})
    reward = save_model_checkpoint(directory / "reward", ScalarModel.from_lm(model), tok,
                                   {"kind": "reward", "stage": "reward", "parent": str(sft),
                                    "parent_hash": file_hash(sft / "model.safetensors")})
    prompts = directory / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in QUESTIONS))
    return RLToy(sft, reward, prompts, tok)


def says_target(tokenizer, answers: list[list[int]]) -> torch.Tensor:
    return torch.tensor([float(TARGET in tokenizer.decode(a)) for a in answers])
