"""The one training loop. A stage brings a model, its batches, its loss and how to save; the loop does the rest:

AdamW with linear warmup and cosine decay, gradient accumulation, gradient clipping, bf16 autocast where the
hardware has it, periodic evaluation, metrics.jsonl, a progress bar with tokens/s, MFU and ETA, atomic
checkpoints with exact resume, a lock on the output directory, and DDP under torchrun.

Contract with a stage:
- `batches(step, micro) -> batch` is a pure function of its arguments for this rank (so resume needs no data
  state); any nesting of tensors, moved to the device by the loop.
- `loss_fn(model, batch) -> (loss, stats)`: `loss` is a scalar mean over the micro-batch; `stats` maps names to
  floats or 0-d tensors, averaged into the logs (except "tokens", summed and used for tokens/s and MFU).
  Under DDP `model` is the wrapper: call `model(...)` exactly once per micro-batch (concatenate chosen and
  rejected, say), as DDP's gradient hooks expect.
- `weight_fn(batch) -> float`, optional: micro-batches' losses are averaged with these weights (e.g. the number
  of loss tokens), so a step's loss is the mean over the step however it is split into micro-batches and ranks.
- `eval_fn(model) -> {name: float}` runs on rank 0 under no_grad and autocast, with the plain model in eval mode.
- `save_fn(out, model, trainer_state, metrics)` writes a complete checkpoint directory atomically, with
  `trainer_state` as state/trainer.pt and `out/metrics.jsonl` copied in: `checkpoint_saver` does it for full models.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from chatforge import ChatforgeError
from chatforge.checkpoint import RunLock, atomic_write_text, is_complete, resolve, save_model_checkpoint
from chatforge.config import to_dict
from chatforge.device import autocast
from chatforge.train.distributed import Dist, setup
from chatforge.train.progress import Progress, duration, matmul_peak

STATE_VERSION = 1
# Settings that may differ on --resume: they change what is observed or where, never the result.
RESUME_FREE = ("eval_every", "eval_batches", "save_every", "log_every", "device", "compile")

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, Any]]"]
BatchFn = Callable[[int, int], Any]
EvalFn = Callable[[nn.Module], "dict[str, float]"]
SaveFn = Callable[[Path, nn.Module, "dict[str, Any]", "dict[str, Any]"], None]


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32           # sequences per optimizer step, over all micro-batches and ranks
    grad_accum: int = 1            # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1      # the cosine decays to lr x this
    warmup_steps: int = 50
    weight_decay: float = 0.1      # on matrices only, never on norms or biases
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0         # max global gradient norm; 0 turns clipping off
    eval_every: int = 200          # steps between evaluations (and always at the end); 0 = only at the end
    eval_batches: int = 20
    save_every: int = 500          # steps between checkpoints (and always at the end)
    log_every: int = 10
    seed: int = 0
    device: str | None = None      # cuda, mps or cpu; default: the best available
    dtype: str = "auto"            # auto (bf16 autocast where supported) | bf16 | fp32
    compile: bool = False
    keep: str = "last"             # the output's weights: last step, or best by best_metric (last kept in state/)
    best_metric: str = "val_loss"
    best_mode: str = "min"         # min | max

    def validate(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "eval_batches", "save_every", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ChatforgeError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "eval_every"):
            if getattr(self, name) < 0:
                raise ChatforgeError(f"{name}: must not be negative, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ChatforgeError(f"lr: must be a positive number, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ChatforgeError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ChatforgeError(f"betas: expected two numbers in [0, 1), got {self.betas}")
        for name, allowed in (("dtype", ("auto", "bf16", "fp32")), ("keep", ("last", "best")),
                              ("best_mode", ("min", "max"))):
            if getattr(self, name) not in allowed:
                raise ChatforgeError(f"{name}: expected one of {', '.join(allowed)}, got {getattr(self, name)!r}")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate at 0-based `step`: linear warmup, then cosine to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(params: Iterable[nn.Parameter] | list[dict[str, Any]], cfg: TrainConfig,
                   device: torch.device, fused_on_cpu: bool = False) -> torch.optim.AdamW:
    """AdamW; plain parameters are grouped into decayed matrices and undecayed vectors (norms, biases).

    Param-group dicts pass through, so a stage can give some parameters their own `lr` or `weight_decay`.
    Fused (one pass over each tensor) on CUDA, and on the CPU with `fused_on_cpu`: 3.3 ms a step against 14.8
    for babbage's 7.2M parameters here, which counts where optimizer steps are frequent and small (PPO).
    """
    params = list(params)
    if params and isinstance(params[0], dict):
        groups = [dict(g) for g in params]
    else:
        trainable = [p for p in params if p.requires_grad]
        groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
    if not any(g["params"] for g in groups):
        raise ChatforgeError("nothing to train: no parameter requires a gradient")
    for g in groups:
        g["base_lr"] = g.get("lr", cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                             fused=device.type == "cuda" or (fused_on_cpu and device.type == "cpu"))


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.dtype != "auto":
        return cfg.dtype == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_has_bf16()
    return False


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: Apple silicon and others run fp32 on the CPU
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def checkpoint_saver(tokenizer: Any, meta: dict[str, Any]) -> SaveFn:
    """The usual `save_fn`: a full model checkpoint whose meta.json is `meta` plus the metrics summary."""
    def save(out: Path, model: nn.Module, state: dict[str, Any], metrics: dict[str, Any]) -> None:
        save_model_checkpoint(out, model, tokenizer, {**meta, "metrics": metrics}, state=state,
                              metrics_from=out / "metrics.jsonl")
    return save


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def resume_fingerprint(cfg: TrainConfig, drop: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    """What must be equal for --resume to continue a run exactly: the settings in `cfg` (a stage's config
    subclassing TrainConfig) but RESUME_FREE and `drop` (e.g. paths whose contents `extra` hashes), and `extra`
    (model architecture, tokenizer and data hashes...)."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in RESUME_FREE and k not in drop}
    return {**settings, **extra}


def train(model: nn.Module, params: Iterable[nn.Parameter] | list[dict[str, Any]], loss_fn: LossFn,
          batches: BatchFn, out: str | Path, cfg: TrainConfig, *, save_fn: SaveFn,
          eval_fn: EvalFn | None = None, weight_fn: Callable[[Any], float] | None = None,
          resume: bool = False, fingerprint: dict[str, Any] | None = None,
          flops_per_token: float | None = None, desc: str = "train") -> dict[str, Any]:
    """Train `model` for `cfg.steps` optimizer steps, writing the checkpoint directory `out`; returns a summary.

    With `resume`, a checkpoint in `out` is continued exactly (refused if `fingerprint` changed); without it, an
    existing checkpoint in `out` is an error. `fingerprint` defaults to `resume_fingerprint(cfg)`.
    """
    cfg.validate()
    if cfg.keep == "best" and eval_fn is None:
        raise ChatforgeError("keep = 'best' needs an evaluation: this stage has no validation data")
    dist = setup(cfg.device)
    run = _Run(model, params, loss_fn, batches, Path(out), cfg, dist, save_fn, eval_fn, weight_fn,
               fingerprint if fingerprint is not None else resume_fingerprint(cfg), flops_per_token, desc)
    lock = RunLock(run.out) if dist.is_main else nullcontext()
    with dist.main_first():
        lock.__enter__()
    try:
        return run.start(resume)
    finally:
        lock.__exit__(None, None, None)


class _Run:
    def __init__(self, model, params, loss_fn, batches, out, cfg, dist: Dist, save_fn, eval_fn, weight_fn,
                 fingerprint, flops_per_token, desc) -> None:
        self.model, self.loss_fn, self.batches, self.out, self.cfg, self.dist = model, loss_fn, batches, out, cfg, dist
        self.save_fn, self.eval_fn, self.weight_fn = save_fn, eval_fn, weight_fn
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))  # as it will read back from disk
        self.flops_per_token, self.desc = flops_per_token, desc
        self.device = dist.device
        model.to(self.device)
        self.optimizer = make_optimizer(params, cfg, self.device)
        names = {id(p): n for n, p in model.named_parameters()}
        self.trainable: dict[str, nn.Parameter] = {}
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                if id(p) not in names:
                    raise ChatforgeError("a trainable parameter is not part of the model given to train()")
                self.trainable[names[id(p)]] = p
        self.bf16 = use_bf16(cfg, self.device)
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        self.saved_step: int | None = None
        self.best: dict[str, Any] = {"metric": cfg.best_metric, "value": None, "step": None}
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.last_eval: dict[str, float] = {}
        self.last_loss: float | None = None

    # --- start: fresh or resumed ---
    def start(self, resume: bool) -> dict[str, Any]:
        state = self._prepare_out(resume)
        if state is None:
            torch.manual_seed(self.cfg.seed + self.dist.rank)
            random.seed(self.cfg.seed + self.dist.rank)
        else:
            self._restore(state)
        if self.step >= self.cfg.steps:
            self._say(f"{self.out}: already trained for {self.step} of {self.cfg.steps} steps; nothing to do")
            return self._summary()
        self.wrapped = self.dist.wrap(self.model)
        if self.cfg.compile:
            self.wrapped = torch.compile(self.wrapped)
        self.model.train()
        self._say_plan()
        return self._loop()

    def _prepare_out(self, resume: bool) -> dict[str, Any] | None:
        """The resume state to continue from, if any; clears what a killed run left behind."""
        out = self.out
        with self.dist.main_first():
            if self.dist.is_main:
                resolve(out)
                for staging in out.parent.glob(f"{out.name}.tmp-*"):
                    shutil.rmtree(staging, ignore_errors=True)  # a save that was killed half-way
            if is_complete(out):
                if not resume:
                    raise ChatforgeError(f"{out} already holds a checkpoint: pass --resume to continue it, "
                                         f"or choose another output directory")
                trainer_pt = out / "state" / "trainer.pt"
                if not trainer_pt.is_file():
                    raise ChatforgeError(f"{out}: checkpoint has no resume state (state/trainer.pt)")
                state = torch.load(trainer_pt, map_location="cpu", weights_only=True)
                self._check_compatible(state, trainer_pt)
            else:
                leftovers = [p.name for p in out.iterdir() if p.name != "metrics.jsonl"] if out.is_dir() else []
                if leftovers:
                    raise ChatforgeError(f"{out}: not a complete checkpoint directory (holds {', '.join(leftovers[:3])}"
                                         f"{'...' if len(leftovers) > 3 else ''}); choose an empty output directory")
                state = None
            if self.dist.is_main:
                out.mkdir(parents=True, exist_ok=True)
                self._trim_metrics(state["step"] if state else 0)
        return state

    def _check_compatible(self, state: dict[str, Any], where: Path) -> None:
        if state.get("version") != STATE_VERSION:
            raise ChatforgeError(f"{where}: resume state version {state.get('version')!r}, this chatforge "
                                 f"resumes version {STATE_VERSION}")
        refuse_changed_resume(self.out, state["fingerprint"], self.fingerprint)

    def _trim_metrics(self, step: int) -> None:
        """metrics.jsonl keeps exactly the steps the checkpoint has done (a killed run may have logged more)."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in lines))

    def _restore(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(state["trainable"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = self.saved_step = state["step"]
        self.tokens, self.elapsed = state["tokens"], state["elapsed"]
        self.best = state["best"]
        self.best_weights = state.get("best_trainable")
        self.last_eval = state.get("last_eval", {})
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            rng = rngs[self.dist.rank]
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
            random.setstate(rng["python"])
        else:  # a different number of ranks: random streams cannot continue, so start them afresh
            torch.manual_seed(self.cfg.seed + self.dist.rank + 7919 * self.step)
            random.seed(self.cfg.seed + self.dist.rank + 7919 * self.step)

    # --- the loop ---
    def _loop(self) -> dict[str, Any]:
        cfg = self.cfg
        bar = Progress(cfg.steps, self.step, self.dist.is_main, self.desc)
        interval_tokens, interval_time = 0, 0.0
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                loss, grad_norm, stats = self._train_step()
                self.step += 1
                self.last_loss = loss
                dt = time.perf_counter() - t0
                interval_time += dt
                interval_tokens += int(stats.get("tokens", 0))
                self.elapsed += dt
                self.tokens += int(stats.get("tokens", 0))
                speed = interval_tokens / interval_time if interval_time else None
                bar.update(self.step, loss, speed, self._mfu(speed))
                final = self.step == cfg.steps
                evaluated = self._maybe_eval(final)
                if self.step % cfg.log_every == 0 or final or evaluated:
                    self._log({"step": self.step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                               "grad_norm": grad_norm, **{k: v for k, v in stats.items() if k != "tokens"},
                               "tokens": self.tokens, "tokens_per_s": speed, "mfu": self._mfu(speed),
                               "elapsed_s": round(self.elapsed, 3), **(evaluated or {})})
                    interval_tokens, interval_time = 0, 0.0
                if evaluated:
                    bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in evaluated.items()))
                if self.step % cfg.save_every == 0 or final:
                    self._save()
        finally:
            bar.close()
        return self._summary()

    def _train_step(self) -> tuple[float, float, dict[str, float]]:
        cfg, dist = self.cfg, self.dist
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(self.step, cfg)
        micro = [self.batches(self.step, m) for m in range(cfg.grad_accum)]
        weights = torch.tensor([float(self.weight_fn(b)) if self.weight_fn else 1.0 for b in micro])
        total_weight = (float(dist.sum(weights.sum().to(self.device))) if self.weight_fn
                        else float(len(micro) * dist.world_size))
        if total_weight <= 0:
            raise ChatforgeError(f"step {self.step + 1}: the batch has nothing to train on (total weight 0)")
        loss_sum = torch.zeros((), device=self.device)
        stat_sums: dict[str, torch.Tensor] = {}
        for m, batch in enumerate(micro):
            batch = to_device(batch, self.device)
            sync = m == len(micro) - 1 or not dist.active
            with (nullcontext() if sync else self.wrapped.no_sync()), self._autocast():
                loss, stats = self.loss_fn(self.wrapped, batch)
            share = weights[m].item() / total_weight
            # DDP averages gradients over ranks; scaling by the world size makes that a weighted sum.
            (loss * (share * dist.world_size)).backward()
            loss_sum += loss.detach().float() * share
            for k, v in stats.items():
                v = torch.as_tensor(v, dtype=torch.float32).detach().to(self.device)
                stat_sums[k] = stat_sums.get(k, 0) + (v if k == "tokens" else v * share)
        keys = sorted(stat_sums)
        totals = dist.sum(torch.stack([loss_sum, *(stat_sums[k] for k in keys)]).float()).tolist()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(self.trainable.values()),
                                                         cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
        loss_value = totals[0]
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            what = f"loss is {loss_value}" if not math.isfinite(loss_value) else f"gradient norm is {grad_norm}"
            kept = (f"the last good checkpoint {self.out} (step {self.saved_step}) is kept" if self.saved_step
                    else "no checkpoint had been written yet")
            raise ChatforgeError(f"step {self.step + 1}: {what}; training stopped and {kept}. "
                                 f"Try a lower --lr or --grad-clip")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm, dict(zip(keys, totals[1:]))

    def _autocast(self):
        return autocast(self.device) if self.bf16 else nullcontext()

    def _mfu(self, tokens_per_s: float | None) -> float | None:
        if not (self.flops_per_token and tokens_per_s and self.dist.is_main):
            return None
        peak = matmul_peak(self.device, torch.bfloat16 if self.bf16 else torch.float32)
        return round(tokens_per_s * self.flops_per_token / (peak * self.dist.world_size), 4)

    # --- evaluation, logging, saving ---
    def _maybe_eval(self, final: bool) -> dict[str, float] | None:
        every = self.cfg.eval_every
        if self.eval_fn is None or not self.dist.is_main or not (final or (every and self.step % every == 0)):
            return None
        self.model.eval()
        with torch.no_grad(), self._autocast():
            metrics = {k: float(v) for k, v in self.eval_fn(self.model).items()}
        self.model.train()
        self.last_eval = metrics
        value = metrics.get(self.cfg.best_metric)
        if value is not None and math.isfinite(value):
            better = self.best["value"] is None or (value < self.best["value"] if self.cfg.best_mode == "min"
                                                    else value > self.best["value"])
            if better:
                self.best = {"metric": self.cfg.best_metric, "value": value, "step": self.step}
                if self.cfg.keep == "best":
                    self.best_weights = {n: p.detach().to("cpu", copy=True) for n, p in self.trainable.items()}
        return metrics

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        # the loss is written exactly (resume is checked against it); other numbers to 6 significant digits
        record = {k: (float(f"{v:.6g}") if isinstance(v, float) and k != "loss" else v)
                  for k, v in record.items() if v is not None}
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _rng_state(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"cpu": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _save(self) -> None:
        rngs = self.dist.gather(self._rng_state())
        if not self.dist.is_main:
            return
        state = {"version": STATE_VERSION, "step": self.step, "tokens": self.tokens, "elapsed": self.elapsed,
                 "fingerprint": self.fingerprint, "rng": rngs, "best": self.best, "last_eval": self.last_eval,
                 "optimizer": self.optimizer.state_dict(),
                 "trainable": {n: p.detach().to("cpu", copy=True) for n, p in self.trainable.items()}}
        if self.cfg.keep == "best" and self.best_weights is not None:
            state["best_trainable"] = self.best_weights
        metrics = self._metrics_summary()
        output = self.best_weights if self.cfg.keep == "best" and self.best_weights is not None else None
        with _weights_swapped(self.trainable, output):
            self.save_fn(self.out, self.model, state, metrics)
        self.saved_step = self.step

    def _metrics_summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = {"step": self.step, "tokens": self.tokens, "train_seconds": round(self.elapsed, 1)}
        if self.last_loss is not None:
            summary["train_loss"] = self.last_loss
        summary.update(self.last_eval)
        if self.best["step"] is not None:
            summary["best"] = self.best
        return summary

    def _summary(self) -> dict[str, Any]:
        return {"checkpoint": str(self.out), **self._metrics_summary(),
                "tokens_per_s": round(self.tokens / self.elapsed, 1) if self.elapsed else None}

    # --- what the user sees ---
    def _say(self, text: str) -> None:
        if self.dist.is_main:
            print(text, file=sys.stderr, flush=True)

    def _say_plan(self) -> None:
        cfg, dist = self.cfg, self.dist
        per_rank = cfg.batch_size // (cfg.grad_accum * dist.world_size)
        seconds = self._time_micro_batch() * cfg.grad_accum * (cfg.steps - self.step)
        where = f"{dist.world_size} ranks" if dist.active else str(self.device)
        start = f"resuming at step {self.step}" if self.step else "from step 0"
        self._say(f"training: {cfg.steps} steps of {cfg.batch_size} sequences ({cfg.grad_accum} x {per_rank} per "
                  f"rank), lr {cfg.lr:g} warmup {cfg.warmup_steps} cosine to {cfg.lr * cfg.min_lr_ratio:g}, "
                  f"{'bf16 autocast' if self.bf16 else 'fp32'} on {where}, {start}; "
                  f"estimated time {duration(seconds)}")

    def _time_micro_batch(self) -> float:
        """Seconds for one forward and backward, timed on a real batch; leaves gradients and RNG as they were."""
        cpu_rng, py_rng = torch.get_rng_state(), random.getstate()
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        batch = to_device(self.batches(self.step, 0), self.device)
        timings = []
        for _ in range(3 if self.cfg.compile else 2):  # the first passes pay one-off costs (allocation, compiling)
            t0 = time.perf_counter()
            with (self.wrapped.no_sync() if self.dist.active else nullcontext()), self._autocast():
                loss, _ = self.loss_fn(self.wrapped, batch)
                loss.backward()
            loss.item()  # waits for the device
            timings.append(time.perf_counter() - t0)
        self.optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(cpu_rng)
        random.setstate(py_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, self.device)
        return timings[-1]


class _weights_swapped:
    """Temporarily put `weights` (by name) into the parameters, e.g. the best step's, to save them."""

    def __init__(self, params: dict[str, nn.Parameter], weights: dict[str, torch.Tensor] | None) -> None:
        self.params, self.weights, self.saved = params, weights, {}

    def __enter__(self) -> None:
        if self.weights is None:
            return
        with torch.no_grad():
            for n, p in self.params.items():
                self.saved[n] = p.detach().clone()
                p.copy_(self.weights[n])

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                if n in self.saved:
                    p.copy_(self.saved[n])


def refuse_changed_resume(out: str | Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Raise, naming the first setting or input that differs, when `now` is not the fingerprint the run at `out`
    was saved with: resuming it would not continue the same run."""
    change = _first_change(saved, now)
    if change:
        key, old, new = change
        raise ChatforgeError(f"cannot resume {out}: {key} changed ({_short(old)} -> {_short(new)}); "
                             f"restore it or start a new run in another directory")


def _first_change(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first differing entry, in the order of `now` (so a stage lists causes before their effects)."""
    for key in [*now, *(k for k in before if k not in now)]:
        old, new = before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            inner = _first_change(old, new, f"{prefix}{key}.")
            if inner:
                return inner
        elif old != new:
            return f"{prefix}{key}", old, new
    return None


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."
