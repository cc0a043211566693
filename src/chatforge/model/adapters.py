"""Parameter-efficient fine-tuning: LoRA and P-tuning on a frozen GPT.

LoRA (Hu et al., 2021) adds a trainable low-rank update B·A to chosen projections; B starts at zero, so the
adapted model equals its base until trained, and B·A can be merged into the weights for zero-cost inference.
P-tuning (Liu et al., 2021) learns continuous "virtual token" embeddings, produced by a small prompt encoder
(MLP or LSTM), that are prepended to every input of a frozen model.

An adapter is saved alone (adapter.safetensors + adapter_config.json, in PEFT's names) beside the path and
weights hash of the checkpoint it was trained on, and is refused on any other base. `adapters_disabled`
switches every adapter off in place, so one set of weights serves as both policy and reference model.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from chatforge import ChatforgeError
from chatforge.model.transformer import GPT, KVCache

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix, so the adapter also loads onto an exported Llama


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(PROJECTIONS))

    def validate(self) -> None:
        if self.rank < 1:
            raise ChatforgeError(f"lora rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ChatforgeError(f"lora dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in PROJECTIONS]
        if unknown or not self.targets:
            raise ChatforgeError(f"lora target {unknown[0] if unknown else '(none)'!r} is not a projection "
                                 f"(choose from {', '.join(PROJECTIONS)})")


@dataclass
class PTuningConfig:
    num_virtual_tokens: int = 20
    encoder: str = "mlp"  # mlp | lstm
    encoder_hidden_size: int = 256

    def validate(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ChatforgeError(f"ptuning num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.encoder not in ("mlp", "lstm"):
            raise ChatforgeError(f"ptuning encoder must be 'mlp' or 'lstm', got {self.encoder!r}")


# ---------------------------------------------------------------- LoRA

class LoRALinear(nn.Module):
    """A frozen linear map plus a trainable low-rank update: y = W x + b + (alpha / r) · B A dropout(x)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: no copy, and the base state-dict names are kept
        self.register_parameter("bias", base.bias)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # the update starts at exactly zero
        self.lora_A.to(base.weight.device)
        self.lora_B.to(base.weight.device)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, rank={self.lora_A.out_features}, scaling={self.scaling:g}"


def attach_lora(model: GPT, cfg: LoRAConfig) -> GPT:
    """Freeze `model` and wrap its target projections with LoRA, in place."""
    cfg.validate()
    model.requires_grad_(False)
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if name in cfg.targets and isinstance(child, nn.Linear):
                    lora = LoRALinear(child, cfg.rank, cfg.alpha, cfg.dropout).train(child.training)
                    setattr(parent, name, lora)
    if not any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ChatforgeError(f"lora targets {cfg.targets} matched no layer of the model")
    return model


def merge_lora(model: GPT) -> GPT:
    """Fold every LoRA update into its weight and put plain linear layers back: same logits, no extra cost."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    linear.weight.copy_(child.weight + child.delta().to(child.weight.dtype))
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                linear.requires_grad_(False)
                setattr(parent, name, linear)
    return model


# ---------------------------------------------------------------- P-tuning

class PromptEncoder(nn.Module):
    """Virtual-token embeddings re-parameterised through an MLP or a bidirectional LSTM (Liu et al., 2021).

    The output is `embedding + head(...)` with the head's last layer zero-initialised, so training starts
    from the embeddings themselves (copied from real tokens' rows) at the scale the model already expects.
    """

    def __init__(self, cfg: PTuningConfig, init: torch.Tensor) -> None:
        super().__init__()
        n, d = init.shape
        h = cfg.encoder_hidden_size
        self.embedding = nn.Embedding(n, d)
        with torch.no_grad():
            self.embedding.weight.copy_(init)
        self.lstm = nn.LSTM(d, h // 2, num_layers=2, bidirectional=True, batch_first=True) if cfg.encoder == "lstm" else None
        self.head = nn.Sequential(nn.Linear(h if self.lstm else d, h), nn.ReLU(), nn.Linear(h, d))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self) -> torch.Tensor:
        """The virtual tokens' input embeddings [n, d]."""
        e = self.embedding.weight
        x = self.lstm(e.unsqueeze(0))[0].squeeze(0) if self.lstm is not None else e
        return e + self.head(x)


class PromptTunedGPT(GPT):
    """A frozen GPT (sharing its modules, not copying them) whose every input starts with virtual tokens.

    Callers see no difference: positions, masks and KV-cache lengths are the ones they would pass to the
    plain model. The virtual tokens take positions 0..n-1 and, with a cache, live in n extra slots in front.
    """

    def __init__(self, base: GPT, cfg: PTuningConfig, seed: int = 0) -> None:
        nn.Module.__init__(self)
        self.config = base.config
        self.model = base.model
        self.lm_head = base.lm_head
        self.register_buffer("inv_freq", base.inv_freq, persistent=False)
        self.ptuning = cfg
        base.requires_grad_(False)
        vocab = self.model.embed_tokens.weight
        rows = torch.randint(0, vocab.shape[0], (cfg.num_virtual_tokens,), generator=torch.Generator().manual_seed(seed))
        self.prompt_encoder = PromptEncoder(cfg, vocab.detach()[rows.to(vocab.device)].float().cpu()).to(vocab.device)
        self.train(base.training)
        self.enabled = True

    @property
    def num_virtual_tokens(self) -> int:
        return self.ptuning.num_virtual_tokens if self.enabled else 0

    def hidden(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
               positions: torch.Tensor | None = None, cache: KVCache | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.enabled:
            return super().hidden(input_ids, inputs_embeds=inputs_embeds, positions=positions, cache=cache, mask=mask)
        n = self.ptuning.num_virtual_tokens
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if positions is not None:
            positions = positions + n
        if cache is None:
            virtual = self.prompt_encoder().to(x.dtype).unsqueeze(0).expand(B, -1, -1)
            if positions is not None:
                positions = torch.cat([torch.arange(n, device=x.device).expand(B, n), positions], dim=1)
            if mask is not None:
                mask = _mask_with_prefix(mask, n)
            h = super().hidden(inputs_embeds=torch.cat([virtual, x], dim=1), positions=positions, mask=mask)
            return h[:, n:]
        if getattr(cache, "virtual_tokens", 0) != n:
            self._fill_prefix(cache, B, x.dtype)
        if mask is not None:
            mask = torch.cat([mask.new_ones(*mask.shape[:-1], n), mask], dim=-1)
        cache.length += n
        try:
            return super().hidden(inputs_embeds=x, positions=positions, cache=cache, mask=mask)
        finally:
            cache.length -= n

    def _fill_prefix(self, cache: KVCache, batch: int, dtype: torch.dtype) -> None:
        """Grow the cache by n slots in front and fill them with the virtual tokens' keys and values."""
        if cache.length:
            raise ChatforgeError("a P-tuned model needs a fresh KV cache (the virtual tokens come first)")
        n = self.ptuning.num_virtual_tokens
        grow = lambda t: torch.cat([t.new_zeros(*t.shape[:2], n, t.shape[3]), t], dim=2)  # noqa: E731
        cache.k, cache.v = [grow(k) for k in cache.k], [grow(v) for v in cache.v]
        virtual = self.prompt_encoder().to(dtype).unsqueeze(0).expand(batch, -1, -1)
        super().hidden(inputs_embeds=virtual, cache=cache)  # writes slots 0..n-1
        cache.length = 0
        cache.virtual_tokens = n


def _mask_with_prefix(mask: torch.Tensor, n: int) -> torch.Tensor:
    """[B, 1, T, S] -> [B, 1, n+T, n+S]: virtual tokens attend causally among themselves; all attend them."""
    B, H, T, S = mask.shape
    top = torch.cat([torch.ones(n, n, dtype=torch.bool, device=mask.device).tril().expand(B, H, n, n),
                     mask.new_zeros(B, H, n, S)], dim=-1)
    bottom = torch.cat([mask.new_ones(B, H, T, n), mask], dim=-1)
    return torch.cat([top, bottom], dim=2)


def attach_ptuning(model: GPT, cfg: PTuningConfig, seed: int = 0) -> PromptTunedGPT:
    """Freeze `model` and return it with a trainable prompt encoder in front (the modules are shared)."""
    cfg.validate()
    if isinstance(model, PromptTunedGPT):
        raise ChatforgeError("the model already has a P-tuning prompt")
    return PromptTunedGPT(model, cfg, seed)


# ---------------------------------------------------------------- new tokens

TOKEN_ROWS = "model.embed_tokens.trainable_token_rows"  # saved rows of the embedding (tied: the LM head too)


def train_token_rows(model: GPT, token_ids: list[int]) -> GPT:
    """Also train the embedding rows of `token_ids`, the rest of the embedding staying frozen.

    A base model has never seen the chat template's special tokens: their rows are still random, and a
    frozen model cannot learn to emit <|end|>. PEFT calls this trainable_token_indices. The rows that
    get no gradient keep exactly their values under AdamW (zero moments, and SFT's adapters use no decay).
    """
    ids = sorted({int(i) for i in token_ids})
    emb = model.model.embed_tokens.weight
    if not ids or min(ids) < 0 or max(ids) >= emb.shape[0]:
        raise ChatforgeError(f"trainable token ids {ids} are not in the vocabulary of {emb.shape[0]}")
    rows = torch.zeros(emb.shape[0], 1, dtype=emb.dtype, device=emb.device)
    rows[ids] = 1
    emb.requires_grad_(True)
    emb.register_hook(lambda grad: grad * rows)
    model.trainable_token_ids = ids
    return model


def chat_token_ids(tokenizer: Any) -> list[int]:
    """The chat template's special tokens (roles and end of turn) and the stop tokens."""
    from chatforge.tokenizer import END, ROLE_TOKENS
    found = [tokenizer.tok.token_to_id(t) for t in (*ROLE_TOKENS.values(), END)]
    return sorted({i for i in found if i is not None} | set(tokenizer.stop_ids))


# ---------------------------------------------------------------- switching, counting

@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: every LoRA update and virtual prompt off inside the block, restored after."""
    switches = [m for m in model.modules() if isinstance(m, (LoRALinear, PromptTunedGPT))]
    before = [m.enabled for m in switches]
    for m in switches:
        m.enabled = False
    try:
        yield model
    finally:
        for m, state in zip(switches, before):
            m.enabled = state


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors are counted once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    return sum(p.numel() for p in seen.values() if p.requires_grad), total


def adapter_method(model: nn.Module) -> str | None:
    if isinstance(model, PromptTunedGPT):
        return "ptuning"
    return "lora" if any(isinstance(m, LoRALinear) for m in model.modules()) else None


# ---------------------------------------------------------------- files

def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors alone, with PEFT's names (plus trained token rows, if any)."""
    state = {PEFT_PREFIX + k: v.detach() for k, v in model.state_dict().items()
             if ".lora_A." in k or ".lora_B." in k or k.startswith("prompt_encoder.")}
    ids = getattr(model, "trainable_token_ids", None)
    if ids:
        state[PEFT_PREFIX + TOKEN_ROWS] = model.model.embed_tokens.weight.detach()[ids]
    return state


def adapter_config(model: nn.Module, base_dir: Path, base_hash: str, adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json: PEFT's keys plus the base checkpoint's path (relative when possible) and hash."""
    base_dir, adapter_dir = Path(base_dir).resolve(), Path(adapter_dir).resolve()
    common = {"base_model_name_or_path": os.path.relpath(base_dir, adapter_dir), "base_abspath": str(base_dir),
              "base_weights_hash": base_hash, "task_type": "CAUSAL_LM",
              "trainable_token_indices": list(getattr(model, "trainable_token_ids", None) or [])}
    if isinstance(model, PromptTunedGPT):
        p = model.ptuning
        return {"peft_type": "P_TUNING", "num_virtual_tokens": p.num_virtual_tokens,
                "encoder_reparameterization_type": p.encoder.upper(), "encoder_hidden_size": p.encoder_hidden_size,
                "token_dim": model.config.hidden_size, **common}
    loras = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not loras:
        raise ChatforgeError("the model has no adapter to save")
    first = next(iter(loras.values()))
    rank = first.lora_A.out_features
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return {"peft_type": "LORA", "r": rank, "lora_alpha": first.scaling * rank, "lora_dropout": dropout,
            "target_modules": sorted(loras), "bias": "none", **common}


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise ChatforgeError(f"{adapter_dir}: no {ADAPTER_CONFIG}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ChatforgeError(f"{path}: not valid JSON ({e.msg})") from None
    if cfg.get("peft_type") not in ("LORA", "P_TUNING"):
        raise ChatforgeError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported (LORA, P_TUNING)")
    return cfg


def base_dir_of(adapter_dir: Path, cfg: dict[str, Any]) -> Path:
    """The base checkpoint named by an adapter: its relative path first (runs move whole), then absolute."""
    relative = (Path(adapter_dir) / cfg["base_model_name_or_path"]).resolve()
    if relative.is_dir():
        return relative
    absolute = Path(cfg.get("base_abspath", ""))
    return absolute if absolute.is_dir() else relative


def apply_adapter(model: GPT, adapter_dir: Path, base_dir: Path, base_hash: str, merge: bool = True) -> GPT:
    """Attach the adapter saved in `adapter_dir` to `model` (loaded from `base_dir`), refusing a wrong base."""
    cfg = read_adapter_config(adapter_dir)
    if cfg.get("base_weights_hash") != base_hash:
        raise ChatforgeError(f"adapter {adapter_dir} was trained on base {cfg.get('base_abspath')} "
                             f"(weights {cfg.get('base_weights_hash')}), not on {base_dir} (weights {base_hash})")
    if cfg["peft_type"] == "LORA":
        lora = LoRAConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg["lora_dropout"]),
                          targets=list(cfg["target_modules"]))
        model = attach_lora(model, lora)
    else:
        pt = PTuningConfig(num_virtual_tokens=int(cfg["num_virtual_tokens"]),
                           encoder=str(cfg["encoder_reparameterization_type"]).lower(),
                           encoder_hidden_size=int(cfg["encoder_hidden_size"]))
        model = attach_ptuning(model, pt)
    token_ids = [int(i) for i in cfg.get("trainable_token_indices") or []]
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(weights)).items()}
    expected = {k.removeprefix(PEFT_PREFIX) for k in adapter_state(model)} | ({TOKEN_ROWS} if token_ids else set())
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)[0]
        raise ChatforgeError(f"{weights}: tensor {odd} does not match adapter_config.json")
    ref = next(model.parameters())
    rows = tensors.pop(TOKEN_ROWS, None)
    model.load_state_dict({k: v.to(ref.device) for k, v in tensors.items()}, strict=False)
    if rows is not None:
        if rows.shape[0] != len(token_ids):
            raise ChatforgeError(f"{weights}: {rows.shape[0]} token rows for {len(token_ids)} trainable_token_indices")
        with torch.no_grad():
            model.model.embed_tokens.weight[token_ids] = rows.to(ref.device, ref.dtype)
    if merge and cfg["peft_type"] == "LORA":
        model = merge_lora(model)
    model.requires_grad_(False)
    return model


# ---------------------------------------------------------------- adapter checkpoints

def weights_hash(checkpoint: Path) -> str:
    """The hash an adapter records for its base: of model.safetensors (or of a stacked adapter's weights)."""
    from chatforge.checkpoint import file_hash, resolve
    checkpoint = resolve(checkpoint)
    for name in ("model.safetensors", ADAPTER_WEIGHTS):
        if (checkpoint / name).is_file():
            return file_hash(checkpoint / name)
    raise ChatforgeError(f"{checkpoint}: no model.safetensors or {ADAPTER_WEIGHTS}")


def save_adapter_checkpoint(path: str | Path, model: nn.Module, tokenizer: Any, base_dir: str | Path,
                            meta: dict[str, Any], state: dict[str, Any] | None = None,
                            metrics_from: Path | None = None) -> Path:
    """A checkpoint directory holding the adapter alone (config.json and the tokenizer for readers).

    `chatforge.checkpoint.load_model` loads it by loading the base it names and applying the adapter.
    """
    from chatforge import __version__
    from chatforge.checkpoint import FORMAT_VERSION, CheckpointWriter
    path, base_dir = Path(path), Path(base_dir)
    base_hash = weights_hash(base_dir)
    w = CheckpointWriter(path)
    try:
        w.write_json("config.json", model.config.to_hf())
        w.write_tensors(ADAPTER_WEIGHTS, adapter_state(model))
        w.write_json(ADAPTER_CONFIG, adapter_config(model, base_dir, base_hash, path))
        tokenizer.save(w.tmp)
        w.write_json("meta.json", {"format_version": FORMAT_VERSION, "code_version": __version__,
                                   "parent": str(base_dir), "parent_hash": base_hash, **meta, "kind": "adapter"})
        if state is not None:
            torch.save(state, w.file("state/trainer.pt"))
        if metrics_from is not None:
            w.copy_in("metrics.jsonl", metrics_from)
        return w.commit()
    except BaseException:
        w.abort()
        raise


def load_adapter_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                            dtype: torch.dtype = torch.float32, merge: bool = True):
    """(model, tokenizer, meta): the base checkpoint loaded, then this adapter applied (LoRA merged)."""
    from chatforge.checkpoint import load_model, read_meta
    from chatforge.tokenizer import Tokenizer
    path = Path(path)
    meta = read_meta(path)
    cfg = read_adapter_config(path)
    base_dir = base_dir_of(path, cfg)
    if not base_dir.is_dir():
        raise ChatforgeError(f"adapter {path} needs its base checkpoint {cfg.get('base_abspath')}, which is missing")
    model, _, _ = load_model(base_dir, device=device, dtype=dtype)
    model = apply_adapter(model, path, base_dir, weights_hash(base_dir), merge=merge)
    return model.to(device=device, dtype=dtype), Tokenizer.load(path), meta
