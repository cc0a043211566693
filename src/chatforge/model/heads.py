"""Scalar heads on the transformer: the reward model (one score per answer) and the PPO value model."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.model.transformer import GPT, ModelConfig


class ScalarModel(GPT):
    """The GPT with its LM head replaced by a linear map to one number per position.

    With `likelihood` (a reward model's option) the LM head stays, and a score read with the answers' start
    positions adds λ x the answer's log-likelihood under that head (λ a learnt scalar starting at `likelihood`).
    A small model knows more than one hidden state at the answer's end can tell a linear head: on the tiny world
    the SFT model's own log-likelihood ranks held-out comparisons far better than a trained scalar head does,
    because a wrong capital is a surprise to the model at the token where it is written, not at the end."""

    def __init__(self, cfg: ModelConfig, likelihood: float = 0.0) -> None:
        super().__init__(cfg)
        if likelihood:
            self.likelihood_weight = nn.Parameter(torch.tensor([float(likelihood)]))
        else:
            del self.lm_head
        self.score = nn.Linear(cfg.hidden_size, 1, bias=True)
        # InstructGPT-style small init, so the untrained head starts near zero whatever the backbone.
        nn.init.normal_(self.score.weight, std=1 / math.sqrt(cfg.hidden_size + 1))
        nn.init.zeros_(self.score.bias)

    @property
    def reads_likelihood(self) -> bool:
        return hasattr(self, "likelihood_weight")

    @classmethod
    def from_lm(cls, lm: GPT, likelihood: float = 0.0) -> "ScalarModel":
        """Initialise from a language model's backbone (SFT for the reward model, the reward model for value);
        with `likelihood`, its LM head too."""
        m = cls(lm.config, likelihood)
        drop = ("score.", "likelihood_weight") + (() if likelihood else ("lm_head.",))
        m.load_state_dict({k: v for k, v in lm.state_dict().items() if not k.startswith(drop)}, strict=False)
        return m.to(next(lm.parameters()).device)

    def forward(self, input_ids: torch.Tensor | None = None, starts: torch.Tensor | None = None,
                **kw) -> torch.Tensor:
        """A scalar for every position, [B, T]. With `starts` [B] (each row's first answer token) and a
        likelihood head, position t adds λ x the log-likelihood of the answer's tokens up to t."""
        hidden = self.hidden(input_ids, **kw)
        values = self.score(hidden).squeeze(-1).float()
        if starts is None or not self.reads_likelihood:
            return values
        logprobs = F.log_softmax(self.logits(hidden[:, :-1]).float(), -1)
        token = logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # token t+1 given tokens <= t
        position = torch.arange(1, input_ids.shape[1], device=input_ids.device)
        in_answer = position[None, :] >= starts.view(-1, 1)
        so_far = F.pad((token * in_answer).cumsum(1), (1, 0))
        return values + self.likelihood_weight.float() * so_far

    def score_last(self, input_ids: torch.Tensor, last: torch.Tensor, starts: torch.Tensor | None = None,
                   **kw) -> torch.Tensor:
        """The scalar at each row's last real token (`last` [B] indices), for right-padded batches."""
        values = self(input_ids, starts, **kw)
        return values.gather(1, last.view(-1, 1)).squeeze(1)
