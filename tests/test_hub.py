"""Import from and export to Hugging Face checkpoints, checked against transformers' own computation."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from chatforge import ChatforgeError
from chatforge.checkpoint import load_model, read_meta
from chatforge.cli import main
from chatforge.hub import export_checkpoint, import_checkpoint
from chatforge.model.transformer import KVCache

transformers = pytest.importorskip("transformers")
IDS = torch.randint(3, 400, (2, 40), generator=torch.Generator().manual_seed(0))  # 40 > the 16-token original context


def hf_model(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def imported(hf_tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("imported")
    return {name: import_checkpoint(hf_tiny_models[name], root / name)[0] for name in ("llama", "qwen2")}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_imported_logits_equal_transformers(arch, hf_tiny_models, imported):
    model, _, meta = load_model(imported[arch])
    with torch.no_grad():
        ours, theirs = model(IDS), hf_model(hf_tiny_models[arch])(IDS).logits
    assert theirs.std() > 0.5  # logits spread: an equality here is not one of near-zero numbers
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert meta["kind"] == "sft" and meta["parent"] == str(hf_tiny_models[arch])  # it ships a chat template
    assert model.config.rope_scaling["rope_type"] == {"llama": "llama3", "qwen2": "linear"}[arch]


def test_mistral_with_a_wide_head_and_a_sliding_window_imports_exactly(hf_tiny_models, tmp_path):
    """Mistral computes as Llama inside its window; the context is capped at the window to stay exact."""
    from conftest import _randomise
    cfg = transformers.MistralConfig(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, head_dim=32, rope_theta=30000.0,
                                     sliding_window=48, max_position_embeddings=128, tie_word_embeddings=False)
    reference = transformers.MistralForCausalLM(cfg).eval()
    _randomise(reference, seed=5)
    reference.save_pretrained(tmp_path / "mistral")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(hf_tiny_models["llama"] / name, tmp_path / "mistral" / name)
    model, _, _ = load_model(import_checkpoint(tmp_path / "mistral", tmp_path / "ckpt")[0])
    assert model.config.max_position_embeddings == 48 and model.config.head_dim == 32
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), reference(IDS).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_export_reloads_in_transformers_with_identical_logits(arch, hf_tiny_models, imported, tmp_path):
    out = export_checkpoint(imported[arch], tmp_path / "hf")
    reloaded = hf_model(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, hf_model(hf_tiny_models[arch])(IDS).logits, atol=1e-5, rtol=0)
    # the tokenizer and template come back as transformers reads them
    original = transformers.AutoTokenizer.from_pretrained(hf_tiny_models[arch])
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "What is 12 + 30? The capital of France is Paris."
    assert tok(text)["input_ids"] == original(text)["input_ids"]
    chat = [{"role": "user", "content": "Hello!"}]
    assert (tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            == original.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
    # and importing the export gives the same model again (this config.json uses the pre-v5 rope keys)
    again, _, _ = load_model(import_checkpoint(out, tmp_path / "again")[0])
    with torch.no_grad():
        torch.testing.assert_close(again(IDS), reloaded(IDS).logits, atol=1e-5, rtol=0)


def greedy(model, prompt: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding through the KV cache, the way generation uses the model."""
    cache = KVCache(model.config, 1, prompt.shape[1] + steps, torch.device("cpu"), torch.float32)
    logits, out = model(prompt, cache=cache), []
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(nxt))
        logits = model(nxt, cache=cache)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_generation_identical(arch, hf_tiny_models, imported):
    model, _, _ = load_model(imported[arch])
    reference = hf_model(hf_tiny_models[arch])
    prompt = IDS[:1, :10]
    with torch.no_grad():
        theirs = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)[0, 10:].tolist()
        assert greedy(model, prompt, 30) == theirs


def test_greedy_generation_identical_through_the_engine(hf_tiny_models, imported):
    """A left-padded batch of different prompt lengths, as chat and serve generate it."""
    engine_mod = pytest.importorskip("chatforge.infer.engine", reason="the inference engine is not built yet")
    engine = engine_mod.Engine.load(imported["qwen2"])
    prompts = [IDS[0, :10].tolist(), IDS[1, :4].tolist()]
    gens = engine.generate(prompts, engine_mod.SamplingParams(max_new_tokens=30, temperature=0, stop_ids=[]))
    reference = hf_model(hf_tiny_models["qwen2"])
    for prompt, gen in zip(prompts, gens):
        theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(prompt):]
        assert list(gen.ids) == theirs.tolist()


def test_imported_chat_template_renders_like_transformers_with_a_loss_mask(hf_tiny_models, imported):
    _, tokenizer, _ = load_model(imported["llama"])
    original = transformers.AutoTokenizer.from_pretrained(hf_tiny_models["llama"])
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 30?"},
            {"role": "assistant", "content": "42."}, {"role": "user", "content": "Thank you!"},
            {"role": "assistant", "content": "Goodbye."}]
    ids, mask = tokenizer.render(chat)
    assert ids == original.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    trained = [tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special=False)]
    # each answer up to its end token: the template's newline after it is formatting, never generated
    assert trained == ["42.<|im_end|>Goodbye.<|im_end|>"]
    prompt = tokenizer.prompt(chat[:2])
    assert prompt == original.apply_chat_template(chat[:2], add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]
    assert tokenizer.stop_ids == [original.convert_tokens_to_ids("<|im_end|>")]


def test_a_base_model_without_template_gets_chatml_ended_by_its_eos(hf_tiny_models, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(hf_tiny_models["llama"], source)
    (source / "chat_template.jinja").unlink()
    _, tokenizer, meta = load_model(import_checkpoint(source, tmp_path / "out")[0])
    assert meta["kind"] == "base" and not meta["config"]["has_chat_template"]
    ids, mask = tokenizer.render([{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."}])
    # the turn ends with the model's own end token, trained on, so a fine-tuned model learns to stop
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special=False) == "Hi.<|im_end|>"
    assert tokenizer.stop_ids == [ids[-2]]


def test_reward_model_reads_an_imported_template_at_the_end_token_as_ppo_does(imported):
    # Regression: with ChatML the reward model was trained at the newline after <|im_end|>, while PPO's
    # rollouts end at <|im_end|> and are scored there.
    from chatforge.train.reward import encode_answer
    _, tokenizer, _ = load_model(imported["llama"])
    chat = [{"role": "user", "content": "What is 12 + 30?"}]
    rollout = tokenizer.prompt(chat) + tokenizer.encode("It is 42.") + tokenizer.stop_ids[:1]
    prompt = len(tokenizer.prompt(chat))
    assert encode_answer(tokenizer, chat, "It is 42.", 128) == (rollout, prompt)  # the answer starts where PPO's does
    cut = len(rollout) - 6
    assert encode_answer(tokenizer, chat, "It is 42.", 6) == (rollout[-6:], max(prompt - cut, 0))  # prompt's start goes


def test_run_evaluates_an_imported_instruct_model_in_the_base_place_through_its_template(
        imported, small_world, tmp_path):
    # Regression: the "before" model of a run started from an instruct import was asked in plain
    # User:/Assistant: text with few-shot examples, as if it were a base model.
    from chatforge.eval.run_eval import EvalConfig, evaluate_run
    cfg = EvalConfig(limit=2, samples=0, fewshot_k=[0], fewshot_limit=2, kl_prompts=2, max_new_tokens=4,
                     examples=["Hello!"])
    evaluate_run(cfg, {"base": imported["llama"], "sft": imported["llama"]}, small_world, tmp_path / "no_rm",
                 tmp_path / "eval")
    models = json.loads((tmp_path / "eval" / "summary.json").read_text())["models"]
    assert (models["base"]["format"], models["base"]["shots"]) == ("chat", 0)
    assert models["base"]["greedy"]["mean_score"] == models["sft"]["greedy"]["mean_score"]


def test_lora_merged_sft_export_round_trip(imported, tmp_path):
    from chatforge.model.adapters import LoRAConfig, attach_lora, save_adapter_checkpoint
    model, tokenizer, _ = load_model(imported["llama"])
    attach_lora(model, LoRAConfig(rank=4, targets=["q_proj", "v_proj", "down_proj"])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        adapted = model(IDS)
    adapter = save_adapter_checkpoint(tmp_path / "sft", model, tokenizer, imported["llama"],
                                      {"stage": "sft", "config": {}, "metrics": {}})
    out = export_checkpoint(adapter, tmp_path / "hf")
    with torch.no_grad():
        base = load_model(imported["llama"])[0](IDS)
        assert not torch.allclose(adapted, base, atol=1e-3)
        torch.testing.assert_close(hf_model(out)(IDS).logits, adapted, atol=1e-4, rtol=0)


def test_cli_import_and_export(hf_tiny_models, tmp_path, capsys):
    assert main(["import", str(hf_tiny_models["qwen2"]), "--out", str(tmp_path / "ckpt"), "--kind", "base",
                 "--dtype", "bfloat16"]) == 0
    assert read_meta(tmp_path / "ckpt")["kind"] == "base"
    assert load_file(str(tmp_path / "ckpt" / "model.safetensors"))["model.norm.weight"].dtype == torch.bfloat16
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    assert "Qwen2ForCausalLM" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "qwen2"
    # an existing output is never overwritten silently
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 2
    assert "already exists" in capsys.readouterr().err


# --- bad input: a clear error naming the problem, and no output directory ---
def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_weights(d, fn):
    tensors = load_file(str(d / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(d / "model.safetensors"))


def _truncate(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) // 2])


BAD = {
    "architecture": (lambda d: _edit_config(d, architectures=["GPT2LMHeadModel"]),
                     ["GPT2LMHeadModel", "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"]),
    "missing weight": (lambda d: _edit_weights(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                       ["missing weight model.layers.1.mlp.up_proj.weight"]),
    "unexpected weight": (lambda d: _edit_weights(d, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)})),
                          ["unexpected weight model.layers.0.mlp.extra.weight"]),
    "shape mismatch": (lambda d: _edit_config(d, intermediate_size=80),
                       ["model.layers.0.mlp.down_proj.weight", "(64, 96)", "(64, 80)"]),
    "truncated safetensors": (_truncate, ["model.safetensors", "corrupt or truncated"]),
    "garbage safetensors": (lambda d: (d / "model.safetensors").write_bytes(b"\x07" * 300), ["corrupt or truncated"]),
    "rope scaling": (lambda d: _edit_config(d, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
                     ["RoPE scaling 'yarn' is not supported", "linear, llama3"]),
    "no tokenizer": (lambda d: (d / "tokenizer.json").unlink(), ["no tokenizer.json"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_named_and_leaves_no_output(case, hf_tiny_models, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(hf_tiny_models["llama"], source)
    corrupt, expected = BAD[case]
    corrupt(source)
    with pytest.raises(ChatforgeError) as err:
        import_checkpoint(source, tmp_path / "out")
    for text in expected:
        assert text in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no staging directory


def test_hub_id_without_network_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with pytest.raises(ChatforgeError, match="HuggingFaceTB/SmolLM2-135M-Instruct: not a local path"):
        import_checkpoint("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_run_imports_the_model_named_in_use_pretrain_once(hf_tiny_models, small_world, tmp_path, capsys):
    from chatforge.pipeline import load_run, run_pipeline
    config = tmp_path / "run.toml"
    config.write_text(f'[run]\nname = "imp"\nout = "{tmp_path}"\nworld = "{small_world}"\n'
                      f'use = {{ pretrain = "{hf_tiny_models["llama"]}" }}\n')
    run_pipeline(load_run(str(config)), until="pretrain")
    assert "pretrain  import" in capsys.readouterr().out
    meta = read_meta(tmp_path / "imp" / "pretrain")
    assert (meta["stage"], meta["kind"], meta["parent"]) == ("import", "sft", str(hf_tiny_models["llama"]))
    run_pipeline(load_run(str(config)), until="pretrain")  # same source: nothing to do
    assert "pretrain  done, skipped" in capsys.readouterr().out
    config.write_text(config.read_text().replace(str(hf_tiny_models["llama"]), str(tmp_path / "nothing.gguf")))
    with pytest.raises(ChatforgeError, match="nothing.gguf is not a complete checkpoint directory, a .gguf file"):
        load_run(str(config))
