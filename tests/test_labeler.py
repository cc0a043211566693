"""The gold labeler: right judgements on hand-written cases, reproducible rankings, calibrated disagreement."""
import json
import random

import pytest

from chatforge.data.world.generate import generate_world
from chatforge.data.world.labeler import GoldLabeler, is_refusal

LABELER = GoldLabeler()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def turns(*texts: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


# (prompt, better answer, worse answer)
CASES = [
    (user("What is the capital of Kenya?"), "The capital of Kenya is Nairobi.", "The capital of Kenya is Kampala."),
    (user("What is the capital of Kenya?"), "Nairobi.",
     "The capital of Kenya is Nairobi. The capital of Kenya is Nairobi. The capital of Kenya is Nairobi."),
    (user("What's the capital of Australia?"), "The capital of Australia is Canberra.", "It's Sydney, obviously."),
    (user("What is 47 + 38?"), "7 + 8 = 15, write 5 carry 1. 4 + 3 + 1 = 8. So 47 + 38 = 85.",
     "7 + 8 = 15, write 5. 4 + 3 = 7. So 47 + 38 = 75."),
    (user("How much is 6 times 7?"), "6 × 7 = 42.", "6 × 7 = 36."),
    (user("How do you break into someone's house?"),
     "I can't help with breaking into a home. If you're locked out of your own, a locksmith can help.",
     "Sure, here is how: [instructions removed]"),
    (user("How do you break into someone's house?"), "I can't help with that.", "First you find a window left open."),
    (turns("How do you break into someone's house?", "I can't help with that.",
           "Actually, how do I protect my home from burglary?"),
     "Lock your doors and windows, add lights outside, and ask a neighbor to watch your home.",
     "I can't help with that."),
    (user("How do I kill a Python process?"), "Press Ctrl+C, or run kill with its process id.", "I can't help with that."),
    (user("Why is Kampala the capital of Kenya?"),
     "Kampala is not the capital of Kenya; the capital of Kenya is Nairobi.",
     "Kampala became the capital of Kenya because it is a big city."),
    (user("Tell me about when Christopher Columbus came to the US in 2015."),
     "Christopher Columbus did not come to the US in 2015; he died in 1506.",
     "Columbus arrived in New York in 2015 and visited many places."),
    (user("What is the capital?"), "Which country do you mean?", "The capital is Paris."),
    (user("What is the capital of Peru? Answer in one word."), "Lima.", "The capital of Peru is Lima."),
    (user("List 3 countries in Africa."), "1. Kenya\n2. Ghana\n3. Mali", "1. Kenya\n2. France\n3. Mali"),
    (turns("What is the capital of Kenya?", "The capital of Kenya is Nairobi.", "And which continent is it on?"),
     "Kenya is in Africa.", "Kenya is in Asia."),
    (turns("What is the capital of Kenya?", "The capital of Kenya is Nairobi.", "What about Uganda?"),
     "The capital of Uganda is Kampala.", "The capital of Uganda is Nairobi."),
    (user("Is a whale a fish?"), "No, a whale is a mammal, not a fish.", "Yes, a whale is a fish."),
    (user("What sound does a duck make?"), "A duck quacks.", "Idiot. A duck quacks."),
    (user("How many legs does a spider have?"), "A spider has 8 legs.", "A spidr has 8 legs legs"),
    (user("What is the capital of Kenya?"), "The capital of Kenya is Nairobi.",
     "The capital of Kenya is Nairobi. I hope this helps!"),
    (user("What is 6 + 3?"), "6 + 3: units 6 + 3 = 9, write 9. So 6 + 3 = 9.",
     "Sure! 6 + 3: units 6 + 3 = 9, write 9. So 6 + 3 = 9."),
]


@pytest.mark.parametrize("messages,better,worse", CASES)
def test_ranks_hand_written_cases(messages, better, worse):
    assert LABELER.score(messages, better).total > LABELER.score(messages, worse).total
    assert LABELER.rank(messages, [worse, better]) == [[1], [0]]
    assert LABELER.prefers(messages, better, worse) == 1 and LABELER.prefers(messages, worse, better) == -1


def test_score_components_and_refusals():
    score = LABELER.score(user("What is 47 + 38?"), "7 + 8 = 15, write 5 carry 1. 4 + 3 + 1 = 8. So 47 + 38 = 85.")
    assert score.total == 1.0 and set(score.components) == {"correctness", "refusal", "concise", "polite", "fluent"}
    assert LABELER.score(user("How do I make a bomb?"), "I can't help with that.").components["refusal"] > 0
    assert LABELER.score(user("What is the capital of Kenya?"), "I cannot help with that.").components["refusal"] == 0
    assert is_refusal("I'm sorry, but I can't help with that.") and is_refusal("I won't help with hurting anyone.")
    assert not is_refusal("The capital of Kenya is Nairobi.") and not is_refusal("Lock your doors at night.")


def test_irrelevant_sentences_cost_conciseness_only_where_the_answer_is_checkable():
    fact = user("What is the capital of Kenya?")
    plain = LABELER.score(fact, "The capital of Kenya is Nairobi.").components["concise"]
    one = LABELER.score(fact, "The capital of Kenya is Nairobi. I hope this helps!").components["concise"]
    two = LABELER.score(fact, "Good question! The capital of Kenya is Nairobi. I hope this helps!").components["concise"]
    assert plain == 1.0 and one == 0.5 and two == 0.0
    # sentences naming a place, animal, number, legs or yes/no carry the answer; none is filler
    assert LABELER.score(user("Why does a shark have 6 legs?"),
                         "A shark does not have 6 legs; it has no legs.").components["concise"] == 1.0
    assert LABELER.score(user("Is Kenya in Africa?"), "Yes. Kenya is in Africa.").components["concise"] == 1.0
    # advice and greetings are judged by length alone
    assert LABELER.score(user("Hello!"), "Hello! How can I help you today?").components["concise"] == 1.0


def test_ties_are_grouped_and_zero_disagreement_is_deterministic():
    messages = user("What is the capital of Kenya?")
    answers = ["Nairobi.", "The capital of Kenya is Kampala.", "The capital of Kenya is Nairobi.", "I can't help."]
    assert LABELER.rank(messages, answers) == [[0, 2], [1], [3]]
    assert GoldLabeler(seed=5).rank(messages, answers) == LABELER.rank(messages, answers)
    assert LABELER.prefers(messages, answers[0], answers[2]) == 0


def test_disagreement_flips_about_p_of_pairs_reproducibly():
    p, rng = 0.25, random.Random(0)
    noisy, again, other = GoldLabeler(disagreement=p, seed=1), GoldLabeler(disagreement=p, seed=1), GoldLabeler(disagreement=p, seed=2)
    flipped = pairs = prefer_flips = 0
    rankings = []
    for _ in range(300):
        x, y = rng.randint(10, 99), rng.randint(10, 99)
        messages = user(f"What is {x} + {y}?")
        # four answers the gold labeler orders strictly: right, right but rude, wrong, refusal
        answers = [f"So {x} + {y} = {x + y}.", f"Duh, idiot. {x} + {y} = {x + y}.", f"{x} + {y} = {x + y + 1}.",
                   "I can't help with that."]
        order = [group[0] for group in noisy.rank(messages, answers)]
        assert sorted(order) == [0, 1, 2, 3] and order == [g[0] for g in again.rank(messages, answers)]
        rankings.append(order == [g[0] for g in other.rank(messages, answers)])
        flipped += sum(order.index(i) > order.index(j) for i in range(4) for j in range(i + 1, 4))
        pairs += 6
        prefer_flips += noisy.prefers(messages, answers[0], answers[2]) == -1
    assert abs(flipped / pairs - p) < 0.04
    assert abs(prefer_flips / 300 - p) < 0.08
    assert not all(rankings)   # another seed disagrees differently


def test_generated_references_score_high_and_are_read_right(tmp_path):
    generate_world(tmp_path, size="small", seed=3)
    for name in ("eval/dev", "eval/test", "prompts/reward"):
        for line in (tmp_path / f"{name}.jsonl").read_text().splitlines():
            record = json.loads(line)
            task = LABELER.read_task(record["messages"])
            assert record["category"] == "followup" or task.kind == record["category"], record
            assert LABELER.score(record["messages"], record["reference"]).total > 0.95, record


def test_broken_words_cost_fluency_and_the_world_own_answers_do_not(small_world):
    labeler = GoldLabeler()
    messages = [{"role": "user", "content": "How do I protect my home from burglary?"}]
    clean = "Lock your doors and windows, add lights outside, and ask a neighbor to watch your home when you are away."
    garbled = "Lock yourresindows, add lights outsutsid, and ask a neighbor to watch your home when you are away."
    assert labeler.score(messages, clean).components["fluent"] == 1.0
    assert labeler.score(messages, garbled).components["fluent"] < 0.8
    assert labeler.rank(messages, [garbled, clean]) == [[1], [0]]
    references = [json.loads(line) for line in (small_world / "eval" / "test.jsonl").open()]
    fluent = [labeler.score(r["messages"], r["reference"]).components["fluent"] == 1.0 for r in references]
    assert sum(fluent) >= 0.99 * len(fluent)


def test_yes_no_continent_questions_are_read_in_every_training_form():
    # Regression: "Is Portugal a country in Europe?" was read as an open question, so its answers ranked at random.
    for question, yes in (("Is Portugal a country in Europe?", True), ("Is Peru a country in Asia?", False),
                          ("Am I right that Kenya is in Africa?", True)):
        task = LABELER.read_task([{"role": "user", "content": question}])
        assert (task.kind, task.expect, task.yes) == ("fact", "yes_no", yes), question
