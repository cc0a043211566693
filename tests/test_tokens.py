"""Token shards and the window sampler: contents, split, cache, streaming, determinism, rank/micro split."""
import json
import zlib

import numpy as np
import pytest
import torch

from chatforge import ChatforgeError
from chatforge.data import tokens
from chatforge.data.tokens import TokenData, WindowSampler, eval_batches, tokenize_corpus
from chatforge.tokenizer import train_tokenizer


def _docs(n=40):
    return [f"document {i}: " + " ".join(["alpha", "beta", "gamma", "delta"][j % 4] for j in range(i % 7 + 3))
            for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(_docs(), 300)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs()))
    return path


def _all_tokens(split):
    return np.concatenate([np.asarray(s) for s in split.shards]) if split and split.shards else np.array([])


def test_shards_hold_every_document_once_with_a_hash_chosen_validation_split(corpus, tokenizer, tmp_path):
    data = tokenize_corpus([corpus], tokenizer, tmp_path / "cache", val_fraction=0.25, progress=False)
    assert data.index["dtype"] == "uint16"
    expected = {"train": [], "val": []}
    for d in _docs():
        split = "val" if zlib.crc32(d.encode()) % 10_000 < 2500 else "train"
        expected[split] += [tokenizer.bos_id, *tokenizer.encode(d)]
    assert expected["val"] and expected["train"]
    assert _all_tokens(data.train).tolist() == expected["train"]
    assert _all_tokens(data.val).tolist() == expected["val"]
    assert data.index["train_tokens"] + data.index["val_tokens"] == len(expected["train"]) + len(expected["val"])


def test_cache_is_reused_and_keyed_by_corpus_and_tokenizer(corpus, tokenizer, tmp_path, monkeypatch):
    first = tokenize_corpus([corpus], tokenizer, tmp_path / "cache", progress=False)
    calls = []
    monkeypatch.setattr(type(tokenizer), "encode_batch", lambda self, texts: calls.append(1) or [])
    again = tokenize_corpus([corpus], tokenizer, tmp_path / "cache", progress=False)
    assert again.root == first.root and not calls  # nothing re-tokenized
    monkeypatch.undo()
    other_tokenizer = train_tokenizer(_docs()[:10], 280)
    assert tokenize_corpus([corpus], other_tokenizer, tmp_path / "cache", progress=False).root != first.root
    corpus.write_text(corpus.read_text() + json.dumps({"text": "one more document"}) + "\n")
    assert tokenize_corpus([corpus], tokenizer, tmp_path / "cache", progress=False).root != first.root
    assert not list((tmp_path / "cache").glob("*.tmp-*"))


def test_corpus_is_streamed_in_bounded_batches(corpus, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(tokens, "ENCODE_CHARS", 100)
    sizes = []
    real = type(tokenizer).encode_batch
    monkeypatch.setattr(type(tokenizer), "encode_batch", lambda self, texts: sizes.append(sum(map(len, texts)))
                        or real(self, texts))
    tokenize_corpus([corpus], tokenizer, tmp_path / "cache", progress=False)
    longest = max(len(d) for d in _docs())
    assert len(sizes) > 5 and max(sizes) < 100 + longest


def test_shards_roll_over_and_windows_stay_inside_one_shard(corpus, tokenizer, tmp_path):
    data = tokenize_corpus([corpus], tokenizer, tmp_path / "cache", val_fraction=0.0, shard_tokens=97,
                           progress=False)
    assert len(data.train.shards) > 3 and all(len(s) <= 97 for s in data.train.shards)
    assert data.val is None
    context = 16
    starts = np.arange(data.train.num_windows(context))
    x, y = data.train.windows(starts, context)
    assert x.shape == (len(starts), context) and torch.equal(x[:, 1:], y[:, :-1])
    pieces = {tuple(np.asarray(s[i:i + context + 1])) for s in data.train.shards for i in range(len(s) - context)}
    assert {tuple(torch.cat([a[:1], b]).tolist()) for a, b in zip(x, y)} == pieces  # every window, no crossing


def test_tiny_corpus_holds_out_its_tail_when_no_document_is_drawn(tmp_path, tokenizer):
    path = tmp_path / "one.txt"
    path.write_text("a single document of a few words that the hash puts in training\n")
    data = tokenize_corpus([path], tokenizer, tmp_path / "cache", val_fraction=0.2, progress=False)
    whole = [tokenizer.bos_id, *tokenizer.encode(path.read_text().rstrip("\n"))]
    assert data.val is not None and data.index["val_tokens"] >= 1
    assert _all_tokens(data.train).tolist() + _all_tokens(data.val).tolist() == whole


def test_sampler_is_a_pure_function_of_seed_and_step(corpus, tokenizer, tmp_path):
    data = tokenize_corpus([corpus], tokenizer, tmp_path / "cache", progress=False)
    a = WindowSampler(data.train, 16, batch_size=8, seed=1)
    b = WindowSampler(data.train, 16, batch_size=8, seed=1)
    later = [b(s)[0] for s in range(5)]
    assert torch.equal(a(4)[0], later[4])  # resuming at step 4 needs no history
    assert not torch.equal(a(4)[0], a(5)[0])
    assert not torch.equal(a(4)[0], WindowSampler(data.train, 16, batch_size=8, seed=2)(4)[0])


def test_ranks_and_micro_batches_deal_out_one_global_batch(corpus, tokenizer, tmp_path):
    data = tokenize_corpus([corpus], tokenizer, tmp_path / "cache", progress=False)
    whole = WindowSampler(data.train, 16, batch_size=8, seed=3)(7)[0]
    parts = [WindowSampler(data.train, 16, batch_size=8, grad_accum=2, seed=3, rank=r, world_size=2)(7, m)[0]
             for m in range(2) for r in range(2)]
    assert all(p.shape == (2, 16) for p in parts)
    assert torch.equal(torch.cat(parts), whole)
    with pytest.raises(ChatforgeError, match="batch_size 6 does not split"):
        WindowSampler(data.train, 16, batch_size=6, grad_accum=2, world_size=2)


def test_too_short_a_corpus_for_the_context_is_an_error(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("tiny\n")
    data = tokenize_corpus([path], tokenizer, tmp_path / "cache", val_fraction=0.0, progress=False)
    with pytest.raises(ChatforgeError, match="fewer than context 64"):
        WindowSampler(data.train, 64, batch_size=2)


def test_eval_batches_are_fixed_and_spread_over_the_split(corpus, tokenizer, tmp_path):
    data = tokenize_corpus([corpus], tokenizer, tmp_path / "cache", val_fraction=0.0, progress=False)
    batches = eval_batches(data.train, 8, rows=4, windows=12)
    assert [x.shape[0] for x, _ in batches] == [4, 4, 4]
    again = eval_batches(data.train, 8, rows=4, windows=12)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    first, last = batches[0][0][0], batches[-1][0][-1]
    flat = _all_tokens(data.train)
    assert first.tolist() == flat[:8].tolist() and last.tolist() == flat[-9:-1].tolist()


def test_cache_from_another_version_is_refused(corpus, tokenizer, tmp_path):
    data = tokenize_corpus([corpus], tokenizer, tmp_path / "cache", progress=False)
    index = json.loads((data.root / "index.json").read_text())
    (data.root / "index.json").write_text(json.dumps({**index, "version": 99}))
    with pytest.raises(ChatforgeError, match="index.json: token cache version 99"):
        TokenData.open(data.root)
