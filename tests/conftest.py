"""Session-scoped fixtures shared by several test files. Each fixture is small and says what it builds."""
import os
from pathlib import Path

import pytest

# The engine compiles its decode step after 2048 eager steps; a compile costs tens of seconds on 2 cores, which
# tests that use one engine for long (the server's) would pay at random. Compilation has its own tests (compile=True).
os.environ.setdefault("CHATFORGE_COMPILE", "0")

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
HF_TEXT = ["The capital of France is Paris. The capital of Italy is Rome.", "What is 12 + 30? It is 42.",
           "A small model answers questions about the world, one token at a time.",
           "Hello! How can I help you today? Thank you, goodbye."] * 20


def _hf_tokenizer(directory: Path):
    """A byte-level BPE saved the way transformers saves one, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(HF_TEXT, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
    return fast


def _randomise(model, seed: int) -> None:
    """Spread the weights (biases and norms too) so that logits differ clearly between tokens."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.8 + 0.4 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="session")
def hf_tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Random tiny Hugging Face checkpoints built locally with transformers (no download):
    `llama` (GQA, untied, rope_theta 50000, llama3 RoPE scaling, one safetensors file),
    `qwen2` (GQA, untied, q/k/v biases, linear RoPE scaling, sharded safetensors),
    `llama_plain`, `qwen2_plain` (no RoPE scaling, which transformers' GGUF loader does not read; qwen2_plain
    has tied embeddings)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    root = tmp_path_factory.mktemp("hf_tiny")
    shape = dict(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    specs = {
        "llama": (LlamaForCausalLM, LlamaConfig(**shape, rope_theta=50000.0, rope_scaling={
            "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16})),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(**shape, rope_theta=20000.0,
                                                rope_scaling={"rope_type": "linear", "factor": 2.0})),
        "llama_plain": (LlamaForCausalLM, LlamaConfig(**shape, rope_theta=50000.0)),
        "qwen2_plain": (Qwen2ForCausalLM, Qwen2Config(**{**shape, "tie_word_embeddings": True}, rope_theta=20000.0)),
    }
    out = {}
    for i, (name, (cls, cfg)) in enumerate(specs.items()):
        torch.manual_seed(i)
        model = cls(cfg).eval()
        _randomise(model, seed=i)
        directory = root / name
        model.save_pretrained(directory, max_shard_size="100KB" if name == "qwen2" else "1GB")
        _hf_tokenizer(directory)
        out[name] = directory
    return out


@pytest.fixture(scope="session")
def rl_toy(tmp_path_factory):
    """PPO/DPO toy (tests/rl_toy.py): a nano SFT model answering a colour question with one of ten colours,
    an untrained reward checkpoint on it, and the prompts; about 10 s on one thread."""
    from rl_toy import build_rl_toy
    return build_rl_toy(tmp_path_factory.mktemp("rl_toy"))


# --- the tiny world and models trained on it (reused by SFT, reward, PPO and pipeline tests) ---

@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    """The tiny world at size "small", seed 0: corpus/, sft.jsonl, prompts/, eval/{dev,test}.jsonl, fewshot/."""
    from chatforge.data.world.generate import generate_world
    root = tmp_path_factory.mktemp("world") / "small"
    generate_world(root, "small", seed=0)
    return root


def _one_thread(fn):
    """Run `fn` on one torch thread: faster than two on a shared two-core machine."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def base_ckpt(small_world, tmp_path_factory) -> Path:
    """A nano GPT (kind "base", vocabulary 1024, context 128) pretrained on the small world's encyclopedia:
    it completes "The capital of Peru is" but has never seen a conversation."""
    from chatforge.train.pretrain import PretrainConfig, pretrain
    out = tmp_path_factory.mktemp("models") / "base"
    cfg = PretrainConfig(data=[str(small_world / "corpus" / "encyclopedia.txt")], preset="nano", vocab_size=1024,
                         context=128, steps=700, batch_size=16, lr=6e-3, warmup_steps=20, weight_decay=0.0,
                         eval_every=0, save_every=10_000, log_every=50)
    _one_thread(lambda: pretrain(cfg, out))
    return out


@pytest.fixture(scope="session")
def sft_ckpt(base_ckpt, small_world, tmp_path_factory) -> Path:
    """base_ckpt fully fine-tuned (kind "sft") for 2 epochs on the demonstrations of a default-size world
    (same seed, so the small world's eval phrasings stay held out): it answers in turns."""
    from chatforge.data.world.generate import generate_world
    from chatforge.train.sft import SFTConfig, run_sft
    root = tmp_path_factory.mktemp("models")
    demos = root / "world_default"
    generate_world(demos, "default", seed=0)
    cfg = SFTConfig(base=str(base_ckpt), data=[str(demos / "sft.jsonl")], world=str(small_world), out=str(root / "sft"),
                    method="full", epochs=2, batch_size=16, lr=2.5e-3, warmup_steps=10, val_fraction=0.02)
    return _one_thread(lambda: run_sft(cfg))


# --- reward model toy (tests/reward_toy.py): used by test_reward.py and test_elo.py ---

@pytest.fixture(scope="session")
def reward_toy(tmp_path_factory):
    """Toy rankings where answers with the marker word "banana" win, a random nano base checkpoint, and
    reference demonstrations; builds in about a second."""
    from reward_toy import build_reward_toy
    return build_reward_toy(tmp_path_factory.mktemp("reward_toy"))


@pytest.fixture(scope="session")
def toy_reward_model(reward_toy, tmp_path_factory) -> Path:
    """A reward model trained for one epoch (20 steps) on reward_toy's rankings, bias-normalised on its
    reference demonstrations; about 10 s on one thread."""
    import torch
    from chatforge.train.reward import RewardConfig, train_reward
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_reward(RewardConfig(init=str(reward_toy.base), data=[str(reward_toy.train)],
                                         heldout=str(reward_toy.heldout), reference=str(reward_toy.reference),
                                         out=str(tmp_path_factory.mktemp("models") / "toy_reward"), lr=1e-3,
                                         batch_size=8, warmup_steps=5, dtype="fp32"))
    finally:
        torch.set_num_threads(threads)


# --- pretraining and token data (test_pretrain, test_tokens, test_resume, test_ddp) ---

@pytest.fixture(scope="session")
def fifty_lines(tmp_path_factory) -> Path:
    """A 50-line text corpus of random words (one document, about 900 tokens at vocabulary 300)."""
    import random
    rng = random.Random(0)
    words = "the cat dog sat on mat ran fast slow red blue green big small house tree".split()
    path = tmp_path_factory.mktemp("corpus") / "fifty.txt"
    path.write_text("".join(f"{i}: {' '.join(rng.choice(words) for _ in range(8))}.\n" for i in range(50)))
    return path


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (faster than two on a shared 2-core machine, and reproducible)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- generation engine (test_engine.py) ---

@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A random 2-layer GQA GPT (4 query / 2 key-value heads, context 48) with spread weights so that logits
    differ clearly, and a BPE tokenizer (vocabulary 300) trained on a few lines, saved as a base checkpoint.
    Returns (checkpoint path, model, tokenizer); the model is in eval mode and must not be modified."""
    import torch
    from chatforge.checkpoint import save_model_checkpoint
    from chatforge.model.transformer import GPT, ModelConfig
    from chatforge.tokenizer import train_tokenizer
    tokenizer = train_tokenizer(["the cat sat on the mat.", "Hello! How are you today?", "1 + 2 = 3, 12 + 30 = 42"] * 4,
                                vocab_size=300)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = GPT(cfg)
    _randomise(model, seed=0)
    path = save_model_checkpoint(tmp_path_factory.mktemp("tiny_lm") / "base", model, tokenizer,
                                 {"kind": "base", "stage": "test"})
    return path, model.eval(), tokenizer


# --- serving (test_serve, test_web, test_moderation) ---

@pytest.fixture(scope="session")
def parrot_ckpt(tmp_path_factory) -> Path:
    """A 2-layer chat model (context 256) that memorised three answers word for word (tests/serve_toy.py):
    an HTML answer with a <script>, a greeting, and a harmful how-to; a few seconds on one thread."""
    import torch
    from serve_toy import build_parrot
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_parrot(tmp_path_factory.mktemp("models") / "parrot")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def moderation_classifier(small_world, tmp_path_factory) -> Path:
    """The moderation classifier trained (300 steps) on the small world's labelled prompts plus the parrot's
    prompts and harmless answers labelled benign, as a user adds their own examples; a few seconds."""
    import json
    from serve_toy import HELLO_ANSWER, MEMORISED, SCRIPT_ANSWER
    from chatforge.safety.moderation import ModerationConfig, read_examples, train_moderator
    root = tmp_path_factory.mktemp("moderation")
    extra = root / "extra.jsonl"
    extra.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}], "category": "benign"}) + "\n"
                             for q in [*MEMORISED, HELLO_ANSWER, SCRIPT_ANSWER]))
    examples = read_examples(small_world / "prompts" / "moderation.jsonl") + read_examples(extra)
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        moderator = train_moderator(examples, ModerationConfig(steps=300), log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    return moderator.save(root / "classifier")


# --- headless Chromium (Debian's chromium + chromium-driver; `make system-deps` installs them) ---
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium driven by selenium, with its own empty profile and no background networking."""
    import shutil
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1200,1600"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
