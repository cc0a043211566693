"""How fast a model configuration trains and generates on this machine (`chatforge models --measure`).

Random weights: speed does not depend on them. Training is forward + next-token loss + backward on about
2048 tokens per step (bf16 autocast where the hardware has it, fp32 otherwise); generation is greedy decoding
of 32 new tokens after a 16-token prompt at batch 1, through the engine. Each is the median of a few timed
repetitions after a warm-up; `bench/model_speed.py` is the careful side-by-side benchmark.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from chatforge.device import autocast, bf16_supported, pick_device
from chatforge.model.transformer import GPT, ModelConfig

STEP_TOKENS = 2048
NEW_TOKENS = 32
PROMPT_TOKENS = 16


def measure(cfg: ModelConfig, device: str | torch.device | None = None, reps: int = 3) -> dict:
    """Columns for `chatforge models --measure`: training tokens/s (and its dtype), generation tokens/s."""
    from chatforge.infer.engine import Engine, SamplingParams
    device = pick_device(device)
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    seq = min(cfg.max_position_embeddings, STEP_TOKENS)
    batch = max(1, STEP_TOKENS // seq)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    bf16 = bf16_supported(device)

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        with autocast(device, enabled=bf16):
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()

    train_s = _median_seconds(train_step, device, reps)
    model.zero_grad(set_to_none=True)
    engine = Engine(model.eval(), _NoTokenizer())
    prompt = ids[:1, :PROMPT_TOKENS].tolist()
    params = SamplingParams(max_new_tokens=NEW_TOKENS, stop_ids=[])
    gen_s = _median_seconds(lambda: engine.generate(prompt, params), device, reps)
    return {"train tok/s": f"{batch * (seq - 1) / train_s:,.0f}", "train dtype": "bf16" if bf16 else "fp32",
            "gen tok/s (batch 1)": f"{NEW_TOKENS / gen_s:,.0f}"}


class _NoTokenizer:
    """The engine only needs stop ids (given) and decoding (unused here) from a tokenizer."""
    stop_ids: list[int] = []

    def decode(self, ids: list[int]) -> str:
        return ""


def _median_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    fn()  # warm-up: allocation, kernel selection
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
