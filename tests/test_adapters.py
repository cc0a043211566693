"""LoRA and P-tuning: exact start, exact merge, frozen base, saved alone and refused on the wrong base."""
import json

import pytest
import torch

from chatforge import ChatforgeError
from chatforge.checkpoint import load_model, save_model_checkpoint
from chatforge.model.adapters import (LoRAConfig, LoRALinear, PTuningConfig, adapter_method, adapters_disabled,
                                      attach_lora, attach_ptuning, merge_lora, save_adapter_checkpoint,
                                      trainable_parameters)
from chatforge.model.presets import preset
from chatforge.model.transformer import GPT, KVCache
from chatforge.tokenizer import train_tokenizer


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(preset("nano", vocab_size=300, context=64)).eval()


def ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_lora(model: GPT) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.05)


def test_lora_starts_as_the_base_and_trains_only_adapters():
    model = tiny_gpt()
    x = ids()
    with torch.no_grad():
        before = model(x)
    attach_lora(model, LoRAConfig(rank=4, targets=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        assert torch.equal(model(x), before)  # B = 0: the update is exactly zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[-3] for n in trainable} == {"q_proj", "v_proj", "down_proj"}
    n_train, n_total = trainable_parameters(model)
    assert n_train == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert n_train < 0.05 * n_total
    # state-dict names of the base are unchanged, so the base part still saves as a plain GPT
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()


def test_lora_merge_gives_the_same_logits_and_disable_gives_the_base():
    model = tiny_gpt()
    x = ids()
    with torch.no_grad():
        base = model(x)
    attach_lora(model, LoRAConfig(rank=4))
    randomize_lora(model)
    with torch.no_grad():
        adapted = model(x)
        assert not torch.allclose(adapted, base)
        with adapters_disabled(model):
            assert torch.equal(model(x), base)
        assert torch.equal(model(x), adapted)  # switched back on
        merge_lora(model)
        assert adapter_method(model) is None
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-4)


def test_lora_rejects_unknown_targets():
    with pytest.raises(ChatforgeError, match="wq"):
        attach_lora(tiny_gpt(), LoRAConfig(targets=["wq"]))


def test_ptuning_trains_only_the_prompt_encoder():
    model = attach_ptuning(tiny_gpt(), PTuningConfig(num_virtual_tokens=5, encoder="mlp", encoder_hidden_size=32))
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("prompt_encoder.")}
    encoder = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("prompt_encoder.")}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = ids()
    logits = model(x)
    assert logits.shape == (2, 12, 300)  # the virtual tokens are not in the output
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300), x[:, 1:].reshape(-1)).backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, encoder[n]) for n, p in model.named_parameters() if n in encoder)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_ptuning_cached_decoding_matches_a_full_forward(encoder):
    model = attach_ptuning(tiny_gpt(), PTuningConfig(num_virtual_tokens=3, encoder=encoder, encoder_hidden_size=16))
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 0.1)
        x = ids(length=8)
        full = model(x)
        cache = KVCache(model.config, 2, 8, x.device, torch.float32)
        steps = [model(x[:, :5], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(5, 8)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
        assert cache.length == 8  # callers see their own lengths
        with adapters_disabled(model):
            assert not torch.allclose(model(x), full)


def test_ptuning_left_padded_batch_matches_unpadded_rows():
    """A batch with explicit positions and mask (as an engine sends for left padding) gives each row's logits."""
    model = attach_ptuning(tiny_gpt(), PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16))
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 0.1)
        short, long = ids(1, 5, seed=3), ids(1, 8, seed=4)
        padded = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
        real = torch.tensor([[0] * 3 + [1] * 5, [1] * 8], dtype=torch.bool)
        positions = (real.cumsum(1) - 1).clamp(min=0)
        mask = (torch.ones(8, 8, dtype=torch.bool).tril() & real[:, None, :])[:, None]
        mask |= torch.eye(8, dtype=torch.bool)  # padding rows attend themselves (no NaN)
        out = model(padded, positions=positions, mask=mask)
        torch.testing.assert_close(out[0, 3:], model(short)[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out[1], model(long)[0], atol=1e-5, rtol=1e-4)


@pytest.fixture
def base_dirs(tmp_path):
    tok = train_tokenizer(["hello world, the capital of France is Paris."] * 20, vocab_size=300)
    dirs = []
    for seed in (0, 1):
        model = GPT(preset("nano", vocab_size=tok.vocab_size, context=64))
        torch.manual_seed(seed)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
        dirs.append(save_model_checkpoint(tmp_path / f"base{seed}", model, tok, {"kind": "base", "stage": "pretrain"}))
    return tok, dirs


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_adapter_checkpoint_is_saved_alone_and_loads_on_its_base(base_dirs, tmp_path, method):
    tok, (base, _) = base_dirs
    model, _, _ = load_model(base)
    if method == "lora":
        model = attach_lora(model, LoRAConfig(rank=2))
        randomize_lora(model)
    else:
        model = attach_ptuning(model, PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16))
    model.eval()
    x = ids(length=6) % tok.vocab_size
    with torch.no_grad():
        expected = model(x)
    out = save_adapter_checkpoint(tmp_path / "adapter", model, tok, base, {"stage": "sft", "acts_as": "sft"})
    assert not (out / "model.safetensors").exists()
    assert (out / "adapter.safetensors").stat().st_size < (base / "model.safetensors").stat().st_size / 5
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == ("LORA" if method == "lora" else "P_TUNING")
    loaded, _, meta = load_model(out, expect_kind=("sft",))
    assert meta["kind"] == "adapter"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-4)


def test_adapter_on_the_wrong_base_is_refused_naming_both(base_dirs, tmp_path):
    tok, (base, other) = base_dirs
    model = attach_lora(load_model(base)[0], LoRAConfig(rank=2))
    out = save_adapter_checkpoint(tmp_path / "adapter", model, tok, base, {"stage": "sft"})
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "../base1"  # point it at another model of the same shape
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ChatforgeError) as err:
        load_model(out)
    assert "base0" in str(err.value) and "base1" in str(err.value)


def test_ptuned_model_generates_through_the_engine_as_without_cache():
    """The engine's left-padded, cached decoding of a P-tuned model matches plain greedy decoding."""
    from chatforge.infer.engine import Engine, SamplingParams
    tok = train_tokenizer(["hello world, the capital of France is Paris."] * 20, vocab_size=300)
    torch.manual_seed(0)
    model = attach_ptuning(GPT(preset("nano", vocab_size=tok.vocab_size, context=64)), PTuningConfig(4, "mlp", 16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    prompts = [tok.encode("hello world"), tok.encode("the capital of France is")]
    gens = Engine(model, tok).generate(prompts, SamplingParams(max_new_tokens=6, stop_ids=[]))
    for prompt, gen in zip(prompts, gens):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert gen.ids == ids[len(prompt):]


def test_trainable_token_rows_change_alone_and_are_saved_with_the_adapter(base_dirs, tmp_path):
    from chatforge.model.adapters import chat_token_ids, train_token_rows
    tok, (base, _) = base_dirs
    model = attach_ptuning(load_model(base)[0], PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16))
    ids_to_train = chat_token_ids(tok)
    train_token_rows(model, ids_to_train)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    x = torch.tensor([tok.render([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}])[0]])
    for _ in range(2):
        torch.nn.functional.cross_entropy(model(x[:, :-1])[0], x[0, 1:]).backward()
        opt.step()
        opt.zero_grad()
    emb = model.model.embed_tokens.weight
    changed = (emb != before["model.embed_tokens.weight"]).any(dim=1).nonzero().flatten().tolist()
    assert changed and set(changed) <= set(ids_to_train)  # only the chat tokens' rows moved
    for n, p in model.named_parameters():
        if not n.startswith(("prompt_encoder.", "model.embed_tokens.")):
            assert torch.equal(p, before[n]), n
    model.eval()
    with torch.no_grad():
        expected = model(x)
    out = save_adapter_checkpoint(tmp_path / "adapter", model, tok, base, {"stage": "sft"})
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)[0](x), expected, atol=1e-5, rtol=1e-4)
