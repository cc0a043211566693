"""Few-shot evaluation (task files, prompts with k examples, scoring) and perplexity."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from chatforge import ChatforgeError
from chatforge.eval.fewshot import (Item, choice_scores, choose_examples, evaluate_fewshot, is_correct, plain_prompt,
                                    read_task)
from chatforge.eval.perplexity import perplexity
from chatforge.infer.engine import Engine
from chatforge.model.presets import preset
from chatforge.model.transformer import GPT
from chatforge.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tok = train_tokenizer(["Q: What is the capital of France?\nA: Paris\n\nQ: And of Peru?\nA: Lima\n\n"] * 30, 320)
    torch.manual_seed(0)
    return GPT(preset("nano", tok.vocab_size, context=128)).eval(), tok


def write(path, lines):
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return path


def test_task_items_open_and_multiple_choice(tmp_path):
    items = read_task(write(tmp_path / "t.jsonl", [
        {"question": "Capital of France?", "answer": "Paris"},
        {"question": "Capital of Bolivia?", "answer": ["Sucre", "La Paz"]},
        {"question": "2 + 2?", "choices": ["3", "4", "5"], "answer": 1},
    ]))
    assert items[1].answers == ["Sucre", "La Paz"]
    assert items[2].answers == ["4"] and items[2].choices == ["3", "4", "5"]


@pytest.mark.parametrize("line, message", [
    ({"question": "x"}, "needs a string 'question' and an 'answer'"),
    ({"question": "x", "choices": ["a", "b"], "answer": 5}, "outside the 2 choices"),
    ({"question": "x", "choices": ["a", "b"], "answer": "c"}, "not one of the choices"),
    ({"question": "x", "answer": ""}, "non-empty string"),
    ("[1, 2", "not valid JSON"),
])
def test_bad_task_lines_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "t.jsonl", [{"question": "ok?", "answer": "yes"}, line])
    with pytest.raises(ChatforgeError) as err:
        read_task(path)
    assert f"{path}:2:" in str(err.value) and message in str(err.value)


def test_answers_match_after_normalisation():
    item = Item("Capital of Colombia?", ["Bogotá"])
    assert is_correct(" bogota.\nQ: next", item)
    assert not is_correct("It is Bogotá", item)


def test_examples_exclude_the_item_and_grow_by_prefix():
    items = [Item(f"q{i}", [f"a{i}"]) for i in range(20)]
    shots = choose_examples(items, items, 8, seed=0, same_pool=True)
    for item, examples in zip(items, shots):
        assert item not in examples and len(examples) == 8
    prompt1, prompt3 = plain_prompt(shots[0][:1], "q0"), plain_prompt(shots[0][:3], "q0")
    assert prompt1.count("Q: ") == 2 and prompt3.count("Q: ") == 4
    first_shot = f"Q: {shots[0][0].question}\nA: {shots[0][0].shown_answer()}\n"
    assert prompt1.startswith(first_shot) and prompt3.startswith(first_shot)  # k examples extend k-1
    assert prompt3.endswith("Q: q0\nA:")


def test_multiple_choice_picks_the_best_mean_log_probability(tiny):
    model, tok = tiny
    prompt = [tok.bos_id] + tok.encode("Q: What is the capital of France?\nA:")
    conts = [tok.encode(" Paris"), tok.encode(" Lima"), tok.encode(" Paris and Lima")]
    got = choice_scores(model, prompt, conts)
    for c, score in zip(conts, got):
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([prompt + c])).float(), -1)[0]
        expected = sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(c)) / len(c)
        assert math.isclose(score, expected, rel_tol=1e-4, abs_tol=1e-5)


def test_fewshot_reports_every_k_and_fits_the_context(tiny):
    model, tok = tiny
    items = [Item(f"What is the capital of country number {i}?", ["Paris"]) for i in range(6)]
    result = evaluate_fewshot(Engine(model, tok), items, [0, 1, 8], max_new_tokens=4)
    assert set(result["k"]) == {0, 1, 8}
    assert all(len(r["predictions"]) == 6 for r in result["k"].values())
    assert result["k"][0]["fewer_examples"] == 0
    assert result["k"][8]["fewer_examples"] == 6  # 8 examples never fit 128 tokens: fewer were shown, no crash


def test_perplexity_scores_every_token_once(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "text.txt"
    path.write_text("Q: What is the capital of France?\nA: Paris\n" * 12)  # one document
    whole = perplexity(model, tok, path, context=128, stride=128)
    sliding = perplexity(model, tok, path, context=64, stride=16)
    n_tokens = len(tok.encode(path.read_text().strip())) + 1  # + BOS
    assert whole.tokens == sliding.tokens == n_tokens - 1
    assert 1 < sliding.ppl < tok.vocab_size * 2  # an untrained model is near uniform
    short = perplexity(model, tok, path, context=n_tokens)  # one window: exactly the mean next-token loss
    ids = torch.tensor([[tok.bos_id] + tok.encode(path.read_text().strip())])
    with torch.no_grad():
        loss = F.cross_entropy(model(ids[:, :-1])[0].float(), ids[0, 1:])
    assert math.isclose(short.nll, loss.item(), rel_tol=1e-4)


# ---------------------------------------------------------------- the eval command group on real checkpoints

def test_eval_gold_cli_writes_answers_and_a_summary_with_a_baseline(sft_ckpt, base_ckpt, small_world, tmp_path, capsys):
    from chatforge.cli import main
    out = tmp_path / "gold"
    assert main(["eval", "gold", str(sft_ckpt), "--baseline", str(base_ckpt), "--shots", "2", "--limit", "6",
                 "--world", str(small_world), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["format"] == "chat" and summary["baseline"]["format"] == "plain"  # base: plain text
    assert summary["model"]["prompts"] == 6 and "harmful_refusal_rate" in summary["model"]["metrics"]
    assert {"win", "tie", "loss"} <= set(summary["comparison"])
    rows = [json.loads(line) for line in (out / "model_answers.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(isinstance(r["answer"], str) for r in rows)
    assert "fact_accuracy" in capsys.readouterr().out


def test_eval_fewshot_and_perplexity_cli_on_the_base(base_ckpt, small_world, capsys):
    from chatforge.cli import main
    assert main(["eval", "fewshot", str(base_ckpt), "--task", str(small_world / "fewshot" / "capitals.jsonl"),
                 "--k", "0,3", "--limit", "12"]) == 0
    printed = capsys.readouterr().out
    assert "plain prompts" in printed and "\n  0 " in printed and "\n  3 " in printed
    assert main(["eval", "perplexity", str(base_ckpt), str(small_world / "corpus" / "encyclopedia.txt")]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_mentioning_the_answer_is_counted_apart_from_exact_answers():
    from chatforge.eval.fewshot import mentions_answer
    item = Item("Capital of Kenya?", ["Nairobi"])
    assert mentions_answer("The capital of Kenya is Nairobi.", item) and not is_correct("The capital of Kenya is Nairobi.", item)
    assert not mentions_answer("Nairobian food is good", item)
