"""The generation engine against full recomputation, and the `chatforge generate` command."""
import copy
import json
import re

import pytest
import torch

from chatforge import ChatforgeError
from chatforge.cli import main
from chatforge.infer.engine import Engine, SamplingParams

LENGTHS = (3, 11, 6, 1)


@pytest.fixture
def engine(tiny_lm):
    _, model, tokenizer = tiny_lm
    return Engine(model, tokenizer, compile=False)


@pytest.fixture(params=[False, True], ids=["eager", "compiled"])
def any_engine(tiny_lm, request):
    """The engine decoding eagerly and through torch.compile: each must pass the tests that use this."""
    _, model, tokenizer = tiny_lm
    return Engine(model, tokenizer, compile=request.param)


@pytest.fixture
def prompts(tiny_lm):
    vocab = tiny_lm[1].config.vocab_size
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def full_forward_greedy(model, prompt, steps):
    """Greedy continuation by recomputing the whole sequence every step: no cache, no padding."""
    seq, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([seq]))[0, -1]
            token = int(logits.argmax())
            logprobs.append(float(logits.log_softmax(-1)[token]))
            seq.append(token)
    return seq[len(prompt):], logprobs


def test_kv_cache_equals_full_recomputation_for_mixed_prompt_lengths(any_engine, prompts):
    gens = any_engine.generate(prompts, SamplingParams(max_new_tokens=12, stop_ids=[]), return_logprobs=True)
    for prompt, gen in zip(prompts, gens):
        ids, logprobs = full_forward_greedy(any_engine.model, prompt, 12)
        assert gen.ids == ids
        assert gen.logprobs == pytest.approx(logprobs, abs=1e-4)
        assert gen.finish_reason == "length" and gen.prompt_ids == prompt


def test_a_row_does_not_depend_on_its_batch(any_engine, prompts):
    params = SamplingParams(max_new_tokens=10, stop_ids=[])
    together = any_engine.generate(prompts, params)
    alone = [any_engine.generate([p], params)[0] for p in prompts]
    assert [g.ids for g in together] == [g.ids for g in alone]


def full_logprobs(model, prompt, ids):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids]))[0, len(prompt) - 1:-1]
    return logits.log_softmax(-1).gather(1, torch.tensor(ids)[:, None]).squeeze(1).tolist()


def test_logprobs_are_the_raw_model_distribution_whatever_the_sampling(any_engine, prompts):
    params = SamplingParams(max_new_tokens=10, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.5,
                            stop_ids=[], seed=3)
    for prompt, gen in zip(prompts, any_engine.generate(prompts, params, return_logprobs=True)):
        assert len(gen.logprobs) == len(gen.ids) == 10
        assert gen.logprobs == pytest.approx(full_logprobs(any_engine.model, prompt, gen.ids), abs=1e-4)
    assert any_engine.generate(prompts, params)[0].logprobs is None


def test_top_k_1_sampling_equals_greedy(engine, prompts):
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=10, stop_ids=[]))
    sampled = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=1.5, top_k=1, stop_ids=[], seed=1))
    assert [g.ids for g in sampled] == [g.ids for g in greedy]


def test_same_seed_same_output_and_seeds_matter(engine, prompts):
    def run(seed):
        params = SamplingParams(max_new_tokens=15, temperature=1.0, stop_ids=[], seed=seed)
        return [g.ids for g in engine.generate(prompts, params)]
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_sampling_follows_the_distribution(engine, prompts):
    """Many one-token samples: frequencies of the likeliest tokens match softmax(logits / T)."""
    prompt = prompts[1]
    with torch.no_grad():
        probs = (engine.model(torch.tensor([prompt]))[0, -1] / 0.5).softmax(-1)
    gens = engine.generate([prompt], SamplingParams(max_new_tokens=1, temperature=0.5, stop_ids=[], seed=0),
                           num_samples=2000)
    counts = torch.bincount(torch.tensor([g.ids[0] for g in gens]), minlength=len(probs)).float() / 2000
    top = probs.topk(3).indices
    assert torch.allclose(counts[top], probs[top], atol=0.04)


def test_top_p_keeps_only_the_nucleus(engine, prompts):
    prompt = prompts[2]
    with torch.no_grad():
        probs = engine.model(torch.tensor([prompt]))[0, -1].softmax(-1)
    ranked = probs.sort(descending=True)
    nucleus = set(ranked.indices[:int((ranked.values.cumsum(0) < 0.3).sum()) + 1].tolist())
    gens = engine.generate([prompt], SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.3, stop_ids=[],
                                                    seed=0), num_samples=200)
    seen = {g.ids[0] for g in gens}
    assert seen <= nucleus and len(seen) == len(nucleus)


def test_repetition_penalty_discourages_seen_tokens(engine, prompts):
    plain = engine.generate(prompts, SamplingParams(max_new_tokens=30, stop_ids=[]))
    penalised = engine.generate(prompts, SamplingParams(max_new_tokens=30, repetition_penalty=10.0, stop_ids=[]))
    repeats = lambda gens: sum(len(g.ids) - len(set(g.ids)) for g in gens)  # noqa: E731
    assert repeats(penalised) < repeats(plain)


def test_stop_tokens_end_their_row_only(any_engine, prompts):
    free = any_engine.generate(prompts, SamplingParams(max_new_tokens=12, stop_ids=[]))
    stop = free[0].ids[4]  # a token that row 0 produces at step 5
    gens = any_engine.generate(prompts, SamplingParams(max_new_tokens=12, stop_ids=[stop]), return_logprobs=True)
    for f, g in zip(free, gens):
        if stop in f.ids:
            cut = f.ids.index(stop)
            assert g.ids == f.ids[:cut] and g.finish_reason == "stop"
            assert len(g.logprobs) == cut + 1  # the stop token's log-prob is reported too
        else:
            assert g.ids == f.ids and g.finish_reason == "length"


def test_default_stop_ids_are_the_tokenizers(engine, prompts):
    first = engine.generate(prompts[:1], SamplingParams(max_new_tokens=1, stop_ids=[]))[0].ids[0]
    tokenizer = copy.copy(engine.tokenizer)
    tokenizer.stop_ids = [first]
    gen = Engine(engine.model, tokenizer).generate(prompts[:1], SamplingParams(max_new_tokens=5))[0]
    assert gen.ids == [] and gen.finish_reason == "stop"


def test_streaming_yields_the_same_tokens_as_generate(any_engine, prompts):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=5, stop_ids=[any_engine.generate(
        prompts, SamplingParams(max_new_tokens=3, stop_ids=[]))[1].ids[2]])
    gens = any_engine.generate(prompts, params, num_samples=2)
    streamed: dict[int, list[int]] = {}
    stream = any_engine.stream(prompts, params, num_samples=2)
    for step in stream:
        assert len({row for row, _ in step}) == len(step)
        for row, token in step:
            streamed.setdefault(row, []).append(token)
    for row, gen in enumerate(gens):
        expected = gen.ids + (params.stop_ids if gen.finish_reason == "stop" else [])
        assert streamed[row] == expected
    assert [g.ids for g in stream.generations()] == [g.ids for g in gens]


def test_cancelling_a_row_drops_it_and_leaves_the_others(any_engine, prompts):
    params = SamplingParams(max_new_tokens=8, stop_ids=[])
    full = any_engine.generate(prompts, params)
    stream = any_engine.stream(prompts, params)
    rows_per_step = []
    for n, step in enumerate(stream):
        rows_per_step.append(sorted(row for row, _ in step))
        if n == 1:
            stream.cancel(2)
    assert rows_per_step[1] == [0, 1, 2, 3] and rows_per_step[2] == [0, 1, 3]
    gens = stream.generations()
    assert gens[2].finish_reason == "cancelled" and gens[2].ids == full[2].ids[:2]
    assert [gens[i].ids for i in (0, 1, 3)] == [full[i].ids for i in (0, 1, 3)]


def test_closing_a_stream_cancels_the_unfinished_rows(engine, prompts):
    stream = engine.stream(prompts, SamplingParams(max_new_tokens=8, stop_ids=[]))
    next(stream)
    stream.close()
    assert {g.finish_reason for g in stream.generations()} == {"cancelled"}
    with pytest.raises(StopIteration):
        next(stream)


def test_num_samples_prefills_once_and_matches_repeated_prompts(any_engine, prompts):
    greedy = SamplingParams(max_new_tokens=8, stop_ids=[])
    single = any_engine.generate(prompts, greedy)
    triple = any_engine.generate(prompts, greedy, num_samples=3)
    assert [g.ids for g in triple] == [g.ids for g in single for _ in range(3)]
    assert [g.prompt_ids for g in triple] == [p for p in prompts for _ in range(3)]
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, stop_ids=[], seed=11)
    by_samples = any_engine.generate(prompts, sampled, num_samples=3)
    by_repeats = any_engine.generate([p for p in prompts for _ in range(3)], sampled)
    assert [g.ids for g in by_samples] == [g.ids for g in by_repeats]
    assert len({tuple(g.ids) for g in by_samples[:3]}) > 1  # the samples of one prompt differ


def test_compiled_decoding_gives_the_eager_tokens_and_log_probs(tiny_lm, prompts):
    _, model, tokenizer = tiny_lm
    params = SamplingParams(max_new_tokens=10, temperature=1.0, stop_ids=[7, 9], seed=4)
    eager = Engine(model, tokenizer, compile=False).generate(prompts, params, return_logprobs=True)
    compiled = Engine(model, tokenizer, compile=True).generate(prompts, params, return_logprobs=True)
    assert [g.ids for g in compiled] == [g.ids for g in eager]
    for c, e in zip(compiled, eager):
        assert c.logprobs == pytest.approx(e.logprobs, abs=1e-4)


def test_a_failing_compiler_warns_once_and_decodes_eagerly(tiny_lm, prompts, monkeypatch):
    import chatforge.infer.engine as engine_module

    def broken(fn, **kw):
        def call(*args):
            raise RuntimeError("no C++ compiler")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(engine_module, "_compiled_decode_step", None)
    monkeypatch.setattr(engine_module, "_compile_failed", False)
    _, model, tokenizer = tiny_lm
    params = SamplingParams(max_new_tokens=6, stop_ids=[])
    expected = [g.ids for g in Engine(model, tokenizer, compile=False).generate(prompts, params)]
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler") as caught:
        got = [g.ids for g in Engine(model, tokenizer, compile=True).generate(prompts, params)]
        got_again = [g.ids for g in Engine(model, tokenizer, compile=True).generate(prompts, params)]
    assert got == got_again == expected
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1


def test_default_policy_compiles_only_after_enough_decode_steps(tiny_lm, prompts, monkeypatch):
    import chatforge.infer.engine as engine_module
    monkeypatch.delenv("CHATFORGE_COMPILE", raising=False)
    monkeypatch.setattr(engine_module, "COMPILE_AFTER_STEPS", 5)
    _, model, tokenizer = tiny_lm
    engine = Engine(model, tokenizer)
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=5, stop_ids=[]))  # 4 decode steps after prefill
    assert engine.decode_steps == 4 and not engine._compiled_now()
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=2, stop_ids=[]))
    assert engine._compiled_now() and not Engine(model, tokenizer)._compiled_now()
    assert Engine(model, tokenizer, expected_steps=5)._compiled_now()  # a long job compiles from its first step
    assert not Engine(model, tokenizer, expected_steps=4)._compiled_now()
    monkeypatch.setenv("CHATFORGE_COMPILE", "0")
    assert Engine(model, tokenizer).compile is False and Engine(model, tokenizer, compile=True).compile is True


def test_generation_stops_at_the_context_length(engine):
    context = engine.config.max_position_embeddings
    gens = engine.generate([[5] * (context - 3), [6] * 2], SamplingParams(max_new_tokens=10, stop_ids=[]))
    assert len(gens[0].ids) == 3 and gens[0].finish_reason == "length"
    assert len(gens[1].ids) == 10


def test_prompt_longer_than_the_context_is_refused(engine):
    context = engine.config.max_position_embeddings
    with pytest.raises(ChatforgeError, match=f"prompt 1: {context} tokens .*context of {context}"):
        engine.generate([[1, 2], [5] * context], SamplingParams())
    with pytest.raises(ChatforgeError, match="prompt 0: must be a non-empty"):
        engine.stream([[]], SamplingParams())
    with pytest.raises(ChatforgeError, match="outside the vocabulary"):
        engine.generate([[engine.config.vocab_size]], SamplingParams())
    with pytest.raises(ChatforgeError, match="top_p"):
        engine.generate([[1]], SamplingParams(top_p=0.0))


def test_chat_uses_the_chat_template_and_training_mode_is_restored(engine):
    conversations = [[{"role": "user", "content": "Hello!"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat"}]]
    params = SamplingParams(max_new_tokens=6, stop_ids=[])
    chats = engine.chat(conversations, params)
    direct = engine.generate([engine.tokenizer.prompt(c) for c in conversations], params)
    assert [c.ids for c in chats] == [d.ids for d in direct]
    assert chats[0].text == engine.tokenizer.decode(chats[0].ids)
    engine.model.train()
    try:
        assert [g.ids for g in engine.chat(conversations, params)] == [c.ids for c in chats]
        assert engine.model.training
    finally:
        engine.model.eval()


def test_engine_load_from_a_checkpoint(tiny_lm, prompts):
    path, model, tokenizer = tiny_lm
    params = SamplingParams(max_new_tokens=6, stop_ids=[])
    loaded = Engine.load(path, device="cpu")
    assert [g.ids for g in loaded.generate(prompts, params)] == [g.ids for g in Engine(model, tokenizer).generate(prompts, params)]


# --- chatforge generate ---

def test_generate_cli_batch_mode_keeps_order_and_fields(tiny_lm, tmp_path):
    path, model, tokenizer = tiny_lm
    requests = [{"prompt": "the cat", "id": 1}, {"messages": [{"role": "user", "content": "Hello!"}]},
                {"prompt": "1 + 2 = 3, 12 + 30 = 42 and the cat sat on the mat"}, {"prompt": ""}]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in requests) + "\n\n")
    assert main(["generate", str(path), "--input", str(src), "--output", str(out), "--max-new-tokens", "7",
                 "--batch-size", "3", "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "completion"} for r in lines] == requests
    engine = Engine(model, tokenizer)
    params = SamplingParams(max_new_tokens=7)
    expected = [engine.generate([[tokenizer.bos_id] + tokenizer.encode(requests[0]["prompt"])], params)[0].text,
                engine.chat([requests[1]["messages"]], params)[0].text]
    assert [r["completion"] for r in lines[:2]] == expected


@pytest.mark.parametrize("line, message", [
    ("{not json", "in.jsonl:2: not valid JSON"),
    ('{"text": "x"}', 'in.jsonl:2: needs exactly one of "prompt"'),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "in.jsonl:2: messages\\[0\\]: unknown role"),
    ('{"prompt": 3}', 'in.jsonl:2: "prompt" must be a string'),
    ('{"prompt": "' + "the cat " * 40 + '"}', "in.jsonl:2: the prompt is \\d+ tokens; the model's context is 48"),
])
def test_generate_cli_names_the_bad_line(tiny_lm, tmp_path, capsys, line, message):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"prompt": "fine"}\n' + line + "\n")
    assert main(["generate", str(tiny_lm[0]), "--input", str(src), "--output", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not out.exists()


def test_generate_cli_streams_one_prompt(tiny_lm, capsys):
    path, model, tokenizer = tiny_lm
    assert main(["generate", str(path), "--prompt", "the cat", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    expected = Engine(model, tokenizer).generate([[tokenizer.bos_id] + tokenizer.encode("the cat")],
                                                 SamplingParams(max_new_tokens=5))[0].text
    assert capsys.readouterr().out == expected + "\n"
