"""The one entry point. Each subcommand lives beside the code it runs and registers itself here."""
from __future__ import annotations

import argparse
import importlib
import sys

from chatforge import ChatforgeError

# subcommand -> module exposing `register(subparsers)`; imported lazily so `chatforge --help` is fast.
COMMANDS: dict[str, str] = {
    "models": "chatforge.model.presets",
    "tokenizer": "chatforge.tokenizer",
    "world": "chatforge.data.world.cli",
    "pretrain": "chatforge.train.pretrain",
    "generate": "chatforge.infer.cli",
    "sft": "chatforge.train.sft",
    "reward": "chatforge.train.reward",
    "ppo": "chatforge.train.ppo",
    "dpo": "chatforge.train.dpo",
    "eval": "chatforge.eval.cli",
    "chat": "chatforge.chat",
    "serve": "chatforge.serve.cli",
    "moderation": "chatforge.safety.moderation",
    "import": "chatforge.hub",
    "export": "chatforge.hub",
    "run": "chatforge.pipeline",
    "label": "chatforge.feedback.cli",
    "feedback": "chatforge.feedback.cli",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    registered: set[str] = set()
    for name, module in COMMANDS.items():
        if wanted is not None and name != wanted:
            continue
        if module in registered:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("chatforge"):
                continue  # a stage not built yet
            raise
        mod.register(sub)
        registered.add(module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        result = args.func(args)
    except ChatforgeError as e:
        print(f"chatforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
