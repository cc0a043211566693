"""One PPO iteration in chatforge against trl's PPOTrainer (trl 1.12.0, `trl.experimental.ppo`), same settings.

    python bench/ppo_speed.py [--preset babbage] [--batch 16] [--minibatch 8] [--prompt-len 32]
                              [--answer-len 32] [--epochs 2] [--iterations 5] [--threads 2] [--dtype fp32|bf16]

Both sides get the same four models (policy, reference, value, reward: one preset, the policy's weights
copied into a transformers `LlamaForCausalLM`, the value and reward models into
`LlamaForSequenceClassification`), the same prompts (random token ids, one length, so neither side pads
them), one dtype on the CPU with the same number of threads, and the same PPO settings: a batch of --batch
answers of exactly --answer-len tokens sampled at temperature 1 (no stop token on either side, so the
answer length cannot differ), --epochs PPO epochs over minibatches of --minibatch, AdamW, a separate value
model, the KL penalty per token, GAE and whitened advantages. trl runs without gradient checkpointing (its
default, which would slow it down).

--dtype fp32 (the default) is fp32 throughout on both sides. --dtype bf16 is each side's bf16 mixed precision
(fp32 weights and optimizer, bf16 matmuls under autocast): trl's `bf16=True`, chatforge's `dtype="bf16"`. Where
each applies it is its own: trl autocasts the PPO update only (the model accelerate prepared; its generation,
reference, value and reward passes stay fp32), chatforge its scoring and update passes (its rollouts stay fp32).

chatforge's engine compiles its decode step (PPO's `compile="on"`, which a long run gets on its own from
`compile="auto"`); the compiler's one-off cost falls in the warm-up iteration, which is not timed.

An iteration is rollout + scoring + advantages + all PPO epochs. The two sides alternate, one iteration each
(a trl callback runs chatforge's), so both are timed under the same load on a shared machine; each runs
one warm-up iteration, then --iterations timed ones, and the medians are compared. The last line is one JSON object with `ppo_speedup`
(trl's seconds per iteration over chatforge's).
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import tempfile
import time
import warnings

import torch

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "po", "da", "fe", "gu", "hi", "jo", "be", "ci",
             "wa", "xu", "yo", "qe", "th", "sh", "ch", "an", "el", "is", "or", "um", "ay"]


def make_tokenizer(vocab_size: int):
    """A BPE trained on synthetic words, so the model's vocabulary is a realistic size (no download)."""
    from chatforge.tokenizer import train_tokenizer
    rng = random.Random(0)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(20000)]
    texts = [" ".join(rng.choice(words) for _ in range(50)) for _ in range(4000)]
    return train_tokenizer(texts, vocab_size)


def build_models(preset_name: str, vocab_size: int, context: int, seed: int):
    from chatforge.model.heads import ScalarModel
    from chatforge.model.presets import preset
    from chatforge.model.transformer import GPT
    torch.manual_seed(seed)
    cfg = preset(preset_name, vocab_size, context)
    policy = GPT(cfg)
    reward = ScalarModel.from_lm(GPT(cfg))  # a different backbone from the policy's, as a real RM would be
    return policy, reward


def to_transformers(policy, reward):
    """The same weights in transformers' Llama classes (chatforge's names are Llama's)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
    hf_cfg = LlamaConfig(**policy.config.to_hf())
    hf_policy = LlamaForCausalLM(hf_cfg)
    hf_policy.load_state_dict(policy.state_dict(), strict=False)
    cls_cfg = LlamaConfig(**{**policy.config.to_hf(), "num_labels": 1, "pad_token_id": hf_cfg.pad_token_id})
    hf_reward = LlamaForSequenceClassification(cls_cfg)
    assert reward.score.bias.abs().sum() == 0  # zero-initialised: trl's head has no bias, so nothing is lost
    hf_reward.load_state_dict({k: v for k, v in reward.state_dict().items() if k != "score.bias"}, strict=False)
    for m in (hf_policy, hf_reward):
        m.config.pad_token_id = policy.config.pad_token_id
    return hf_policy, hf_reward


def chatforge_iteration(policy, reward, tokenizer, args):
    """A function that runs one chatforge PPO iteration on the next prompts and returns its statistics row."""
    from chatforge.tokenizer import Tokenizer
    from chatforge.train.ppo import PPOConfig, PPOModels, RewardModelScorer, train_ppo
    no_stop = Tokenizer(tokenizer.tok, eos_tokens=())  # answers run to the length limit, as trl's do
    models = PPOModels(policy=copy.deepcopy(policy).eval(),
                       reference=copy.deepcopy(policy).requires_grad_(False).eval(),
                       value=copy.deepcopy(reward).requires_grad_(True).eval(),
                       reward=RewardModelScorer(copy.deepcopy(reward), no_stop.pad_id, {}, batch_size=args.batch),
                       tokenizer=no_stop)
    cfg = PPOConfig(iterations=1, rollout_batch=args.batch, minibatch=args.minibatch, ppo_epochs=args.epochs,
                    max_new_tokens=args.answer_len, lr=args.lr, value_lr=args.lr, warmup_steps=0, kl_coef=0.05,
                    vf_coef=0.1, missing_eos_penalty=0.0, sample_every=0, progress=False, dtype=args.dtype,
                    compile="on")
    calls = 0

    def step(prompts: list[list[int]]) -> dict:
        nonlocal calls
        calls += 1
        cfg.seed = args.seed + calls
        return train_ppo(models, prompts, cfg, log=lambda _: None)[-1]
    return step


def run_interleaved(hf_policy, hf_reward, tokenizer, prompts, cf_step, args) -> tuple[list[float], list[dict]]:
    """trl's PPOTrainer runs its iterations; after each one, a callback runs one chatforge iteration, so both
    sides are timed under the same machine load. Returns (trl seconds per iteration, chatforge rows)."""
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    class Alternate(TrainerCallback):
        def __init__(self) -> None:
            self.trl_seconds: list[float] = []
            self.chatforge_rows: list[dict] = []
            self.start = 0.0

        def on_train_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.trl_seconds.append(time.perf_counter() - self.start)
            i = len(self.chatforge_rows)
            self.chatforge_rows.append(cf_step(prompts[i * args.batch:(i + 1) * args.batch]))
            self.start = time.perf_counter()

    hf_tok = PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(tokenizer.tok), pad_token="<|pad|>",
                                     eos_token="<|end|>", bos_token="<|bos|>")
    data = Dataset.from_dict({"input_ids": prompts})
    out = tempfile.mkdtemp(prefix="trl-ppo-bench-")
    config = PPOConfig(output_dir=out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                       num_mini_batches=args.batch // args.minibatch, num_ppo_epochs=args.epochs,
                       response_length=args.answer_len, total_episodes=args.batch * (1 + args.iterations),
                       local_rollout_forward_batch_size=args.batch, learning_rate=args.lr, temperature=1.0,
                       kl_coef=0.05, vf_coef=0.1, missing_eos_penalty=None, stop_token=None,
                       num_sample_generations=0, bf16=args.dtype == "bf16", fp16=False, gradient_checkpointing=False,
                       use_cpu=True, report_to=[], save_strategy="no", logging_steps=10_000, disable_tqdm=True,
                       lr_scheduler_type="constant", seed=args.seed, dataloader_num_workers=0)
    alternate = Alternate()
    trainer = PPOTrainer(args=config, processing_class=hf_tok, model=copy.deepcopy(hf_policy),
                         ref_model=copy.deepcopy(hf_policy), reward_model=copy.deepcopy(hf_reward),
                         train_dataset=data, value_model=copy.deepcopy(hf_reward), eval_dataset=None,
                         callbacks=[alternate])
    trainer.train()
    return alternate.trl_seconds[1:], alternate.chatforge_rows[1:]  # the first of each is the warm-up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="babbage")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--minibatch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--answer-len", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--iterations", type=int, default=5, help="timed iterations after one warm-up")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="both sides: fp32, or bf16 autocast (fp32 weights, bf16 matmuls)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.batch % args.minibatch:
        p.error("--batch must be a multiple of --minibatch")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    tokenizer = make_tokenizer(args.vocab_size)
    context = args.prompt_len + args.answer_len + 8
    policy, reward = build_models(args.preset, tokenizer.vocab_size, context, args.seed)
    policy.config.pad_token_id = tokenizer.pad_id
    hf_policy, hf_reward = to_transformers(policy, reward)
    gen = torch.Generator().manual_seed(args.seed)
    low = 16  # past the special tokens
    prompts = torch.randint(low, tokenizer.vocab_size, (args.batch * (1 + args.iterations), args.prompt_len),
                            generator=gen).tolist()
    print(f"PPO iteration: preset {args.preset} ({policy.config.num_params() / 1e6:.1f}M params x 4 models: policy, "
          f"reference, value, reward), vocab {tokenizer.vocab_size}, batch {args.batch}, prompt {args.prompt_len} "
          f"+ answer {args.answer_len} tokens, {args.epochs} epochs x minibatch {args.minibatch}, {args.dtype}, "
          f"{args.threads} threads; median of {args.iterations} after 1 warm-up", flush=True)

    cf_step = chatforge_iteration(policy, reward, tokenizer, args)
    trl_times, cf_rows = run_interleaved(hf_policy, hf_reward, tokenizer, prompts, cf_step, args)
    cf_times = [r["seconds"] for r in cf_rows]
    phases = {k: round(statistics.median(r[f"{k}_seconds"] for r in cf_rows), 4) for k in ("rollout", "score", "update")}
    cf, trl = statistics.median(cf_times), statistics.median(trl_times)
    print(f"{'':12} {'s/iteration':>12} {'answers/s':>10}")
    print(f"{'chatforge':12} {cf:12.3f} {args.batch / cf:10.1f}")
    print(f"{'trl':12} {trl:12.3f} {args.batch / trl:10.1f}")
    print(f"chatforge phases (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
    print(f"speedup: chatforge is {trl / cf:.2f}x trl's speed per PPO iteration")
    print(json.dumps({"ppo_speedup": round(trl / cf, 3), "chatforge_s_per_iter": round(cf, 4),
                      "trl_s_per_iter": round(trl, 4), "chatforge_phases": phases, "chatforge_times": [round(t, 4) for t in cf_times],
                      "trl_times": [round(t, 4) for t in trl_times], "preset": args.preset,
                      "batch": args.batch, "minibatch": args.minibatch, "prompt_len": args.prompt_len,
                      "answer_len": args.answer_len, "epochs": args.epochs, "threads": args.threads,
                      "dtype": args.dtype}))


if __name__ == "__main__":
    main()
