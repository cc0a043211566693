import json
import re

import pytest
import torch
import torch.nn.functional as F

from chatforge import ChatforgeError
from chatforge.checkpoint import load_model, read_meta
from chatforge.cli import main
from chatforge.data.chat import read_conversations
from chatforge.data.preferences import Comparison, read_comparisons
from chatforge.eval.reward_eval import evaluate_reward_model, health_warnings
from chatforge.model.heads import ScalarModel
from chatforge.train.reward import (CollectConfig, RewardConfig, ScoreConfig, collate_rankings, collect, encode_answer,
                                    encode_comparison, reward_loss, score_answers, score_file, score_sequences,
                                    train_reward)


@pytest.fixture(scope="module")
def toy_model(reward_toy):
    """An untrained ScalarModel on the toy base: the identities below hold for any weights."""
    torch.manual_seed(1)
    gpt, tokenizer, _ = load_model(reward_toy.base)
    return ScalarModel.from_lm(gpt).eval(), tokenizer


def test_kway_loss_is_the_mean_of_pairwise_losses_one_by_one(toy_model):
    model, tok = toy_model
    user = [{"role": "user", "content": "Say something about moon."}]
    comparisons = [Comparison(user, [["sun moon"], ["a", "b c"], ["tree road house"]]),  # K = 4, one tie
                   Comparison(user, [["apple"], ["river stone"]])]                       # K = 2
    items = [encode_comparison(tok, c, 64) for c in comparisons]
    batch = collate_rankings(items, tok.pad_id)
    assert batch["input_ids"].shape[0] == 6  # every answer scored once, not once per pair
    loss, stats = reward_loss(model, batch)

    per_prompt = []
    for c in comparisons:
        alone = [model.score_last(torch.tensor([s]), torch.tensor([len(s) - 1]), torch.tensor([a])).item()
                 for s, a in encode_comparison(tok, c, 64).seqs]
        losses = [-F.logsigmoid(torch.tensor(alone[i] - alone[j])).item() for i, j in c.pairs()]
        per_prompt.append(sum(losses) / len(losses))
    assert len(comparisons[0].pairs()) == 5  # C(4, 2) = 6 minus the tied pair
    assert loss.item() == pytest.approx(sum(per_prompt) / len(per_prompt), abs=1e-5)


@pytest.fixture(scope="module")
def toy_likelihood_model(reward_toy):
    """An untrained ScalarModel that keeps the toy base's LM head and adds λ x the answer's log-likelihood."""
    torch.manual_seed(1)
    gpt, tokenizer, _ = load_model(reward_toy.base)
    return ScalarModel.from_lm(gpt, likelihood=0.5).eval(), tokenizer, gpt.eval()


def test_likelihood_score_adds_the_answers_log_likelihood_under_the_lm(toy_model, toy_likelihood_model):
    plain, tok = toy_model
    model, _, lm = toy_likelihood_model
    user = [{"role": "user", "content": "Say something."}]
    for answer in ("sun", "apple river stone"):
        ids, start = encode_answer(tok, user, answer, 64)
        assert tok.decode(ids[start:]).startswith(answer)  # the start is the answer's first token
        with torch.no_grad():
            logprobs = F.log_softmax(lm(torch.tensor([ids]))[0, :-1].float(), -1)
            answer_logprob = sum(logprobs[t - 1, ids[t]].item() for t in range(start, len(ids)))
            head = plain.score_last(torch.tensor([ids]), torch.tensor([len(ids) - 1])).item()  # same seed, same head
        assert answer_logprob < -1.0
        assert score_sequences(model, [(ids, start)], tok.pad_id)[0] == pytest.approx(head + 0.5 * answer_logprob,
                                                                                      abs=1e-4)


@pytest.mark.parametrize("likelihood", [False, True])
def test_score_is_invariant_to_padding_and_batch_composition(toy_model, toy_likelihood_model, likelihood):
    model, tok = toy_likelihood_model[:2] if likelihood else toy_model
    user = [{"role": "user", "content": "Say something."}]
    seqs = [encode_answer(tok, user, a, 64) for a in ("sun", "apple river stone cloud green quick table", "moon tree")]
    alone = [score_sequences(model, [s], tok.pad_id)[0] for s in seqs]
    together = score_sequences(model, seqs, tok.pad_id, batch_size=3)           # padded to the longest
    mixed = score_sequences(model, [seqs[2], ([5] * 60, 30), seqs[0], seqs[1]], tok.pad_id, batch_size=2)
    assert together == pytest.approx(alone, abs=1e-5)
    assert [mixed[2], mixed[3], mixed[0]] == pytest.approx(alone, abs=1e-5)
    assert len(set(round(a, 4) for a in alone)) == 3  # the answers really score differently


def test_toy_preference_learned_and_bias_normalised(toy_reward_model, reward_toy):
    meta = read_meta(toy_reward_model)
    assert meta["kind"] == "reward" and meta["parent"] == str(reward_toy.base)
    report = meta["metrics"]["heldout"]
    assert report["pairs"] >= 100 and report["accuracy"] >= 0.95
    model, tok, _ = load_model(toy_reward_model)
    assert isinstance(model, ScalarModel)
    demos = [(c.messages[:-1], c.messages[-1]["content"]) for c in read_conversations(reward_toy.reference)]
    rewards = torch.tensor(score_answers(model, tok, demos))
    assert abs(rewards.mean().item()) < 1e-4 * max(1.0, meta["reward_scale"])
    assert meta["reward_scale"] == pytest.approx(rewards.std(correction=0).item(), rel=1e-3)
    assert abs(meta["reward_offset"]) > 1e-3  # the shift really happened


def test_lora_reward_model_saves_merged_weights(reward_toy, tmp_path):
    torch.set_num_threads(1)
    out = train_reward(RewardConfig(init=str(reward_toy.base), data=[str(reward_toy.train)],
                                    reference=str(reward_toy.reference), out=str(tmp_path / "rm"), method="lora",
                                    lora_rank=4, steps=3, batch_size=4, dtype="fp32"))
    meta = read_meta(out)
    assert meta["method"] == "lora" and meta["trainable_params"] < meta["total_params"] / 5
    model, _, _ = load_model(out)  # a plain reward checkpoint: no adapter tensors, loads by name
    assert not any("lora" in name for name in model.state_dict())
    assert "heldout" in meta["metrics"]  # 10% of the data was held out and evaluated


def test_score_command_keeps_fields_and_adds_reward(toy_reward_model, tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"prompt": "Say something.", "response": "sun banana moon", "id": 7}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "Say something."}],
                                     "completion": "sun tree moon"}) + "\n")
    scored = tmp_path / "scored.jsonl"
    assert main(["reward", "score", str(toy_reward_model), "--input", str(answers), "--output", str(scored)]) == 0
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    assert rows[0]["id"] == 7 and rows[0]["response"] == "sun banana moon" and rows[1]["completion"] == "sun tree moon"
    assert rows[0]["reward"] > rows[1]["reward"]  # the marker wins


def test_score_input_errors_name_the_line(toy_reward_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n" + json.dumps({"prompt": "q"}) + "\n")
    assert main(["reward", "score", str(toy_reward_model), "--input", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert f"{bad}:2: missing answer" in capsys.readouterr().err


def test_reward_and_policy_checkpoints_refused_by_name(toy_reward_model, reward_toy, tmp_path):
    with pytest.raises(ChatforgeError, match="is a reward checkpoint, expected base or sft or policy"):
        load_model(toy_reward_model, expect_kind=("base", "sft", "policy"))
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n")
    with pytest.raises(ChatforgeError, match="is a base checkpoint, expected reward"):
        score_file(ScoreConfig(reward_model=str(reward_toy.base), input=str(answers), output=str(tmp_path / "o")))
    with pytest.raises(ChatforgeError, match="is a reward checkpoint, expected base or sft or policy"):
        collect(CollectConfig(policy=str(toy_reward_model), prompts=str(answers), out=str(tmp_path / "r.jsonl")))


def test_health_warnings_on_a_collapsed_model(toy_model, reward_toy):
    model, tok = toy_model
    saved = model.score.weight.detach().clone()
    with torch.no_grad():
        model.score.weight.zero_()  # every answer gets the bias: a constant reward
    try:
        report = evaluate_reward_model(model, tok, read_comparisons(reward_toy.heldout))
    finally:
        with torch.no_grad():
            model.score.weight.copy_(saved)
    text = " ".join(report["warnings"])
    assert "collapsed" in text and "near chance" in text


def test_length_preference_warning():
    report = {"reward_std": 1.0, "pairs": 100, "accuracy": 0.9, "length_correlation": 0.8,
              "gold_length_correlation": 0.1, "accuracy_when_longer_is_worse": 0.3}
    assert any("prefers longer answers" in w for w in health_warnings(report))
    assert health_warnings({**report, "length_correlation": 0.2}) == []
    # when gold itself prefers longer answers, so may the reward model
    assert health_warnings({**report, "gold_length_correlation": 0.75}) == []


def test_collect_samples_distinct_answers_for_human_labelers(rl_toy, tmp_path):
    # the toy SFT model answers one of ten colours: nine distinct answers need re-sampling of duplicates
    out = collect(CollectConfig(policy=str(rl_toy.sft), prompts=str(rl_toy.prompts), out=str(tmp_path / "u.jsonl"),
                                unranked=True, min_answers=8, max_answers=9, max_new_tokens=8, seed=3))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6
    for r in records:
        assert 2 <= len(r["answers"]) <= 9 and len(set(r["answers"])) == len(r["answers"])
        assert "messages" in r and "responses" not in r
    with pytest.raises(ChatforgeError, match="unranked answers"):
        read_comparisons(out)  # a labeler has to rank them first


def test_collect_ranks_world_answers_with_the_gold_labeler(sft_ckpt, small_world, tmp_path, capsys):
    out = collect(CollectConfig(policy=str(sft_ckpt), world=str(small_world), out=str(tmp_path / "r.jsonl"),
                                limit=12, max_new_tokens=48, disagreement=0.0, batch_size=4))
    # not a terminal: plain progress lines, the first after one batch (with an ETA), the last at the end
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("reward collect: prompt ")]
    assert len(lines) >= 2, lines
    pattern = r"reward collect: prompt (\d+)/12, \d+/\d+ answers, [\d.]+ answers/s"
    assert re.match(pattern + r", ETA \d+[hms]", lines[0]) and int(re.match(pattern, lines[0])[1]) < 12, lines[0]
    assert re.match(pattern + "$", lines[-1]), lines[-1]
    comparisons = read_comparisons(out)  # what collect writes, train reads
    # K = 4..9 wanted; a prompt whose resampling runs out of distinct answers keeps the two or more it has
    assert comparisons and all(2 <= len(c.answers) <= 9 and len(c.tiers) >= 2 for c in comparisons)
    assert any(len(c.answers) >= 4 for c in comparisons)
    from chatforge.data.world.labeler import GoldLabeler
    gold = GoldLabeler()
    for c in comparisons:  # with disagreement 0 the tiers are in gold-score order, ties grouped
        levels = [{gold.score(c.messages, a).total for a in tier} for tier in c.tiers]
        assert all(len(level) == 1 for level in levels)
        assert [next(iter(level)) for level in levels] == sorted((next(iter(lv)) for lv in levels), reverse=True)
