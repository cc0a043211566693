"""One simulated RLHF round at the smallest size: 200 ranking tasks of 9 answers sampled from the SFT model,
labelled by the gold labeler through the HTTP API, then `feedback round`: reward model, PPO, evaluation, Elo,
report."""
import json

import pytest
from serve_toy import LiveServer

from chatforge import ChatforgeError
from chatforge.feedback.api import label_app
from chatforge.feedback.rounds import RoundConfig, run_round
from chatforge.feedback.simulate import simulate
from chatforge.feedback.store import FeedbackStore
from chatforge.feedback.tasks import add_tasks

PROMPTS = 200  # every reward prompt of the small world


@pytest.fixture
def label_server(tmp_path):
    store = FeedbackStore.open(tmp_path / "run" / "feedback.db")
    with LiveServer(label_app(store)) as live:
        yield store, live.url
    store.close()


def test_one_simulated_round_improves_on_chance_and_reports_its_numbers(sft_ckpt, small_world, label_server, tmp_path,
                                                                      one_thread):
    store, url = label_server
    run = tmp_path / "run"
    added, _ = add_tasks(store, "ranking", prompts=str(small_world / "prompts" / "reward.jsonl"), policy=str(sft_ckpt),
                         min_answers=9, max_answers=9, limit=PROMPTS, max_new_tokens=48)
    assert added >= PROMPTS - 5  # a prompt whose samples were all the same gives no task
    token = store.add_labeler("gold")
    result = simulate(url, token, n=1000, disagreement=0.1, seed=0)
    assert result == {"labeler": "gold", "submitted": added, "remaining": 0}

    cfg = RoundConfig(run=str(run), sft=str(sft_ckpt), world=str(small_world), eval_limit=60, ppo_iterations=6,
                      rollout_batch=16, minibatch=8, ppo_lr=1e-5, kl_coef=0.05, max_new_tokens=48, bootstrap=200,
                      next_tasks=8, min_answers=4, max_answers=9)
    summary = run_round(cfg)
    print(f"round 1: reward held-out accuracy {summary['reward_accuracy']}; gold score "
          f"{summary['previous_score']:.3f} -> {summary['score']:.3f}, difference {summary['difference']}")
    # the reward model learned the labelers' preference: its held-out accuracy (judged by the noise-free gold
    # labeler), 95% interval over prompts, lies above chance, where round 0 stands with no reward model
    accuracy = summary["reward_accuracy"]
    assert accuracy["pairs"] >= 100 and accuracy["ci_low"] > 0.5, accuracy
    heldout = sum(1 for _ in open(summary["heldout"]))
    assert summary["comparisons"] + heldout + sum(summary["skipped"].values()) == added
    assert summary["previous_reward_accuracy"] is None and summary["judge"] == "gold"
    assert summary["eval_prompts"] == 60 and summary["difference"]["ci_low"] <= summary["difference"]["mean"]
    assert summary["score"] - summary["previous_score"] == pytest.approx(summary["difference"]["mean"], abs=1e-9)

    rounds = run / "rounds"
    elo = json.loads((rounds / "elo.json").read_text())
    assert sorted(r["name"] for r in elo["ratings"]) == ["round-0", "round-1"] and elo["games"] == 60
    report = (rounds / "report.md").read_text()
    assert "| 1 | " in report and f"{accuracy['accuracy']:.3f}" in report
    assert json.loads((rounds / "round-1" / "round.json").read_text())["round"] == 1
    assert store.progress(store.authenticate(token).id)["ranking"]["todo"] == 8  # the next round's work is queued

    with pytest.raises(ChatforgeError, match="round 1: it is done"):
        run_round(RoundConfig(**{**cfg.__dict__, "round": 1}))
    with pytest.raises(ChatforgeError, match="no new comparisons"):
        run_round(cfg)


def test_held_out_prompts_stay_out_of_training_whatever_file_they_come_from(tmp_path):
    from chatforge.feedback.rounds import fixed_heldout, prompt_key, training_comparisons
    records = [{"messages": [{"role": "user", "content": f"q{i}"}], "responses": [f"a{i}", f"b{i}"], "task": i}
               for i in range(10)]
    cfg = RoundConfig(run=str(tmp_path), world="w", heldout_fraction=0.3)
    heldout = fixed_heldout(cfg, records)
    held = {prompt_key(json.loads(line)["messages"]) for line in heldout.read_text().splitlines()}
    assert len(held) == 3
    assert fixed_heldout(cfg, records[:4]).read_text() == heldout.read_text()  # chosen once, kept for every round
    extra = tmp_path / "collect.jsonl"  # earlier rankings, in the "prompt" form, on every prompt
    extra.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "x", "rejected": "y"}) + "\n"
                             for i in range(10)))
    train = training_comparisons(RoundConfig(**{**cfg.__dict__, "extra_comparisons": [str(extra)]}), records, held)
    assert len(train) == 14 and not {prompt_key(r["messages"]) for r in train} & held
