"""Bad input to the typed configs and the checkpoint directories is named precisely; saves are atomic."""
import argparse
import json

import pytest
import torch

from chatforge import ChatforgeError
from chatforge.checkpoint import (RunLock, is_complete, load_model, load_weights, read_meta, resolve,
                                  save_model_checkpoint)
from chatforge.config import add_config_args, config_from_args, from_dict
from chatforge.model.transformer import GPT, ModelConfig
from chatforge.tokenizer import train_tokenizer
from chatforge.train.loop import TrainConfig


def _args(argv, cls=TrainConfig):
    parser = argparse.ArgumentParser()
    add_config_args(parser, cls)
    return parser.parse_args(argv)


def test_toml_then_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[train]\nsteps = 7\nlr = 0.5\nbetas = [0.8, 0.9]\n")
    cfg = config_from_args(TrainConfig, _args(["--config", str(toml), "--lr", "0.25", "--compile", "yes"]), "train")
    assert (cfg.steps, cfg.lr, cfg.betas, cfg.compile) == (7, 0.25, [0.8, 0.9], True)
    assert config_from_args(TrainConfig, _args(["--betas", "0.5,0.6"])).betas == [0.5, 0.6]


@pytest.mark.parametrize("text, message", [
    ("[train]\nstep = 3\n", "run.toml [train]: unknown key 'step' (known: batch_size, best_metric"),
    ("[train]\nsteps = 'many'\n", "run.toml [train].steps: expected int, got 'many'"),
    ("[train]\nsteps = 2.5\n", "run.toml [train].steps: expected int, got 2.5"),
    ("[train]\nsteps = -1\n", "run.toml [train]: steps: must be positive, got -1"),
    ("[train]\ndtype = 'fp8'\n", "run.toml [train]: dtype: expected one of auto, bf16, fp32, got 'fp8'"),
    ("[train]\nbetas = [0.9]\n", "run.toml [train]: betas: expected two numbers in [0, 1), got [0.9]"),
    ("[train]\nsteps = \n", "run.toml: invalid TOML"),
])
def test_bad_config_files_name_the_key(tmp_path, text, message):
    toml = tmp_path / "run.toml"
    toml.write_text(text)
    with pytest.raises(ChatforgeError) as e:
        config_from_args(TrainConfig, _args(["--config", str(toml)]), "train")
    assert message in str(e.value)


def test_bad_flags_and_missing_files(tmp_path):
    with pytest.raises(ChatforgeError, match="flags.compile: expected bool, got 'maybe'"):
        config_from_args(TrainConfig, _args(["--compile", "maybe"]))
    with pytest.raises(ChatforgeError, match="nope.toml: config file not found"):
        config_from_args(TrainConfig, _args(["--config", str(tmp_path / "nope.toml")]))
    with pytest.raises(ChatforgeError, match="stage: keep: expected one of last, best"):
        from_dict(TrainConfig, {"keep": "first"}, "stage")


# --- checkpoints ---

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tokenizer = train_tokenizer(["a few words to learn a tokenizer from"] * 10, 270)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    return model, tokenizer


def _save(path, tiny, **meta):
    model, tokenizer = tiny
    return save_model_checkpoint(path, model, tokenizer, {"kind": "base", "stage": "test", **meta})


def test_checkpoint_round_trip(tmp_path, tiny):
    path = _save(tmp_path / "ckpt", tiny)
    model, tokenizer, meta = load_model(path)
    assert meta["kind"] == "base" and is_complete(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny[0].state_dict().values()))
    with pytest.raises(ChatforgeError, match="is a base checkpoint, expected reward"):
        load_model(path, expect_kind=("reward",))


def test_incomplete_or_foreign_checkpoints_are_named(tmp_path, tiny):
    with pytest.raises(ChatforgeError, match="checkpoint directory not found"):
        read_meta(tmp_path / "absent")
    path = _save(tmp_path / "ckpt", tiny)
    (path / "model.safetensors").unlink()
    with pytest.raises(ChatforgeError, match=r"ckpt: incomplete checkpoint, missing model.safetensors"):
        load_model(path)
    path = _save(tmp_path / "future", tiny)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ChatforgeError, match=r"future/meta.json: checkpoint format 99 is not supported"):
        load_model(path)


def test_weights_that_do_not_fit_are_named(tiny):
    model = tiny[0]
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(ChatforgeError, match="w.safetensors: missing weight model.norm.weight"):
        load_weights(model, {k: v for k, v in state.items() if k != "model.norm.weight"}, "w.safetensors")
    with pytest.raises(ChatforgeError, match="unexpected weight extra.bias"):
        load_weights(model, {**state, "extra.bias": torch.zeros(1)}, "w.safetensors")
    with pytest.raises(ChatforgeError, match=r"weight model.norm.weight has shape \(3,\), the model expects \(16,\)"):
        load_weights(model, {**state, "model.norm.weight": torch.zeros(3)}, "w.safetensors")


def test_a_crash_during_a_save_leaves_the_previous_checkpoint(tmp_path, tiny):
    path = _save(tmp_path / "ckpt", tiny, note="first")

    class Broken:
        def save(self, directory):
            raise OSError("disk full")
    with pytest.raises(OSError):
        save_model_checkpoint(path, tiny[0], Broken(), {"kind": "base", "stage": "test", "note": "second"})
    assert read_meta(path)["note"] == "first" and not list(tmp_path.glob("ckpt.tmp-*"))


def test_an_interrupted_swap_is_completed(tmp_path, tiny):
    path = _save(tmp_path / "ckpt", tiny, note="old")
    path.rename(tmp_path / "ckpt.old")  # killed between the two renames of a save
    assert read_meta(resolve(path))["note"] == "old" and not (tmp_path / "ckpt.old").exists()
    _save(tmp_path / "stale", tiny)
    (tmp_path / "stale.old").mkdir()  # killed after the swap, before the old copy was removed
    assert is_complete(tmp_path / "stale") and not (tmp_path / "stale.old").exists()


def test_run_lock_names_its_holder(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(ChatforgeError, match=r"run is in use by pid \d+ on "):
            RunLock(tmp_path / "run").__enter__()
    with RunLock(tmp_path / "run"):  # released: free again
        pass
