"""Elo ratings of models from pairwise judgements, with bootstrap confidence intervals.

Every model answers the same prompts; a judge (the gold labeler, or a reward model) compares the answers of
each pair of models on each prompt. Ratings are the Bradley-Terry maximum-likelihood strengths on the Elo
scale (400 points = 10:1 odds, mean 1000), which unlike sequential Elo updates do not depend on game order.
Confidence intervals come from refitting on prompts resampled with replacement.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Any

import numpy as np

from chatforge import ChatforgeError
from chatforge.checkpoint import atomic_write_text, read_meta, resolve
from chatforge.config import add_config_args, config_from_args
from chatforge.tokenizer import Message

ELO_SCALE = 400 / np.log(10)  # natural-log strength -> Elo points
ELO_MEAN = 1000.0


@dataclass
class Game:
    """One judgement on one prompt: `outcome` is 1 if player a won, 0.5 for a tie, 0 if b won."""
    prompt: int
    a: int
    b: int
    outcome: float


@dataclass
class Rating:
    name: str
    elo: float
    low: float   # bootstrap confidence interval
    high: float
    wins: float  # ties count half
    games: int


def fit_bradley_terry(wins: np.ndarray, prior: float = 0.5, iters: int = 2000) -> np.ndarray:
    """Elo ratings maximising the Bradley-Terry likelihood of a win matrix (`wins[i, j]`: i's wins over j).

    `prior` adds that many virtual wins each way between every two players, so a player who won (or lost)
    every game gets a finite rating. Solved with Hunter's MM iteration, which converges monotonically.
    """
    n = len(wins)
    wins = wins + prior * (1 - np.eye(n))
    played = wins + wins.T
    strength = np.ones(n)
    for _ in range(iters):
        new = wins.sum(1) / (played / (strength[:, None] + strength[None, :])).sum(1)
        new /= np.exp(np.log(new).mean())
        done = np.abs(np.log(new) - np.log(strength)).max() < 1e-10
        strength = new
        if done:
            break
    return ELO_MEAN + ELO_SCALE * np.log(strength)


def elo_ratings(games: list[Game], names: list[str], bootstrap: int = 1000, confidence: float = 0.95,
                seed: int = 0) -> list[Rating]:
    """Ratings best first, each with a bootstrap interval over prompts (a prompt's games stay together)."""
    n = len(names)
    prompts = sorted({g.prompt for g in games})
    row = {p: i for i, p in enumerate(prompts)}
    per_prompt = np.zeros((len(prompts), n, n))  # win matrix of each prompt's games
    for g in games:
        per_prompt[row[g.prompt], g.a, g.b] += g.outcome
        per_prompt[row[g.prompt], g.b, g.a] += 1.0 - g.outcome
    wins = per_prompt.sum(0)
    point = fit_bradley_terry(wins)
    low, high = point, point
    if bootstrap and prompts:
        rng = np.random.default_rng(seed)
        draws = rng.multinomial(len(prompts), np.full(len(prompts), 1 / len(prompts)), size=bootstrap)
        samples = np.stack([fit_bradley_terry(np.tensordot(d, per_prompt, axes=1)) for d in draws])
        tail = (1 - confidence) / 2 * 100
        low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
    played = wins + wins.T
    ratings = [Rating(names[i], float(point[i]), float(low[i]), float(high[i]), float(wins[i].sum()),
                      int(round(played[i].sum()))) for i in range(n)]
    return sorted(ratings, key=lambda r: -r.elo)


# ---------------------------------------------------------------- chatforge eval elo

@dataclass
class EloConfig:
    checkpoints: list[str] = field(default_factory=list)  # the models compared (two or more)
    judge: str = "gold"              # gold (the tiny world's noise-free labeler) or a reward-model checkpoint
    world: str = ""                  # the world whose eval split is answered (default: the first model's)
    split: str = "test"
    prompts: str = ""                # or any JSONL of {"prompt"|"messages"} instead of a world split
    limit: int = 200                 # prompts answered (the first N)
    max_new_tokens: int = 96
    temperature: float = 0.0         # 0 = greedy
    bootstrap: int = 1000            # resamples of the prompts for the confidence intervals
    seed: int = 0
    out: str = ""                    # write the ratings and every model's answers to this JSON file
    device: str | None = None

    def validate(self) -> None:
        if len(self.checkpoints) < 2:
            raise ChatforgeError(f"elo needs two or more checkpoints to compare, got {len(self.checkpoints)}")
        if len(set(self.checkpoints)) != len(self.checkpoints):
            raise ChatforgeError("the same checkpoint is given twice")
        if self.limit < 0 or self.bootstrap < 0 or self.max_new_tokens <= 0:
            raise ChatforgeError("limit and bootstrap must not be negative, max_new_tokens must be positive")


def read_elo_prompts(cfg: EloConfig) -> list[list[Message]]:
    if cfg.prompts:
        from chatforge.data.jsonl import iter_jsonl
        from chatforge.data.preferences import parse_prompt
        conversations = [parse_prompt(record, where) for where, record in iter_jsonl(cfg.prompts)]
    else:
        from chatforge.eval.cli import world_of
        from chatforge.eval.gold import load_eval
        conversations = [r["messages"] for r in load_eval(world_of(cfg.checkpoints[0], cfg.world or None), cfg.split)]
    conversations = conversations[:cfg.limit] if cfg.limit else conversations
    if not conversations:
        raise ChatforgeError(f"{cfg.prompts or 'the eval split'}: no prompts to answer")
    return conversations


def answer_all(checkpoint: str, conversations: list[list[Message]], cfg: EloConfig) -> list[str]:
    """One answer per conversation from `checkpoint`, through the engine."""
    from chatforge.data.chat import fit_messages
    from chatforge.infer.engine import Engine, SamplingParams
    engine = Engine.load(checkpoint, device=cfg.device)
    context = engine.model.config.max_position_embeddings - getattr(engine.model, "num_virtual_tokens", 0)
    if cfg.max_new_tokens >= context:
        raise ChatforgeError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in the "
                             f"{context}-token context of {checkpoint}")
    prompts = [fit_messages(engine.tokenizer, m, context - cfg.max_new_tokens, for_generation=True).ids
               for m in conversations]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            stop_ids=list(engine.tokenizer.stop_ids), seed=cfg.seed)
    return [g.text.strip() for g in engine.generate(prompts, params)]


def judge_games(conversations: list[list[Message]], answers: list[list[str]], judge: str,
                device: str | None = None) -> list[Game]:
    """Every pair of models on every prompt, judged by the gold labeler or by a reward model's scores."""
    n_models = len(answers)
    if judge == "gold":
        from chatforge.data.world.labeler import GoldLabeler
        labeler = GoldLabeler()

        def verdict(p: int, a: int, b: int) -> int:  # 1, 0 or -1
            return labeler.prefers(conversations[p], answers[a][p], answers[b][p])
    else:
        from chatforge.checkpoint import load_model
        from chatforge.device import pick_device
        from chatforge.train.reward import score_answers
        model, tokenizer, _ = load_model(judge, pick_device(device), expect_kind=("reward",))
        flat = score_answers(model, tokenizer, [(conversations[p], answers[m][p]) for m in range(n_models)
                                                for p in range(len(conversations))])
        rewards = np.array(flat).reshape(n_models, len(conversations))

        def verdict(p: int, a: int, b: int) -> int:
            return int(np.sign(rewards[a, p] - rewards[b, p]))
    return [Game(p, a, b, (verdict(p, a, b) + 1) / 2)
            for p in range(len(conversations)) for a, b in combinations(range(n_models), 2)]


def check_kinds(cfg: EloConfig) -> None:
    """Refuse, before any model answers, a player that cannot answer or a judge that is not a reward model."""
    expected = [(ckpt, ("base", "sft", "policy", "adapter")) for ckpt in cfg.checkpoints]
    for ckpt, kinds in expected + ([(cfg.judge, ("reward",))] if cfg.judge != "gold" else []):
        kind = read_meta(ckpt)["kind"]
        if kind not in kinds:
            raise ChatforgeError(f"{ckpt}: is a {kind} checkpoint, expected {' or '.join(kinds)}")


def elo(cfg: EloConfig) -> dict[str, Any]:
    """`chatforge eval elo`: the models answer the same prompts, a judge compares them pairwise, Elo ranks them."""
    cfg.validate()
    check_kinds(cfg)
    conversations = read_elo_prompts(cfg)
    judge = "gold" if cfg.judge == "gold" else str(resolve(cfg.judge))
    answers = []
    for ckpt in cfg.checkpoints:
        start = time.perf_counter()
        answers.append(answer_all(ckpt, conversations, cfg))
        print(f"elo: {ckpt} answered {len(conversations)} prompts in {time.perf_counter() - start:.0f}s",
              file=sys.stderr, flush=True)
    games = judge_games(conversations, answers, judge, cfg.device)
    ratings = elo_ratings(games, list(cfg.checkpoints), cfg.bootstrap, seed=cfg.seed)
    result = {"judge": judge, "prompts": len(conversations), "games": len(games), "temperature": cfg.temperature,
              "ratings": [asdict(r) for r in ratings]}
    print(f"Elo from {len(games)} games on {len(conversations)} prompts, judged by "
          f"{'the gold labeler' if judge == 'gold' else judge} (95% bootstrap interval over prompts):")
    width = max(len(r.name) for r in ratings)
    for rank, r in enumerate(ratings, 1):
        print(f"{rank:>2}. {r.name:<{width}}  {r.elo:7.1f}  [{r.low:7.1f}, {r.high:7.1f}]  "
              f"wins {r.wins:g}/{r.games} ({r.wins / max(r.games, 1):.0%})")
    if cfg.out:
        result["answers"] = [{"messages": m, **{ckpt: answers[i][p] for i, ckpt in enumerate(cfg.checkpoints)}}
                             for p, m in enumerate(conversations)]
        atomic_write_text(cfg.out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        print(f"ratings and answers: {cfg.out}")
    return result


def register_elo(esub: argparse._SubParsersAction) -> None:
    """Adds `elo` to the `chatforge eval` group."""
    p = esub.add_parser("elo", help="Elo ratings of several checkpoints from pairwise judgements of their answers")
    p.add_argument("cfg_checkpoints", nargs="+", metavar="CKPT")
    add_config_args(p, EloConfig, skip=("checkpoints",))

    def run(args: argparse.Namespace) -> None:
        elo(config_from_args(EloConfig, args, section="elo"))
    p.set_defaults(func=run)
