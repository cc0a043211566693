"""GGUF files (llama.cpp's format): read and dequantise into Hugging Face names, and write back.

Reading and writing go through the `gguf` package. Three things differ from a Hugging Face checkpoint:
- names (`blk.0.attn_q.weight` vs `model.layers.0.self_attn.q_proj.weight`): mapped with gguf's own table;
- llama.cpp's converter permutes the rows of q/k for the `llama` architecture (rotary pairs interleaved,
  not half-split); we undo it on read and redo it on write. `qwen2` uses the half-split layout and is not permuted;
- the tokenizer and chat template live in metadata; we rebuild a `tokenizers.Tokenizer` from them.
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chatforge import ChatforgeError
from chatforge.tokenizer import Tokenizer

GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# The Hugging Face pre-tokenizers that llama.cpp names in `tokenizer.ggml.pre`.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
DIGITS_THEN_BYTES = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
PLAIN_BYTES = ("default", "gpt2", "gpt-2")
SPLIT_REGEXES = {"llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}
WRITE_TYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass
class GGUFModel:
    config: dict[str, Any]          # config.json in the Hugging Face format
    tensors: dict[str, torch.Tensor]  # Hugging Face names, float32, q/k in the half-split layout
    tokenizer: Tokenizer
    has_chat_template: bool
    tensor_types: dict[str, int]    # storage type -> tensor count, for the report


# --- q/k row order ---
def to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """GGUF `llama` rows (pairs interleaved within each head) -> Hugging Face rows (pairs split in halves)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `to_half_split`: what llama.cpp's converter does to q_proj/k_proj."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _name_map(arch: str, cfg) -> dict[str, str]:
    """Hugging Face name -> GGUF name for every tensor the model has."""
    import gguf
    from chatforge.checkpoint import model_state
    from chatforge.model.transformer import GPT, ModelConfig
    # the same module tree at width 1: the real model's names without allocating its weights
    skeleton = ModelConfig(vocab_size=1, hidden_size=2, intermediate_size=1, num_hidden_layers=cfg.num_hidden_layers,
                           num_attention_heads=1, num_key_value_heads=1, attention_bias=cfg.attention_bias,
                           tie_word_embeddings=cfg.tie_word_embeddings)
    table = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg.num_hidden_layers)
    mapping = {}
    for hf in model_state(GPT(skeleton)):
        name = table.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:  # a bug in our table, not in the user's file
            raise RuntimeError(f"no GGUF name for {hf}")
        mapping[hf] = name
    return mapping


# --- reading ---
def _open(path: Path):
    import gguf
    if not path.is_file():
        raise ChatforgeError(f"{path}: file not found")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct errors, IndexError... on damaged files
        raise ChatforgeError(f"{path}: not a readable GGUF file, corrupt or truncated ({type(e).__name__}: {e})") from None


def _fields(reader) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception as e:
            raise ChatforgeError(f"{reader.data.filename}: metadata key {key} is unreadable ({e})") from None
    return out


def _config(path: Path, meta: dict[str, Any], arch: str, tensor_names: set[str]) -> dict[str, Any]:
    def key(name: str, default: Any = ...) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is ...:
            raise ChatforgeError(f"{path}: metadata key {arch}.{name} is missing")
        return value

    hidden, n_heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", hidden // n_heads)
    rotary = key("rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise ChatforgeError(f"{path}: {arch}.rope.dimension_count={rotary} rotates part of each head "
                             f"(head_dim={head_dim}); chatforge supports full rotary only")
    vocab = key("vocab_size", len(meta.get("tokenizer.ggml.tokens", [])))
    config: dict[str, Any] = {
        "architectures": [GGUF_ARCHITECTURES[arch]], "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"), "num_hidden_layers": key("block_count"),
        "num_attention_heads": n_heads, "num_key_value_heads": key("attention.head_count_kv", n_heads),
        "max_position_embeddings": key("context_length"), "rope_theta": float(key("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    if head_dim != hidden // n_heads:
        config["head_dim"] = head_dim
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    elif scaling != "none":
        raise ChatforgeError(f"{path}: RoPE scaling {scaling!r} ({arch}.rope.scaling.type) is not supported "
                             f"(supported: none, linear, and llama3 as a rope_freqs tensor)")
    return config


def llama3_rope_scaling(freq_factors: torch.Tensor, config: dict[str, Any], original_context: int,
                        where: str) -> dict[str, Any]:
    """Recover Llama 3's RoPE scaling from the per-frequency divisors llama.cpp stores as `rope_freqs.weight`.

    The converter keeps only the divisors, not the parameters; we take the factor from them and check
    that Llama 3's published low/high frequency factors (1, 4) and the original context reproduce them.
    """
    from chatforge.model.transformer import ModelConfig, rope_frequencies
    factor = float(freq_factors.max())
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": original_context}
    cfg = ModelConfig(hidden_size=config["hidden_size"], num_attention_heads=config["num_attention_heads"],
                      num_key_value_heads=config["num_key_value_heads"], head_dim=config.get("head_dim"),
                      rope_theta=config["rope_theta"])
    base = rope_frequencies(cfg)
    cfg.rope_scaling = scaling
    if not torch.allclose(base / rope_frequencies(cfg), freq_factors.float(), rtol=1e-3):
        raise ChatforgeError(f"{where}: rope_freqs.weight is a RoPE scaling chatforge cannot express "
                             f"(it is not Llama 3's with factor {factor:g})")
    return scaling


def _dequantise(path: Path, t) -> torch.Tensor:
    import gguf
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    try:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        readable = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, IQ* and TQ*"
        raise ChatforgeError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which the gguf "
                             f"reader cannot dequantise (readable: {readable})") from None
    except Exception as e:
        raise ChatforgeError(f"{path}: tensor {t.name} is corrupt or truncated ({e})") from None
    if values.size != math.prod(shape):
        raise ChatforgeError(f"{path}: tensor {t.name} holds {values.size} values, its shape {list(shape)} "
                             f"needs {math.prod(shape)} (truncated file?)")
    return torch.from_numpy(np.require(values.reshape(shape), np.float32, ["C", "W"]))  # copies out of the mmap


def read_gguf(path: str | Path) -> GGUFModel:
    """Config, dequantised float32 tensors (Hugging Face names) and tokenizer of a GGUF file."""
    path = Path(path)
    reader = _open(path)
    meta = _fields(reader)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ChatforgeError(f"{path}: GGUF architecture {arch!r} is not supported "
                             f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    by_name = {t.name: t for t in reader.tensors}
    config = _config(path, meta, arch, set(by_name))
    from chatforge.hub import model_config
    expected = _name_map(arch, model_config(config, str(path)))
    gguf_to_hf = {g: h for h, g in expected.items()}
    side = {"rope_freqs.weight"} if arch == "llama" else set()
    unexpected = sorted(set(by_name) - set(gguf_to_hf) - side)
    missing = sorted(set(gguf_to_hf) - set(by_name))
    if unexpected:
        raise ChatforgeError(f"{path}: unexpected tensor {unexpected[0]}" + _more(unexpected))
    if missing:
        raise ChatforgeError(f"{path}: missing tensor {missing[0]} ({gguf_to_hf[missing[0]]})" + _more(missing))
    if "rope_freqs.weight" in by_name:
        # llama.cpp reads this key for YaRN only; Llama 3.x were trained at 8192 before scaling
        original = int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192))
        config["rope_scaling"] = llama3_rope_scaling(_dequantise(path, by_name["rope_freqs.weight"]), config,
                                                     original, str(path))
    tensors = {}
    for name, hf in gguf_to_hf.items():
        w = _dequantise(path, by_name[name])
        if arch == "llama" and hf.endswith("q_proj.weight"):
            w = to_half_split(w, config["num_attention_heads"])
        elif arch == "llama" and hf.endswith("k_proj.weight"):
            w = to_half_split(w, config["num_key_value_heads"])
        tensors[hf] = w
    tokenizer = tokenizer_from_metadata(path, meta)
    return GGUFModel(config, tensors, tokenizer, bool(meta.get("tokenizer.chat_template")),
                     dict(Counter(t.tensor_type.name for t in reader.tensors)))


def _more(names: list[str]) -> str:
    return f" (+{len(names) - 1} more)" if len(names) > 1 else ""


# --- the tokenizer from metadata ---
def tokenizer_from_metadata(path: Path, meta: dict[str, Any]) -> Tokenizer:
    from chatforge.hub import FALLBACK_TEMPLATE
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ChatforgeError(f"{path}: no tokenizer.ggml.tokens in the metadata; cannot rebuild the tokenizer")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(set(tokens)) != len(tokens):
        dup = next(t for t, n in Counter(tokens).items() if n > 1)
        raise ChatforgeError(f"{path}: token {dup!r} appears twice in tokenizer.ggml.tokens")
    if kind == "gpt2":
        tok = _byte_level_bpe(path, meta, tokens)
    elif kind == "llama":
        tok = _sentencepiece_bpe(meta, tokens, types)
    else:
        raise ChatforgeError(f"{path}: tokenizer model {kind!r} is not supported (supported: gpt2 byte-level BPE, "
                             f"llama SentencePiece BPE)")
    from tokenizers import AddedToken
    # CONTROL tokens are special (skipped when decoding); USER_DEFINED ones are plain added tokens.
    tok.add_tokens([AddedToken(tokens[i], special=t == 3, normalized=False) for i, t in enumerate(types) if t in (3, 4)])
    bos, eos = _token(tokens, meta.get("tokenizer.ggml.bos_token_id")), _token(tokens, meta.get("tokenizer.ggml.eos_token_id"))
    if meta.get("tokenizer.ggml.add_bos_token", kind == "llama") and bos is not None:
        from tokenizers import processors
        bos_id = tokens.index(bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    stops = [t for t in (eos, _token(tokens, meta.get("tokenizer.ggml.eot_token_id")),
                         _token(tokens, meta.get("tokenizer.ggml.eom_token_id"))) if t is not None]
    template = meta.get("tokenizer.chat_template") or FALLBACK_TEMPLATE
    return Tokenizer(tok, template, bos_token=bos, eos_tokens=tuple(dict.fromkeys(stops)),
                     pad_token=_token(tokens, meta.get("tokenizer.ggml.padding_token_id")))


def _token(tokens: list[str], index: Any) -> str | None:
    return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None


def _byte_level_bpe(path: Path, meta: dict[str, Any], tokens: list[str]):
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = meta.get("tokenizer.ggml.pre", "default")
    tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                 ignore_merges=pre in ("llama-bpe", "llama3")))
    if pre in DIGITS_THEN_BYTES:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif pre in SPLIT_REGEXES:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_REGEXES[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if pre == "qwen2":
            tok.normalizer = normalizers.NFC()
    else:
        if pre not in PLAIN_BYTES:
            print(f"warning: {path}: pre-tokenizer {pre!r} is not known to chatforge; using GPT-2's "
                  f"(known: {', '.join(PLAIN_BYTES + DIGITS_THEN_BYTES + tuple(SPLIT_REGEXES))})", file=sys.stderr)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str], types: list[int]):
    """llama.cpp's SPM vocabulary: BPE whose merge order is the score of the merged piece, with byte fallback."""
    from tokenizers import decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, i in vocab.items():
        if types[i] != 1:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-scores[i], vocab[left], vocab[right], left, right))
    merges.sort()
    unk = _token(tokens, meta.get("tokenizer.ggml.unknown_token_id"))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk,
                                 byte_fallback=True, fuse_unk=True))
    prefix = "always" if meta.get("tokenizer.ggml.add_space_prefix", True) else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prefix, split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix == "always" else []))
    return tok


# --- writing ---
def write_gguf(path: str | Path, model: torch.nn.Module, tokenizer: Tokenizer, out_type: str = "f16",
               name: str = "chatforge") -> Path:
    """Write `model` and `tokenizer` as one GGUF file, atomically. 1-D tensors stay F32, as llama.cpp does."""
    import gguf
    from chatforge.checkpoint import model_state
    if out_type not in WRITE_TYPES:
        raise ChatforgeError(f"--gguf-type {out_type!r} is not supported (supported: {', '.join(WRITE_TYPES)})")
    path = Path(path)
    cfg = model.config
    arch = "qwen2" if cfg.architecture == "Qwen2ForCausalLM" else "llama"
    pre = _pre_name(tokenizer)  # fails early, before anything is written
    qtype = getattr(gguf.GGMLQuantizationType, out_type.upper())
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_name(name)
        writer.add_file_type(file_type)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_rope_dimension_count(cfg.head_dim)
        if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
            writer.add_key_length(cfg.head_dim)
            writer.add_value_length(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        scaling = cfg.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(scaling["factor"]))
        elif kind == "llama3":
            from chatforge.model.transformer import ModelConfig, rope_frequencies
            plain = ModelConfig(**{**_shape_args(cfg), "rope_scaling": None})
            writer.add_tensor("rope_freqs.weight", (rope_frequencies(plain) / model.inv_freq.cpu()).numpy().astype(np.float32))
            writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
        elif kind != "default":
            raise ChatforgeError(f"RoPE scaling {kind!r} cannot be written to GGUF (supported: linear, llama3)")
        _write_tokenizer(writer, tokenizer, pre, cfg.vocab_size)
        names = _name_map(arch, cfg)
        for hf, t in model_state(model).items():
            w = t.detach().float().cpu()
            if arch == "llama" and hf.endswith("q_proj.weight"):
                w = to_interleaved(w, cfg.num_attention_heads)
            elif arch == "llama" and hf.endswith("k_proj.weight"):
                w = to_interleaved(w, cfg.num_key_value_heads)
            data = w.numpy()
            kind_here = qtype if data.ndim == 2 else gguf.GGMLQuantizationType.F32
            if kind_here == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
                kind_here = gguf.GGMLQuantizationType.F16  # Q8_0 needs rows in blocks of 32, as llama.cpp falls back
            writer.add_tensor(names[hf], gguf.quants.quantize(data, kind_here), raw_dtype=kind_here)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def _shape_args(cfg) -> dict[str, Any]:
    return {"hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta}


def _pre_name(tokenizer: Tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; byte-level BPE only."""
    spec = json.loads(tokenizer.tok.to_str())
    if spec["model"]["type"] != "BPE" or spec["model"].get("byte_fallback"):
        raise ChatforgeError("GGUF export supports byte-level BPE tokenizers only (this one is "
                             f"{spec['model']['type']}{' with byte fallback' if spec['model'].get('byte_fallback') else ''})")
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if types == ["Split", "ByteLevel"]:
        regex = parts[0].get("pattern", {}).get("Regex")
        for name, known in (("llama-bpe", LLAMA3_SPLIT), ("qwen2", QWEN2_SPLIT)):
            if regex == known:
                return name
    raise ChatforgeError(f"GGUF export: the tokenizer's pre-tokenizer ({' + '.join(map(str, types))}) has no "
                         f"llama.cpp equivalent chatforge knows")


def _write_tokenizer(writer, tokenizer: Tokenizer, pre: str, vocab_size: int) -> None:
    import gguf
    spec = json.loads(tokenizer.tok.to_str())
    vocab = dict(spec["model"]["vocab"])
    added = {a["content"]: a for a in spec.get("added_tokens", [])}
    for content, a in added.items():
        vocab[content] = a["id"]
    by_id = {i: t for t, i in vocab.items()}
    if len(by_id) > vocab_size:
        raise ChatforgeError(f"the tokenizer has {len(by_id)} tokens but the model only {vocab_size} embeddings")
    tokens, types = [], []
    for i in range(vocab_size):  # embedding rows beyond the tokenizer become unused placeholder tokens
        t = by_id.get(i)
        tokens.append(t if t is not None else f"[PAD{i}]")
        if t is None:
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            types.append(gguf.TokenType.CONTROL if added[t].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.stop_ids:
        writer.add_eos_token_id(tokenizer.stop_ids[0])
        if len(tokenizer.stop_ids) > 1:
            writer.add_eot_token_id(tokenizer.stop_ids[1])
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(_adds_bos(spec))
    writer.add_chat_template(tokenizer.chat_template)


def _adds_bos(spec: dict[str, Any]) -> bool:
    post = spec.get("post_processor") or {}
    if post.get("type") == "TemplateProcessing":
        first = post.get("single", [{}])[0]
        return "SpecialToken" in first
    return False
