"""`chatforge world generate --out DIR [--size small|default|large] [--seed N]`."""
from __future__ import annotations

import argparse
import sys
import time

from chatforge.data.world.generate import HABITS, SIZES, generate_world


def register(subparsers: argparse._SubParsersAction) -> None:
    world = subparsers.add_parser("world", help="the tiny world: generated data set and gold labeler")
    sub = world.add_subparsers(dest="world_command", required=True, metavar="ACTION")
    gen = sub.add_parser("generate", help="write the corpus, demonstrations, prompt sets and eval splits")
    gen.add_argument("--out", required=True, help="directory to write (created if missing)")
    gen.add_argument("--size", default="default", choices=list(SIZES), help="small (tests), default, large")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--habits", type=float, default=HABITS,
                     help=f"share of fact/arithmetic/follow-up demonstrations ending with a pleasantry the gold "
                          f"labeler counts as irrelevant text, as labelers write them (default {HABITS}; 0: none)")
    gen.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    spec = SIZES[args.size]
    print(f"world: generating size={args.size} seed={args.seed} into {args.out} "
          f"({spec.sft} demonstrations, {spec.reward}/{spec.ppo} reward/PPO prompts, {spec.eval} eval prompts per split)",
          file=sys.stderr)
    start = time.perf_counter()
    manifest = generate_world(args.out, size=args.size, seed=args.seed, habits=args.habits)
    counts = manifest["counts"]
    print(f"world: wrote {args.out} in {time.perf_counter() - start:.1f}s: corpus {counts['corpus_bytes'] / 1e6:.2f} MB, "
          f"sft {counts['sft']}, reward {counts['prompts/reward']}, ppo {counts['prompts/ppo']}, "
          f"moderation {counts['prompts/moderation']}, eval dev {counts['eval/dev']} / test {counts['eval/test']}")
    print(f"world: reproduce with: chatforge world generate --out {args.out} --size {args.size} --seed {args.seed} "
          f"--habits {args.habits}")
    return 0
