"""`chatforge pretrain`: it learns, it writes a usable checkpoint, and bad input gets a one-line error."""
import json

import pytest
import torch

from chatforge.checkpoint import RunLock, load_model
from chatforge.cli import main
from chatforge.train.pretrain import PretrainConfig, pretrain

TINY = ["--preset", "nano", "--vocab-size", "300", "--context", "16", "--batch-size", "2", "--steps", "2",
        "--eval-every", "0", "--eval-batches", "2"]


def _error(capsys, argv) -> str:
    """Run the CLI expecting exit code 2 and a one-line error; return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("chatforge pretrain: error: ")
    return line


def test_tiny_model_memorises_fifty_lines(fifty_lines, tmp_path, one_thread, capsys):
    out = tmp_path / "base"
    cfg = PretrainConfig(data=[str(fifty_lines)], preset="nano", vocab_size=300, context=128, batch_size=8,
                         steps=250, lr=4e-3, warmup_steps=10, weight_decay=0.0, val_fraction=0.0, log_every=1,
                         save_every=1000, seed=0)
    summary = pretrain(cfg, out)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 250
    assert sum(losses[-10:]) / 10 < 0.1 < losses[0]
    captured = capsys.readouterr()
    assert "model: nano" in captured.err and "estimated time" in captured.err
    assert f"wrote {out} (step 250)" in captured.out

    model, tokenizer, meta = load_model(out)
    assert meta["kind"] == "base" and meta["stage"] == "pretrain" and meta["parent"] is None
    assert meta["metrics"]["step"] == 250 and summary["train_loss"] == losses[-1]
    text = fifty_lines.read_text()
    ids = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(text)][:129]])
    with torch.no_grad():
        predicted = model(ids[:, :-1])[0].argmax(-1)
    accuracy = (predicted[8:] == ids[0, 9:]).float().mean()
    assert accuracy > 0.95  # the saved weights recite the corpus


def test_metrics_log_speed_mfu_and_validation(fifty_lines, tmp_path, one_thread):
    out = tmp_path / "run"
    pretrain(PretrainConfig(data=[str(fifty_lines)], preset="nano", vocab_size=300, context=32, batch_size=4,
                            steps=6, log_every=2, eval_every=3, eval_batches=2, val_fraction=0.1), out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3, 4, 6]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["tokens"] == r["step"] * 4 * 32 for r in records)
    assert "val_loss" in records[1] and "val_loss" not in records[0] and "val_ppl" in records[-1]
    assert (out / "state" / "trainer.pt").is_file()


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "missing.txt: corpus file not found"),
    ("empty.txt", b"", "empty.txt: corpus file is empty"),
    ("latin1.txt", "first line\ncaf\xe9\n".encode("latin-1"), "latin1.txt:2: not UTF-8"),
    ("broken.jsonl", b'{"text": "fine"}\n{"text": \n', "broken.jsonl:2: not valid JSON"),
    ("notext.jsonl", b'{"content": "no text field"}\n', "notext.jsonl:1: record has no string field 'text'"),
    ("blank.txt", b"\n\n\n", "holds no text"),
])
def test_bad_corpus_is_named_with_its_line(name, content, message, tmp_path, capsys):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    line = _error(capsys, ["pretrain", "--data", str(path), "--out", str(tmp_path / "out"), *TINY])
    assert message in line


def test_bad_settings_are_named(fifty_lines, tmp_path, capsys):
    base = ["pretrain", "--data", str(fifty_lines), "--out", str(tmp_path / "out")]
    assert "unknown model preset 'gpt9'" in _error(capsys, [*base, *TINY, "--preset", "gpt9"])
    assert "--vocab-size 100 is too small" in _error(capsys, [*base, *TINY, "--vocab-size", "100"])
    assert "lr: expected float, got 'fast'" in _error(capsys, [*base, *TINY, "--lr", "fast"])
    toml = tmp_path / "run.toml"
    toml.write_text("[pretrain]\nsteps = 3\nlearning_rate = 0.1\n")
    assert f"{toml} [pretrain]: unknown key 'learning_rate'" in _error(capsys, [*base, *TINY, "--config", str(toml)])
    assert "no tokenizer.json" in _error(capsys, [*base, *TINY, "--tokenizer", str(tmp_path)])


def test_resume_refuses_a_changed_config_or_tokenizer(fifty_lines, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    base = ["pretrain", "--data", str(fifty_lines), "--out", str(out), *TINY]
    assert main(base) == 0
    assert "already holds a checkpoint: pass --resume" in _error(capsys, base)
    assert "lr changed (0.001 -> 0.002)" in _error(capsys, [*base, "--resume", "--lr", "0.002"])
    assert "context changed (16 -> 24)" in _error(capsys, [*base, "--resume", "--context", "24"])
    other = tmp_path / "other_tokenizer"
    assert main(["tokenizer", "train", "--data", str(fifty_lines), "--vocab-size", "290", "--out", str(other)]) == 0
    assert "tokenizer changed" in _error(capsys, [*base, "--resume", "--tokenizer", str(other)])
    assert main([*base, "--resume", "--eval-every", "1"]) == 0  # what only observes the run may change
    assert "nothing to do" in capsys.readouterr().err


def test_two_runs_cannot_write_one_directory(fifty_lines, tmp_path, capsys):
    out = tmp_path / "out"
    with RunLock(out):
        line = _error(capsys, ["pretrain", "--data", str(fifty_lines), "--out", str(out), *TINY])
    assert f"{out} is in use by pid" in line


def test_resume_of_an_incomplete_checkpoint_is_refused(fifty_lines, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"")
    line = _error(capsys, ["pretrain", "--data", str(fifty_lines), "--out", str(out), *TINY, "--resume"])
    assert f"{out}: not a complete checkpoint directory (holds model.safetensors)" in line
