"""Data parallel training under torchrun: 2 CPU ranks (gloo) x batch B/2 on disjoint windows take the same
steps as 1 process x batch B."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from chatforge.cli import main

RUN = ["--preset", "nano", "--vocab-size", "300", "--context", "32", "--batch-size", "8", "--steps", "8",
       "--log-every", "1", "--eval-every", "4", "--eval-batches", "2", "--val-fraction", "0.1", "--warmup-steps", "2",
       "--lr", "3e-3", "--dtype", "fp32"]


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)
def test_two_gloo_ranks_match_one_process(fifty_lines, tmp_path, one_thread, capsys):
    single = tmp_path / "single"
    assert main(["pretrain", "--data", str(fifty_lines), "--out", str(single), *RUN]) == 0
    accumulated = tmp_path / "accumulated"  # one process, the batch in two micro-batches: the same steps too
    assert main(["pretrain", "--data", str(fifty_lines), "--out", str(accumulated), *RUN, "--grad-accum", "2"]) == 0

    ranks = tmp_path / "ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "chatforge.cli", "pretrain", "--data", str(fifty_lines), "--out", str(ranks), *RUN],
                          env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 ranks" in done.stderr and done.stdout.count("wrote ") == 1  # rank 0 alone reports and writes

    expected = _records(single)
    for out in (ranks, accumulated):
        got = _records(out)
        assert [r["step"] for r in got] == list(range(1, 9))
        for a, b in zip(got, expected):
            assert abs(a["loss"] - b["loss"]) < 1e-5 and a["tokens"] == b["tokens"]
            assert ("val_loss" in a) == ("val_loss" in b) and abs(a.get("val_loss", 0) - b.get("val_loss", 0)) < 1e-5
    assert expected[-1]["loss"] < expected[0]["loss"] - 0.5  # the steps did train
    reference = load_file(str(single / "model.safetensors"))
    for name, weight in load_file(str(ranks / "model.safetensors")).items():
        torch.testing.assert_close(weight, reference[name], atol=1e-5, rtol=1e-4)
