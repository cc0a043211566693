"""Start from a pretrained model: import Hugging Face and GGUF checkpoints, export back.

    chatforge import SRC --out DIR             SRC = a Hugging Face model directory, a .gguf file, or a Hub id
    chatforge export CKPT --out DIR            a directory transformers loads with no custom code
    chatforge export CKPT --format gguf --out FILE.gguf

Imported weights go into chatforge's one model class (`GPT` uses Hugging Face Llama names), so an imported
checkpoint is an ordinary checkpoint directory: `chat`, `serve`, `sft` and every later stage take it.
Its tokenizer and chat template are the model's own. The checkpoint kind is `sft` when the source ships a
chat template (an instruct model) and `base` otherwise; `--kind` overrides.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from chatforge import ChatforgeError
from chatforge.model.transformer import GPT, ModelConfig
from chatforge.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_SCALING = {"linear": ("factor",),
                          "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
# config.json keys that describe the file rather than the model; carrying them over would mislead readers.
FILE_KEYS = ("dtype", "torch_dtype", "transformers_version", "quantization_config", "auto_map", "_name_or_path")
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Base models without a template get ChatML as text, each turn ended by the model's own end-of-text token.
FALLBACK_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --- config.json -> ModelConfig ---
def model_config(hf: dict[str, Any], where: str) -> ModelConfig:
    """Check a Hugging Face config against what chatforge's model computes, and translate it."""
    arch = (hf.get("architectures") or [None])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ChatforgeError(f"{where}: architecture {arch!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    d = {k: v for k, v in hf.items() if k not in FILE_KEYS}
    rope = d.pop("rope_parameters", None)  # transformers >= 5 keeps theta and scaling together here
    if rope:
        d["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        d["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    scaling = d.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        d["rope_scaling"] = None
    elif kind not in SUPPORTED_ROPE_SCALING:
        raise ChatforgeError(f"{where}: RoPE scaling {kind!r} is not supported "
                             f"(supported: default, {', '.join(SUPPORTED_ROPE_SCALING)})")
    else:
        missing = [k for k in SUPPORTED_ROPE_SCALING[kind] if k not in scaling]
        if missing:
            raise ChatforgeError(f"{where}: rope_scaling of type {kind} needs {missing[0]}")
    if d.get("hidden_act", "silu") != "silu":
        raise ChatforgeError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (chatforge's MLP is SwiGLU: silu)")
    if d.get("mlp_bias"):
        raise ChatforgeError(f"{where}: mlp_bias=true is not supported (chatforge's MLP has no biases)")
    if arch != "Qwen2ForCausalLM" and d.get("attention_bias"):
        raise ChatforgeError(f"{where}: attention_bias=true adds an o_proj bias chatforge's attention does not have")
    # transformers' defaults for these architectures, where config.json leaves a key out
    d.setdefault("tie_word_embeddings", False)
    d.setdefault("rms_norm_eps", 1e-6)
    window = d.pop("sliding_window", None)
    if window and (arch == "MistralForCausalLM" or d.get("use_sliding_window")):
        # Within its window sliding attention is full attention: cap the context there and stay exact.
        d["max_position_embeddings"] = min(d.get("max_position_embeddings", window), window)
    if arch == "MistralForCausalLM":
        d["architectures"] = ["LlamaForCausalLM"]  # the same computation once the window is capped
    return ModelConfig.from_hf(d)


# --- reading a Hugging Face directory ---
def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded safetensors checkpoint."""
    from safetensors import safe_open
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        other = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        raise ChatforgeError(f"{directory}: no *.safetensors weights" + (
            f" (found {other[0]}: only safetensors is read, never pickles; re-save with "
            f"save_pretrained(safe_serialization=True))" if other else ""))
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise ChatforgeError(f"{index}: shard {name} is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key in tensors:
                        raise ChatforgeError(f"{path}: weight {key} is also in another shard")
                    tensors[key] = f.get_tensor(key)
        except ChatforgeError:
            raise
        except Exception as e:  # safetensors raises its own error type for damaged headers and data
            raise ChatforgeError(f"{path}: not a readable safetensors file, corrupt or truncated ({e})") from None
    # old checkpoints carry the rotary table as a buffer; the model recomputes it
    return {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}


def read_hf_tokenizer(directory: Path, config: dict[str, Any]) -> tuple[Tokenizer, bool]:
    """The model's tokenizer and chat template; True when the template is the model's own."""
    from tokenizers import Tokenizer as HFTokenizer
    from chatforge.tokenizer import _token_text
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ChatforgeError(f"{directory}: no tokenizer.json (only fast tokenizers are read; "
                             f"re-save with AutoTokenizer.from_pretrained(...).save_pretrained(...))")
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:
        raise ChatforgeError(f"{path}: not a valid tokenizer file ({e})") from None
    cfg = _read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else {}
    specials = _read_json(directory / "special_tokens_map.json") if (directory / "special_tokens_map.json").is_file() else {}
    template = cfg.get("chat_template")
    if (directory / "chat_template.jinja").is_file():  # transformers >= 4.43 saves it beside the config
        template = (directory / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)

    def special(name: str) -> str | None:
        return _token_text(cfg.get(name)) or _token_text(specials.get(name))

    bos, eos, pad = special("bos_token"), special("eos_token"), special("pad_token")
    stops = [eos] if eos else []
    gen = _read_json(directory / "generation_config.json") if (directory / "generation_config.json").is_file() else {}
    eos_ids = gen.get("eos_token_id", config.get("eos_token_id"))
    for i in eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else []:
        token = tok.id_to_token(int(i))
        if token is not None and token not in stops:
            stops.append(token)
    if not stops:
        raise ChatforgeError(f"{directory}: no end-of-sequence token (eos_token in tokenizer_config.json or "
                             f"eos_token_id in generation_config.json); generation could never stop")
    return Tokenizer(tok, template or FALLBACK_TEMPLATE, bos_token=bos, eos_tokens=tuple(stops), pad_token=pad), bool(template)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChatforgeError(f"{path}: not valid JSON ({e})") from None


def _hub_download(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ChatforgeError(f"{repo_id}: not a local path; to fetch it from the Hugging Face Hub "
                             f"install huggingface_hub (pip install 'chatforge[hf]')") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated model...
        raise ChatforgeError(f"{repo_id}: not a local path, and fetching it from the Hugging Face Hub "
                             f"failed ({type(e).__name__}: {e})") from None


# --- import ---
def build_model(config: dict[str, Any], tensors: dict[str, torch.Tensor], tokenizer: Tokenizer, where: str) -> GPT:
    """chatforge's GPT holding `tensors`, every one checked by name and shape."""
    from chatforge.checkpoint import load_weights
    cfg = model_config(config, where)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ChatforgeError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{cfg.vocab_size} embeddings")
    model = GPT(cfg)
    load_weights(model, tensors, where)
    return model.eval()


def import_checkpoint(source: str | Path, out: str | Path, kind: str = "auto", dtype: str = "float32",
                      force: bool = False, revision: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Read SRC, check every weight against the model, and write a checkpoint directory atomically."""
    from chatforge.checkpoint import file_hash, save_model_checkpoint
    out = Path(out)
    _check_out(out, force)
    if kind not in ("auto", "base", "sft"):
        raise ChatforgeError(f"--kind {kind!r}: expected auto, base or sft")
    if dtype not in DTYPES:
        raise ChatforgeError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    src = Path(source)
    if src.is_file() and (src.suffix == ".gguf" or _starts_with(src, b"GGUF")):
        from chatforge.gguf_io import read_gguf
        g = read_gguf(src)
        config, tensors, tokenizer, has_template = g.config, g.tensors, g.tokenizer, g.has_chat_template
        fmt, where, parent_hash, storage = "gguf", str(src), file_hash(src), g.tensor_types
    else:
        if src.is_file():
            raise ChatforgeError(f"{src}: expected a Hugging Face model directory or a .gguf file")
        if not src.is_dir():
            if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
                raise ChatforgeError(f"{source}: no such file or directory (nor a Hugging Face Hub id like org/name)")
            src = _hub_download(str(source), revision)
        if not (src / "config.json").is_file():
            raise ChatforgeError(f"{src}: no config.json (expected a Hugging Face model directory)")
        config = _read_json(src / "config.json")
        model_config(config, str(src / "config.json"))  # architecture and RoPE errors before reading weights
        tensors = read_hf_weights(src)
        tokenizer, has_template = read_hf_tokenizer(src, config)
        fmt, where = "hf", str(src)
        index = src / "model.safetensors.index.json"
        parent_hash = file_hash(index if index.is_file() else next(src.glob("*.safetensors")))
        storage = {str(k).removeprefix("torch."): sum(t.dtype == k for t in tensors.values())
                   for k in {t.dtype for t in tensors.values()}}
    model = build_model(config, tensors, tokenizer, where).to(DTYPES[dtype])
    kind = ("sft" if has_template else "base") if kind == "auto" else kind
    meta = {"kind": kind, "stage": "import", "parent": str(source), "parent_hash": parent_hash,
            "config": {"source": str(source), "format": fmt, "dtype": dtype, "storage_types": storage,
                       "has_chat_template": has_template},
            "metrics": {"params": model.num_params()}}
    save_model_checkpoint(out, model, tokenizer, meta)
    return out, meta


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def _check_out(out: Path, force: bool) -> None:
    occupied = any(out.iterdir()) if out.is_dir() else out.exists()
    if occupied and not force:
        raise ChatforgeError(f"{out}: already exists (pass --force to replace it)")


# --- export ---
def load_for_export(path: str | Path) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """A language model from any checkpoint a user would serve: base, sft, policy, or an adapter merged in."""
    from chatforge.checkpoint import load_model, read_meta
    meta = read_meta(path)
    if meta["kind"] == "adapter":
        from chatforge.model.adapters import adapter_method, load_adapter_checkpoint
        model, tokenizer, meta = load_adapter_checkpoint(path, merge=True)
        if adapter_method(model) is not None:  # P-tuning's virtual tokens have no place in a plain model
            raise ChatforgeError(f"{path}: a {adapter_method(model)} adapter cannot be merged into the weights; "
                                 f"only LoRA adapters export")
        return model, tokenizer, meta
    return load_model(path, expect_kind=("base", "sft", "policy"))


def write_hf(out: str | Path, model: GPT, tokenizer: Tokenizer, dtype: str = "float32") -> Path:
    """A Hugging Face model directory (config, safetensors, tokenizer, generation config), atomically."""
    from chatforge.checkpoint import CheckpointWriter, model_state
    if dtype not in DTYPES:
        raise ChatforgeError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    w = CheckpointWriter(out)
    try:
        config = model.config.to_hf()
        config["torch_dtype"] = dtype
        w.write_json("config.json", config)
        w.write_tensors("model.safetensors", {k: v.to(DTYPES[dtype]) for k, v in model_state(model).items()})
        tokenizer.save(w.tmp)
        stops = tokenizer.stop_ids
        w.write_json("generation_config.json", {
            "bos_token_id": tokenizer.bos_id, "pad_token_id": tokenizer.pad_id,
            "eos_token_id": stops[0] if len(stops) == 1 else stops})
        return w.commit()
    except BaseException:
        w.abort()
        raise


def export_checkpoint(checkpoint: str | Path, out: str | Path, fmt: str = "hf", dtype: str = "float32",
                      gguf_type: str = "f16", force: bool = False) -> Path:
    out = Path(out)
    if fmt not in ("hf", "gguf"):
        raise ChatforgeError(f"--format {fmt!r}: expected hf or gguf")
    _check_out(out, force)
    model, tokenizer, _ = load_for_export(checkpoint)
    if fmt == "hf":
        return write_hf(out, model, tokenizer, dtype)
    from chatforge.gguf_io import write_gguf
    if out.is_dir():
        shutil.rmtree(out)  # --force over a directory: the file takes its place
    return write_gguf(out, model, tokenizer, gguf_type, name=Path(checkpoint).name)


# --- command line ---
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="import a Hugging Face or GGUF checkpoint",
                       description="Import a pretrained model into a chatforge checkpoint directory.")
    p.add_argument("source", help="a Hugging Face model directory, a .gguf file, or a Hub id (org/name)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--kind", default="auto", choices=("auto", "base", "sft"),
                   help="auto: sft when the source has a chat template, else base")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights as stored in the checkpoint")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) when SRC is a Hub id")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_import_cli)
    e = sub.add_parser("export", help="export a checkpoint as a Hugging Face directory or a GGUF file",
                       description="Export a checkpoint for transformers, vLLM or llama.cpp.")
    e.add_argument("checkpoint")
    e.add_argument("--out", required=True, help="a directory (hf) or a .gguf file (gguf)")
    e.add_argument("--format", default="hf", choices=("hf", "gguf"))
    e.add_argument("--dtype", default="float32", choices=list(DTYPES), help="hf: weight dtype")
    e.add_argument("--gguf-type", default="f16", choices=("f32", "f16", "bf16", "q8_0"),
                   help="gguf: storage type of 2-D weights (1-D weights stay f32)")
    e.add_argument("--force", action="store_true", help="replace --out if it exists")
    e.set_defaults(func=_export_cli)


def _import_cli(args: argparse.Namespace) -> None:
    print(f"import: {args.source} -> {args.out} ({args.dtype})")
    start = time.time()
    out, meta = import_checkpoint(args.source, args.out, kind=args.kind, dtype=args.dtype,
                                  force=args.force, revision=args.revision)
    cfg = json.loads((out / "config.json").read_text())
    storage = ", ".join(f"{n} {k}" for k, n in meta["config"]["storage_types"].items())
    print(f"import: {cfg['architectures'][0]}, {meta['metrics']['params'] / 1e6:.1f}M parameters, "
          f"{cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']}, source tensors: {storage}")
    template = "the model's own chat template" if meta["config"]["has_chat_template"] else "a fallback ChatML template"
    print(f"import: wrote {meta['kind']} checkpoint {out} with {template} in {time.time() - start:.1f}s; "
          f"try: chatforge chat {out}")


def _export_cli(args: argparse.Namespace) -> None:
    print(f"export: {args.checkpoint} -> {args.out} ({args.format})")
    start = time.time()
    out = export_checkpoint(args.checkpoint, args.out, args.format, args.dtype, args.gguf_type, args.force)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else out.stat().st_size
    print(f"export: wrote {out} ({size / 1e6:.1f} MB) in {time.time() - start:.1f}s")
