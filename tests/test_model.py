"""The GPT: causal masking, grouped-query attention, RoPE, parameter count, padded batches, and Llama equivalence."""
import pytest
import torch
import torch.nn as nn

from chatforge.model.presets import preset
from chatforge.model.transformer import (GPT, CausalAttention, KVCache, ModelConfig, RMSNorm, _RMSNormFunction,
                                        apply_rope)


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=96)
    return ModelConfig(**{**base, **kw})


def spread(model: GPT, seed: int = 0) -> GPT:
    """Weights large enough that every token and position changes the logits visibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.8 + 0.4 * torch.rand(p.shape, generator=g) if name.endswith("norm.weight")
                    else 0.15 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> GPT:
    return spread(GPT(tiny()))


def ids(n: int, batch: int = 2, seed: int = 0, vocab: int = 97) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seq", [8, 80])  # 80 tokens take the fused-projection path, 8 the per-layer one
def test_causal_masking_later_tokens_do_not_change_earlier_logits(model, seq):
    x = ids(seq)
    y = x.clone()
    cut = seq // 2
    y[:, cut:] = (y[:, cut:] + 1 + torch.arange(seq - cut)) % 97
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :cut], b[:, :cut], atol=1e-5)
    assert not torch.allclose(a[:, cut:], b[:, cut:], atol=1e-3)  # and the later ones do change


def test_grouped_query_attention_equals_repeated_key_value_heads():
    gqa = spread(GPT(tiny(num_attention_heads=4, num_key_value_heads=2)), seed=1)
    mha = GPT(tiny(num_attention_heads=4, num_key_value_heads=4)).eval()
    state = gqa.state_dict()
    hd = gqa.config.head_dim
    for key in list(state):
        if key.endswith(("k_proj.weight", "v_proj.weight")):  # each kv head serves 2 query heads: repeat it
            state[key] = state[key].view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(state)
    x = ids(20)
    with torch.no_grad():
        assert torch.allclose(gqa(x), mha(x), atol=1e-5)


def test_rope_scores_depend_only_on_relative_position(model):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, model.config.head_dim, generator=g).unbind(0)

    def score(m: int, n: int) -> float:
        cos, sin = model.rope(torch.tensor([m, n]), torch.float32)
        rq, rk = apply_rope(torch.stack([q, k]), cos, sin).unbind(0)
        return float(rq @ rk)

    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)
    cos, sin = model.rope(torch.tensor([0]), torch.float32)
    assert torch.equal(apply_rope(q[None], cos, sin)[0], q)  # position 0 is not rotated


def test_rope_table_equals_direct_computation(model):
    table_cos, table_sin = model.rope(None, torch.float32, start=3, length=50)
    cos, sin = model.rope(torch.arange(3, 53), torch.float32)
    assert torch.equal(table_cos, cos) and torch.equal(table_sin, sin)


@pytest.mark.parametrize("tied, bias", [(True, False), (False, False), (False, True)])
def test_parameter_count_matches_the_config(tied, bias):
    cfg = tiny(tie_word_embeddings=tied, attention_bias=bias)
    assert GPT(cfg).num_params() == cfg.num_params()


@pytest.mark.parametrize("name", ["nano", "curie"])  # curie has grouped-query attention
def test_preset_parameter_counts(name):
    cfg = preset(name, vocab_size=4096)
    assert GPT(cfg).num_params() == cfg.num_params()


def test_left_padded_rows_equal_unpadded_rows(model):
    """positions [B, T] and mask [B, 1, T, S] make a left-padded row compute exactly what it computes alone."""
    short, long = ids(5, 1, seed=1)[0], ids(9, 1, seed=2)[0]
    batch = torch.stack([torch.cat([torch.zeros(4, dtype=torch.long), short]), long])
    pad = torch.tensor([4, 0])
    t = torch.arange(9)
    positions = (t[None] - pad[:, None]).clamp(min=0)
    mask = ((t[None, :] <= t[:, None]) & (t[None, None, :] >= pad[:, None, None])) | torch.eye(9, dtype=torch.bool)
    with torch.no_grad():
        out = model(batch, positions=positions, mask=mask[:, None])
        assert torch.allclose(out[0, 4:], model(short[None])[0], atol=1e-5)
        assert torch.allclose(out[1], model(long[None])[0], atol=1e-5)


def test_cache_prefill_then_decode_equals_one_pass(model):
    x = ids(30)
    cache = KVCache(model.config, 2, 40, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        full = model(x)
        parts = [model(x[:, :20], cache=cache), model(x[:, 20:26], cache=cache)]
        parts += [model(x[:, i:i + 1], cache=cache) for i in range(26, 30)]
    assert cache.length == 30
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


class Wrapped(nn.Module):
    """A projection that is not a plain nn.Linear (as LoRA makes them): forces the per-layer path."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.inner = linear

    def forward(self, x):
        return self.inner(x)


def test_fused_and_per_layer_projections_agree(model):
    x = ids(80)  # long enough for the fused path
    wrapped = spread(GPT(model.config))
    wrapped.load_state_dict(model.state_dict())
    for block in wrapped.model.layers:
        block.self_attn.k_proj = Wrapped(block.self_attn.k_proj)
        block.mlp.up_proj = Wrapped(block.mlp.up_proj)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), model(x), atol=1e-5)
    wrapped.train()
    model_copy = spread(GPT(model.config)).train()
    model_copy.load_state_dict(model.state_dict())
    wrapped(x).square().mean().backward()
    model_copy(x).square().mean().backward()
    for (name, a), b in zip(model_copy.named_parameters(), [p for _, p in wrapped.named_parameters()]):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


@pytest.mark.parametrize("gqa", [False, True])
def test_logits_equal_transformers_llama(gqa):
    transformers = pytest.importorskip("transformers")
    cfg = tiny(num_key_value_heads=2 if gqa else 4, tie_word_embeddings=not gqa,
               rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16} if gqa else None)
    ours = spread(GPT(cfg), seed=3)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf())).eval()
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    x = ids(70, seed=4)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x).logits, atol=1e-4)


@pytest.mark.parametrize("T, heads, kv_heads", [(5, 4, 4), (200, 6, 2)])  # 200 > ATTENTION_CHUNK: two chunks
def test_causal_attention_function_equals_sdpa_with_gradients(T, heads, kv_heads):
    """The bf16 training path's attention, checked exactly in float64 against PyTorch's SDPA."""
    g = torch.Generator().manual_seed(T)
    q = torch.randn(2, T, heads, 8, dtype=torch.float64, generator=g).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(2, T, kv_heads, 8, dtype=torch.float64, generator=g).transpose(1, 2).requires_grad_()
            for _ in range(2))
    ours = CausalAttention.apply(q, k, v)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    reference = reference.transpose(1, 2).reshape(2, T, heads * 8)
    assert torch.allclose(ours, reference, atol=1e-12)
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(reference, (q, k, v), grad)):
        assert torch.allclose(a, b, atol=1e-12)


def test_rms_norm_gradients():
    norm = RMSNorm(16, 1e-5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-5, torch.float64), (x, norm.weight))
    with torch.no_grad():
        assert torch.allclose(norm(x), torch.nn.functional.rms_norm(x, (16,), norm.weight, 1e-5))


def test_bf16_training_path_follows_the_fp32_model(model):
    """Under bf16 autocast the fast attention and norms run; loss and gradients stay close to fp32's."""
    x = ids(40)
    losses, grads = [], []
    for bf16 in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad()
    assert losses[1] == pytest.approx(losses[0], rel=0.02)
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


def test_models_measure_reports_training_and_generation_speed():
    from chatforge.model.speed import measure
    row = measure(preset("nano", vocab_size=300, context=64), device="cpu", reps=1)
    assert row["train dtype"] in ("bf16", "fp32")
    assert float(row["train tok/s"].replace(",", "")) > 0 and float(row["gen tok/s (batch 1)"].replace(",", "")) > 0
