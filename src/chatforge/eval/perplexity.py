"""Perplexity of a checkpoint on a text file, by sliding windows over its token stream.

The file is read as the pretraining corpus is (documents of .txt/.jsonl, each starting with BOS). Every
token is scored once, and with at least `context - stride` tokens of left context except at the start.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from chatforge import ChatforgeError
from chatforge.data.corpus import iter_corpus
from chatforge.tokenizer import Tokenizer


@dataclass
class Perplexity:
    tokens: int
    nll: float  # mean negative log-likelihood per token, nats

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    @property
    def bits_per_token(self) -> float:
        return self.nll / math.log(2)


def token_stream(tokenizer: Tokenizer, path: str | Path) -> list[int]:
    separator = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.pad_id
    ids: list[int] = []
    for doc in iter_corpus([path]):
        ids += [separator, *tokenizer.encode(doc)]
    if len(ids) < 2:
        raise ChatforgeError(f"{path}: too little text to measure perplexity")
    return ids


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer: Tokenizer, path: str | Path, context: int | None = None,
               stride: int | None = None, batch_size: int = 8) -> Perplexity:
    ids = torch.tensor(token_stream(tokenizer, path), dtype=torch.long)
    context = min(context or model.config.max_position_embeddings, len(ids))
    stride = stride or max(1, context // 2)
    if not 0 < stride <= context:
        raise ChatforgeError(f"--stride must be in 1..{context}, got {stride}")
    # window w covers ids[start : start+context]; it scores the targets after the previous window's last one
    windows: list[tuple[int, int]] = []  # (start, first scored target index within the window)
    scored_up_to = 1  # target positions < this are done; position 0 has no prediction
    start = 0
    while scored_up_to < len(ids):
        start = max(0, min(start, len(ids) - context))
        windows.append((start, scored_up_to - start))
        scored_up_to = start + context
        start += stride
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        x = torch.stack([ids[s:s + context] for s, _ in chunk]).to(device)
        logits = model(x[:, :-1]).float()
        nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # [B, context-1]
        for row, (_, first) in enumerate(chunk):
            part = nll[row, first - 1:]
            total_nll += part.sum().item()
            total_tokens += part.numel()
    model.train(was_training)
    return Perplexity(total_tokens, total_nll / total_tokens)
