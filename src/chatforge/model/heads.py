"""Scalar heads on the transformer: the reward model (one score per answer) and the PPO value model."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from chatforge.model.transformer import GPT, ModelConfig


class ScalarModel(GPT):
    """The GPT with its LM head replaced by a linear map to one number per position."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        del self.lm_head
        self.score = nn.Linear(cfg.hidden_size, 1, bias=True)
        # InstructGPT-style small init, so the untrained head starts near zero whatever the backbone.
        nn.init.normal_(self.score.weight, std=1 / math.sqrt(cfg.hidden_size + 1))
        nn.init.zeros_(self.score.bias)

    @classmethod
    def from_lm(cls, lm: GPT) -> "ScalarModel":
        """Initialise from a language model's backbone (SFT for the reward model, the reward model for value)."""
        m = cls(lm.config)
        backbone = {k: v for k, v in lm.state_dict().items() if not k.startswith(("lm_head.", "score."))}
        m.load_state_dict(backbone, strict=False)
        return m.to(next(lm.parameters()).device)

    def forward(self, input_ids: torch.Tensor | None = None, **kw) -> torch.Tensor:
        """A scalar for every position, [B, T]."""
        return self.score(self.hidden(input_ids, **kw)).squeeze(-1).float()

    def score_last(self, input_ids: torch.Tensor, last: torch.Tensor, **kw) -> torch.Tensor:
        """The scalar at each row's last real token (`last` [B] indices), for right-padded batches."""
        values = self(input_ids, **kw)
        return values.gather(1, last.view(-1, 1)).squeeze(1)
