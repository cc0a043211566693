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
    """Rotate pairs (i, i + head_dim/2), Llama's half-split convention.

    `sin` comes sign-folded from `GPT.rope` ([-sin, sin] over the two halves), so the rotated copy is a plain
    roll: x·cos + roll(x)·sin equals x·cos + cat(-x2, x1)·sin exactly, in two fewer operations.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Normalised in fp32; the result in `out_dtype` (default x's), e.g. the bf16 a following matmul takes."""
        out_dtype = out_dtype or x.dtype
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFunction.apply(x, self.weight, self.eps, out_dtype)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(out_dtype)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward: half the full-size passes of autograd's composite one."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # at least fp32
        d = x.shape[-1]
        rstd = (torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(d).add_(eps)).rsqrt_()
        normed = xf * rstd
        ctx.save_for_backward(normed, weight, rstd)
        ctx.x_dtype = x.dtype
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        return torch.mul(normed, weight.to(xf.dtype), out=out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        normed, weight, rstd = ctx.saved_tensors
        grad = grad.to(normed.dtype)  # once: mixed-dtype products would each convert it
        w = weight.to(normed.dtype)
        grad_times_normed = grad * normed
        grad_weight = grad_times_normed.flatten(0, -2).sum(0).to(weight.dtype)
        # mean(grad·w·normed) over the features, as a matrix-vector product: no full-size temporary
        projection = (grad_times_normed @ w).unsqueeze(-1).div_(normed.shape[-1])
        grad_x = torch.addcmul(grad * w, normed, projection, value=-1).mul_(rstd)
        return grad_x.to(ctx.x_dtype), grad_weight, None, None


class KVCache:
    """Preallocated keys and values for every layer: [batch, kv_heads, max_len, head_dim].

    By default a forward appends its tokens at `length` and attends to the filled slots, so shapes grow step by
    step. With `slots` set (a long tensor: the cache index of each input token, the same for every row) a
    forward writes there and attends to all `max_len` slots under the caller's mask, leaving `length` alone:
    every decode step then has the same shapes, which is what lets one compiled graph serve them all.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.length = 0  # positions filled so far (same for all rows; rows are left-padded)
        self.max_len = max_len
        self.slots: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (drop finished sequences, or repeat a prefilled prompt for N samples)."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]


class CausalAttention(torch.autograd.Function):
    """Causal attention as batched matmuls that keeps the probabilities for the backward pass.

    In bf16 on a CPU this is about twice as fast as SDPA's flash kernel at training lengths: that kernel's
    backward recomputes the probabilities, and its small per-block GEMMs run far from the matmul peak. Queries
    go in chunks of `ATTENTION_CHUNK` that only score the keys up to their own end, which skips most of the
    masked upper triangle. The cost is memory, about B·H·T²/2 bf16 values per layer, which bounds where
    `Attention` uses it. Grouped-query heads share their key/value head by stacking their queries.

    q [B, H, T, hd], k and v [B, K, T, hd] -> the output token-major, [B, T, H·hd], as o_proj takes it.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, H, T, hd = q.shape
        K = k.shape[1]
        rep = H // K
        with torch.autocast(q.device.type, enabled=False):
            # rows ordered (time, query head of the group), so a chunk of time is a block of rows
            q3 = q.view(B, K, rep, T, hd).transpose(2, 3).reshape(B * K, T * rep, hd)
            k3, v3 = k.reshape(B * K, T, hd), v.reshape(B * K, T, hd)
            bias = _causal_bias(T, rep, q.dtype, q.device)
            probs, outs = [], []
            for start, end in _chunks(T):
                rows = slice(start * rep, end * rep)
                p = torch.baddbmm(bias[rows, :end].expand(B * K, -1, -1), q3[:, rows], k3[:, :end].transpose(1, 2),
                                  alpha=hd ** -0.5).softmax(-1)
                probs.append(p)
                outs.append(torch.bmm(p, v3[:, :end]))
            ctx.save_for_backward(q3, k3, v3, *probs)
            out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
            return out.view(B, K, T, rep, hd).transpose(1, 2).reshape(B, T, H * hd)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q3, k3, v3, *probs = ctx.saved_tensors
        B, T = grad.shape[:2]
        K, hd = k3.shape[0] // B, k3.shape[2]
        rep = q3.shape[1] // T
        with torch.autocast(grad.device.type, enabled=False):
            grad3 = grad.view(B, T, K, rep, hd).transpose(1, 2).reshape(q3.shape).to(q3.dtype)
            grad_q = torch.empty_like(q3)
            grad_k, grad_v = torch.zeros_like(k3), torch.zeros_like(v3)
            for (start, end), p in zip(_chunks(T), probs):
                rows = slice(start * rep, end * rep)
                g = grad3[:, rows]
                grad_v[:, :end].baddbmm_(p.transpose(1, 2), g)
                # softmax backward in one kernel (a long-standing ATen op): p * (grad_p - sum(grad_p * p))
                grad_scores = torch._softmax_backward_data(torch.bmm(g, v3[:, :end].transpose(1, 2)), p, -1, p.dtype)
                grad_scores.mul_(hd ** -0.5)
                torch.bmm(grad_scores, k3[:, :end], out=grad_q[:, rows])
                grad_k[:, :end].baddbmm_(grad_scores.transpose(1, 2), q3[:, rows])
        H = K * rep
        grad_q = grad_q.view(B, K, T, rep, hd).transpose(2, 3).reshape(B, H, T, hd)
        return grad_q, grad_k.view(B, K, T, hd), grad_v.view(B, K, T, hd)


ATTENTION_CHUNK = 128


def _chunks(T: int) -> list[tuple[int, int]]:
    return [(start, min(start + ATTENTION_CHUNK, T)) for start in range(0, T, ATTENTION_CHUNK)]


def _causal_bias(T: int, rep: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[T·rep, T]: 0 where a query may attend, -inf above the diagonal; each row repeated for `rep` heads."""
    return torch.full((T, T), float("-inf"), dtype=dtype, device=device).triu(1).repeat_interleave(rep, dim=0)


_FAST_ATTENTION_MAX_PROBS = 1 << 25  # 64 MB of bf16 probabilities per layer


def _fast_attention(q: torch.Tensor, T: int) -> bool:
    """Whether `CausalAttention` beats SDPA here: reduced precision on a CPU, and probabilities that fit."""
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and 1 < T <= 1024
            and q.shape[0] * q.shape[1] * T * T <= _FAST_ATTENTION_MAX_PROBS)


def linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """`layer(x)` for a projection; a plain `nn.Linear` goes through `project` (adapters are called as modules)."""
    return project(x, layer.weight, layer.bias) if type(layer) is nn.Linear else layer(x)


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except for a single row being compiled (decoding one sequence): written there as a multiply
    and a sum over the inputs, which inductor turns into one vectorised pass over the weights. A GEMM library
    at one row runs several times below memory speed, and reading the weights is all a one-row step does."""
    if x.numel() == x.shape[-1] and torch.compiler.is_compiling():
        y = (weight * x.reshape(1, -1)).sum(-1).view(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


FUSE_MIN_TOKENS = 64  # below this many tokens (decoding), stacking the weights costs more than it saves


def fused_linear(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> torch.Tensor:
    """The outputs of several projections of `x`, concatenated on the last dimension.

    Plain `nn.Linear`s become one matmul with their weights stacked: a bigger GEMM is faster, and autograd
    splits the gradient back to each weight. Stacking copies the weights, which costs more than it saves when
    only a few tokens go through (decoding): those run one by one through `project`, skipping the module call,
    whose overhead is a real part of an eager decoding step. Adapter-wrapped layers are called as modules.
    (Either way, forward hooks on these projections do not fire.)
    """
    if not all(type(m) is nn.Linear for m in layers):
        return torch.cat([m(x) for m in layers], dim=-1)
    if x.shape[0] * x.shape[1] >= FUSE_MIN_TOKENS:
        weight = torch.cat([m.weight for m in layers])
        bias = None if layers[0].bias is None else torch.cat([m.bias for m in layers])
        return F.linear(x, weight, bias)
    return torch.cat([project(x, m.weight, m.bias) for m in layers], dim=-1)


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
        H, K = self.n_heads, self.n_kv
        qkv = fused_linear(x, (self.q_proj, self.k_proj, self.v_proj)).view(B, T, H + 2 * K, self.hd).transpose(1, 2)
        # split, not slicing: its backward is one concatenation instead of zero-filled buffers per slice
        qk, v = qkv.split((H + K, K), dim=1)
        q, k = apply_rope(qk, cos, sin).split((H, K), dim=1)  # queries and keys rotated together
        if cache is not None and cache.slots is not None:  # static shapes: the caller's mask hides unfilled slots
            cache.k[self.layer].index_copy_(2, cache.slots, k)
            cache.v[self.layer].index_copy_(2, cache.slots, v)
            k, v = cache.k[self.layer], cache.v[self.layer]
        elif cache is not None:
            start = cache.length
            cache.k[self.layer][:, :, start:start + T] = k
            cache.v[self.layer][:, :, start:start + T] = v
            k = cache.k[self.layer][:, :, :start + T]
            v = cache.v[self.layer][:, :, :start + T]
        # Grouped-query attention without copying keys/values per query head.
        gqa = K != H
        if cache is None and mask is None and _fast_attention(q, T):
            return linear(CausalAttention.apply(q, k, v), self.o_proj)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return linear(y.transpose(1, 2).reshape(B, T, H * self.hd), self.o_proj)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = fused_linear(x, (self.gate_proj, self.up_proj)).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, self.down_proj)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, mask):
        # Under autocast the norms hand the projections bf16 directly: the cast they would make anyway.
        matmul_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        x = x + self.self_attn(self.input_layernorm(x, matmul_dtype), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x, matmul_dtype))


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

    def rope(self, positions: torch.Tensor | None, dtype: torch.dtype, start: int = 0,
             length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin (see `apply_rope`) for `positions` [B, T] or [T], shaped to broadcast over
        heads; without `positions`, for start..start+length-1 from a table computed once per dtype."""
        if positions is None:
            table = getattr(self, "_rope_table", None)
            key = (self.inv_freq.data_ptr(), self.inv_freq._version, dtype)
            end = start + length
            if table is None or table[0] != key or table[1].shape[0] < end:
                size = max(end, self.config.max_position_embeddings)
                with torch.inference_mode(False), torch.no_grad():  # usable by training after inference
                    table = (key, *self._rope(torch.arange(size, device=self.inv_freq.device), dtype))
                self._rope_table = table
            return table[1][start:end], table[2][start:end]
        return self._rope(positions, dtype)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        if emb.dim() == 3:
            emb = emb.unsqueeze(1)  # [B, 1, T, hd]
        sin = emb.sin()
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return emb.cos().to(dtype), sin.to(dtype)

    def hidden(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
               positions: torch.Tensor | None = None, cache: KVCache | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, d].

        `positions` [B, T] and a boolean `mask` [B, 1, T, S] (True = may attend) are needed only for
        left-padded batches; without them attention is plain causal from position 0 (or the cache length).
        """
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        T = x.shape[1]
        start = 0
        if positions is None:
            start = cache.length if cache is not None else 0
            if start > 0 and mask is None and T > 1:  # a single new query may see the whole cache: no mask
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
        autocast = torch.is_autocast_enabled(x.device.type)
        cos, sin = self.rope(positions, torch.get_autocast_dtype(x.device.type) if autocast else x.dtype, start, T)
        for block in self.model.layers:
            x = block(x, cos, sin, cache, mask)
        if cache is not None and cache.slots is None:
            cache.length += T
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        """Logits [B, T, vocab]."""
        return self.logits(self.hidden(input_ids, **kw))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on hidden states from `hidden`."""
        return linear(hidden, self.lm_head)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
