"""DPO on the toy colour world: answers saying "blue" ranked above every other colour."""
import json
import math

import pytest
import torch

from chatforge.checkpoint import load_model, read_meta
from chatforge.data.preferences import PreferencePair, read_comparisons, to_pairs
from chatforge.train.dpo import (DPOConfig, collate_pairs, dpo_loss, encode_pair, reference_logprobs, run_dpo,
                                 sequence_logprobs)
from rl_toy import COLOURS, QUESTIONS, TARGET


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: a second thread only adds contention


def write_rankings(path):
    """InstructGPT-style rankings: blue first, the other nine tied below it (9 pairs per prompt)."""
    others = [c for c in COLOURS if c != TARGET]
    path.write_text("".join(json.dumps({"prompt": q, "responses": [TARGET, others]}) + "\n" for q in QUESTIONS))
    return path


def margins(policy, reference, tok, pairs):
    encoded = [encode_pair(tok, p, 64) for p in pairs]
    pol = reference_logprobs(policy, encoded, tok.pad_id)
    ref = reference_logprobs(reference, encoded, tok.pad_id)
    return (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]), pol


def test_answer_mask_covers_exactly_the_answer_and_its_end_token(rl_toy):
    tok = rl_toy.tokenizer
    pair = PreferencePair([{"role": "user", "content": "Which color?"}], "blue", "red")
    e = encode_pair(tok, pair, 64)
    batch = collate_pairs([e], tok.pad_id)
    answer = tok.encode("blue") + tok.stop_ids[:1]
    chosen_mask = batch["answer_mask"][0].bool()
    assert batch["input_ids"][0][chosen_mask].tolist() == answer


def test_dpo_loss_starts_at_log2_when_policy_is_reference():
    lp = torch.tensor([-3.0, -1.5])
    loss, stats = dpo_loss(lp, lp + 1, lp, lp + 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2)) and stats["margin"].item() == 0


def test_sequence_logprobs_ignore_prompt_and_padding(rl_toy):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (1, 6))
    mask = torch.tensor([[0, 0, 0, 1, 1, 0.0]])
    logits = torch.randn(1, 6, 50)
    expected = sum(logits[0, t - 1].log_softmax(-1)[ids[0, t]] for t in (3, 4))
    assert sequence_logprobs(logits, ids, mask).item() == pytest.approx(expected.item(), abs=1e-5)


def test_dpo_raises_chosen_over_rejected_margin(rl_toy, tmp_path):
    data = write_rankings(tmp_path / "rankings.jsonl")
    out = run_dpo(DPOConfig(policy=str(rl_toy.sft), data=[str(data)], out=str(tmp_path / "dpo"), beta=0.1,
                            steps=15, batch_size=8, lr=1e-3, warmup_steps=0, val_fraction=0.0, eval_every=0,
                            device="cpu", dtype="fp32"))
    meta = read_meta(out)
    assert meta["kind"] == "policy" and meta["stage"] == "dpo" and meta["parent"] == str(rl_toy.sft.resolve())
    policy, tok, _ = load_model(out, expect_kind=("policy",))
    reference, _, _ = load_model(rl_toy.sft)
    pairs = to_pairs(read_comparisons(data))
    margin, logps = margins(policy, reference, tok, pairs)
    _, ref_logps = margins(reference, reference, tok, pairs)
    assert margin.mean() > 1.0                   # nats of log-ratio, from exactly 0 at the start
    assert (margin > 0).float().mean() > 0.9
    assert logps[:, 0].mean() > ref_logps[:, 0].mean()  # "blue" itself became more likely
