"""The one generation engine: the chat CLI, the server, PPO rollouts, preference sampling and evaluation all use it.

A batch holds prompts of different lengths, left-padded to the longest: each row carries its own positions and
a key mask, so its tokens are exactly those it would get alone. The prompts are prefilled once into a
preallocated KV cache (copied row-wise for several samples per prompt); each decode step then feeds one token
per live row. A row that stops (a stop token, its token budget, the context length, or a cancel) is dropped
from the batch, so it costs nothing afterwards.

Log-probabilities (`return_logprobs=True`) are those of the *model's* distribution, `log_softmax` of the raw
logits at temperature 1 before any repetition penalty, top-k or top-p: the quantity PPO's ratios and KL use,
whatever sampling settings picked the tokens.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from chatforge import ChatforgeError
from chatforge.device import pick_device
from chatforge.model.transformer import GPT, KVCache
from chatforge.tokenizer import Message, Tokenizer


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0          # 0 = greedy (argmax)
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    repetition_penalty: float = 1.0   # 1 = off; >1 discourages tokens already in the prompt or the answer
    stop_ids: list[int] | None = None  # None = the tokenizer's stop tokens
    seed: int | None = None           # None = torch's global RNG

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ChatforgeError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ChatforgeError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ChatforgeError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ChatforgeError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ChatforgeError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass
class Generation:
    prompt_ids: list[int]
    ids: list[int]                    # generated tokens, the stop token excluded
    text: str
    finish_reason: str                # "stop" | "length" | "cancelled"
    logprobs: list[float] | None = None  # per generated token (the stop token included when it ended the row)


class Stream:
    """Iterates decode steps: each `next()` gives the `(row, token_id)` pairs produced by one step.

    Rows are numbered as in `Engine.generate`'s result (prompt-major with several samples). A row's stop
    token is yielded too, and is its last. `cancel(row)` drops a row before the next step (a client went
    away); `close()` ends the whole batch. `generations()` gives the rows so far as `Generation`s.
    """

    def __init__(self, run: "_Run") -> None:
        self._run = run
        self._steps = run.steps()

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> list[tuple[int, int]]:
        return next(self._steps)

    def cancel(self, row: int) -> None:
        self._run.cancel(row)

    def close(self) -> None:
        self._steps.close()
        self._run.close()

    def generations(self) -> list[Generation]:
        return self._run.generations()


# Decode steps an engine runs eagerly before the default policy compiles: the compiler's tens of seconds pay
# off over thousands of steps (a PPO run, an evaluation, a server), never in a short job.
COMPILE_AFTER_STEPS = 2048


class Engine:
    """Batched generation with a KV cache from a GPT (any of its adapters attached) and its tokenizer.

    `device`/`dtype` move the model when given; otherwise it is used where and as it is. Generation runs
    without gradients and in eval mode (a model in training mode is switched back after every forward).

    The decode step can run through torch.compile (see `_decode_step`): `compile=True` from the first step,
    False never, None (the default) once this engine has decoded `COMPILE_AFTER_STEPS` steps eagerly (or from
    the first step when the caller expects to run that many, `expected_steps`), so that a short job never waits
    for the compiler and a long one (PPO, evaluation, serving) runs compiled. The
    environment variable CHATFORGE_COMPILE=0 or 1 changes that default. Without a working compiler the engine
    warns once and stays eager; the tokens are the same either way (up to float rounding).
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, compile: bool | None = None, expected_steps: int = 0) -> None:
        if device is not None or dtype is not None:
            model.to(device=pick_device(device) if device is not None else None, dtype=dtype)
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        if compile is None and os.environ.get("CHATFORGE_COMPILE", "") in ("0", "1"):
            compile = os.environ["CHATFORGE_COMPILE"] == "1"
        self.compile = compile
        self.decode_steps = 0  # run so far, for the default compile policy
        self.expected_steps = expected_steps  # a caller's word for how many it will run (a PPO run's rollouts)

    def _compiled_now(self) -> bool:
        if self.compile is None:
            steps = max(self.decode_steps, self.expected_steps)
            return steps >= COMPILE_AFTER_STEPS and self.device.type in ("cpu", "cuda")
        return self.compile

    @classmethod
    def load(cls, ckpt_dir: str | Path, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None) -> "Engine":
        from chatforge.checkpoint import load_model
        model, tokenizer, _ = load_model(ckpt_dir, device=pick_device(device), dtype=dtype or torch.float32,
                                         expect_kind=("base", "sft", "policy", "adapter"))
        return cls(model.eval(), tokenizer)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def generate(self, prompts: list[list[int]], params: SamplingParams, return_logprobs: bool = False,
                 num_samples: int = 1) -> list[Generation]:
        """Complete every prompt `num_samples` times; results are prompt-major (p0 s0, p0 s1, ..., p1 s0, ...)."""
        run = _Run(self, prompts, params, return_logprobs, num_samples)
        for _ in run.steps():
            pass
        return run.generations()

    def stream(self, prompts: list[list[int]], params: SamplingParams, return_logprobs: bool = False,
               num_samples: int = 1) -> Stream:
        """Like `generate`, one decode step at a time (see `Stream`). Bad input raises here, not at the first step."""
        return Stream(_Run(self, prompts, params, return_logprobs, num_samples))

    def chat(self, conversations: list[list[Message]], params: SamplingParams, **kw) -> list[Generation]:
        """The next assistant turn of each conversation (OpenAI-style messages), through the chat template."""
        return self.generate([self.tokenizer.prompt(m) for m in conversations], params, **kw)


class _Run:
    """One batch being generated: the cache, the live rows and what each row has produced."""

    def __init__(self, engine: Engine, prompts: list[list[int]], params: SamplingParams,
                 return_logprobs: bool, num_samples: int) -> None:
        params.validate()
        if num_samples < 1:
            raise ChatforgeError(f"num_samples must be >= 1, got {num_samples}")
        cfg = engine.config
        self.engine, self.params, self.num_samples = engine, params, num_samples
        self.prompts = [_check_prompt(p, i, cfg.vocab_size, cfg.max_position_embeddings) for i, p in enumerate(prompts)]
        rows = len(self.prompts) * num_samples
        self.stop_ids = set(engine.tokenizer.stop_ids if params.stop_ids is None else params.stop_ids)
        # A row ends at its budget or where the context ends, whichever comes first.
        self.budget = [min(params.max_new_tokens, cfg.max_position_embeddings - len(self.prompts[r // num_samples]))
                       for r in range(rows)]
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.logprobs: list[list[float]] | None = [[] for _ in range(rows)] if return_logprobs else None
        self.finish: list[str | None] = [None] * rows
        self.cancelled: set[int] = set()
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(engine.device).manual_seed(params.seed)

    def cancel(self, row: int) -> None:
        if 0 <= row < len(self.finish) and self.finish[row] is None:
            self.cancelled.add(row)

    def close(self) -> None:
        for r, f in enumerate(self.finish):
            if f is None:
                self.finish[r] = "cancelled"

    def generations(self) -> list[Generation]:
        tok = self.engine.tokenizer
        return [Generation(prompt_ids=list(self.prompts[r // self.num_samples]), ids=ids, text=tok.decode(ids),
                           finish_reason=self.finish[r] or "cancelled",
                           logprobs=self.logprobs[r] if self.logprobs is not None else None)
                for r, ids in enumerate(self.ids)]

    def steps(self) -> Iterator[list[tuple[int, int]]]:
        if not self.prompts:
            return
        if max(self.budget) == 0:
            self.finish = ["length"] * len(self.finish)
            return
        model = self.engine.model
        with _inference(model):
            decoder = _Decoder(model, self.prompts, self.num_samples, max(self.budget), self.params)
            logits = decoder.prefill()
        alive = list(range(len(self.ids)))  # the original row of each batch row
        tokens = None  # the last step's tokens, not yet fed
        while True:
            keep = [i for i, row in enumerate(alive) if self._live(row)]
            if not keep:
                return
            with _inference(model):
                if len(keep) < len(alive):
                    index = torch.tensor(keep, device=logits.device)
                    decoder.keep(index)
                    alive = [alive[i] for i in keep]
                    if tokens is None:
                        logits = logits[index]
                    else:
                        tokens = tokens[index]
                if tokens is not None:
                    logits = decoder.step(tokens, self.engine._compiled_now())
                    self.engine.decode_steps += 1
                tokens, logprobs = decoder.sample(logits, self.generator, self.logprobs is not None)
            yield self._record(alive, tokens.tolist(), logprobs.tolist() if logprobs is not None else None)

    def _live(self, row: int) -> bool:
        if self.finish[row] is None and row in self.cancelled:
            self.finish[row] = "cancelled"
        return self.finish[row] is None

    def _record(self, alive: list[int], tokens: list[int], logprobs: list[float] | None) -> list[tuple[int, int]]:
        for i, (row, token) in enumerate(zip(alive, tokens)):
            if logprobs is not None:
                self.logprobs[row].append(logprobs[i])
            if token in self.stop_ids:
                self.finish[row] = "stop"
                continue
            self.ids[row].append(token)
            if len(self.ids[row]) >= self.budget[row]:
                self.finish[row] = "length"
        return list(zip(alive, tokens))


class _Decoder:
    """The tensor side of a run: left-padded prefill, then one token per live row per step.

    Every row writes its step's token at the same cache slot (`slot`, a one-element tensor) and attends over
    all slots under a mask of those holding its real tokens, so a step's shapes never change: one compiled
    graph serves every step (of every run with the same batch size being one or more).
    """

    def __init__(self, model: GPT, prompts: list[list[int]], num_samples: int, max_new: int,
                 params: SamplingParams) -> None:
        self.model, self.params = model, params
        device = model.lm_head.weight.device
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        self.ragged = min(lengths) != width
        pad = [width - n for n in lengths]
        self.ids = torch.tensor([[0] * k + p for k, p in zip(pad, prompts)], device=device)
        self.pad = torch.tensor(pad, device=device).unsqueeze(1)  # [B, 1]
        self.num_samples = num_samples
        dtype = model.lm_head.weight.dtype
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        self.cache = KVCache(model.config, len(prompts), width + max_new, device, dtype)
        # key_ok[b, s]: slot s of row b holds a real token (not left padding); slots past the prompt always do.
        self.key_ok = torch.arange(width + max_new, device=device)[None, :] >= self.pad
        self.slot = torch.tensor([width], device=device)  # where the next step's tokens go
        # A model with its own cache layout (P-tuning's virtual tokens) appends instead, shapes growing.
        self.static = type(model).hidden is GPT.hidden
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(len(prompts), model.config.vocab_size, dtype=torch.bool, device=device)
            rows = [b for b, p in enumerate(prompts) for _ in p]
            self.seen[rows, [t for p in prompts for t in p]] = True

    def prefill(self) -> torch.Tensor:
        """Logits [rows, vocab] after each prompt's last token."""
        positions = mask = None
        if self.ragged:
            width = self.ids.shape[1]
            t = torch.arange(width, device=self.ids.device)
            positions = (t[None, :] - self.pad).clamp(min=0)
            causal = t[None, :] <= t[:, None]
            # Padding queries see themselves only, so no softmax row is empty (NaNs would reach real rows).
            mask = (causal & self.key_ok[:, None, :width]) | torch.eye(width, dtype=torch.bool, device=t.device)
            mask = mask.unsqueeze(1)
        hidden = self.model.hidden(self.ids, positions=positions, cache=self.cache, mask=mask)  # appends
        if self.static:
            self.cache.slots = self.slot  # decode steps write at a slot instead
        logits = self.model.logits(hidden[:, -1])
        if self.num_samples > 1:  # copy each prompt's cache rows instead of prefilling it again
            rows = torch.arange(len(self.ids), device=logits.device).repeat_interleave(self.num_samples)
            self.keep(rows)
            logits = logits[rows]
        return logits

    def step(self, tokens: torch.Tensor, compiled: bool) -> torch.Tensor:
        """Feed one token per live row; logits [rows, vocab] for the next."""
        if self.static:
            logits = _run_decode_step(compiled, self.model, self.cache, tokens, self.pad, self.key_ok)
        else:
            mask = self.key_ok[:, None, None, :self.cache.length + 1]
            hidden = self.model.hidden(tokens.unsqueeze(1), positions=self.slot - self.pad, cache=self.cache,
                                       mask=mask)
            logits = self.model.logits(hidden[:, -1])
        self.slot += 1
        return logits

    def keep(self, rows: torch.Tensor) -> None:
        """Continue with these batch rows only (in this order)."""
        self.cache.select(rows)
        self.key_ok = self.key_ok[rows]
        self.pad = self.pad[rows]
        if self.seen is not None:
            self.seen = self.seen[rows]

    def sample(self, logits: torch.Tensor, generator: torch.Generator | None,
               want_logprobs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        p = self.params
        logits = logits.float()
        raw = logits
        if self.seen is not None:
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        if p.temperature == 0:
            tokens = logits.argmax(-1)
        else:
            logits = logits / p.temperature
            if p.top_k > 0:
                kth = logits.topk(min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = logits.softmax(-1)
            if p.top_p < 1.0:
                probs = _top_p(probs, p.top_p)
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        if self.seen is not None:
            self.seen.scatter_(1, tokens.unsqueeze(1), True)
        logprobs = raw.log_softmax(-1).gather(1, tokens.unsqueeze(1)).squeeze(1) if want_logprobs else None
        return tokens, logprobs


def _decode_step(model: GPT, cache: KVCache, tokens: torch.Tensor, pad: torch.Tensor,
                 key_ok: torch.Tensor) -> torch.Tensor:
    """Logits [rows, vocab] after feeding `tokens` [rows] at cache slot `cache.slots` (one for all rows,
    which are left-padded by `pad` [rows, 1]); `key_ok` [rows, max_len] marks the slots that are not padding."""
    slot = cache.slots
    mask = key_ok & (torch.arange(key_ok.shape[1], device=key_ok.device) <= slot)
    hidden = model.hidden(tokens.unsqueeze(1), positions=slot - pad, cache=cache, mask=mask[:, None, None, :])
    return model.logits(hidden[:, -1])


_compiled_decode_step = None  # torch.compile(_decode_step), shared: its graphs are keyed by the model's structure
_compile_failed = False


def _run_decode_step(compiled: bool, *args: object) -> torch.Tensor:
    """`_decode_step`, compiled when asked and possible (one warning and eager from then on when not)."""
    global _compiled_decode_step, _compile_failed
    if compiled and not _compile_failed:
        try:
            if _compiled_decode_step is None:
                # Batch and cache length dynamic: one graph for one row, one for several (any cache length).
                _compiled_decode_step = torch.compile(_decode_step, dynamic=True)
            return _compiled_decode_step(*args)
        except Exception as e:  # no C++ compiler, an unsupported device, ...: the eager step gives the same tokens
            _compile_failed = True
            warnings.warn(f"torch.compile of the decode step failed, decoding without it: "
                          f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                          RuntimeWarning, stacklevel=2)
    return _decode_step(*args)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches `top_p` (the top token always)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def _check_prompt(prompt: list[int], index: int, vocab_size: int, context: int) -> list[int]:
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ChatforgeError(f"prompt {index}: must be a non-empty list of token ids")
    if len(prompt) >= context:
        raise ChatforgeError(f"prompt {index}: {len(prompt)} tokens do not fit the model's context of {context} "
                             f"tokens (max_position_embeddings) with room to generate; shorten it to at most "
                             f"{context - 1} tokens")
    low, high = min(prompt), max(prompt)
    if low < 0 or high >= vocab_size:
        raise ChatforgeError(f"prompt {index}: token id {low if low < 0 else high} is outside the vocabulary "
                             f"(0..{vocab_size - 1})")
    return list(prompt)


class _inference:
    """Inference mode and eval mode for one forward; a model that was training is put back afterwards."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.inference_mode = torch.inference_mode()

    def __enter__(self) -> None:
        self.was_training = self.model.training
        if self.was_training:
            self.model.eval()
        self.inference_mode.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.inference_mode.__exit__(*exc)
        if self.was_training:
            self.model.train()
