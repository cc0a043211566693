"""The model family: named sizes trading quality for speed, in the spirit of GPT-3's ada...davinci."""
from __future__ import annotations

import argparse

from chatforge import ChatforgeError
from chatforge.model.transformer import ModelConfig

# name: (layers, width, heads, kv_heads, mlp width). Parameter counts depend on the vocabulary; see `chatforge models`.
PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "nano": (2, 128, 4, 4, 352),         # ~1M: smoke tests
    "ada": (4, 256, 4, 4, 640),          # ~4M: the tiny world's default on a CPU in minutes
    "babbage": (6, 288, 6, 6, 768),      # ~7M: the benchmark size
    "curie": (8, 512, 8, 4, 1408),       # ~25M
    "davinci": (12, 768, 12, 4, 2048),   # ~80M
    "titan": (12, 1024, 16, 8, 2560),    # ~135M: a GPU's job
}


def preset(name: str, vocab_size: int, context: int = 512, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ChatforgeError(f"unknown model preset {name!r} (known: {', '.join(PRESETS)})")
    layers, width, heads, kv, mlp = PRESETS[name]
    return ModelConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=context,
                       **overrides)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model presets with their size (and speed with --measure)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--measure", action="store_true", help="time training and generation on this machine")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> None:
    rows = []
    for name in PRESETS:
        cfg = preset(name, args.vocab_size, args.context)
        row = {"preset": name, "layers": cfg.num_hidden_layers, "width": cfg.hidden_size,
               "heads": f"{cfg.num_attention_heads}/{cfg.num_key_value_heads}", "params": f"{cfg.num_params() / 1e6:.1f}M"}
        if args.measure:
            from chatforge.model.speed import measure
            row.update(measure(cfg, device=args.device))
        rows.append(row)
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(str(r.get(k, "")).ljust(widths[k]) for k in keys))
