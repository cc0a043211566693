"""PPO's arithmetic against hand-computed values."""
import math

import pytest
import torch

from chatforge.train.rl_math import (AdaptiveKLController, RunningMoments, explained_variance, gae, group_advantages,
                                     kl_per_token, per_token_rewards, policy_loss, token_logprobs, value_loss, whiten)


def test_gae_matches_hand_computed_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.1, 0.2, 9.0]])  # 9.0 sits on padding and must not leak
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: δ = (0.1, 0.1, 0.3); A2 = 0.3, A1 = 0.1 + 0.95·0.3, A0 = 0.1 + 0.95·A1
    a1 = 0.1 + 0.95 * 0.3
    expected = torch.tensor([[0.1 + 0.95 * a1, a1, 0.3], [0.1 + 0.95 * 1.8, 1.8, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, (expected + values) * mask)


def test_gae_with_discount():
    advantages, _ = gae(torch.tensor([[1.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2), gamma=0.9, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[1.0 + 0.45, 1.0]]))


def test_gae_lambda_one_gives_monte_carlo_returns():
    rewards = torch.tensor([[0.5, -1.0, 2.0, 0.25]])
    values = torch.tensor([[0.3, 0.1, -0.2, 0.4]])
    _, returns = gae(rewards, values, torch.ones(1, 4), gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, rewards.flip(1).cumsum(1).flip(1))


def test_group_advantages_are_leave_one_out_returns():
    # two prompts x 3 answers; the second group's answers are identical, the first group's KL costs its best answer
    scores = torch.tensor([1.0, 2.0, 4.0, 0.5, 0.5, 0.5])
    kl = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1, 0], [1, 1], [1, 1], [1, 1], [1, 0], [1, 1]])
    advantages = group_advantages(scores, kl, mask, kl_coef=0.1, group_size=3)
    returns = torch.tensor([1.0, 2.0, 3.0])               # 4 - 0.1 x (5 + 5)
    loo = returns - (returns.sum() - returns) / 2          # each against the mean of the other two
    raw = torch.cat([loo, torch.zeros(3)])
    expected = (raw / raw.std()).unsqueeze(1) * mask
    torch.testing.assert_close(advantages, expected)
    assert advantages[3:].abs().max() == 0                # nothing to compare: no push
    assert advantages[0, 1] == 0                          # padding stays 0
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(scores, kl, mask, 0.1, group_size=4)


def test_per_token_rewards_put_score_on_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    r = per_token_rewards(torch.tensor([1.0, 2.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.2, -0.25 + 2.0, 0.0]]))


@pytest.mark.parametrize("advantage,log_ratio,expect_zero", [
    (1.0, math.log(1.5), True),     # ratio above 1+ε and the advantage wants it higher: clipped
    (-1.0, math.log(0.5), True),    # ratio below 1-ε and the advantage wants it lower: clipped
    (1.0, math.log(0.5), False),    # the pessimistic bound is the unclipped term: gradient flows
    (-1.0, math.log(1.5), False),
    (1.0, math.log(1.1), False),    # inside the range
])
def test_clipped_objective_gradient_is_zero_outside_clip_range(advantage, log_ratio, expect_zero):
    old = torch.tensor([[-2.0]])
    new = (old + log_ratio).clone().requires_grad_(True)
    loss, _ = policy_loss(new, old, torch.tensor([[advantage]]), torch.ones(1, 1), clip_range=0.2)
    loss.backward()
    assert (new.grad.abs().item() == 0.0) is expect_zero


def test_policy_loss_reports_clip_fraction():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.0, 1.5, 0.5, 1.1]]))
    _, stats = policy_loss(new, old, torch.ones(1, 4), torch.ones(1, 4), clip_range=0.2)
    assert stats["clip_frac"] == pytest.approx(0.25)  # only 1.5 is clipped with A > 0


def test_value_loss_is_clipped_around_old_values():
    old, returns = torch.tensor([[0.0]]), torch.tensor([[1.0]])
    values = torch.tensor([[0.5]], requires_grad=True)
    loss, stats = value_loss(values, old, returns, torch.ones(1, 1), clip_range=0.2)
    # clipped value 0.2 is further from the return than 0.5: the max picks it, and its gradient is zero
    assert loss.item() == pytest.approx(0.5 * 0.8 ** 2)
    loss.backward()
    assert values.grad.item() == 0.0 and stats["value_clip_frac"] == 1.0


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_is_zero_for_identical_distributions(estimator):
    lp = torch.log_softmax(torch.randn(3, 5, 11), -1).max(-1).values
    assert torch.equal(kl_per_token(lp, lp.clone(), estimator), torch.zeros_like(lp))


def test_kl_estimators_are_unbiased_on_samples():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6), 0)
    q = torch.softmax(torch.randn(6), 0)
    exact = (p * (p / q).log()).sum()
    samples = torch.multinomial(p, 200_000, replacement=True)
    for est in ("k1", "k3"):
        estimate = kl_per_token(p.log()[samples], q.log()[samples], est).mean()
        assert estimate.item() == pytest.approx(exact.item(), rel=0.05)
    assert (kl_per_token(p.log()[samples], q.log()[samples], "k3") >= 0).all()


def test_token_logprobs_equal_log_softmax_gather():
    logits = torch.randn(2, 3, 7)
    tokens = torch.randint(0, 7, (2, 3))
    torch.testing.assert_close(token_logprobs(logits, tokens),
                               logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1))


def test_whiten_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    w = whiten(x, mask)
    real = w[mask.bool()]
    assert real.mean().abs() < 1e-6 and real.std().item() == pytest.approx(1.0, abs=1e-4)
    assert (w[~mask.bool()] == 0).all()


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask) == pytest.approx(0.0, abs=1e-6)


def test_adaptive_kl_moves_toward_target_with_bounded_step():
    ctl = AdaptiveKLController(init=0.15, target=6.0, horizon=10000)
    assert ctl.update(kl=60.0, n_answers=500) == pytest.approx(0.15 * (1 + 0.2 * 500 / 10000))  # error clipped
    ctl = AdaptiveKLController(init=0.15, target=6.0, horizon=10000)
    assert ctl.update(kl=3.0, n_answers=1000) == pytest.approx(0.15 * (1 - 0.2 * 0.1))
    assert AdaptiveKLController(0.15, 6.0, 10000).update(6.0, 1000) == pytest.approx(0.15)


def test_running_moments_match_batch_statistics():
    torch.manual_seed(0)
    data = torch.randn(1000) * 3 + 2
    rm = RunningMoments()
    for chunk in data.split(64):
        rm.update(chunk)
    assert rm.mean == pytest.approx(data.mean().item(), abs=1e-4)
    assert rm.std == pytest.approx(data.std(unbiased=False).item(), rel=1e-4)
