"""Plots of PPO runs, from their metrics.jsonl files.

    python -m chatforge.eval.rlhf_plots RUN/metrics.jsonl [MORE/metrics.jsonl ...] --out DIR

- `ppo_training.png`: reward (RM score − β·KL), RM score and KL per iteration, and β.
- `overoptimisation.png`: gold score and proxy (reward model) score on held-out prompts against √KL from the
  SFT model, Gao et al.'s (2022) view of reward over-optimisation: the proxy keeps rising with √KL while the
  gold score peaks and falls once the policy exploits the reward model. Needs a run with `eval_prompts`,
  `eval_every` and `gold` set (the evaluation rows of metrics.jsonl).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from chatforge import ChatforgeError
from chatforge.data.jsonl import read_jsonl


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows) of a PPO metrics.jsonl."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    rows = [row for _, row in read_jsonl(path, "metrics file")]
    train = [r for r in rows if "reward" in r]
    evals = [r for r in rows if "eval_kl" in r]
    if not train:
        raise ChatforgeError(f"{path}: no PPO iterations in the file")
    return train, evals


def plot_training(runs: dict[str, list[dict]], out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, rows in runs.items():
        it = [r["iteration"] for r in rows]
        axes[0].plot(it, [r["reward"] for r in rows], label=f"{name}: reward")
        axes[0].plot(it, [r["rm_score"] for r in rows], "--", label=f"{name}: RM score")
        axes[1].plot(it, [r["kl"] for r in rows], label=name)
        axes[2].plot(it, [r["kl_coef"] for r in rows], label=name)
    for ax, title in zip(axes, ("reward = RM score − β·KL", "KL to the SFT model (nats per answer)", "β (kl_coef)")):
        ax.set_xlabel("PPO iteration")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "ppo_training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_overoptimisation(runs: dict[str, list[dict]], out: Path) -> Path | None:
    runs = {n: rows for n, rows in runs.items() if rows}
    if not runs:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in runs.items():
        root_kl = [math.sqrt(max(r["eval_kl"], 0.0)) for r in rows]
        line = ax.plot(root_kl, [r["eval_rm_score"] for r in rows], "--o", ms=3, label=f"{name}: proxy (RM)")[0]
        if all("eval_gold_score" in r for r in rows):
            ax.plot(root_kl, [r["eval_gold_score"] for r in rows], "-o", ms=3, color=line.get_color(),
                    label=f"{name}: gold")
    ax.set_xlabel("√KL(policy ‖ SFT)  (√nats)")
    ax.set_ylabel("score on held-out prompts")
    ax.set_title("Gold and proxy reward against √KL (Gao et al. 2022)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "overoptimisation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_runs(metrics: list[str | Path], out: str | Path) -> list[Path]:
    """Both figures for one or more runs (named by their directory); returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, evals = {}, {}
    for m in metrics:
        path = Path(m)
        name = (path if path.is_dir() else path.parent).name
        train[name], evals[name] = read_metrics(path)
    written = [plot_training(train, out)]
    over = plot_overoptimisation(evals, out)
    if over is not None:
        written.append(over)
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", nargs="+", help="PPO metrics.jsonl files or checkpoint directories holding one")
    p.add_argument("--out", default=".", help="directory for the PNG files")
    args = p.parse_args(argv)
    try:
        for path in plot_runs(args.metrics, args.out):
            print(path)
    except ChatforgeError as e:
        raise SystemExit(f"rlhf_plots: error: {e}")


if __name__ == "__main__":
    main()
