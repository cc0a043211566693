import json
from itertools import combinations

import pytest

from chatforge import ChatforgeError
from chatforge.data.preferences import ranking_pairs, read_comparisons, to_pairs


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_both_forms_read_and_expand_to_pairs(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "Say hi", "chosen": "hi", "rejected": "no", "category": "greet"},
        {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "Q"}],
         "responses": ["best", ["tie a", "tie b"], "worst"]},
        {"prompt": [{"role": "user", "content": "Q2"}],
         "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]},
    ])
    pair, ranking, conversational = read_comparisons(path)
    assert pair.messages == [{"role": "user", "content": "Say hi"}]
    assert pair.tiers == [["hi"], ["no"]] and pair.fields == {"category": "greet"}
    assert pair.where == f"{path}:1"
    assert ranking.answers == ["best", "tie a", "tie b", "worst"]
    # 4 answers give C(4,2) = 6 pairs; the tied pair (1, 2) is left out
    assert ranking.pairs() == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert conversational.tiers == [["good"], ["bad"]]
    pairs = to_pairs([ranking])
    assert [(p.chosen, p.rejected) for p in pairs] == [("best", "tie a"), ("best", "tie b"), ("best", "worst"),
                                                        ("tie a", "worst"), ("tie b", "worst")]


def test_ranking_pairs_is_all_pairs_without_ties():
    assert ranking_pairs([1] * 5) == list(combinations(range(5), 2))
    assert ranking_pairs([2, 1]) == [(0, 2), (1, 2)]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "responses": ["only one"]}, "at least two answers"),
    ({"prompt": "q", "responses": ["a", "b", "a"]}, "same answer appears twice"),
    ({"prompt": "q", "responses": [["a", "b"]]}, "ranked equal"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "are the same answer"),
    ({"chosen": "a", "rejected": "b"}, "missing prompt"),
    ({"prompt": "q", "chosen": "a"}, "missing 'rejected'"),
    ({"prompt": "q", "answers": ["a", "b"]}, "unranked answers"),
    ({"prompt": "q", "responses": ["a", 3]}, r"responses\[1\]"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "chosen": "x", "rejected": "y"}, "ends with an assistant turn"),
    ({"messages": [{"role": "robot", "content": "q"}], "chosen": "x", "rejected": "y"}, "unknown role"),
    ("{not json", "not valid JSON"),
])
def test_bad_records_name_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(ChatforgeError, match=message) as err:
        read_comparisons(path)
    assert str(err.value).startswith(f"{path}:2:")


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(ChatforgeError, match="not found"):
        read_comparisons(tmp_path / "nope.jsonl")
    with pytest.raises(ChatforgeError, match="no comparisons"):
        read_comparisons(write_jsonl(tmp_path / "empty.jsonl", []))
