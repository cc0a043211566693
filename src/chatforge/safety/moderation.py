"""Moderation: a small trained classifier that flags harmful requests by category, OpenAI-style.

A keyword list fails on paraphrases and on benign look-alikes ("kill a Python process", "break into the film
industry"). What generalises from a few hundred labelled prompts is a fastText-style model: hashed words and
word pairs (pairs give context: "kill a" + "a python") averaged in one embedding bag, then a linear layer
with one sigmoid per harm category (multi-label, as OpenAI's `category_scores`). Three choices make it hold
up on wordings it has never seen:
- a word never seen in training maps to one learned "unknown" feature, and training hides a random share of
  each prompt's features behind it, so a new template's words neither vanish nor pose as evidence;
- an L2 penalty on the embeddings keeps words that merely co-occur with harm ("Thanks." ends many harmful
  prompts) weak, so a one-word message is not flagged on their account;
- precision/recall are reported on the world's evaluation prompts (held-out templates and partly held-out
  actions, never in training) next to a keyword-list baseline built from the same training prompts.

    chatforge moderation train [--data FILE] --out DIR      # DIR/moderation.safetensors + moderation.json
    chatforge moderation score DIR "some text" ...
"""
from __future__ import annotations

import argparse
import json
import random
import re
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge import ChatforgeError
from chatforge.data.jsonl import iter_jsonl

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
FORMAT = "chatforge-moderation-1"


@dataclass
class ModerationConfig:
    data: str | None = None          # labelled JSONL; default: the tiny world's prompts/moderation.jsonl
    heldout: list[str] | None = None # held-out prompts; default: the world's eval/dev.jsonl, eval/test.jsonl
    out: str = "runs/moderation"
    buckets: int = 1 << 16           # hashed feature table size
    dim: int = 32
    steps: int = 1000                # optimizer steps, whatever the data size (a few hundred prompts need many epochs)
    batch_size: int = 32
    lr: float = 0.1
    weight_decay: float = 1e-4
    unknown_rate: float = 0.5        # up to this share of a prompt's features is replaced by the unknown feature
    l2: float = 0.01                 # on the features of each batch: only words that matter grow strong
    threshold: float = 0.5
    heldout_fraction: float = 0.2    # of records, only when there is no held-out file
    seed: int = 0

    def validate(self) -> None:
        if self.buckets < 1024 or self.dim < 1 or self.steps < 1 or self.batch_size < 1:
            raise ChatforgeError("moderation: buckets >= 1024, dim, steps and batch_size >= 1 are required")
        if not 0.0 < self.threshold < 1.0:
            raise ChatforgeError(f"moderation: threshold must be in (0, 1), got {self.threshold}")
        if self.l2 < 0:
            raise ChatforgeError(f"moderation: l2 must be >= 0, got {self.l2}")
        if not 0.0 <= self.unknown_rate < 1.0:
            raise ChatforgeError(f"moderation: unknown_rate must be in [0, 1), got {self.unknown_rate}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ChatforgeError(f"moderation: heldout_fraction must be in (0, 1), got {self.heldout_fraction}")


@dataclass
class Example:
    text: str
    labels: list[str]                # harm categories; empty = benign


# --- features ---------------------------------------------------------------------------------------------

def feature_strings(text: str) -> list[str]:
    # Words and word pairs only: character n-grams let a few hundred prompts teach that "there" is
    # harassment (it shares "here>" with "find out where someone lives").
    words = WORD.findall(text.lower())
    return [f"w:{w}" for w in words] + [f"b:{a} {b}" for a, b in zip(words, words[1:])] or ["<empty>"]


def feature_ids(text: str, buckets: int) -> list[int]:
    # crc32, not hash(): Python salts str hashes per process, which would scramble a saved model.
    return [zlib.crc32(f.encode()) % buckets for f in feature_strings(text)]


class BagClassifier(nn.Module):
    """Mean of hashed feature embeddings -> one logit per category. Row `buckets` is the unknown feature."""

    def __init__(self, buckets: int, dim: int, num_categories: int) -> None:
        super().__init__()
        self.unknown_id = buckets
        self.embed = nn.EmbeddingBag(buckets + 1, dim, mode="mean", sparse=True)  # a step touches few rows
        self.out = nn.Linear(dim, num_categories)
        # Zero rows: a row that stays zero was never trained, which is how `Moderator` spots unseen features.
        nn.init.zeros_(self.embed.weight)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(ids, offsets))


def _pack(features: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.tensor([0] + [len(f) for f in features[:-1]]).cumsum(0)
    return torch.tensor([i for f in features for i in f], dtype=torch.long), offsets


def _hide_some(features: list[int], unknown_id: int, max_rate: float, rng: random.Random) -> list[int]:
    """Replace a random share (0..max_rate) of the features by the unknown one: a new phrasing's words are
    unknown at inference, and the model must learn to judge by what it does recognise."""
    rate = rng.uniform(0.0, max_rate)
    return [unknown_id if rng.random() < rate else f for f in features]


# --- the classifier users load ----------------------------------------------------------------------------

@dataclass
class ModerationResult:
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]

    def flagged_categories(self) -> list[str]:
        return [c for c, on in self.categories.items() if on]


class Moderator:
    """A trained moderation classifier: `moderate(texts)` -> one OpenAI-style result per text."""

    def __init__(self, model: BagClassifier, categories: list[str], buckets: int, threshold: float,
                 info: dict[str, Any] | None = None) -> None:
        self.model = model.eval()
        # Features never seen in training count as the (trained) unknown feature: many unknown words pull a
        # prompt towards the prior, a few do not hide the words that carry a request.
        self.known = (model.embed.weight.detach()[:buckets] != 0).any(dim=1).tolist()
        self.categories = categories
        self.buckets = buckets
        self.threshold = threshold
        self.info = info or {}

    @torch.no_grad()
    def scores(self, texts: Sequence[str]) -> torch.Tensor:
        """[len(texts), categories] probabilities."""
        if not texts:
            return torch.zeros(0, len(self.categories))
        unknown = self.model.unknown_id
        ids, offsets = _pack([[f if self.known[f] else unknown for f in feature_ids(t, self.buckets)] for t in texts])
        return torch.sigmoid(self.model(ids, offsets))

    def moderate(self, texts: Sequence[str]) -> list[ModerationResult]:
        results = []
        for row in self.scores(texts).tolist():
            flags = {c: s >= self.threshold for c, s in zip(self.categories, row)}
            results.append(ModerationResult(flagged=any(flags.values()), categories=flags,
                                            category_scores={c: round(s, 6) for c, s in zip(self.categories, row)}))
        return results

    def save(self, directory: str | Path) -> Path:
        from chatforge.checkpoint import CheckpointWriter
        w = CheckpointWriter(directory)
        try:
            w.write_tensors("moderation.safetensors", dict(self.model.state_dict()))
            w.write_json("moderation.json", {"format": FORMAT, "categories": self.categories, "buckets": self.buckets,
                                             "dim": self.model.embed.embedding_dim, "threshold": self.threshold,
                                             **self.info})
            return w.commit()
        except BaseException:
            w.abort()
            raise

    @classmethod
    def load(cls, directory: str | Path) -> "Moderator":
        from safetensors.torch import load_file

        from chatforge.checkpoint import load_weights, resolve
        directory = resolve(directory)
        meta_path, weights_path = directory / "moderation.json", directory / "moderation.safetensors"
        if not meta_path.is_file() or not weights_path.is_file():
            raise ChatforgeError(f"{directory}: not a moderation classifier (needs moderation.json and "
                                 f"moderation.safetensors; train one with `chatforge moderation train`)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ChatforgeError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}")
        model = BagClassifier(meta["buckets"], meta["dim"], len(meta["categories"]))
        load_weights(model, load_file(str(weights_path)), weights_path)
        info = {k: v for k, v in meta.items() if k not in ("format", "categories", "buckets", "dim", "threshold")}
        return cls(model, list(meta["categories"]), meta["buckets"], float(meta["threshold"]), info)


# --- data -------------------------------------------------------------------------------------------------

def _record_text(rec: dict[str, Any], where: str) -> str:
    """The text to screen: the record's last user message, or its `text`/`input` field."""
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ChatforgeError(f"{where}: 'messages' must be a non-empty list")
        users = [m.get("content") for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
        if not users or not isinstance(users[-1], str):
            raise ChatforgeError(f"{where}: 'messages' has no user message with string content")
        return users[-1]
    for key in ("text", "input", "prompt"):
        if isinstance(rec.get(key), str):
            return rec[key]
    raise ChatforgeError(f"{where}: needs 'messages' or a 'text' string")


def read_examples(path: str | Path, other_categories_benign: bool = False) -> list[Example]:
    """Labelled JSONL: `messages` (or `text`), `category` harmful|benign, `harm_category` (a name or a list).

    With `other_categories_benign`, any category but "harmful" counts as benign (evaluation files mix
    facts, arithmetic, ... with harmful requests)."""
    examples = []
    for where, rec in iter_jsonl(path, "moderation data"):
        category = rec.get("category")
        if category not in ("harmful", "benign") and not (other_categories_benign and isinstance(category, str)):
            raise ChatforgeError(f"{where}: 'category' must be 'harmful' or 'benign', got {category!r}")
        labels: list[str] = []
        if category == "harmful":
            harm = rec.get("harm_category")
            labels = [harm] if isinstance(harm, str) else harm if isinstance(harm, list) else []
            if not labels or not all(isinstance(h, str) and h for h in labels):
                raise ChatforgeError(f"{where}: a harmful record needs 'harm_category' (a name or a list of names)")
        examples.append(Example(_record_text(rec, where), labels))
    if not examples:
        raise ChatforgeError(f"{path}: no records")
    return examples


def heldout_split(train: list[Example], heldout: list[Example] | None, fraction: float,
                  seed: int) -> tuple[list[Example], list[Example], str]:
    """(train, held-out, how): a held-out file when there is one, else a random share of the data.

    Held-out prompts whose exact text is also a training prompt are dropped, so only new wordings count."""
    if heldout:
        seen = {e.text.strip().lower() for e in train}
        fresh: dict[str, Example] = {}
        for e in heldout:
            if e.text.strip().lower() not in seen:
                fresh.setdefault(e.text.strip().lower(), e)
        return train, list(fresh.values()), (f"distinct prompts of the held-out file(s), "
                                             f"{len(seen & {e.text.strip().lower() for e in heldout})} also in training dropped")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    k = max(1, round(fraction * len(train)))
    return ([train[i] for i in order[k:]], [train[i] for i in order[:k]],
            "random records of the training data (no held-out file: paraphrase generalisation is not measured)")


class KeywordBaseline:
    """The strawman a trained classifier must beat: flag any word seen only in harmful training prompts."""

    def __init__(self, train: list[Example]) -> None:
        def words(e: Example) -> set[str]:
            return set(WORD.findall(e.text.lower()))
        harmful = set().union(*(words(e) for e in train if e.labels))
        benign = set().union(*(words(e) for e in train if not e.labels))
        self.keywords = harmful - benign

    def flags(self, texts: Sequence[str]) -> list[bool]:
        return [bool(self.keywords & set(WORD.findall(t.lower()))) for t in texts]


# --- training and evaluation ------------------------------------------------------------------------------

def train_moderator(train: list[Example], cfg: ModerationConfig, log=print) -> Moderator:
    categories = sorted({c for e in train for c in e.labels})
    if not categories:
        raise ChatforgeError("moderation: the training split has no harmful examples")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = BagClassifier(cfg.buckets, cfg.dim, len(categories))
    targets = torch.zeros(len(train), len(categories))
    for i, e in enumerate(train):
        for c in e.labels:
            targets[i, categories.index(c)] = 1.0
    optimizers = [torch.optim.SparseAdam(list(model.embed.parameters()), lr=cfg.lr),
                  torch.optim.AdamW(model.out.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)]
    features = [feature_ids(e.text, cfg.buckets) for e in train]
    order: list[int] = []
    running = 0.0
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:  # reshuffle once per pass over the data
            order += torch.randperm(len(train), generator=gen).tolist()
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        ids, offsets = _pack([_hide_some(features[i], model.unknown_id, cfg.unknown_rate, rng) for i in idx])
        loss = F.binary_cross_entropy_with_logits(model(ids, offsets), targets[idx])
        # Without it, a word that merely co-occurs with harm ("Thanks." ends many harmful prompts) grows
        # until the word alone, a one-word message, is flagged.
        loss = loss + cfg.l2 * F.embedding(ids, model.embed.weight, sparse=True).pow(2).sum(1).mean()
        lr = cfg.lr * min(1.0, (step + 1) / (0.1 * cfg.steps)) * (1 - step / cfg.steps)  # warm up, then decay
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        running = 0.95 * running + 0.05 * loss.item() if step else loss.item()
        if (step + 1) % max(1, cfg.steps // 4) == 0 or step + 1 == cfg.steps:
            log(f"step {step + 1}/{cfg.steps}  loss {running:.4f}")
    return Moderator(model, categories, cfg.buckets, cfg.threshold)


def prf(pred: list[bool], gold: list[bool]) -> dict[str, float]:
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4), "support": sum(gold)}


def evaluate(moderator: Moderator, examples: list[Example]) -> dict[str, Any]:
    """Precision/recall of `flagged` (harmful vs benign) and of each category."""
    results = moderator.moderate([e.text for e in examples])
    report = {"n": len(examples), "flagged": prf([r.flagged for r in results], [bool(e.labels) for e in examples])}
    report["categories"] = {c: prf([r.categories[c] for r in results], [c in e.labels for e in examples])
                            for c in moderator.categories}
    return report


def train_and_report(examples: list[Example], heldout: list[Example] | None, cfg: ModerationConfig,
                     log=print) -> tuple[Moderator, dict[str, Any]]:
    train, test, how = heldout_split(examples, heldout, cfg.heldout_fraction, cfg.seed)
    for name, part in (("training", train), ("held-out", test)):
        if not any(e.labels for e in part) or all(e.labels for e in part):
            raise ChatforgeError(f"moderation: the {name} prompts need both harmful and benign examples")
    log(f"moderation: {len(train)} training / {len(test)} held-out prompts ({how})")
    moderator = train_moderator(train, cfg, log)
    baseline = KeywordBaseline(train)
    metrics = {"split": how, "train": evaluate(moderator, train), "heldout": evaluate(moderator, test),
               "heldout_keyword_baseline": prf(baseline.flags([e.text for e in test]), [bool(e.labels) for e in test])}
    unseen = sorted({c for e in test for c in e.labels} - set(moderator.categories))
    if unseen:
        metrics["heldout_categories_unseen_in_training"] = unseen
    moderator.info = {"metrics": metrics, "config": asdict(cfg)}
    return moderator, metrics


# --- command line -----------------------------------------------------------------------------------------

def _default_data() -> Path:
    """The tiny world's labelled prompts, generated into runs/world when missing."""
    path = Path("runs/world/prompts/moderation.jsonl")
    if not path.is_file():
        from chatforge.cli import main as cli_main
        print("moderation: no --data given; generating the tiny world into runs/world")
        if cli_main(["world", "generate", "--out", "runs/world", "--size", "small"]) != 0 or not path.is_file():
            raise ChatforgeError("moderation: could not generate the tiny world; pass --data FILE")
    return path


def _train_cli(args: argparse.Namespace) -> None:
    from chatforge.config import config_from_args
    cfg = config_from_args(ModerationConfig, args, section="moderation")
    data = Path(cfg.data) if cfg.data else _default_data()
    examples = read_examples(data)
    heldout_paths = [Path(p) for p in cfg.heldout] if cfg.heldout else [
        p for p in (data.parent.parent / "eval" / "dev.jsonl", data.parent.parent / "eval" / "test.jsonl") if p.is_file()]
    heldout = [e for p in heldout_paths for e in read_examples(p, other_categories_benign=True)] or None
    cats = sorted({c for e in examples for c in e.labels})
    print(f"moderation: {len(examples)} prompts from {data} ({sum(bool(e.labels) for e in examples)} harmful; "
          f"categories {', '.join(cats)}); bag of words and word pairs hashed into {cfg.buckets} x {cfg.dim}, {cfg.steps} steps")
    moderator, metrics = train_and_report(examples, heldout, cfg)
    moderator.info["data"] = str(data)
    moderator.info["heldout"] = [str(p) for p in heldout_paths]
    out = moderator.save(cfg.out)
    held = metrics["heldout"]["flagged"]
    print(f"held-out ({metrics['split']}): precision {held['precision']:.3f}  recall {held['recall']:.3f}  "
          f"f1 {held['f1']:.3f}  (n={metrics['heldout']['n']})")
    base = metrics["heldout_keyword_baseline"]
    print(f"  keyword-list baseline on the same prompts: precision {base['precision']:.3f}  recall {base['recall']:.3f}  "
          f"f1 {base['f1']:.3f}")
    for c, m in metrics["heldout"]["categories"].items():
        print(f"  {c:<16} precision {m['precision']:.3f}  recall {m['recall']:.3f}  (support {m['support']})")
    print(f"classifier -> {out}  (serve it: chatforge serve CKPT --moderation {out})")


def _score_cli(args: argparse.Namespace) -> None:
    moderator = Moderator.load(args.dir)
    for text, r in zip(args.texts, moderator.moderate(args.texts)):
        print(json.dumps({"input": text, "flagged": r.flagged, "categories": r.flagged_categories(),
                          "category_scores": r.category_scores}))


def register(sub: argparse._SubParsersAction) -> None:
    from chatforge.config import add_config_args
    p = sub.add_parser("moderation", help="train and apply the moderation classifier")
    msub = p.add_subparsers(dest="action", required=True)
    t = msub.add_parser("train", help="train on labelled harmful/benign prompts; report held-out precision/recall")
    add_config_args(t, ModerationConfig)
    t.set_defaults(func=_train_cli)
    s = msub.add_parser("score", help="print moderation results for some texts")
    s.add_argument("dir", help="a directory written by `chatforge moderation train`")
    s.add_argument("texts", nargs="+")
    s.set_defaults(func=_score_cli)
