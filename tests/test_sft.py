"""SFT data (formats, errors, loss mask, context window, batches) and a short SFT run on the small world."""
import json

import pytest
import torch

from chatforge import ChatforgeError
from chatforge.data.chat import (IGNORE, Conversation, bucket_batches, collate, encode_conversations, fit_messages,
                                 read_conversations)
from chatforge.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    texts = ["The capital of France is Paris. What is two plus two? It is four. Be brief and kind."] * 50
    return train_tokenizer(texts, vocab_size=320)


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_both_formats_are_detected_from_the_keys(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}]},
        "",
        {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
        {"instruction": "Say hi.", "output": "Hi."},
    ])
    convs = read_conversations(path)
    assert [c.where for c in convs] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert convs[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert convs[1].messages == [{"role": "user", "content": "Add the numbers.\n\n2 and 2"},
                                 {"role": "assistant", "content": "4"}]
    assert convs[2].messages[0]["content"] == "Say hi."


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
    ({"messages": []}, "conversation is empty"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 42}]}, "content must be a string"),
    ({"instruction": "Say hi."}, "Alpaca record has no 'output'"),
    ({"prompt": "x"}, "neither 'messages' nor Alpaca"),
    ("{not json", "not valid JSON"),
])
def test_bad_records_name_file_and_line(tmp_path, record, message):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(ChatforgeError) as err:
        read_conversations(path)
    assert f"{path}:2:" in str(err.value) and message in str(err.value)


def test_loss_mask_is_exactly_the_assistant_tokens(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"},
                {"role": "assistant", "content": "It is four."}, {"role": "user", "content": "And France?"},
                {"role": "assistant", "content": "Paris."}]
    (example,), _ = encode_conversations(tok, [Conversation(messages, "x:1")], max_tokens=200)
    batch = collate([example], tok.pad_id)
    trained = batch["targets"][0][batch["targets"][0] != IGNORE].tolist()
    end = tok.tok.token_to_id("<|end|>")
    assert trained == tok.encode("It is four.") + [end] + tok.encode("Paris.") + [end]
    # the targets are the next tokens of the inputs
    ids = torch.tensor(example.ids)
    assert torch.equal(batch["input_ids"][0], ids[:-1])


def test_truncation_keeps_the_system_message_and_the_newest_turns(tok):
    system = {"role": "system", "content": "Be brief."}
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"What is two plus {i}?"}, {"role": "assistant", "content": f"It is {i + 2}."}]
    full = tok.render([system] + turns)[0]
    fitted = fit_messages(tok, [system] + turns, max_tokens=len(full) - 5)
    assert fitted.messages[0] == system
    assert fitted.messages[-2:] == turns[-2:]
    assert fitted.messages[1]["role"] == "user"  # never starts with an answer to a dropped question
    assert fitted.dropped_turns == 2 and len(fitted.ids) <= len(full) - 5
    assert fitted.ids == tok.render(fitted.messages)[0]


def test_a_conversation_whose_answer_cannot_fit_is_skipped_and_counted(tok):
    long_system = {"role": "system", "content": "Be brief and kind. " * 30}
    convs = [Conversation([long_system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "f:1"),
             Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "f:2")]
    examples, stats = encode_conversations(tok, convs, max_tokens=40)
    assert len(examples) == 1 and stats.skipped == ["f:1"]
    assert "1 skipped" in stats.summary()
    # a long final answer is cut at the end but still trains on what fits
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Be brief and kind. " * 30}]
    fitted = fit_messages(tok, conv, max_tokens=20)
    assert len(fitted.ids) == 20 and fitted.cut_tokens > 0 and any(fitted.mask)


def test_generation_prompt_keeps_the_last_turn_or_says_it_is_too_long(tok):
    conv = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "It is four."},
            {"role": "user", "content": "And France?"}]
    fitted = fit_messages(tok, conv, max_tokens=12, for_generation=True)
    assert fitted.messages == conv[-1:] and fitted.dropped_turns == 2
    with pytest.raises(ChatforgeError, match="context window"):
        fit_messages(tok, conv, max_tokens=3, for_generation=True)


def test_length_buckets_cover_every_example_once_with_little_padding():
    lengths = [(i * 37) % 90 + 5 for i in range(500)]
    batches = bucket_batches(lengths, rows=8, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert all(len(b) == 8 for b in batches[:-1] if len(b) != 500 % 8)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert padded < 1.1 * sum(lengths)  # little compute spent on padding
    assert bucket_batches(lengths, 8, seed=3) == batches and bucket_batches(lengths, 8, seed=4) != batches


# ---------------------------------------------------------------- a short SFT run on the small world

def held_out_capital_questions(world, n=10):
    """Questions from the world's held-out eval splits (phrasings never trained on) asking for a capital."""
    from chatforge.eval.gold import load_eval
    records = [r for split in ("test", "dev") for r in load_eval(world, split)
               if r["category"] == "fact" and len(r["messages"]) == 1 and r["reference"].startswith("The capital of")]
    return records[:n]


def test_short_sft_answers_held_out_capital_questions(sft_ckpt, small_world):
    from chatforge.data.world.facts import fold
    from chatforge.infer.engine import Engine, SamplingParams
    records = held_out_capital_questions(small_world)
    assert len(records) == 10
    engine = Engine.load(sft_ckpt)
    answers = engine.chat([r["messages"] for r in records], SamplingParams(max_new_tokens=32))
    capitals = [r["reference"].rsplit(" is ", 1)[1].rstrip(".") for r in records]
    correct = [fold(c).lower() in fold(a.text).lower() for c, a in zip(capitals, answers)]
    assert sum(correct) >= 9, [(r["messages"][0]["content"], a.text) for r, a in zip(records, answers)]


def test_sft_checkpoint_records_its_lineage_and_best_step(sft_ckpt, base_ckpt):
    import json as _json
    from chatforge.checkpoint import read_meta
    from chatforge.model.adapters import weights_hash
    meta = read_meta(sft_ckpt)
    assert meta["kind"] == "sft" and meta["method"] == "full"
    assert meta["parent_hash"] == weights_hash(base_ckpt)
    assert meta["metrics"]["best"]["metric"] == "val_loss"
    logged = [_json.loads(line) for line in (sft_ckpt / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in logged if "val_loss" in r}
    assert meta["metrics"]["best"]["value"] == pytest.approx(min(val.values()), abs=1e-6)  # the log rounds


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_adapter_sft_saves_the_adapter_alone_and_trains_little(method, base_ckpt, small_world, tmp_path):
    from chatforge.checkpoint import load_model, read_meta
    from chatforge.train.sft import SFTConfig, run_sft
    out = run_sft(SFTConfig(base=str(base_ckpt), world=str(small_world), out=str(tmp_path / method), method=method,
                            steps=4, batch_size=8, ptuning_tokens=4, ptuning_hidden=32, threads=1))
    meta = read_meta(out)
    assert meta["kind"] == "adapter" and meta["acts_as"] == "sft" and meta["method"] == method
    assert not (out / "model.safetensors").exists()
    assert meta["trainable_params"] < 0.2 * meta["total_params"]
    model, _, _ = load_model(out, expect_kind=("sft",))  # loadable wherever an SFT checkpoint is
    assert model.config.vocab_size == load_model(base_ckpt)[0].config.vocab_size
