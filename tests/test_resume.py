"""Resume is exact: a run killed with SIGKILL at random instants (in the middle of saves too) and resumed
logs the same per-step losses as one that was never interrupted; crashes never damage the last checkpoint."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from chatforge import ChatforgeError
from chatforge.checkpoint import is_complete, load_model
from chatforge.cli import main
from chatforge.model.transformer import GPT, ModelConfig
from chatforge.tokenizer import train_tokenizer
from chatforge.train.loop import TrainConfig, checkpoint_saver, train

RUN = ["--preset", "nano", "--vocab-size", "300", "--context", "32", "--batch-size", "4", "--steps", "40",
       "--save-every", "3", "--log-every", "1", "--eval-every", "8", "--eval-batches", "2", "--val-fraction", "0.1",
       "--warmup-steps", "5"]


def _pretrain(out: Path, corpus: Path, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    argv = [sys.executable, "-m", "chatforge.cli", "pretrain", "--data", str(corpus), "--out", str(out), *RUN]
    log = open(out.parent / f"{out.name}.log", "a")
    return subprocess.Popen(argv + (["--resume"] if resume else []), env=env, stdout=log, stderr=log)


def _steps_logged(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, IndexError):
        return 0


def _wait_and_kill(proc: subprocess.Popen, out: Path, mode: str, rng: random.Random) -> bool:
    """Kill `proc` mid-save (as soon as a staging directory appears) or at a random instant of training.
    Returns False if the run finished first."""
    deadline = time.monotonic() + 120
    start = _steps_logged(out)
    delay = rng.uniform(0.0, 0.4)
    started = None
    while proc.poll() is None and time.monotonic() < deadline:
        if mode == "save" and list(out.parent.glob(f"{out.name}.tmp-*")):
            break
        if mode == "random":
            if started is None and _steps_logged(out) > start:
                started = time.monotonic()
            if started is not None and time.monotonic() - started > delay:
                break
        time.sleep(0.001)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _losses(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r.get("val_loss")) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_killed_and_resumed_run_equals_an_uninterrupted_one(fifty_lines, tmp_path, one_thread, capsys):
    reference = tmp_path / "reference"  # in this process, on one thread like the subprocesses
    assert main(["pretrain", "--data", str(fifty_lines), "--out", str(reference), *RUN]) == 0

    out = tmp_path / "killed"
    rng = random.Random(int(time.time()))
    kills = 0
    for mode in ["random", "save", "random"]:
        if not _wait_and_kill(_pretrain(out, fifty_lines, resume=True), out, mode, rng):
            break
        kills += 1
        if is_complete(out):  # whatever instant the kill hit, the last checkpoint is whole and loads
            load_model(out)
    assert _pretrain(out, fifty_lines, resume=True).wait(timeout=300) == 0

    log = (tmp_path / "killed.log").read_text()
    resumed_at = [int(n) for n in re.findall(r"resuming at step (\d+)", log)]
    assert kills >= 2 and any(n > 0 for n in resumed_at), log[-2000:]
    assert _losses(out) == _losses(reference)
    assert len(_losses(out)) == 40 and _losses(out)[-1][2] is not None
    final, expected = load_file(str(out / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert not list(tmp_path.glob("*.tmp-*")) and not list(tmp_path.glob("*.old"))


# --- the loop on its own: a tiny model and synthetic batches ---

@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["tiny words for a tiny tokenizer"] * 20, 270)


def _model(tokenizer) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))


def _batches(step: int, micro: int):
    g = torch.Generator().manual_seed(1000 * step + micro)
    ids = torch.randint(0, 200, (4, 17), generator=g)
    return ids[:, :-1], ids[:, 1:], step


class Crash(Exception):
    pass


def _loss(fail_at: int | None = None, nan_at: int | None = None, seen: dict | None = None):
    def loss_fn(model, batch):
        x, y, step = batch
        if step == fail_at:
            raise Crash()
        if seen is not None:
            seen["steps_done"] = step + 1
        loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        return (loss * float("nan") if step == nan_at else loss), {"tokens": y.numel()}
    return loss_fn


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 8, "batch_size": 4, "lr": 1e-2, "warmup_steps": 2, "save_every": 3,
                          "log_every": 1, "eval_every": 2, "dtype": "fp32", **kw})


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tokenizer, tmp_path, one_thread):
    out = tmp_path / "run"
    model = _model(tokenizer)
    save = checkpoint_saver(tokenizer, {"kind": "base", "stage": "test"})
    with pytest.raises(ChatforgeError, match=rf"step 8: loss is nan; .* {out} \(step 6\) is kept"):
        train(model, model.parameters(), _loss(nan_at=7), _batches, out, _cfg(), save_fn=save)
    saved = torch.load(out / "state" / "trainer.pt", weights_only=True)
    assert saved["step"] == 6
    weights = load_file(str(out / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert torch.equal(weights["model.embed_tokens.weight"], saved["trainable"]["model.embed_tokens.weight"])


def test_keep_best_outputs_the_best_step_and_resumes_with_the_last(tokenizer, tmp_path, one_thread):
    scores = {2: 3.0, 4: 1.0, 6: 2.0, 8: 4.0}  # validation loss by step: best at step 4

    def run(out, fail_at=None, resume=False, snapshots=None):
        model = _model(tokenizer)
        seen = {}

        def evaluate(m):
            snapshots[seen["steps_done"]] = {k: v.clone() for k, v in m.state_dict().items()}
            return {"val_loss": scores[seen["steps_done"]]}
        saver = checkpoint_saver(tokenizer, {"kind": "sft", "stage": "test"})
        return train(model, model.parameters(), _loss(fail_at=fail_at, seen=seen), _batches, out,
                     _cfg(keep="best", save_every=4), save_fn=saver, eval_fn=evaluate, resume=resume)

    snapshots = {}
    summary = run(tmp_path / "a", snapshots=snapshots)
    assert summary["best"] == {"metric": "val_loss", "value": 1.0, "step": 4}
    output = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert torch.equal(output["model.embed_tokens.weight"], snapshots[4]["model.embed_tokens.weight"])
    last = torch.load(tmp_path / "a" / "state" / "trainer.pt", weights_only=True)["trainable"]
    assert torch.equal(last["model.embed_tokens.weight"], snapshots[8]["model.embed_tokens.weight"])
    assert not torch.equal(snapshots[4]["model.embed_tokens.weight"], snapshots[8]["model.embed_tokens.weight"])

    with pytest.raises(Crash):  # dies at step 7, after the save at step 4
        run(tmp_path / "b", fail_at=6, snapshots={})
    run(tmp_path / "b", resume=True, snapshots={})
    resumed = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(resumed[k], output[k]) for k in output)
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
