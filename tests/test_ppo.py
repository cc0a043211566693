"""PPO on the toy colour world (tests/rl_toy.py): the engine's log-probs, the KL, a short run that learns the
toy reward, LoRA-PPO leaving the base untouched, and bad input refused before any compute."""
import copy
import json

import pytest
import torch

from chatforge import ChatforgeError
from chatforge.checkpoint import load_model, read_meta, save_model_checkpoint
from chatforge.model.heads import ScalarModel
from chatforge.model.transformer import GPT
from chatforge.train import ppo
from chatforge.train.ppo import (PPOConfig, PPOModels, ValueHead, answer_logits, compute_advantages, rollout,
                                 run_ppo, score, to_experience, train_ppo)
from chatforge.train.rl_math import RunningMoments, token_logprobs
from rl_toy import QUESTIONS, says_target

KL_BOUND = 3.0  # nats: always answering "blue" is ln 10 ≈ 2.3 from the uniform SFT model; degenerate text is far more


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: a second thread only adds contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_models(rl_toy, lora: bool = False) -> PPOModels:
    policy, tok, _ = load_model(rl_toy.sft)
    reference = None
    if lora:
        from chatforge.model.adapters import LoRAConfig, attach_lora
        attach_lora(policy, LoRAConfig(rank=4, alpha=8.0, dropout=0.0))
    else:
        reference = copy.deepcopy(policy).requires_grad_(False).eval()
    return PPOModels(policy.eval(), reference, ValueHead(policy.config.hidden_size),
                     lambda prompts, answers, finished: says_target(tok, answers), tok)


def sample(models: PPOModels, n_per_question: int, seed: int):
    from chatforge.infer.engine import Engine
    prompts = [p for p in [models.tokenizer.prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
               for _ in range(n_per_question)]
    gens = rollout(Engine(models.policy, models.tokenizer), prompts, 8, models.tokenizer.stop_ids, seed)
    exp = to_experience(gens, models.tokenizer.pad_id, torch.device("cpu"))
    return prompts, exp


def toy_cfg(**kw) -> PPOConfig:
    base = dict(iterations=20, rollout_batch=32, minibatch=16, ppo_epochs=2, max_new_tokens=8, lr=4e-4,
                value_lr=1e-3, kl_coef=0.05, warmup_steps=0, sample_every=0, progress=False)
    return PPOConfig(**{**base, **kw})


def test_engine_logprobs_equal_full_forward(rl_toy):
    models = toy_models(rl_toy)
    _, exp = sample(models, 3, seed=1)  # prompts of different lengths in one batch
    assert len({len(q) for q in QUESTIONS}) > 1
    with torch.no_grad():
        full = token_logprobs(answer_logits(models.policy, exp)[0], exp.answers)
    mask = exp.mask.bool()
    torch.testing.assert_close(exp.logprobs[mask], full[mask], atol=1e-4, rtol=0)
    # the forward passes skip each answer's last token: its output predicts nothing
    assert exp.sequences.shape[1] == int((exp.positions * exp.mask).max()) + 1


@pytest.mark.parametrize("lora", [False, True])
def test_kl_is_zero_when_policy_equals_reference(rl_toy, lora):
    models = toy_models(rl_toy, lora=lora)  # LoRA starts with B = 0: the adapted policy is its base
    prompts, exp = sample(models, 3, seed=2)
    cfg = toy_cfg(kl_estimator="k1")
    score(models, exp, prompts, cfg, RunningMoments(), torch.autocast("cpu", enabled=False))
    compute_advantages(exp, cfg.kl_coef, cfg)
    assert exp.mask.sum() > 0
    assert exp.kl.abs().max().item() < 1e-4
    assert exp.rewards.sum(1).sub(exp.scores).abs().max().item() < 1e-4  # no KL penalty left in the rewards


def test_ppo_learns_toy_reward_with_bounded_kl(rl_toy):
    torch.manual_seed(0)
    models = toy_models(rl_toy)
    before = sample(models, 10, seed=3)[1]
    start_rate = says_target(models.tokenizer, [r[:int(n)].tolist() for r, n in zip(before.answers, before.mask.sum(1))])
    assert start_rate.mean() < 0.2
    history = train_ppo(models, rl_toy.prompt_ids() * 6, toy_cfg())
    prompts, after = sample(models, 10, seed=4)
    rate = says_target(models.tokenizer, [r[:int(n)].tolist() for r, n in zip(after.answers, after.mask.sum(1))])
    assert rate.mean() > 0.8, [h["rm_score"] for h in history]
    cfg = toy_cfg()
    score(models, after, prompts, cfg, RunningMoments(), torch.autocast("cpu", enabled=False))
    compute_advantages(after, cfg.kl_coef, cfg)
    kl = after.kl.sum(1).mean().item()
    assert 0 < kl < KL_BOUND
    for key in ("reward", "rm_score", "kl", "kl_coef", "entropy", "clip_frac", "approx_kl", "value_loss",
                "explained_var", "answer_len"):
        assert key in history[-1]


def test_group_baseline_learns_toy_reward_without_a_value_model(rl_toy):
    """baseline = "group": answers compared with the other answers to their prompt (RLOO), no value model."""
    torch.manual_seed(0)
    models = toy_models(rl_toy)
    models.value = None
    cfg = toy_cfg(baseline="group", samples_per_prompt=4, rollout_batch=8)
    from chatforge.infer.engine import Engine
    prompts = rl_toy.prompt_ids()[:3]
    answers = rollout(Engine(models.policy, models.tokenizer), prompts, 4, models.tokenizer.stop_ids, seed=7,
                      samples_per_prompt=4)
    assert [a.prompt_ids for a in answers] == [p for p in prompts for _ in range(4)]  # groups are contiguous
    history = train_ppo(models, rl_toy.prompt_ids() * 6, cfg)
    prompts, after = sample(models, 10, seed=4)
    rate = says_target(models.tokenizer, [r[:int(n)].tolist() for r, n in zip(after.answers, after.mask.sum(1))])
    assert rate.mean() > 0.8, [h["rm_score"] for h in history]
    assert "value_loss" not in history[-1] and "explained_var" not in history[-1]
    score(models, after, prompts, cfg, RunningMoments(), torch.autocast("cpu", enabled=False))
    compute_advantages(after, cfg.kl_coef, cfg)
    assert 0 < after.kl.sum(1).mean().item() < KL_BOUND


def test_tempered_policy_logprobs_and_zero_start_kl(rl_toy):
    """temperature T: the policy trained is softmax(logits / T); its log-probs replace the engine's untempered ones,
    and the reference is tempered alike, so the KL starts at exactly 0."""
    models = toy_models(rl_toy)
    cfg = toy_cfg(temperature=0.5)
    prompts = [models.tokenizer.prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
    from chatforge.infer.engine import Engine
    answers = rollout(Engine(models.policy, models.tokenizer), prompts, 8, models.tokenizer.stop_ids, seed=6,
                      temperature=0.5)
    exp = to_experience(answers, models.tokenizer.pad_id, torch.device("cpu"))
    untempered = exp.logprobs.clone()
    score(models, exp, prompts, cfg, RunningMoments(), torch.autocast("cpu", enabled=False))
    compute_advantages(exp, cfg.kl_coef, cfg)
    with torch.no_grad():
        logits = answer_logits(models.policy, exp)[0]
        tempered = torch.log_softmax(logits / 0.5, -1).gather(-1, exp.answers.unsqueeze(-1)).squeeze(-1)
    mask = exp.mask.bool()
    torch.testing.assert_close(exp.logprobs[mask], tempered[mask], atol=1e-4, rtol=0)
    assert (exp.logprobs[mask] - untempered[mask]).abs().max() > 1e-2  # the uniform toy policy sharpens
    assert exp.kl.abs().max().item() < 1e-4
    with pytest.raises(ChatforgeError, match="temperature must be > 0"):
        PPOConfig(temperature=0).validate()


def test_gold_reward_is_the_labelers_score(rl_toy):
    from chatforge.data.world.labeler import GoldLabeler
    tok = rl_toy.tokenizer
    question = [{"role": "user", "content": "What is the capital of Kenya?"}]
    prompt = tok.prompt(question)
    texts = ["The capital of Kenya is Nairobi.", "The capital of Kenya is Lima.", "I can't help with that."]
    answers = [tok.encode(t) + tok.stop_ids[:1] for t in texts]
    scores = ppo.GoldScorer(tok, {tuple(prompt): question})([prompt] * 3, answers, torch.ones(3, dtype=torch.bool))
    expected = [GoldLabeler().score(question, t).total for t in texts]
    torch.testing.assert_close(scores, torch.tensor(expected))
    assert scores[0] > scores[1] and scores[0] > scores[2]
    with pytest.raises(ChatforgeError, match='reward_model = "gold" has no network to start a value model from'):
        PPOConfig(reward_model="gold").validate()
    PPOConfig(reward_model="gold", baseline="group", samples_per_prompt=2).validate()


def test_ppo_optimizer_moves_weights_as_plain_adamw(rl_toy):
    """PPO's AdamW is fused on the CPU (one pass per tensor); the weights it reaches are the unfused ones'."""
    from contextlib import nullcontext

    from chatforge.train.loop import TrainConfig, make_optimizer
    states = []
    for fused in (True, False):
        models = toy_models(rl_toy)
        prompts, exp = sample(models, 2, seed=5)
        cfg = toy_cfg(rollout_batch=len(prompts), minibatch=len(prompts) // 2)
        score(models, exp, prompts, cfg, RunningMoments(), nullcontext())
        compute_advantages(exp, cfg.kl_coef, cfg)
        train_cfg = TrainConfig(steps=8, lr=cfg.lr, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0)
        optimizer = make_optimizer([{"params": list(ppo._named(models.policy).values()), "lr": cfg.lr},
                                    {"params": list(ppo._named(models.value).values()), "lr": cfg.value_lr}],
                                   train_cfg, torch.device("cpu"), fused_on_cpu=True)
        assert optimizer.defaults["fused"]
        if not fused:
            optimizer = torch.optim.AdamW([{k: g[k] for k in ("params", "lr", "base_lr")} for g in optimizer.param_groups],
                                          betas=optimizer.defaults["betas"], weight_decay=0.0, foreach=False)
        ppo.ppo_update(models, exp, optimizer, ppo.Schedule(optimizer, train_cfg), cfg, torch.Generator().manual_seed(0),
                       None, nullcontext())
        states.append({k: v.clone() for k, v in models.policy.state_dict().items()})
    sft, _, _ = load_model(rl_toy.sft)
    moved = max((states[0][k] - v).abs().max().item() for k, v in sft.state_dict().items())
    assert moved > 1e-4
    for name, tensor in states[0].items():
        torch.testing.assert_close(tensor, states[1][name], atol=moved * 1e-3, rtol=0)


def test_rollouts_compile_when_the_run_decodes_enough_steps(rl_toy, monkeypatch):
    from chatforge.infer.engine import COMPILE_AFTER_STEPS
    from chatforge.train.ppo import rollout_engine
    monkeypatch.delenv("CHATFORGE_COMPILE", raising=False)
    models = toy_models(rl_toy)
    cfg = PPOConfig(max_new_tokens=64)
    enough = COMPILE_AFTER_STEPS // 64
    assert rollout_engine(models, cfg, enough)._compiled_now()
    assert not rollout_engine(models, cfg, enough - 1)._compiled_now()
    assert rollout_engine(models, PPOConfig(compile="on"), 1)._compiled_now()
    assert not rollout_engine(models, PPOConfig(compile="off"), 10 * enough)._compiled_now()
    from chatforge.infer.engine import Engine
    with monkeypatch.context() as m:
        m.setattr(Engine, "device", property(lambda self: torch.device("meta")))
        assert not rollout_engine(models, cfg, enough)._compiled_now()  # no compiler for this device
    monkeypatch.setenv("CHATFORGE_COMPILE", "0")
    assert not rollout_engine(models, cfg, 10 * enough)._compiled_now()
    with pytest.raises(ChatforgeError, match="compile must be auto, on or off"):
        PPOConfig(compile="yes").validate()


def test_group_baseline_settings_are_checked():
    with pytest.raises(ChatforgeError, match="samples_per_prompt must be >= 2 with baseline = 'group', got 1"):
        PPOConfig(baseline="group").validate()
    with pytest.raises(ChatforgeError, match="baseline must be 'value' or 'group'"):
        PPOConfig(baseline="critic").validate()
    with pytest.raises(ChatforgeError, match=r"minibatch must be in \[1, rollout_batch x samples_per_prompt = 8\]"):
        PPOConfig(baseline="group", samples_per_prompt=4, rollout_batch=2, minibatch=9).validate()
    PPOConfig(baseline="group", samples_per_prompt=4, rollout_batch=2, minibatch=8).validate()


def test_lora_ppo_keeps_base_weights_bit_identical(rl_toy):
    models = toy_models(rl_toy, lora=True)
    sft, _, _ = load_model(rl_toy.sft)
    train_ppo(models, rl_toy.prompt_ids(), toy_cfg(iterations=2, rollout_batch=12, minibatch=6, lr=1e-3))
    state = models.policy.state_dict()
    for name, tensor in sft.state_dict().items():
        assert torch.equal(state[name], tensor), name
    lora_b = [t for n, t in state.items() if "lora_B" in n]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)  # the adapters did train


def test_ptx_mixes_the_pretraining_loss_into_the_update(rl_toy, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"{q} The answer is a colour, for example red or blue." for q in QUESTIONS * 5))
    models = toy_models(rl_toy)
    history = train_ppo(models, rl_toy.prompt_ids(), toy_cfg(iterations=1, rollout_batch=12, minibatch=6,
                                                              ptx_coef=1.0, ptx_corpus=[str(corpus)], ptx_batch=4,
                                                              ptx_context=16), token_cache=tmp_path / "cache")
    assert 0 < history[-1]["ptx_loss"] < 20


def test_run_ppo_writes_a_policy_checkpoint(rl_toy, tmp_path):
    out = tmp_path / "ppo"
    cfg = PPOConfig(policy=str(rl_toy.sft), reward_model=str(rl_toy.reward), prompts=str(rl_toy.prompts),
                    out=str(out), iterations=2, rollout_batch=6, minibatch=3, max_new_tokens=6,
                    eval_prompts=str(rl_toy.prompts), eval_every=1, sample_every=1, progress=False, device="cpu")
    path = run_ppo(cfg)
    meta = read_meta(path)
    assert meta["kind"] == "policy" and meta["stage"] == "ppo" and meta["parent"] == str(rl_toy.sft.resolve())
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "reward" in r] == [1, 2]
    assert [r["iteration"] for r in rows if "eval_kl" in r] == [0, 1, 2]
    model, _, _ = load_model(path, expect_kind=("policy",))
    assert isinstance(model, GPT)
    from chatforge.eval.rlhf_plots import plot_runs
    pngs = plot_runs([path / "metrics.jsonl"], tmp_path / "plots")
    assert [p.name for p in pngs] == ["ppo_training.png", "overoptimisation.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_run_ppo_with_the_gold_reward_and_a_group_baseline(rl_toy, tmp_path):
    """--reward-model gold: no reward checkpoint is read; the eval rows' proxy is then the gold score itself."""
    cfg = PPOConfig(policy=str(rl_toy.sft), reward_model="gold", prompts=str(rl_toy.prompts), out=str(tmp_path / "p"),
                    iterations=2, rollout_batch=3, samples_per_prompt=2, baseline="group", minibatch=3,
                    max_new_tokens=6, eval_prompts=str(rl_toy.prompts), eval_every=2, gold=True, progress=False,
                    sample_every=0, device="cpu")
    rows = [json.loads(line) for line in (run_ppo(cfg) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_kl" in r]
    assert [r["iteration"] for r in evals] == [0, 2]
    assert all(r["eval_rm_score"] == pytest.approx(r["eval_gold_score"]) for r in evals)
    assert all("explained_var" not in r for r in rows)


# ---------------------------------------------------------------- resume, and LoRA-PPO's output

def run_cfg(rl_toy, out, **kw) -> PPOConfig:
    base = dict(policy=str(rl_toy.sft), reward_model=str(rl_toy.reward), prompts=str(rl_toy.prompts), out=str(out),
                iterations=4, save_every=2, rollout_batch=6, minibatch=3, max_new_tokens=6, adaptive_kl=True,
                kl_coef=0.1, kl_horizon=50.0, score_norm=True, eval_prompts=str(rl_toy.prompts), eval_every=2,
                eval_size=3, sample_every=0, progress=False, device="cpu")
    return PPOConfig(**{**base, **kw})


def metrics(path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


class Killed(Exception):
    """Stands in for SIGKILL: the run stops where it is, with nothing cleaned up."""


def test_a_stopped_and_resumed_run_repeats_the_uninterrupted_one(rl_toy, tmp_path, monkeypatch):
    whole = metrics(run_ppo(run_cfg(rl_toy, tmp_path / "whole")))

    # stopped by an iterations limit after 2, then continued to 4
    limited = tmp_path / "limited"
    run_ppo(run_cfg(rl_toy, limited, iterations=2))
    with pytest.raises(ChatforgeError, match="pass --resume"):
        run_ppo(run_cfg(rl_toy, limited))
    with pytest.raises(ChatforgeError, match=r"cannot resume .*limited: kl_coef changed \(0.1 -> 0.2\)"):
        run_ppo(run_cfg(rl_toy, limited, kl_coef=0.2, resume=True))
    run_ppo(run_cfg(rl_toy, limited, resume=True))

    # killed during iteration 4: saved at 2, iteration 3 already logged
    killed = tmp_path / "killed"
    update, calls = ppo.ppo_update, []

    def dies_in_iteration_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise Killed()
        return update(*args, **kwargs)
    monkeypatch.setattr(ppo, "ppo_update", dies_in_iteration_4)
    with pytest.raises(Killed):
        run_ppo(run_cfg(rl_toy, killed))
    assert read_meta(killed)["metrics"]["iterations"] == 2
    assert [r["iteration"] for r in metrics(killed) if "reward" in r] == [1, 2, 3]
    monkeypatch.setattr(ppo, "ppo_update", update)
    run_ppo(run_cfg(rl_toy, killed, resume=True))

    trained = [r for r in whole if "reward" in r]
    assert [r["iteration"] for r in trained] == [1, 2, 3, 4]
    assert len({round(r["kl_coef"], 9) for r in trained}) == 4  # the adaptive β moved: its state must carry over
    for run in (limited, killed):
        rows = metrics(run)
        assert [r["iteration"] for r in rows if "eval_kl" in r] == [0, 2, 4]  # nothing logged twice
        for a, b in zip(trained, [r for r in rows if "reward" in r], strict=True):
            assert a["iteration"] == b["iteration"]
            for key in ("reward", "kl", "rm_score", "kl_coef", "value_loss", "entropy", "clip_frac"):
                assert abs(a[key] - b[key]) < 1e-6, (run.name, a["iteration"], key, a[key], b[key])
    final = load_model(tmp_path / "whole")[0].state_dict()
    for run in (limited, killed):
        for name, tensor in load_model(run)[0].state_dict().items():
            assert torch.equal(tensor, final[name]), (run.name, name)
    assert "nothing to do" in _resume_output(run_cfg(rl_toy, killed, resume=True))


def _resume_output(cfg: PPOConfig) -> str:
    import contextlib
    import io
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        run_ppo(cfg)
    return buffer.getvalue()


def test_lora_ppo_writes_the_adapter_alone(rl_toy, tmp_path, monkeypatch):
    from chatforge.checkpoint import file_hash
    from chatforge.infer.engine import Engine, SamplingParams
    sft_hash = file_hash(rl_toy.sft / "model.safetensors")
    live = []  # the policy of each run, as it is in memory at the end
    train = ppo.train_ppo

    def keep_models(models, *args, **kwargs):
        live.append(models.policy)
        return train(models, *args, **kwargs)
    monkeypatch.setattr(ppo, "train_ppo", keep_models)
    out = run_ppo(run_cfg(rl_toy, tmp_path / "lora", iterations=2, lora=True, lora_rank=4, lr=1e-3,
                          eval_prompts="", eval_every=0))
    meta = read_meta(out)
    assert meta["kind"] == "adapter" and meta["acts_as"] == "policy" and meta["stage"] == "ppo"
    assert not (out / "model.safetensors").exists()
    assert (out / "adapter.safetensors").stat().st_size < (rl_toy.sft / "model.safetensors").stat().st_size / 5
    assert file_hash(rl_toy.sft / "model.safetensors") == sft_hash
    sft, _, _ = load_model(rl_toy.sft)
    policy_state = live[0].state_dict()
    for name, tensor in sft.state_dict().items():  # the base under the adapters never moved
        assert torch.equal(policy_state[name], tensor), name

    loaded, tok, _ = load_model(out, expect_kind=("policy",))
    merged_out = run_ppo(run_cfg(rl_toy, tmp_path / "merged", iterations=2, lora=True, lora_rank=4, lr=1e-3,
                                 eval_prompts="", eval_every=0, lora_merge=True))
    assert read_meta(merged_out)["kind"] == "policy" and (merged_out / "model.safetensors").is_file()
    merged, _, _ = load_model(merged_out, expect_kind=("policy",))
    prompts = rl_toy.prompt_ids()
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0, stop_ids=tok.stop_ids)
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        assert (live[0](ids) - sft(ids)).abs().max() > 1e-3  # the adapters did train
        for saved, policy in ((loaded, live[0]), (merged, live[1])):
            torch.testing.assert_close(saved(ids), policy(ids), atol=1e-5, rtol=0)
    want = [g.ids for g in Engine(live[0].eval(), tok).generate(prompts, greedy)]
    for model in (loaded, merged):  # same seed, same run: merged or not, the same policy
        assert [g.ids for g in Engine(model.eval(), tok).generate(prompts, greedy)] == want
    assert Engine.load(out).generate(prompts[:1], greedy)[0].ids == want[0]  # as chat and serve load it


# ---------------------------------------------------------------- bad input, refused before any compute

@pytest.fixture
def no_compute(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("models were loaded before the input was checked")
    monkeypatch.setattr(ppo, "load_models", refuse)


def bad_cfg(rl_toy, tmp_path, **kw) -> PPOConfig:
    base = dict(policy=str(rl_toy.sft), reward_model=str(rl_toy.reward), prompts=str(rl_toy.prompts),
                out=str(tmp_path / "out"), progress=False, device="cpu", max_new_tokens=8)
    return PPOConfig(**{**base, **kw})


def test_reward_model_with_another_tokenizer_is_refused(rl_toy, tmp_path, no_compute):
    from chatforge.tokenizer import train_tokenizer
    other_tok = train_tokenizer(["completely different text for another tokenizer"] * 20, 300)
    sft, _, _ = load_model(rl_toy.sft)
    rm = save_model_checkpoint(tmp_path / "rm", ScalarModel.from_lm(sft), other_tok, {"kind": "reward", "stage": "reward"})
    with pytest.raises(ChatforgeError, match="tokenizer differs"):
        run_ppo(bad_cfg(rl_toy, tmp_path, reward_model=str(rm)))


def test_prompt_longer_than_context_is_refused(rl_toy, tmp_path, no_compute):
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(json.dumps({"prompt": "Name a color."}) + "\n" + json.dumps({"prompt": "color " * 80}) + "\n")
    with pytest.raises(ChatforgeError, match=r"long.jsonl:2: the conversation needs \d+ tokens"):
        run_ppo(bad_cfg(rl_toy, tmp_path, prompts=str(prompts)))


def test_empty_prompt_file_is_refused(rl_toy, tmp_path, no_compute):
    prompts = tmp_path / "empty.jsonl"
    prompts.write_text("\n")
    with pytest.raises(ChatforgeError, match="empty.jsonl: no prompts"):
        run_ppo(bad_cfg(rl_toy, tmp_path, prompts=str(prompts)))


def test_reference_that_is_not_the_policys_parent_is_refused(rl_toy, tmp_path, no_compute):
    sft, tok, _ = load_model(rl_toy.sft)
    torch.manual_seed(1)
    stranger = save_model_checkpoint(tmp_path / "stranger", GPT(sft.config), tok, {"kind": "sft", "stage": "sft"})
    with pytest.raises(ChatforgeError, match="is not the policy's parent"):
        run_ppo(bad_cfg(rl_toy, tmp_path, reference=str(stranger)))


def test_reward_model_given_as_policy_is_refused(rl_toy, tmp_path, no_compute):
    with pytest.raises(ChatforgeError, match="expected a policy"):
        run_ppo(bad_cfg(rl_toy, tmp_path, policy=str(rl_toy.reward)))


def test_health_monitor_warns_on_known_failure_modes():
    from chatforge.train.ppo import HealthMonitor
    monitor = HealthMonitor(kl_target=6.0)
    row = {"kl": 0.5, "rm_score": 0.0, "answer_len": 20.0}
    assert monitor.check(row, [f"answer {i}" for i in range(16)]) == []
    warnings = monitor.check({"kl": -0.5, "rm_score": 0.1, "answer_len": 20.0}, ["same"] * 12 + ["other"] * 4)
    assert any("negative KL" in w for w in warnings) and any("collapsing" in w for w in warnings)
    assert any("KL explodes" in w for w in monitor.check({"kl": 80.0, "rm_score": 2.0, "answer_len": 20.0}, []))
    assert any("length hacking" in w for w in monitor.check({"kl": 1.0, "rm_score": 0.5, "answer_len": 60.0}, []))
    assert any("length hacking" in w for w in monitor.check({"kl": 1.0, "rm_score": 0.5, "answer_len": 5.0}, []))
