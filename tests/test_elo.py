import json

import numpy as np
import pytest

from chatforge import ChatforgeError
from chatforge.cli import main
from chatforge.eval.elo import ELO_MEAN, EloConfig, Game, elo, elo_ratings, fit_bradley_terry, judge_games


def synthetic_games(true_elo: list[float], prompts: int, seed: int) -> list[Game]:
    """Every pair plays once per prompt; a beats b with the Elo model's probability."""
    rng = np.random.default_rng(seed)
    games = []
    for p in range(prompts):
        for a in range(len(true_elo)):
            for b in range(a + 1, len(true_elo)):
                p_a = 1 / (1 + 10 ** ((true_elo[b] - true_elo[a]) / 400))
                games.append(Game(p, a, b, float(rng.random() < p_a)))
    return games


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_elo_recovers_three_players_with_known_win_rates(seed):
    true = [800.0, 1200.0, 1000.0]  # win rates: 1200 beats 1000 76% of the time, 800 91% of the time
    ratings = elo_ratings(synthetic_games(true, prompts=150, seed=seed), ["weak", "strong", "middle"],
                          bootstrap=300, seed=seed)
    assert [r.name for r in ratings] == ["strong", "middle", "weak"]
    assert np.mean([r.elo for r in ratings]) == pytest.approx(ELO_MEAN)
    by_name = {r.name: r for r in ratings}
    for name, elo_true in (("strong", 1200.0), ("middle", 1000.0), ("weak", 800.0)):
        r = by_name[name]
        assert r.low < r.elo < r.high
        assert abs(r.elo - elo_true) < 60  # the fit, centred on 1000 like the truth, is near it
    assert by_name["strong"].games == 300 and by_name["strong"].wins > 150


def test_unbeaten_player_gets_a_finite_rating_and_ties_count_half():
    wins = np.array([[0.0, 10.0], [0.0, 0.0]])
    ratings = fit_bradley_terry(wins)
    assert np.isfinite(ratings).all() and ratings[0] > ratings[1]
    even = elo_ratings([Game(p, 0, 1, 0.5) for p in range(20)], ["a", "b"], bootstrap=50)
    assert even[0].elo == pytest.approx(even[1].elo) and even[0].wins == 10


def test_judges_compare_answers_by_content(toy_reward_model):
    banana = [[{"role": "user", "content": "Say something about sun."}]] * 3
    answers = [["sun banana moon", "tree banana", "banana road"], ["sun moon", "tree", "road house"]]
    games = judge_games(banana, answers, str(toy_reward_model))
    assert [g.outcome for g in games] == [1.0, 1.0, 1.0]  # the reward model prefers the marker word
    capital = [[{"role": "user", "content": "What is the capital of Kenya?"}]]
    games = judge_games(capital, [["The capital of Kenya is Nairobi."], ["The capital of Kenya is Lima."],
                                  ["The capital of Kenya is Nairobi."]], "gold")
    assert [(g.a, g.b, g.outcome) for g in games] == [(0, 1, 1.0), (0, 2, 0.5), (1, 2, 0.0)]


def test_elo_command_end_to_end(rl_toy, reward_toy, toy_reward_model, tmp_path, capsys):
    out = tmp_path / "elo.json"
    code = main(["eval", "elo", str(rl_toy.sft), str(reward_toy.base), "--judge", str(toy_reward_model),
                 "--prompts", str(rl_toy.prompts), "--max-new-tokens", "8", "--bootstrap", "50", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["prompts"] == 6 and result["games"] == 6
    assert {r["name"] for r in result["ratings"]} == {str(rl_toy.sft), str(reward_toy.base)}
    assert len(result["answers"]) == 6 and str(rl_toy.sft) in result["answers"][0]
    assert "Elo from 6 games" in capsys.readouterr().out


def test_elo_refuses_a_reward_model_as_player_and_a_policy_as_judge(rl_toy, reward_toy, toy_reward_model):
    with pytest.raises(ChatforgeError, match="is a reward checkpoint, expected base or sft or policy"):
        elo(EloConfig(checkpoints=[str(rl_toy.sft), str(toy_reward_model)], prompts=str(rl_toy.prompts)))
    with pytest.raises(ChatforgeError, match="is a sft checkpoint, expected reward"):
        elo(EloConfig(checkpoints=[str(rl_toy.sft), str(reward_toy.base)], judge=str(rl_toy.sft)))
    with pytest.raises(ChatforgeError, match="two or more checkpoints"):
        elo(EloConfig(checkpoints=[str(rl_toy.sft)]))
