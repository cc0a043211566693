"""`chatforge run`: the whole recipe from one config, skipping stages whose inputs and settings are unchanged.

    world -> pretrain -> sft -> collect (K answers ranked by the gold labeler) -> reward -> ppo | dpo -> eval -> report

Each stage reads checkpoint directories and writes one under runs/<name>/. `pipeline.json` there records a
fingerprint (the stage's settings and its inputs' fingerprints) for every finished stage, so a re-run, or a run
that was interrupted, starts at the first stage that is not done; an interrupted stage resumes from its state.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from chatforge import ChatforgeError, __version__
from chatforge.checkpoint import RunLock, atomic_write_text, file_hash, is_complete
from chatforge.config import from_dict, read_toml
from chatforge.data.world.generate import HABITS

STAGES = ("world", "pretrain", "sft", "collect", "reward", "ppo", "dpo", "eval", "report")
SIZES = ("small", "default", "large")


@dataclass
class RunSettings:
    name: str = "tiny-world"
    out: str = "runs"
    size: str = "default"            # the world's size
    seed: int = 0
    device: str | None = None
    threads: int = 0                 # torch CPU threads; 0 = torch's default
    world: str = ""                  # an existing world directory instead of generating one
    align: list[str] = field(default_factory=lambda: ["ppo", "dpo"])
    # stage -> an existing checkpoint to use instead of training it (e.g. pretrain = an imported SmolLM2);
    # pretrain may also name what `chatforge import` reads (a .gguf file, a Hugging Face directory or Hub id):
    # the pretrain stage then imports it
    use: dict[str, str] = field(default_factory=dict)
    estimates: dict[str, float] = field(default_factory=dict)  # seconds per stage, printed in the plan

    def validate(self) -> None:
        if self.size not in SIZES:
            raise ChatforgeError(f"run.size: must be one of {', '.join(SIZES)}, got {self.size!r}")
        unknown = [a for a in self.align if a not in ("ppo", "dpo")]
        if unknown:
            raise ChatforgeError(f"run.align: unknown stage {unknown[0]!r} (ppo, dpo)")
        for stage, path in self.use.items():
            if stage not in ("pretrain", "sft", "reward", "ppo", "dpo"):
                raise ChatforgeError(f"run.use: {stage!r} is not a checkpoint stage (pretrain, sft, reward, ppo, dpo)")
            if not is_complete(path) and not (stage == "pretrain" and importable(path)):
                raise ChatforgeError(f"run.use.{stage}: {path} is not a complete checkpoint directory"
                                     + (", a .gguf file, a Hugging Face model directory or a Hub id"
                                        if stage == "pretrain" else ""))


def importable(source: str) -> bool:
    """What `chatforge import` reads: a .gguf file, a Hugging Face model directory, or a Hub id (org/name)."""
    path = Path(source)
    if path.exists():
        return path.suffix == ".gguf" and path.is_file() or (path / "config.json").is_file()
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", source)) and not source.startswith((".", "/"))


@dataclass
class Run:
    """A run's settings, each stage's raw config section, and where things go."""
    settings: RunSettings
    sections: dict[str, dict[str, Any]]
    source: str

    @property
    def dir(self) -> Path:
        return Path(self.settings.out) / self.settings.name

    @property
    def world(self) -> Path:
        return Path(self.settings.world) if self.settings.world else self.dir / "world"

    def imported(self, stage: str) -> bool:
        """use.pretrain names an import source rather than a checkpoint: the pretrain stage imports it."""
        return stage == "pretrain" and stage in self.settings.use and not is_complete(self.settings.use[stage])

    def given(self, stage: str) -> bool:
        """The stage is an existing checkpoint, used as it is."""
        return stage in self.settings.use and not self.imported(stage)

    def stage_dir(self, stage: str) -> Path:
        return Path(self.settings.use[stage]) if self.given(stage) else self.dir / stage

    @property
    def rankings(self) -> Path:
        return self.dir / "collect" / "rankings.jsonl"

    def stages(self) -> list[str]:
        return [s for s in STAGES if s not in ("ppo", "dpo") or s in self.settings.align]


def load_run(config: str | None, size: str | None = None, overrides: dict[str, Any] | None = None) -> Run:
    """The embedded config for `size` (default: "default"), or a user's TOML file; unknown sections are errors."""
    if config:
        data, source = read_toml(config), str(config)
    else:
        name = f"{size or 'default'}.toml"
        if (size or "default") not in SIZES:
            raise ChatforgeError(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
        data = __import__("tomllib").loads(resources.files("chatforge.configs").joinpath(name).read_text())
        source = f"chatforge/configs/{name}"
    unknown = sorted(set(data) - {"run", *STAGES})
    if unknown:
        raise ChatforgeError(f"{source}: unknown section [{unknown[0]}] (known: run, {', '.join(STAGES)})")
    run_data = dict(data.get("run", {}))
    if size and config:
        run_data["size"] = size
    run_data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    settings = from_dict(RunSettings, run_data, f"{source} [run]")
    sections = {s: dict(data.get(s, {})) for s in STAGES}
    return Run(settings, sections, source)


# ------------------------------------------------------------------ the stages
# Each takes the run and its own section (the stage's config keys), fills in the paths the pipeline owns,
# runs the stage's one function and returns a small summary for the report.

def _common(run: Run, cls: type, section: dict[str, Any], **paths: Any) -> Any:
    """The stage's config: its section, the run-wide settings it has fields for, then the pipeline's paths."""
    s = run.settings
    fields = cls.__dataclass_fields__
    data = dict(section)
    shared = {"seed": s.seed, "device": s.device, "threads": s.threads, "world": str(run.world)}
    for key, value in shared.items():
        if key in fields and key not in data and value:
            data[key] = value
    data.update(paths)
    return from_dict(cls, data, f"{run.source} [{cls.__name__}]")


@dataclass
class WorldSection:
    size: str = ""                   # default: [run] size
    habits: float = HABITS           # share of fact/arithmetic/follow-up demonstrations ending with a pleasantry


def stage_world(run: Run, section: dict[str, Any]) -> dict[str, Any]:
    from chatforge.data.world.generate import generate_world
    if run.settings.world:
        return json.loads((run.world / "world.json").read_text())
    cfg = from_dict(WorldSection, section, f"{run.source} [world]")
    return generate_world(run.world, cfg.size or run.settings.size, run.settings.seed,
                          habits=cfg.habits)


def stage_pretrain(run: Run, section: dict[str, Any]) -> dict[str, Any]:
    if run.imported("pretrain"):
        from chatforge.hub import import_checkpoint
        source = run.settings.use["pretrain"]
        out, meta = import_checkpoint(source, run.stage_dir("pretrain"), force=True)
        return {"imported": source, "kind": meta["kind"], **meta["metrics"]}
    from chatforge.train.pretrain import PretrainConfig, pretrain
    cfg = _common(run, PretrainConfig, section, data=[str(run.world / "corpus")])
    out = run.stage_dir("pretrain")
    return pretrain(cfg, out, resume=(out / "state").exists() or out.with_name(out.name + ".run").exists())


def stage_sft(run: Run, section: dict[str, Any]) -> dict[str, Any]:
    from chatforge.train.sft import SFTConfig, run_sft
    out = run.stage_dir("sft")
    cfg = _common(run, SFTConfig, section, base=str(run.stage_dir("pretrain")), out=str(out),
                  resume=(out / "state").exists())
    run_sft(cfg)
    return _meta_metrics(out)


def stage_collect(run: Run, section: dict[str, Any]) -> dict[str, Any]:
    from chatforge.train.reward import CollectConfig, collect
    cfg = _common(run, CollectConfig, section, policy=str(run.stage_dir("sft")), out=str(run.rankings))
    path = collect(cfg)
    return {"comparisons": sum(1 for _ in open(path))}


def stage_reward(run: Run, section: dict[str, Any]) -> dict[str, Any]:
    from chatforge.train.reward import RewardConfig, train_reward
    out = run.stage_dir("reward")
    cfg = _common(run, RewardConfig, section, init=str(run.stage_dir("sft")), data=[str(run.rankings)],
                  out=str(out))
    train_reward(cfg)
    return _meta_metrics(out)


def stage_ppo(run: Run, section: dict[str, Any]) -> dict[str, Any]:
    from chatforge.train.ppo import PPOConfig, run_ppo
    out = run.stage_dir("ppo")
    paths = {"policy": str(run.stage_dir("sft")), "reward_model": str(run.stage_dir("reward")),
             "prompts": str(run.world / "prompts" / "ppo.jsonl"), "out": str(out), "resume": (out / "state").exists()}
    if "ptx_corpus" not in section:
        paths["ptx_corpus"] = [str(run.world / "corpus")]
    if section.get("eval_every") and "eval_prompts" not in section:  # track gold and proxy on the dev split
        paths.update(eval_prompts=str(run.world / "eval" / "dev.jsonl"), gold=True)
    run_ppo(_common(run, PPOConfig, section, **paths))
    return _meta_metrics(out)


def stage_dpo(run: Run, section: dict[str, Any]) -> dict[str, Any]:
    from chatforge.train.dpo import DPOConfig, run_dpo
    out = run.stage_dir("dpo")
    run_dpo(_common(run, DPOConfig, section, policy=str(run.stage_dir("sft")), data=[str(run.rankings)],
                    out=str(out)))
    return _meta_metrics(out)


def stage_eval(run: Run, section: dict[str, Any]) -> dict[str, Any]:
    from chatforge.eval.run_eval import EvalConfig, evaluate_run
    models = {"base": run.stage_dir("pretrain"), "sft": run.stage_dir("sft")}
    models.update({a: run.stage_dir(a) for a in run.settings.align})
    cfg = _common(run, EvalConfig, section)
    return evaluate_run(cfg, models, run.world, run.stage_dir("reward"), run.dir / "eval")


def stage_report(run: Run, section: dict[str, Any]) -> dict[str, Any]:
    from chatforge.report import write_report
    state = _read_state(run)
    stage_dirs = {s: run.stage_dir(s) for s in ("pretrain", "sft", "reward", *run.settings.align)}
    paths = write_report(run.dir, state, stage_dirs)
    return {k: str(v) for k, v in paths.items()}


STAGE_FUNCTIONS: dict[str, Callable[[Run, dict[str, Any]], dict[str, Any]]] = {
    "world": stage_world, "pretrain": stage_pretrain, "sft": stage_sft, "collect": stage_collect,
    "reward": stage_reward, "ppo": stage_ppo, "dpo": stage_dpo, "eval": stage_eval, "report": stage_report,
}
# What each stage reads: a stage reruns when one of these changed.
INPUTS: dict[str, tuple[str, ...]] = {
    "world": (), "pretrain": ("world",), "sft": ("world", "pretrain"), "collect": ("world", "sft"),
    "reward": ("world", "sft", "collect"), "ppo": ("world", "sft", "reward"), "dpo": ("sft", "collect"),
    "eval": ("world", "pretrain", "sft", "reward", "ppo", "dpo"), "report": ("eval",),
}


def _meta_metrics(path: Path) -> dict[str, Any]:
    meta = json.loads((path / "meta.json").read_text())
    return meta.get("metrics", {})


def _outputs_exist(run: Run, stage: str) -> bool:
    if stage == "world":
        return (run.world / "world.json").is_file()
    if stage == "collect":
        return run.rankings.is_file()
    if stage == "eval":
        return (run.dir / "eval" / "summary.json").is_file()
    if stage == "report":
        return (run.dir / "report.json").is_file() and (run.dir / "report.html").is_file()
    return is_complete(run.stage_dir(stage))


def fingerprint(run: Run, stage: str, done: dict[str, Any]) -> str:
    s = run.settings
    if run.given(stage):  # a given checkpoint: its weights are its identity
        return file_hash(Path(s.use[stage]) / "model.safetensors")
    if run.imported(stage):  # a local source by its contents, a Hub id by its name
        source = Path(s.use[stage])
        weights = source if source.is_file() else next(iter(sorted(source.glob("*.safetensors"))), None)
        return hashlib.sha256(f"import {s.use[stage]} {weights and file_hash(weights)} {__version__}".encode()
                              ).hexdigest()[:16]
    key = {"stage": stage, "section": run.sections.get(stage, {}), "version": __version__,
           "run": {"size": s.size, "seed": s.seed, "world": s.world, "align": s.align if stage == "eval" else None},
           "inputs": {i: done.get(i, {}).get("fingerprint") for i in INPUTS[stage]}}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _set_aside(out: Path) -> None:
    """Keep a stage's earlier output as <stage>.previous (replacing an older one), so the stage starts fresh
    instead of resuming a checkpoint made from other inputs, and nothing is deleted that was not already kept."""
    if out.is_dir() and any(out.iterdir()):
        previous = out.with_name(out.name + ".previous")
        if previous.exists():
            shutil.rmtree(previous)
        out.rename(previous)
        print(f"{out}: made from other settings or inputs; kept as {previous.name}, starting afresh")


def _read_state(run: Run) -> dict[str, Any]:
    path = run.dir / "pipeline.json"
    return json.loads(path.read_text()) if path.is_file() else {"stages": {}}


def _write_state(run: Run, state: dict[str, Any]) -> None:
    atomic_write_text(run.dir / "pipeline.json", json.dumps(state, indent=2, default=str))


def _fmt(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def run_pipeline(run: Run, start: str | None = None, until: str | None = None) -> dict[str, Any]:
    stages = run.stages()
    for name, value in (("--from", start), ("--until", until)):
        if value is not None and value not in stages:
            raise ChatforgeError(f"{name}: unknown stage {value!r} (stages: {', '.join(stages)})")
    first = stages.index(start) if start else 0
    last = stages.index(until) if until else len(stages) - 1
    run.dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run.dir):
        state = _read_state(run)
        done = state["stages"]
        plan = []
        for i, stage in enumerate(stages):
            fp = fingerprint(run, stage, {**done, **{p: {"fingerprint": f} for p, f, _ in plan}})
            finished = done.get(stage, {}).get("fingerprint") == fp and _outputs_exist(run, stage)
            given = run.given(stage)
            input_reruns = any(w for p, _, w in plan if p in INPUTS[stage])  # its inputs will change
            wanted = not given and first <= i <= last and (not finished or start == stage or input_reruns)
            if given:
                done[stage] = {"fingerprint": fp, "seconds": 0.0, "summary": {"given": run.settings.use[stage]}}
            plan.append((stage, fp, wanted))
        _print_plan(run, plan, done)
        timings: dict[str, float] = {}
        for stage, fp, wanted in plan:
            if not wanted:
                continue
            missing = [p for p in INPUTS[stage] if p in stages and p not in done and p not in timings]
            if missing and stage != "report":
                raise ChatforgeError(f"stage {stage} needs {', '.join(missing)}, which has not run: "
                                     f"start earlier (--from {missing[0]})")
            print(f"\n== {stage} " + "=" * (60 - len(stage)))
            started = state.setdefault("started", {})
            if started.get(stage) != fp:  # not the same stage interrupted: what is there came from other inputs
                _set_aside(run.dir / stage)
            started[stage] = fp
            _write_state(run, state)
            t0 = time.time()
            summary = STAGE_FUNCTIONS[stage](run, run.sections.get(stage, {}))
            timings[stage] = time.time() - t0
            done[stage] = {"fingerprint": fp, "seconds": round(timings[stage], 1), "summary": summary,
                           "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            _write_state(run, state)
            print(f"== {stage} done in {_fmt(timings[stage])}")
        _print_end(run, stages, done, timings)
        return state


def _print_plan(run: Run, plan: list[tuple[str, str, bool]], done: dict[str, Any]) -> None:
    s = run.settings
    print(f"chatforge run {run.settings.name}: {run.source} (world size {s.size}, seed {s.seed}) -> {run.dir}")
    total = 0.0
    for stage, _, wanted in plan:
        estimate = done.get(stage, {}).get("seconds") or s.estimates.get(stage, 0)
        if wanted:
            total += estimate
        status = ("given" if run.given(stage) else ("import" if run.imported(stage) else "run") if wanted
                  else "done, skipped" if stage in done else "not in range")
        print(f"  {stage:<9} {status:<14} ~{_fmt(estimate)}")
    print(f"  estimated total ~{_fmt(total)}")


def _print_end(run: Run, stages: list[str], done: dict[str, Any], timings: dict[str, float]) -> None:
    print("\nstage      seconds")
    for stage in stages:
        if stage in done:
            mark = "" if stage in timings else "  (earlier run)"
            print(f"  {stage:<9} {done[stage]['seconds']:>7.1f}{mark}")
    print(f"  total     {sum(timings.values()):>7.1f} this run")
    chat_ready = next((run.stage_dir(a) for a in ("ppo", "dpo", "sft") if is_complete(run.stage_dir(a))), None)
    if (run.dir / "report.html").is_file():
        print(f"report: {run.dir / 'report.html'}")
    if chat_ready:
        print(f"chat-ready model: {chat_ready}\ntalk to it:  chatforge chat {chat_ready}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the whole recipe in one command (default: the embedded tiny world)")
    p.add_argument("config", nargs="?", help="a run config TOML (default: the embedded tiny-world config)")
    p.add_argument("--size", choices=SIZES, help="the world's size and stage budgets (embedded configs)")
    p.add_argument("--name", help="run name: the directory under --out")
    p.add_argument("--out", help="where runs go (default: runs)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument("--from", dest="start", metavar="STAGE", help=f"first stage ({', '.join(STAGES)})")
    p.add_argument("--until", metavar="STAGE", help="last stage")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> None:
    overrides = {"name": args.name, "out": args.out, "seed": args.seed, "device": args.device}
    if args.size and not args.config and not args.name:
        overrides["name"] = f"tiny-world-{args.size}" if args.size != "default" else None
    run = load_run(args.config, args.size, overrides)
    run_pipeline(run, args.start, args.until)
