"""Iterated RLHF rounds on human feedback: retrain the reward model as comparisons come in, continue PPO,
and check that each round's policy beats the last (Anthropic's weekly "online" rounds; InstructGPT too).

    chatforge feedback round --run runs/demo --world world         (the next round)

Round N writes runs/<run>/rounds/round-N/:
  1. comparisons.jsonl  every comparison in the feedback store so far (and in --extra-comparisons), less
                        those on the fixed held-out prompts
  2. reward/            a reward model trained from the SFT model on them (retrained, not fine-tuned: the
                        comparisons of all rounds together, as InstructGPT did)
  3. ppo/               PPO continued from the current policy: round N-1's; for round 1, --policy (default
                        the run's ppo/ if there is one, else the SFT model), which is "round 0"
  4. answers.json       the new policy's greedy answers to the evaluation prompts
  5. round.json         written last, so a round with it is done and never rerun: the reward model's held-out
                        accuracy (and the previous one's on the same comparisons), the new policy's score and
                        its paired difference with the previous policy (95% bootstrap interval), the
                        comparisons used (new since the last round, trained on)
and updates rounds/elo.json and rounds/report.md: the Elo of every round's policy from pairwise judgements
of their answers to the same prompts. In the tiny world the judge is the gold labeler; elsewhere it is the
newest reward model. A stage whose checkpoint is complete is not redone when a crashed round is restarted.
Optionally the round ends by queueing ranking tasks sampled from the new policy, so labelers have the next
round's work.

A run of `chatforge run` has the layout this expects (<run>/sft, <run>/ppo, and <run>/collect/rankings.jsonl
to pass as --extra-comparisons), so `chatforge feedback round --run runs/<name> --world ...` continues it.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chatforge import ChatforgeError
from chatforge.checkpoint import atomic_write_text, is_complete
from chatforge.config import add_config_args, config_from_args
from chatforge.data.jsonl import iter_jsonl, write_jsonl
from chatforge.data.preferences import parse_prompt
from chatforge.feedback.export import export_records
from chatforge.feedback.store import FeedbackStore
from chatforge.tokenizer import Message


@dataclass
class RoundConfig:
    run: str = "runs/default"        # the run directory: its rounds/ (and feedback.db by default)
    db: str = ""                     # the feedback store; default <run>/feedback.db
    sft: str = ""                    # the SFT checkpoint: reward model init; default <run>/sft
    policy: str = ""                 # round 0, which round 1 continues: default <run>/ppo if complete, else sft
    world: str = ""                  # tiny world: gold judge, PPO and evaluation prompts by default
    round: int = 0                   # which round to run; 0 = the next one
    ppo_prompts: str = ""            # default <world>/prompts/ppo.jsonl
    eval_prompts: str = ""           # default the world's eval split (--eval-split)
    eval_split: str = "dev"
    eval_limit: int = 150
    heldout: str = ""                # held-out comparisons; default: heldout_fraction of round 1's prompts, kept
    heldout_fraction: float = 0.2
    extra_comparisons: list[str] = field(default_factory=list)  # earlier comparison files (e.g. `reward collect`
                                                                 # output) trained on too, held-out prompts left out
    reward_epochs: float = 2.0       # small world, 72 comparisons: 2 x 1e-4 reached 71% held out, 1 x 5e-5 54%
    reward_lr: float = 1e-4
    reward_batch_size: int = 8
    ppo_iterations: int = 20
    rollout_batch: int = 32
    minibatch: int = 16
    ppo_lr: float = 1e-5
    kl_coef: float = 0.05
    max_new_tokens: int = 48
    next_tasks: int = 0              # ranking tasks to queue from the new policy for the next round
    next_prompts: str = ""           # default <world>/prompts/reward.jsonl
    min_answers: int = 4
    max_answers: int = 9
    bootstrap: int = 1000
    seed: int = 0
    device: str | None = None
    threads: int = 0

    def validate(self) -> None:
        checks = [
            (self.round >= 0, f"round must be >= 0 (0 = the next one), got {self.round}"),
            (0 < self.heldout_fraction < 1, f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}"),
            (self.eval_limit >= 0 and self.next_tasks >= 0, "eval_limit and next_tasks must not be negative"),
            (self.world or (self.ppo_prompts and self.eval_prompts),
             "without --world, give --ppo-prompts and --eval-prompts"),
        ]
        for ok, message in checks:
            if not ok:
                raise ChatforgeError(message)


def round_dir(cfg: RoundConfig, n: int) -> Path:
    return Path(cfg.run) / "rounds" / f"round-{n}"


def done_rounds(cfg: RoundConfig) -> list[dict[str, Any]]:
    """round.json of every finished round, in order (round 1 first)."""
    out, n = [], 1
    while (round_dir(cfg, n) / "round.json").is_file():
        out.append(json.loads((round_dir(cfg, n) / "round.json").read_text()))
        n += 1
    return out


def prompt_key(messages: list[Message]) -> str:
    return json.dumps(messages, ensure_ascii=False, sort_keys=True)


def fixed_heldout(cfg: RoundConfig, records: list[dict[str, Any]]) -> Path:
    """The held-out comparisons every round's reward model is judged on: --heldout, else a seeded share of
    the prompts labelled by the first round, written once to rounds/heldout.jsonl."""
    if cfg.heldout:
        return Path(cfg.heldout)
    path = Path(cfg.run) / "rounds" / "heldout.jsonl"
    if not path.is_file():
        prompts = sorted({prompt_key(r["messages"]) for r in records})
        if len(prompts) < 2:
            raise ChatforgeError(f"{len(prompts)} labelled prompt(s): a round needs two or more to hold some out")
        random.Random(cfg.seed).shuffle(prompts)
        held = set(prompts[:max(1, round(cfg.heldout_fraction * len(prompts)))])
        write_jsonl(path, [r for r in records if prompt_key(r["messages"]) in held])
    return path


def fitting_prompts(path: str | Path, checkpoint: Path, max_new_tokens: int, out: Path) -> tuple[Path, int]:
    """The prompts of `path` that leave room for an answer in the model's context, written to `out`;
    returns (out, how many were left out)."""
    from chatforge.tokenizer import Tokenizer
    tokenizer = Tokenizer.load(checkpoint)
    context = json.loads((checkpoint / "config.json").read_text())["max_position_embeddings"]
    total, kept = 0, []
    for where, record in iter_jsonl(path):
        total += 1
        if len(tokenizer.prompt(parse_prompt(record, where))) + max_new_tokens <= context:
            kept.append(record)
    if not kept:
        raise ChatforgeError(f"{path}: no prompt leaves {max_new_tokens} tokens for an answer in the context of "
                             f"{context}")
    write_jsonl(out, kept)
    return out, total - len(kept)


def training_comparisons(cfg: RoundConfig, records: list[dict[str, Any]], held: set[str]) -> list[dict[str, Any]]:
    """The extra comparison files' records and the store's, less any on a held-out prompt."""
    extra = []
    for path in cfg.extra_comparisons:
        for where, record in iter_jsonl(path):
            messages = parse_prompt(record, where)
            rest = {k: v for k, v in record.items() if k not in ("prompt", "messages")}
            extra.append({"messages": messages, **rest})
    return [r for r in extra + records if prompt_key(r["messages"]) not in held]


def eval_conversations(cfg: RoundConfig) -> tuple[list[list[Message]], list[dict[str, Any]] | None]:
    """The evaluation prompts, and the world's records (for the gold labeler) when judged in the tiny world."""
    if cfg.eval_prompts:
        from chatforge.feedback.tasks import read_prompt_file
        return read_prompt_file(cfg.eval_prompts, cfg.eval_limit), None
    from chatforge.eval.gold import load_eval
    records = load_eval(cfg.world, cfg.eval_split)
    records = records[:cfg.eval_limit] if cfg.eval_limit else records
    return [r["messages"] for r in records], records


def policy_answers(checkpoint: str | Path, conversations: list[list[Message]], cache: Path,
                   cfg: RoundConfig) -> list[str]:
    """Greedy answers of a policy, cached in `cache` (each round's policy answers once)."""
    from chatforge.eval.elo import EloConfig, answer_all
    key = {"checkpoint": str(checkpoint), "prompts": [prompt_key(m) for m in conversations],
           "max_new_tokens": cfg.max_new_tokens}
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved["key"] == key:
            return saved["answers"]
    answers = answer_all(str(checkpoint), conversations, EloConfig(max_new_tokens=cfg.max_new_tokens,
                                                                   temperature=0.0, seed=cfg.seed, device=cfg.device))
    atomic_write_text(cache, json.dumps({"key": key, "answers": answers}, ensure_ascii=False) + "\n")
    return answers


def policy_scores(conversations: list[list[Message]], records: list[dict[str, Any]] | None, answers: list[str],
                  reward_model: Path, device: str | None) -> tuple[list[float], str]:
    """Per-prompt scores of one answer each: the gold labeler's in the tiny world, else the reward model's."""
    if records is not None:
        from chatforge.data.world.labeler import GoldLabeler
        labeler = GoldLabeler()
        return [labeler.score(m, a).total for m, a in zip(conversations, answers)], "gold"
    from chatforge.checkpoint import load_model
    from chatforge.device import pick_device
    from chatforge.train.reward import score_answers
    model, tokenizer, _ = load_model(reward_model, pick_device(device), expect_kind=("reward",))
    return score_answers(model, tokenizer, list(zip(conversations, answers))), str(reward_model)


def heldout_accuracy(reward_model: Path, heldout: Path, gold: bool, device: str | None,
                     seed: int = 0) -> dict[str, float]:
    """Pairwise accuracy of a reward model on the held-out comparisons (ranked by the noise-free gold labeler
    in the tiny world, else as labelled), with a 95% interval that resamples prompts: a prompt's pairs
    share its answers, so they are not independent draws."""
    import numpy as np

    from chatforge.checkpoint import load_model
    from chatforge.data.preferences import ranking_pairs, read_comparisons
    from chatforge.data.world.labeler import GoldLabeler
    from chatforge.device import pick_device
    from chatforge.train.reward import score_answers
    model, tokenizer, _ = load_model(reward_model, pick_device(device), expect_kind=("reward",))
    comparisons = read_comparisons(heldout)
    rewards = score_answers(model, tokenizer, [(c.messages, a) for c in comparisons for a in c.answers])
    labeler = GoldLabeler() if gold else None
    per_prompt, offset = [], 0
    for c in comparisons:
        r = rewards[offset:offset + len(c.answers)]
        offset += len(c.answers)
        if labeler is None:
            pairs = c.pairs()
        else:
            tiers = labeler.rank(c.messages, c.answers)
            order = [i for tier in tiers for i in tier]
            pairs = [(order[i], order[j]) for i, j in ranking_pairs([len(t) for t in tiers])]
        if pairs:
            per_prompt.append((sum(r[i] > r[j] for i, j in pairs), len(pairs)))
    if not per_prompt:
        raise ChatforgeError(f"{heldout}: no held-out pair is ranked apart")
    counts = np.array(per_prompt, dtype=float)
    draws = counts[np.random.default_rng(seed).integers(0, len(counts), size=(1000, len(counts)))].sum(1)
    low, high = np.percentile(draws[:, 0] / draws[:, 1], [2.5, 97.5])
    return {"accuracy": float(counts[:, 0].sum() / counts[:, 1].sum()), "pairs": int(counts[:, 1].sum()),
            "prompts": len(counts), "ci_low": float(low), "ci_high": float(high)}


def update_elo(cfg: RoundConfig, conversations: list[list[Message]], judge: str, start: Path,
               rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Elo of round 0 (the starting policy) and every round's policy, on the same prompts, from cached answers."""
    from chatforge.eval.elo import elo_ratings, judge_games
    players = [("round-0", start, Path(cfg.run) / "rounds" / "round-0" / "answers.json")]
    players += [(f"round-{r['round']}", Path(r["policy"]), round_dir(cfg, r["round"]) / "answers.json")
                for r in rounds]
    answers = [policy_answers(ckpt, conversations, cache, cfg) for _, ckpt, cache in players]
    games = judge_games(conversations, answers, judge, cfg.device)
    ratings = [asdict(r) for r in elo_ratings(games, [name for name, _, _ in players], cfg.bootstrap, seed=cfg.seed)]
    atomic_write_text(Path(cfg.run) / "rounds" / "elo.json",
                      json.dumps({"judge": judge, "prompts": len(conversations), "games": len(games),
                                  "ratings": ratings}, indent=2) + "\n")
    return ratings


def write_report(cfg: RoundConfig, rounds: list[dict[str, Any]], ratings: list[dict[str, Any]]) -> Path:
    elo = {r["name"]: r for r in ratings}
    lines = ["# RLHF rounds", "",
             f"Policies answer the same {rounds[-1]['eval_prompts']} prompts greedily; judged by "
             f"{rounds[-1]['judge']}. Rounds run with `{rounds[-1]['command']}`; each round's settings are in "
             "round-N/round.json.", "",
             "| round | comparisons: new, trained on | reward held-out accuracy (95% CI) | score "
             "| vs previous round (95% CI) | Elo (95% CI) |", "|---|---|---|---|---|---|"]
    r0 = elo["round-0"]
    lines.append(f"| 0 ({Path(rounds[0]['previous_policy']).name}) | | | {rounds[0]['previous_score']:.3f} | | "
                 f"{r0['elo']:.0f} ({r0['low']:.0f}..{r0['high']:.0f}) |")
    for r in rounds:
        e, d = elo[f"round-{r['round']}"], r["difference"]
        a, p = r["reward_accuracy"], r["previous_reward_accuracy"]
        previous = "" if p is None else f"; round {r['round'] - 1}'s {p['accuracy']:.3f}"
        lines.append(f"| {r['round']} | {r['comparisons_new']}, {r['comparisons']} | {a['accuracy']:.3f} "
                     f"({a['ci_low']:.3f}..{a['ci_high']:.3f}{previous}) | {r['score']:.3f} "
                     f"| {d['mean']:+.3f} ({d['ci_low']:+.3f}..{d['ci_high']:+.3f}) "
                     f"| {e['elo']:.0f} ({e['low']:.0f}..{e['high']:.0f}) |")
    path = Path(cfg.run) / "rounds" / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def run_round(cfg: RoundConfig) -> dict[str, Any]:
    """One round; returns its round.json summary."""
    import torch

    from chatforge.eval.stats import mean_ci, paired_difference
    from chatforge.train.ppo import PPOConfig, run_ppo
    from chatforge.train.reward import RewardConfig, train_reward
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rounds = done_rounds(cfg)
    n = len(rounds) + 1
    if cfg.round and cfg.round != n:
        raise ChatforgeError(f"round {cfg.round}: {'it is done' if cfg.round < n else 'not next'}; "
                             f"{len(rounds)} round(s) are done in {cfg.run}, so the next is round {n}")
    sft = Path(cfg.sft or Path(cfg.run) / "sft")
    if not is_complete(sft):
        raise ChatforgeError(f"{sft}: no SFT checkpoint (give --sft)")
    run_ppo_dir = Path(cfg.run) / "ppo"
    first_policy = Path(cfg.policy) if cfg.policy else (run_ppo_dir if is_complete(run_ppo_dir) else sft)
    if not is_complete(first_policy):
        raise ChatforgeError(f"{first_policy}: no policy checkpoint to start from (give --policy)")
    policy = Path(rounds[-1]["policy"]) if rounds else first_policy
    out = round_dir(cfg, n)
    start = time.time()
    store = FeedbackStore.open(cfg.db or Path(cfg.run) / "feedback.db")

    # 1. the comparisons so far, the held-out prompts set apart
    rows = store.submissions()
    watermark = max((sub.id for sub, _, _ in rows), default=0)
    since = rounds[-1]["last_submission_id"] if rounds else 0
    records, skipped = export_records(store, "comparisons")
    new = len(export_records(store, "comparisons", after_id=since)[0])
    if not new:
        raise ChatforgeError(f"no new comparisons in the feedback store since round {n - 1}: label some first "
                             "(the labeling app, or `chatforge feedback simulate`)")
    heldout = fixed_heldout(cfg, records)
    held = {prompt_key(parse_prompt(record, where)) for where, record in iter_jsonl(heldout, "held-out file")}
    train = training_comparisons(cfg, records, held)
    write_jsonl(out / "comparisons.jsonl", train)
    print(f"round {n}: {len(train)} comparisons to train on ({new} new since round {n - 1}, "
          f"{len(cfg.extra_comparisons)} earlier file(s); those on the held-out prompts of {heldout} set apart), "
          f"policy {policy}", file=sys.stderr, flush=True)

    # 2. the reward model, retrained on everything so far
    reward = out / "reward"
    if not is_complete(reward):
        train_reward(RewardConfig(init=str(sft), data=[str(out / "comparisons.jsonl")],
                                  heldout=str(heldout), world=cfg.world, out=str(reward), epochs=cfg.reward_epochs,
                                  lr=cfg.reward_lr, batch_size=cfg.reward_batch_size, seed=cfg.seed + n,
                                  device=cfg.device, threads=cfg.threads))
    gold = bool(cfg.world)
    accuracy = heldout_accuracy(reward, heldout, gold, cfg.device, cfg.seed)
    previous_accuracy = (heldout_accuracy(Path(rounds[-1]["reward_model"]), heldout, gold, cfg.device, cfg.seed)
                         if rounds else None)

    # 3. PPO from the current policy against the new reward model
    ppo = out / "ppo"
    if not is_complete(ppo):
        prompts, too_long = fitting_prompts(cfg.ppo_prompts or Path(cfg.world) / "prompts" / "ppo.jsonl", policy,
                                            cfg.max_new_tokens, out / "ppo_prompts.jsonl")
        if too_long:
            print(f"round {n}: {too_long} PPO prompts left out: too long for the context with "
                  f"{cfg.max_new_tokens} new tokens", file=sys.stderr)
        run_ppo(PPOConfig(policy=str(policy), reward_model=str(reward), out=str(ppo), prompts=str(prompts),
                          iterations=cfg.ppo_iterations, rollout_batch=cfg.rollout_batch, minibatch=cfg.minibatch,
                          lr=cfg.ppo_lr, kl_coef=cfg.kl_coef, max_new_tokens=cfg.max_new_tokens,
                          seed=cfg.seed + n, device=cfg.device, threads=cfg.threads, progress=False,
                          sample_every=0))

    # 4. the new policy against the previous one, on the same prompts
    conversations, eval_records = eval_conversations(cfg)
    previous_cache = round_dir(cfg, n - 1) / "answers.json"
    before = policy_answers(policy, conversations, previous_cache, cfg)
    after = policy_answers(ppo, conversations, out / "answers.json", cfg)
    score_before, judge = policy_scores(conversations, eval_records, before, reward, cfg.device)
    score_after, _ = policy_scores(conversations, eval_records, after, reward, cfg.device)
    difference = paired_difference(score_after, score_before, seed=cfg.seed)
    summary = {
        "round": n, "policy": str(ppo), "previous_policy": str(policy), "reward_model": str(reward),
        "comparisons": len(train), "comparisons_new": new, "heldout": str(heldout), "skipped": skipped,
        "last_submission_id": watermark, "reward_accuracy": accuracy,
        "previous_reward_accuracy": previous_accuracy,
        "judge": judge, "eval_prompts": len(conversations), "score": mean_ci(score_after)["mean"],
        "score_ci": mean_ci(score_after), "previous_score": mean_ci(score_before)["mean"], "difference": difference,
        "seconds": round(time.time() - start, 1), "config": asdict(cfg),
        "command": f"chatforge feedback round --run {cfg.run}" + (f" --world {cfg.world}" if cfg.world else ""),
    }

    # 5. the Elo table across rounds, then the round is marked done
    ratings = update_elo(cfg, conversations, "gold" if gold else str(reward), first_policy,
                         rounds + [summary])
    summary["elo"] = {r["name"]: r["elo"] for r in ratings}
    atomic_write_text(out / "round.json", json.dumps(summary, indent=2) + "\n")
    report = write_report(cfg, rounds + [summary], ratings)
    print(f"round {n}: reward model held-out accuracy {accuracy['accuracy']:.3f} (95% CI {accuracy['ci_low']:.3f}.."
          f"{accuracy['ci_high']:.3f}, {accuracy['pairs']} pairs of {accuracy['prompts']} prompts)"
          + (f"; round {n - 1}'s: {previous_accuracy['accuracy']:.3f}" if previous_accuracy is not None else "")
          + f"; policy {judge} score {summary['previous_score']:.3f} -> {summary['score']:.3f}, difference "
          f"{difference['mean']:+.3f} (95% CI {difference['ci_low']:+.3f}..{difference['ci_high']:+.3f}) on "
          f"{len(conversations)} prompts; report {report}", file=sys.stderr, flush=True)

    # 6. the next round's work
    if cfg.next_tasks:
        from chatforge.feedback.tasks import add_tasks
        add_tasks(store, "ranking", prompts=cfg.next_prompts or str(Path(cfg.world) / "prompts" / "reward.jsonl"),
                  policy=str(ppo), min_answers=cfg.min_answers, max_answers=cfg.max_answers, limit=cfg.next_tasks,
                  offset=n * cfg.next_tasks, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + n,
                  device=cfg.device)
    store.close()
    return summary


def register_round(fsub: argparse._SubParsersAction) -> None:
    p = fsub.add_parser("round", help="one RLHF round: retrain the reward model on the feedback, continue PPO, "
                                      "evaluate against the last round, update the Elo table")
    add_config_args(p, RoundConfig)
    p.set_defaults(func=lambda args: run_round(config_from_args(RoundConfig, args, section="round")))
