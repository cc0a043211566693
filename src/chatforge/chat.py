"""`chatforge chat CKPT`: talk to any checkpoint in the terminal, the answer streamed token by token.

Commands: /system TEXT (set the system message; "/system" alone clears it), /reset (forget the conversation),
/temp T (sampling temperature; 0 = greedy), /exit (or Ctrl-D). A base model can be chatted with too: it has
never seen a conversation, and it shows. When the conversation outgrows the context window the oldest
turns are left out of the prompt (the system message stays), and the chat says so.
"""
from __future__ import annotations

import argparse
import sys
from typing import TextIO

from chatforge import ChatforgeError
from chatforge.data.chat import fit_messages
from chatforge.tokenizer import Message

HELP = "commands: /system TEXT, /reset, /temp T, /exit"


class ChatSession:
    """The conversation and its settings; `reply` streams one answer to `out`."""

    def __init__(self, engine, system: str = "", temperature: float = 0.7, top_p: float = 0.95, top_k: int = 0,
                 max_new_tokens: int = 256, repetition_penalty: float = 1.0, seed: int | None = None) -> None:
        self.engine, self.system, self.temperature = engine, system, temperature
        self.top_p, self.top_k, self.repetition_penalty = top_p, top_k, repetition_penalty
        self.seed = seed
        context = engine.model.config.max_position_embeddings - getattr(engine.model, "num_virtual_tokens", 0)
        self.max_new_tokens = min(max_new_tokens, context // 2)
        self.prompt_budget = context - self.max_new_tokens
        self.turns: list[Message] = []
        self.dropped = 0  # oldest turns currently left out of the prompt

    def messages(self) -> list[Message]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def reply(self, user_text: str, out: TextIO) -> str:
        from chatforge.infer.engine import SamplingParams
        self.turns.append({"role": "user", "content": user_text})
        try:
            fitted = fit_messages(self.engine.tokenizer, self.messages(), self.prompt_budget, for_generation=True)
        except ChatforgeError as e:
            self.turns.pop()
            raise ChatforgeError(f"message not sent: {e}") from None
        if fitted.dropped_turns > self.dropped:
            out.write(f"[{fitted.dropped_turns} oldest turn(s) left out to fit the "
                      f"{self.engine.model.config.max_position_embeddings}-token context window]\n")
        self.dropped = fitted.dropped_turns
        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                                top_p=self.top_p, repetition_penalty=self.repetition_penalty,
                                stop_ids=list(self.engine.tokenizer.stop_ids), seed=self.seed)
        tokenizer = self.engine.tokenizer
        ids: list[int] = []
        shown = ""
        try:
            for step in self.engine.stream([fitted.ids], params):
                for _, token in step:
                    if token in tokenizer.stop_ids:
                        continue
                    ids.append(token)
                text = tokenizer.decode(ids)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    out.write(text[len(shown):])
                    out.flush()
                    shown = text
        except KeyboardInterrupt:
            out.write(" [interrupted]")
        text = tokenizer.decode(ids)
        out.write(text[len(shown):] + "\n")
        out.flush()
        self.turns.append({"role": "assistant", "content": text})
        return text

    def command(self, line: str, out: TextIO) -> bool:
        """Handle a /command; False means exit."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/system":
            self.system = arg
            out.write(f"[system message {'set' if arg else 'cleared'}]\n")
        elif name == "/reset":
            self.turns, self.dropped = [], 0
            out.write("[conversation reset]\n")
        elif name == "/temp":
            try:
                value = float(arg)
                if value < 0:
                    raise ValueError
            except ValueError:
                out.write(f"[/temp needs a number >= 0, got {arg!r}]\n")
                return True
            self.temperature = value
            out.write(f"[temperature {value:g}{' (greedy)' if value == 0 else ''}]\n")
        else:
            out.write(f"[unknown command {name}; {HELP}]\n")
        return True


def run_chat(checkpoint: str, system: str = "", temperature: float = 0.7, top_p: float = 0.95, top_k: int = 0,
             max_new_tokens: int = 256, repetition_penalty: float = 1.0, seed: int | None = None,
             device: str | None = None, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    from chatforge.checkpoint import read_meta
    from chatforge.infer.engine import Engine
    meta_kind = read_meta(checkpoint)["kind"]
    engine = Engine.load(checkpoint, device=device) if device else Engine.load(checkpoint)
    session = ChatSession(engine, system, temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed)
    cfg = engine.model.config
    out.write(f"chatforge chat: {checkpoint} ({meta_kind}), "
              f"{engine.model.num_params() / 1e6:.1f}M params, context {cfg.max_position_embeddings} tokens, "
              f"temperature {temperature:g}\n{HELP}\n")
    interactive = stdin.isatty()
    while True:
        out.write("you> ")
        out.flush()
        try:
            line = stdin.readline() if not interactive else input()
        except (EOFError, KeyboardInterrupt):
            line = ""
        if not line:  # end of input
            out.write("\n")
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            if not session.command(line, out):
                break
            continue
        out.write("assistant> ")
        out.flush()
        try:
            session.reply(line, out)
        except ChatforgeError as e:
            out.write(f"[{e}]\n")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a checkpoint in the terminal (streamed)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="any checkpoint directory: base, sft, adapter, policy")
    p.add_argument("--system", default="", help="system message")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: 0.7)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None)
    p.set_defaults(func=lambda a: run_chat(a.checkpoint, a.system, a.temperature, a.top_p, a.top_k, a.max_new_tokens,
                                           a.repetition_penalty, a.seed, a.device))
