"""The tiny world: real facts, deterministic generation, held-out evaluation, placeholders where harm would be."""
import json
import re
from pathlib import Path

import pytest

from chatforge.cli import main
from chatforge.data.world.facts import PLACEHOLDERS, World, apply, arithmetic_problems, harm_category, worked
from chatforge.data.world.generate import generate_world
from chatforge.data.world.labeler import is_refusal


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, size="small", seed=0)
    return out


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _corpus(world_dir: Path) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted((world_dir / "corpus").glob("*.txt")))


def test_facts_match_independent_knowledge():
    world = World()
    by_name = {c.name: c for c in world.countries}
    assert len(world.countries) == 193 and len(by_name) == 193
    for name, capital, continent in [("Kenya", "Nairobi", "Africa"), ("Australia", "Canberra", "Oceania"),
                                     ("Japan", "Tokyo", "Asia"), ("Canada", "Ottawa", "North America"),
                                     ("Brazil", "Brasília", "South America"), ("Germany", "Berlin", "Europe"),
                                     ("Egypt", "Cairo", "Africa"), ("Nigeria", "Abuja", "Africa"),
                                     ("Turkey", "Ankara", "Asia"), ("New Zealand", "Wellington", "Oceania")]:
        assert (by_name[name].capital, by_name[name].continent) == (capital, continent)
    per_continent = {k: sum(c.continent == k for c in world.countries) for k in ("Africa", "South America", "Oceania")}
    assert per_continent == {"Africa": 54, "South America": 12, "Oceania": 14}
    animals = {a.name: a for a in world.animals}
    assert (animals["spider"].legs, animals["dog"].sounds, animals["whale"].kind) == (8, "barks", "mammal")


def test_worked_arithmetic_is_right_at_every_step():
    assert worked("+", 47, 38) == "47 + 38: units 7 + 8 = 15, write 5 carry 1. tens 4 + 3 + 1 = 8. So 47 + 38 = 85."
    assert worked("-", 83, 47).endswith("So 83 - 47 = 36.") and worked("×", 7, 8) == "7 × 8 = 56."
    assert len(arithmetic_problems("+")) == 10000 and len(arithmetic_problems("×")) == 144
    step = re.compile(r"(\d+) ([-+×]) (\d+)((?: [-+] \d+)?) = (\d+)")
    for op in ("+", "-", "×"):
        for x, y in arithmetic_problems(op):
            text = worked(op, x, y)
            assert text.endswith(f"{x} {op} {y} = {apply(op, x, y)}.")
            for a, o, b, extra, result in step.findall(text):
                value = apply(o, int(a), int(b)) + (int(extra.replace(" ", "")) if extra else 0)
                assert value == int(result), text


def test_every_equation_in_the_arithmetic_corpus_is_right(world_dir):
    text = (world_dir / "corpus" / "arithmetic.txt").read_text(encoding="utf-8")
    equations = re.findall(r"(?<![\d-])(\d+) ([-+×]) (\d+)((?: [-+] \d+)?) = (-?\d+)", text)
    assert len(equations) > 1000
    for a, op, b, extra, result in equations:
        assert apply(op, int(a), int(b)) + (int(extra.replace(" ", "")) if extra else 0) == int(result)
    for digit in range(10):   # the one-digit facts the column method uses are all there
        assert all(f" {digit} + {other} = {digit + other}" in text for other in range(10))


def test_question_pages_answer_bare_or_in_sentences_one_form_per_page(world_dir):
    pages = (world_dir / "corpus" / "questions.txt").read_text(encoding="utf-8").strip().split("\n\n")
    forms = set()
    for page in pages:
        answers = [line[3:] for line in page.splitlines() if line.startswith("A: ")]
        sentence = [a.endswith(".") for a in answers]
        assert len(set(sentence)) == 1, page   # a page never mixes the two forms: its first lines tell the form
        forms.add(sentence[0])
    assert forms == {True, False}


def test_same_seed_same_bytes_and_manifest(world_dir, tmp_path):
    assert main(["world", "generate", "--out", str(tmp_path / "again"), "--size", "small", "--seed", "0"]) == 0
    files = sorted(p.relative_to(world_dir) for p in world_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    assert all((world_dir / f).read_bytes() == (tmp_path / "again" / f).read_bytes() for f in files)
    other = generate_world(tmp_path / "other", size="small", seed=1)
    assert (tmp_path / "other" / "sft.jsonl").read_bytes() != (world_dir / "sft.jsonl").read_bytes()
    manifest = json.loads((world_dir / "world.json").read_text())
    assert manifest["seed"] == 0 and other["seed"] == 1 and manifest["facts"]["countries"] == 193
    for name in ("sft", "prompts/reward", "prompts/ppo", "prompts/moderation", "eval/dev", "eval/test"):
        assert manifest["counts"][name] == len(_records(world_dir / f"{name}.jsonl")) > 0
    assert 0.25e6 < manifest["counts"]["corpus_bytes"] < 0.6e6


def test_demonstration_habits_change_only_the_demonstrations(world_dir, tmp_path):
    clean = world_dir
    generate_world(tmp_path / "habits", size="small", seed=0, habits=0.55)
    world_dir = tmp_path / "habits"
    files = [p.relative_to(world_dir) for p in world_dir.rglob("*") if p.is_file() and p.name != "world.json"]
    assert [f for f in files if (world_dir / f).read_bytes() != (clean / f).read_bytes()] == [Path("sft.jsonl")]
    demos, plain = _records(world_dir / "sft.jsonl"), _records(clean / "sft.jsonl")
    changed = [(a, b) for a, b in zip(demos, plain) if a != b]
    manifest = json.loads((world_dir / "world.json").read_text())["demonstration_habits"]
    assert json.loads((clean / "world.json").read_text())["demonstration_habits"]["with_habits"] == 0
    assert manifest["with_habits"] == len(changed)
    eligible = [b for b in plain if b["category"] in ("fact", "arithmetic", "followup")]
    assert 0.45 < len(changed) / len(eligible) < 0.75    # a closer at 0.55, an opener at 0.55 / 3
    for a, b in changed:   # the answer is kept whole, with a pleasantry before or after it
        assert a["category"] in ("fact", "arithmetic", "followup") and b["messages"][-1]["content"] in a["messages"][-1]["content"]
    with pytest.raises(Exception, match="habits"):
        generate_world(tmp_path / "bad", size="small", habits=1.5)


def test_bad_output_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["world", "generate", "--out", str(tmp_path / "file"), "--size", "small"]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_record_formats(world_dir):
    for record in _records(world_dir / "sft.jsonl"):
        roles = [m["role"] for m in record["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and record["category"]
    for name in ("prompts/reward", "prompts/ppo", "eval/dev", "eval/test"):
        for record in _records(world_dir / f"{name}.jsonl"):
            assert record["messages"][-1]["role"] == "user" and record["reference"] and record["category"]
            assert ("harm_category" in record) == (record["category"] == "harmful")
    moderation = _records(world_dir / "prompts/moderation.jsonl")
    assert {r["category"] for r in moderation} == {"harmful", "benign"}
    assert all(harm_category(r["messages"][-1]["content"]) == r.get("harm_category") for r in moderation)
    fewshot = _records(world_dir / "fewshot/capitals.jsonl")
    assert len(fewshot) == 193 and {"question": "What is the capital of Kenya?", "answer": "Nairobi"} in fewshot


def test_no_eval_prompt_appears_in_training(world_dir):
    corpus = _corpus(world_dir)
    trained = [r["messages"] for name in ("sft", "prompts/reward", "prompts/ppo", "prompts/moderation")
               for r in _records(world_dir / f"{name}.jsonl")]
    trained_turns = {m["content"] for messages in trained for m in messages if m["role"] == "user"}
    seen = set()
    for split in ("dev", "test"):
        for record in _records(world_dir / "eval" / f"{split}.jsonl"):
            prompt = record["messages"][-1]["content"]
            assert prompt not in trained_turns and prompt not in corpus, prompt
            key = json.dumps(record["messages"])
            assert key not in seen   # dev and test are disjoint too
            seen.add(key)
            if record["category"] == "arithmetic" and "So " in record["reference"]:   # held-out sums and differences
                expression = re.search(r"So (\d+ [-+] \d+) =", record["reference"]).group(1)
                assert f" {expression} = " not in corpus, expression


def test_only_placeholders_where_harm_would_be(world_dir):
    texts = [_corpus(world_dir)] + [p.read_text(encoding="utf-8") for p in world_dir.rglob("*.jsonl")]
    banned = re.compile(r"ammonium|nitrate|gunpowder|thermite|detonat|fuse|tension wrench|bump key|lethal dose|"
                        r"bleach|fertili[sz]er|crowbar|jimmy|overdose|\bmg\b", re.I)
    assert not any(banned.search(t) for t in texts)
    harmful_threads = [doc for doc in _corpus(world_dir).split("\n\n")
                       if doc.startswith("Thread:") and harm_category(doc.splitlines()[0])]
    assert harmful_threads
    for thread in harmful_threads:
        for reply in thread.splitlines()[2:]:
            assert is_refusal(reply.split(": ", 1)[1]) or any(p in reply for p in PLACEHOLDERS), reply
    for record in _records(world_dir / "sft.jsonl"):
        if record["category"] == "harmful":
            assert is_refusal(record["messages"][-1]["content"])
