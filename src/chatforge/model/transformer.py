"""The GPT: a decoder-only transformer with Llama-compatible parameter names.

Token embedding -> N x [RMSNorm -> GQA attention with RoPE -> RMSNorm -> SwiGLU] -> RMSNorm -> LM head.
State-dict keys and shapes equal Hugging Face `LlamaForCausalLM`'s (and Qwen2's with q/k/v bias), so
checkpoints map in and out by name. Base, SFT, reward and policy models are all this class.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge import ChatforgeError


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int | None = None
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    architecture: str = "LlamaForCausalLM"
    extra: dict[str, Any] = field(default_factory=dict)  # config.json keys we carry but do not use

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ChatforgeError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                                 f"num_key_value_heads={self.num_key_value_heads}")

    def to_hf(self) -> dict[str, Any]:
        """config.json in the Hugging Face format, so other tools read our checkpoints."""
        d = {k: v for k, v in asdict(self).items() if k not in ("extra", "architecture")}
        model_type = "qwen2" if self.architecture == "Qwen2ForCausalLM" else "llama"
        d.update(architectures=[self.architecture], model_type=model_type, hidden_act="silu",
                 attention_dropout=0.0, mlp_bias=False, torch_dtype="float32")
        if model_type == "qwen2":
            d.pop("attention_bias")
            d.pop("head_dim")
        return {**self.extra, **d}

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)} - {"extra", "architecture"}
        arch = (d.get("architectures") or ["LlamaForCausalLM"])[0]
        kwargs = {k: v for k, v in d.items() if k in known}
        if arch == "Qwen2ForCausalLM":
            kwargs["attention_bias"] = True
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = d["num_attention_heads"]
        extra = {k: v for k, v in d.items() if k not in known and k not in ("architectures", "model_type")}
        return cls(architecture=arch, extra=extra, **kwargs)

    def num_params(self) -> int:
        d, L, V, hd = self.hidden_size, self.num_hidden_layers, self.vocab_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.attention_bias else 0)
        mlp = 3 * d * self.intermediate_size
        per_layer = attn + mlp + 2 * d
        return V * d * (1 if self.tie_word_embeddings else 2) + L * per_layer + d

    def flops_per_token(self, context: int) -> float:
        """Training FLOPs per token: 6 x matmul parameters + attention scores (the embedding lookup is free)."""
        matmul_params = self.num_params() - (0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size)
        return 6 * matmul_params + 12 * self.num_hidden_layers * self.hidden_size * context


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies per rotary pair, with Llama-3 and linear scaling as Hugging Face defines them."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        pass
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    else:
        raise ChatforgeError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3)")
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Llama's half-split convention: pairs are (i, i + head_dim/2).
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class KVCache:
    """Preallocated keys and values for every layer: [batch, kv_heads, max_len, head_dim]."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.length = 0  # positions filled so far (same for all rows; rows are left-padded)
        self.max_len = max_len

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (drop finished sequences, or repeat a prefilled prompt for N samples)."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.hd, self.layer = cfg.num_attention_heads, cfg.num_key_value_heads, hd, layer
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            start = cache.length
            cache.k[self.layer][:, :, start:start + T] = k
            cache.v[self.layer][:, :, start:start + T] = v
            k = cache.k[self.layer][:, :, :start + T]
            v = cache.v[self.layer][:, :, :start + T]
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Named `model` inside GPT, matching Hugging Face's `LlamaModel`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):  # residual writers: GPT-2's scaled init
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.num_hidden_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions [B, T] or [T], shaped to broadcast over heads."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        if emb.dim() == 3:
            emb = emb.unsqueeze(1)  # [B, 1, T, hd]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def hidden(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
               positions: torch.Tensor | None = None, cache: KVCache | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, d].

        `positions` [B, T] and a boolean `mask` [B, 1, T, S] (True = may attend) are needed only for
        left-padded batches; without them attention is plain causal from position 0 (or the cache length).
        """
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        T = x.shape[1]
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=x.device)
            if cache is not None and start > 0 and mask is None:
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
        autocast = torch.is_autocast_enabled(x.device.type)
        cos, sin = self.rope(positions, torch.get_autocast_dtype(x.device.type) if autocast else x.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin, cache, mask)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        """Logits [B, T, vocab]."""
        return self.lm_head(self.hidden(input_ids, **kw))

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
