"""Byte-level BPE (Hugging Face `tokenizers`) and the chat template.

The chat template is one function, `Tokenizer.render`, which returns token ids and the loss mask in one
pass, so what is trained on can never drift from what is generated from. It is also saved as a Jinja
`chat_template` in tokenizer_config.json, the convention other tools read.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from chatforge import ChatforgeError

BOS, PAD, END = "<|bos|>", "<|pad|>", "<|end|>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {r: f"<|{r}|>" for r in ROLES}
SPECIAL_TOKENS = [BOS, PAD, *ROLE_TOKENS.values(), END] + [f"<|reserved_{i}|>" for i in range(4)]
NATIVE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
Message = dict[str, str]


def validate_messages(messages: object, where: str = "messages") -> list[Message]:
    """Check an OpenAI-style conversation, naming the first problem."""
    if not isinstance(messages, list) or not messages:
        raise ChatforgeError(f"{where}: conversation is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatforgeError(f"{where}[{i}]: needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ChatforgeError(f"{where}[{i}]: unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise ChatforgeError(f"{where}[{i}]: content must be a string, got {type(m['content']).__name__}")
    return messages  # type: ignore[return-value]


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the chat template and the ids of the special tokens."""

    def __init__(self, tok: HFTokenizer, chat_template: str = NATIVE_TEMPLATE,
                 bos_token: str | None = BOS, eos_tokens: tuple[str, ...] = (END,), pad_token: str | None = PAD) -> None:
        self.tok = tok
        tok.encode_special_tokens = True  # plain text never yields a special token
        self.chat_template = chat_template
        self.bos_token, self.pad_token = bos_token, pad_token
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None
        self.stop_ids = [tok.token_to_id(t) for t in eos_tokens if tok.token_to_id(t) is not None]
        pad = tok.token_to_id(pad_token) if pad_token else None
        self.pad_id = pad if pad is not None else (self.stop_ids[0] if self.stop_ids else 0)
        self.native = chat_template == NATIVE_TEMPLATE
        self._role_ids = {r: tok.token_to_id(t) for r, t in ROLE_TOKENS.items()}
        self._end_id = tok.token_to_id(END)
        self._jinja = None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and a mask that is 1 exactly on assistant tokens (their end token too)."""
        validate_messages(messages)
        if not self.native:
            return self._render_jinja(messages, add_generation_prompt)
        ids, mask = [self.bos_id], [0]
        for m in messages:
            body = [self._role_ids[m["role"]]] + self.encode(m["content"]) + [self._end_id]
            ids += body
            trained = 1 if m["role"] == "assistant" else 0
            mask += [0] + [trained] * (len(body) - 1)
        if add_generation_prompt:
            ids.append(self._role_ids["assistant"])
            mask.append(0)
        return ids, mask

    def prompt(self, messages: list[Message]) -> list[int]:
        """Ids to generate the next assistant turn from."""
        return self.render(messages, add_generation_prompt=True)[0]

    # --- imported models bring their own Jinja template (see hub.py) ---
    def _template_text(self, messages: list[Message], add_generation_prompt: bool) -> str:
        if self._jinja is None:
            self._jinja = _jinja_environment().from_string(self.chat_template)
        eos = self.tok.id_to_token(self.stop_ids[0]) if self.stop_ids else ""
        return self._jinja.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                  bos_token=self.bos_token or "", eos_token=eos)

    def _render_jinja(self, messages: list[Message], add_generation_prompt: bool) -> tuple[list[int], list[int]]:
        # Render growing prefixes; the text each assistant turn adds is its span. Specials are parsed here.
        ids: list[int] = []
        mask: list[int] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                head = self._template_text(messages[:i], add_generation_prompt=True)
                piece_ids = self._encode_with_specials(self._extend(done, head))
                ids += piece_ids
                mask += [0] * len(piece_ids)
                done = head
            text = self._template_text(messages[:i + 1], add_generation_prompt=False)
            piece_ids = self._encode_with_specials(self._extend(done, text))
            ids += piece_ids
            mask += self._answer_mask(piece_ids) if m["role"] == "assistant" else [0] * len(piece_ids)
            done = text
        if add_generation_prompt:
            text = self._template_text(messages, add_generation_prompt=True)
            piece_ids = self._encode_with_specials(self._extend(done, text))
            ids += piece_ids
            mask += [0] * len(piece_ids)
        return ids, mask

    def _answer_mask(self, piece_ids: list[int]) -> list[int]:
        """1 on an assistant turn's tokens up to its end token; what the template puts after it (ChatML's
        newline) is formatting the model never generates, and the reward is read at the end token."""
        ends = [j for j, t in enumerate(piece_ids) if t in self.stop_ids]
        n = ends[-1] + 1 if ends else len(piece_ids)
        return [1] * n + [0] * (len(piece_ids) - n)

    def _extend(self, done: str, text: str) -> str:
        if not text.startswith(done):  # e.g. a template that rewrites earlier turns once a later one exists
            raise ChatforgeError("chat template: rendering one more message changed the text before it, "
                                 "so turns cannot be masked separately")
        return text[len(done):]

    def _encode_with_specials(self, text: str) -> list[int]:
        self.tok.encode_special_tokens = False
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = True

    # --- files ---
    def save(self, directory: str | Path) -> None:
        from chatforge.checkpoint import atomic_write_text
        directory = Path(directory)
        atomic_write_text(directory / "tokenizer.json", self.tok.to_str())
        atomic_write_text(directory / "tokenizer_config.json", json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.tok.id_to_token(self.stop_ids[0]) if self.stop_ids else None,
            "pad_token": self.pad_token, "chat_template": self.chat_template,
            "chatforge_stop_tokens": [self.tok.id_to_token(i) for i in self.stop_ids],
            "clean_up_tokenization_spaces": False,
        }, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ChatforgeError(f"{directory}: no tokenizer.json")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise ChatforgeError(f"{path}: not a valid tokenizer file ({e})") from None
        cfg_path = directory / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        template = cfg.get("chat_template") or NATIVE_TEMPLATE
        stops = tuple(cfg.get("chatforge_stop_tokens") or ([_token_text(cfg.get("eos_token"))] if cfg.get("eos_token") else [END]))
        return cls(tok, template, bos_token=_token_text(cfg.get("bos_token")) if "bos_token" in cfg else BOS,
                   eos_tokens=stops, pad_token=_token_text(cfg.get("pad_token")) if "pad_token" in cfg else PAD)


def _jinja_environment():
    """The environment transformers renders chat templates in: the same globals, so imported templates work."""
    import datetime

    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ChatforgeError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    return env


def _token_text(value: object) -> str | None:
    """tokenizer_config.json writes a token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with digits split one per token, so arithmetic is learnable digit by digit."""
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ChatforgeError(f"--vocab-size {vocab_size} is too small: the 256 bytes and "
                             f"{len(SPECIAL_TOKENS)} special tokens need at least {minimum}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tsub = p.add_subparsers(dest="action", required=True)
    t = tsub.add_parser("train", help="train on a corpus and write tokenizer.json")
    t.add_argument("--data", nargs="+", required=True, help="text/JSONL files or directories")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--out", required=True)
    t.set_defaults(func=_train_cli)


def _train_cli(args: argparse.Namespace) -> None:
    from chatforge.data.corpus import iter_corpus
    tok = train_tokenizer(iter_corpus(args.data), args.vocab_size)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tok.save(args.out)
    print(f"tokenizer: {tok.vocab_size} tokens -> {Path(args.out) / 'tokenizer.json'}")
