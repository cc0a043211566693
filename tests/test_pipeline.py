"""`chatforge run` end to end at the smallest size: every stage's checkpoint loads, the report is written and
renders, PPO raises the reward model's score over SFT's at a KL above zero, a re-run skips what is done, and a
second run on the same directory is refused by the lock."""
import json
import shutil

import pytest

from chatforge import ChatforgeError
from chatforge.checkpoint import RunLock, load_model
from chatforge.pipeline import load_run, run_pipeline

RUN_TOML = """
[run]
name = "e2e"
out = "{out}"
world = "{world}"
size = "small"
align = ["ppo", "dpo"]
use = {{ pretrain = "{base}", sft = "{sft}" }}

[collect]
limit = 48
min_answers = 4
max_answers = 4
max_new_tokens = 32
threads = 1

[reward]
batch_size = 8
epochs = 2
lr = 1e-4
threads = 1

[ppo]
iterations = 10
rollout_batch = 16
minibatch = 8
max_new_tokens = 32
lr = 1e-4
kl_coef = 0.02
threads = 1

[dpo]
steps = 4
batch_size = 8

[eval]
limit = 24
samples = 2
fewshot_limit = 10
fewshot_k = [0, 1]
kl_prompts = 8
max_new_tokens = 32
"""


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, small_world, base_ckpt, sft_ckpt):
    root = tmp_path_factory.mktemp("pipeline")
    config = root / "run.toml"
    config.write_text(RUN_TOML.format(out=root / "runs", world=small_world, base=base_ckpt, sft=sft_ckpt))
    run = load_run(str(config))
    state = run_pipeline(run)
    return config, run, state


def test_every_stage_produced_a_loadable_checkpoint(e2e):
    _, run, state = e2e
    assert set(state["stages"]) == set(run.stages())
    for stage, kinds in (("pretrain", ("base",)), ("sft", ("sft",)), ("reward", ("reward",)),
                         ("ppo", ("policy",)), ("dpo", ("policy",))):
        model, tokenizer, meta = load_model(run.stage_dir(stage), expect_kind=kinds)
        assert meta["kind"] in kinds and tokenizer.vocab_size == model.config.vocab_size
    assert run.rankings.is_file()


def test_report_files_parse_and_ppo_beats_sft_on_the_reward_model(e2e):
    _, run, _ = e2e
    report = json.loads((run.dir / "report.json").read_text())
    models = report["evaluation"]["models"]
    assert list(models) == ["base", "sft", "ppo", "dpo"]
    assert models["ppo"]["rm_score"] > models["sft"]["rm_score"], (models["ppo"]["rm_score"], models["sft"]["rm_score"])
    assert models["ppo"]["kl_to_sft"]["kl"] > 0
    assert set(models["base"]["fewshot"]) == {"0", "1"}
    assert all(0 <= v["accuracy"] <= v["mentions_answer"] <= 1 for v in models["base"]["fewshot"].values())
    assert {"pretrain", "ppo"} <= set(report["plots"])
    assert "<h2>Models on the gold labeler</h2>" in (run.dir / "report.html").read_text()
    checks = {t["target"]: t for t in report["targets"]}
    assert checks["reward model held-out accuracy >= 80%"]["met"] == (report["evaluation"]["reward_model"]["heldout"]["accuracy"] >= 0.8)
    assert {"PPO harmful compliance <= 2%", "SFT fact accuracy >= 90%"} <= set(checks)
    missed = sum(not t["met"] for t in checks.values())
    assert f"{len(checks) - missed} met, {missed} missed" in (run.dir / "report.html").read_text()


def test_rerun_skips_finished_stages_and_resumes_at_the_first_missing_one(e2e, capsys):
    config, run, state = e2e
    before = {k: v["finished"] for k, v in state["stages"].items() if "finished" in v}
    (run.dir / "eval" / "summary.json").unlink()  # as if the run had stopped during evaluation
    capsys.readouterr()
    again = run_pipeline(load_run(str(config)))
    out = capsys.readouterr().out
    assert "== eval" in out and "== report" in out
    for stage in ("world", "collect", "reward", "ppo", "dpo"):
        assert f"== {stage} " not in out
        assert again["stages"][stage]["finished"] == before[stage]
    assert "pretrain  given" in out


def test_a_second_run_on_the_same_directory_is_refused(e2e):
    config, run, _ = e2e
    with RunLock(run.dir):
        with pytest.raises(ChatforgeError, match=r"in use by pid \d+"):
            run_pipeline(load_run(str(config)))


def test_unknown_section_and_stage_are_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[pretrian]\nsteps = 3\n")
    with pytest.raises(ChatforgeError, match=r"bad.toml: unknown section \[pretrian\]"):
        load_run(str(bad))
    with pytest.raises(ChatforgeError, match="--from: unknown stage 'sfft'"):
        run_pipeline(load_run(None, "small", {"out": str(tmp_path)}), start="sfft")


def test_the_world_section_sets_the_demonstrations_habits_and_refuses_unknown_keys(tmp_path):
    (tmp_path / "clean.toml").write_text(f'[run]\nname = "w"\nout = "{tmp_path}"\nsize = "small"\n[world]\nhabits = 0.5\n')
    run_pipeline(load_run(str(tmp_path / "clean.toml")), until="world")
    assert json.loads((tmp_path / "w" / "world" / "world.json").read_text())["demonstration_habits"]["with_habits"] > 0
    (tmp_path / "bad.toml").write_text(f'[run]\nname = "b"\nout = "{tmp_path}"\n[world]\nhabit = 0.5\n')
    with pytest.raises(ChatforgeError, match=r"bad.toml \[world\]: unknown key 'habit'"):
        run_pipeline(load_run(str(tmp_path / "bad.toml")), until="world")


def test_report_renders_in_chromium(e2e, browser):
    _, run, _ = e2e
    browser.get((run.dir / "report.html").as_uri())
    assert "chatforge run report" in browser.find_element("tag name", "h1").text
    widths = browser.execute_script(
        "return Array.from(document.querySelectorAll('img')).map(i => [i.id, i.complete && i.naturalWidth])")
    plots = dict(widths)
    assert plots.get("plot-pretrain") and plots.get("plot-ppo"), widths
    assert len(browser.find_elements("css selector", "table")) >= 3


def test_a_changed_setting_reruns_the_stage_afresh_and_keeps_the_old_output(e2e, capsys):
    config, run, _ = e2e
    changed = config.with_name("run_changed.toml")
    changed.write_text(config.read_text().replace("kl_coef = 0.02", "kl_coef = 0.03"))
    old_weights = (run.dir / "ppo" / "model.safetensors").read_bytes()
    capsys.readouterr()
    state = run_pipeline(load_run(str(changed)), until="ppo")
    out = capsys.readouterr().out
    assert "== ppo " in out and "kept as ppo.previous" in out
    assert state["stages"]["ppo"]["fingerprint"] == state["started"]["ppo"]
    assert (run.dir / "ppo.previous" / "model.safetensors").read_bytes() == old_weights
    assert load_model(run.dir / "ppo")[2]["config"]["kl_coef"] == 0.03
