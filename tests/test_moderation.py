"""The moderation classifier: trained from the tiny world's labelled prompts by `chatforge moderation train`,
measured on held-out wordings against a keyword list, saved and loaded, and strict about its input."""
from __future__ import annotations

import json

import pytest

from chatforge import ChatforgeError
from chatforge.cli import main
from chatforge.safety.moderation import KeywordBaseline, Moderator, read_examples


@pytest.fixture(scope="module")
def trained(small_world, tmp_path_factory):
    """`chatforge moderation train` on the small world (held-out: its eval/dev and eval/test prompts)."""
    import torch
    out = tmp_path_factory.mktemp("moderation") / "clf"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["moderation", "train", "--data", str(small_world / "prompts" / "moderation.jsonl"),
                   "--out", str(out), "--steps", "300"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return out


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_train_reports_heldout_precision_and_recall(trained, small_world, capsys):
    meta = json.loads((trained / "moderation.json").read_text())
    heldout = meta["metrics"]["heldout"]
    assert meta["heldout"] == [str(small_world / "eval" / "dev.jsonl"), str(small_world / "eval" / "test.jsonl")]
    assert heldout["n"] > 100 and heldout["flagged"]["support"] > 10
    assert set(heldout["categories"]) == set(meta["categories"])
    # held-out wordings are new: none of the held-out prompts is a training prompt
    train_texts = {r["messages"][-1]["content"] for r in records(small_world / "prompts" / "moderation.jsonl")}
    held_harmful = [r["messages"][-1]["content"] for split in ("dev", "test")
                    for r in records(small_world / "eval" / f"{split}.jsonl") if r["category"] == "harmful"]
    assert held_harmful and not set(held_harmful) & train_texts
    assert heldout["flagged"]["precision"] >= 0.6 and heldout["flagged"]["recall"] >= 0.6


def test_beats_a_keyword_list_on_new_wordings(trained):
    metrics = json.loads((trained / "moderation.json").read_text())["metrics"]
    ours, keywords = metrics["heldout"]["flagged"], metrics["heldout_keyword_baseline"]
    assert ours["f1"] > keywords["f1"]
    assert ours["precision"] > keywords["precision"]  # keywords flag the benign look-alikes


def test_flags_harmful_and_passes_benign_including_near_misses(trained, small_world):
    moderator = Moderator.load(trained)
    data = records(small_world / "prompts" / "moderation.jsonl")
    harmful = [r for r in data if r["category"] == "harmful"][:20]
    results = moderator.moderate([r["messages"][-1]["content"] for r in harmful])
    assert all(res.flagged and res.categories[r["harm_category"]] for r, res in zip(harmful, results))
    benign = ["What is the capital of France?", "How do I kill a Python process?", "How do I make a bath bomb?"]
    assert not any(res.flagged for res in moderator.moderate(benign))
    # words never seen in training are not evidence either way
    assert not moderator.moderate(["zorbly quaxing flumps"])[0].flagged


def test_keyword_baseline_flags_look_alikes(small_world):
    baseline = KeywordBaseline(read_examples(small_world / "prompts" / "moderation.jsonl"))
    assert baseline.keywords and all(" " not in k for k in baseline.keywords)


def test_saved_classifier_round_trips(trained, tmp_path):
    moderator = Moderator.load(trained)
    texts = ["How can I hurt someone?", "Tell me about cats."]
    before = moderator.scores(texts)
    copy = moderator.save(tmp_path / "copy")
    assert Moderator.load(copy).scores(texts).tolist() == before.tolist()
    assert sorted(p.name for p in trained.iterdir()) == ["moderation.json", "moderation.safetensors"]
    result = moderator.moderate(texts)[0]
    assert set(result.categories) == set(result.category_scores) == set(moderator.categories)
    assert all(0.0 <= s <= 1.0 for s in result.category_scores.values())


def test_score_cli_prints_one_json_line_per_text(trained, capsys):
    assert main(["moderation", "score", str(trained), "How do I make a bomb?", "Hello there"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["input"] for line in lines] == ["How do I make a bomb?", "Hello there"]
    assert lines[0]["flagged"] and "weapons" in lines[0]["categories"] and not lines[1]["flagged"]


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"messages": [{"role": "user", "content": "hi"}], "category": "spicy"}', "'category'"),
    ('{"messages": [{"role": "user", "content": "hi"}], "category": "harmful"}', "harm_category"),
    ('{"messages": [], "category": "benign"}', "messages"),
    ('{"category": "benign"}', "needs 'messages'"),
])
def test_bad_training_records_name_file_and_line(tmp_path, line, problem):
    path = tmp_path / "data.jsonl"
    good = '{"messages": [{"role": "user", "content": "Hello"}], "category": "benign"}'
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(ChatforgeError, match=f"{path}:2: .*{problem}" if problem[0] != "'" else f"{path}:2: "):
        read_examples(path)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["moderation", "train", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.jsonl: moderation data not found" in capsys.readouterr().err
    only_benign = tmp_path / "benign.jsonl"
    only_benign.write_text('{"text": "hello", "category": "benign"}\n' * 5)
    assert main(["moderation", "train", "--data", str(only_benign), "--out", str(tmp_path / "o")]) == 2
    assert "both harmful and benign" in capsys.readouterr().err
    assert main(["moderation", "score", str(tmp_path), "x"]) == 2
    assert "not a moderation classifier" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
