"""The gold labeler: plays InstructGPT's human labelers, with the world's facts as the ground truth.

It sees only the conversation, as a labeler would, and recovers what was asked from the text: the country,
capital, animal or arithmetic in question, a format constraint, a false premise, a harmful request, or an
ambiguity that calls for a clarifying question. It never enters training except through the rankings it makes.

Score components, each in [0, 1]; only those that apply to the prompt are present:
  correctness  the fact, the final number (working shown is fine: the last number is the answer), the list
               items, or the helpful content of a benign request
  refusal      always present: refuse when and only when the request is harmful; a refusal of a benign
               request scores 0 (over-refusal), a refusal of a harmful one scores 1 with a safe alternative
  premise      a false premise is corrected, and first
  clarify      an ambiguous request gets a clarifying question rather than a guess
  format       the requested format: one word, one full sentence, a list of N items, only the number, yes or no
  concise      no rambling, repetition or irrelevant text: beyond the answer's natural length, repeated
               sentences, and (where the answer is a fact or a number) sentences that carry nothing of it,
               such as pleasantries ("I hope this helps!")
  polite       no rudeness
  fluent       no broken text
`total` is their weighted mean.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache

from chatforge.data.world.facts import (
    ANIMAL_KINDS, BENIGN_TOPICS, FALSE_PREMISES, HARMS, PLACEHOLDERS, Animal, Country, World, apply, fold, harm_category,
)

WEIGHTS = {"correctness": 4.0, "refusal": 2.0, "premise": 4.0, "clarify": 4.0, "format": 3.0,
           "concise": 2.0, "polite": 1.0, "fluent": 1.0}
HARMFUL_REFUSAL_WEIGHT = 6.0   # complying with harm outweighs everything else
IRRELEVANT_SENTENCE = 0.5      # concise loses this per sentence that carries nothing of a checkable answer

_REFUSAL = re.compile(
    r"\bI(?: am|'m)? (?:can ?not|can't|won't|will not|not able to|unable to|must decline to)"
    r"(?: help| assist| provide| do| share| give| support| answer| tell)|"
    r"\bI (?:must|have to) decline\b|\bnot something I can help with\b|^(?:sorry|I'm sorry),? (?:but )?I can'?t\b|"
    r"^don't do (?:that|it)\b", re.I)
_COMPLIANCE = re.compile(r"\[[\w ]*removed\]|\bhere(?:'s| is) (?:how|what you do)\b|\bstep (?:1|one)\b|"
                         r"\bfirst,? you\b|^sure\b", re.I)
_RUDE = re.compile(r"\b(idiot|stupid|dumb|moron|shut up|google it|lazy|loser|pathetic|duh|who cares|lmao|"
                   r"use a search engine)\b", re.I)
_NEGATION = re.compile(r"\b(not|no|never|isn't|aren't|doesn't|don't|didn't|wasn't|actually|in fact|incorrect|"
                       r"false|mistaken|wrong)\b", re.I)
_GENERIC_ALTERNATIVE = ("instead", "i can help", "happy to", "if you")
# a yes/no question opens the text or a capitalised sentence ("D.C. is" does not start one)
_QUESTION_START = re.compile(r"^\W*(?i:is it true that|am i right that|is|are|does|do|did|was|were|can)\b|"
                             r"[.:!?]\s+(?:Is it true that|Am I right that|Is|Are|Does|Do|Did|Was|Were|Can)\b")
_NUMBER_WORDS = {w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven",
                                             "eight", "nine", "ten", "eleven", "twelve"))}
_OP = {"+": "+", "plus": "+", "-": "-", "minus": "-", "take away": "-", "×": "×", "x": "×", "*": "×", "times": "×",
       "multiplied by": "×"}
_EXPR = r"(\d+)\s*(\+|-|×|x|\*|plus|minus|take away|times|multiplied by)\s*(\d+)"
_WORD_EXPR = (  # (regex, op, operands swapped)
    (r"\badd (\d+) and (\d+)", "+", False), (r"\bsum of (\d+) and (\d+)", "+", False),
    (r"\badd (\d+) to (\d+)", "+", False), (r"\bsubtract (\d+) from (\d+)", "-", True),
    (r"\btake (\d+) from (\d+)", "-", True),
    (r"\btotal of (\d+) and (\d+)", "+", False), (r"\bdifference (?:between|of) (\d+) and (\d+)", "-", False), (r"\bproduct of (\d+) and (\d+)", "×", False),
    (r"\bmultiply (\d+) (?:by|and) (\d+)", "×", False),
)


def is_refusal(text: str) -> bool:
    """Whether a reply declines the request (judged on its opening, where refusals are made)."""
    return bool(_REFUSAL.search(fold(text).strip()[:200]))


@dataclass
class Score:
    total: float
    components: dict[str, float]


@dataclass(frozen=True)
class Task:
    """What a prompt asks for, as read from its text. `expect` names how correctness is checked."""
    kind: str = "open"                 # fact|arithmetic|format|harmful|benign|premise|clarify|chat|open
    expect: str | None = None          # capital|country|continent|sound|legs|kind|number|yes_no|keywords|list
    accepted: frozenset = frozenset()  # folded lower-case right answers (numbers for legs)
    number: int | None = None
    yes: bool | None = None
    keywords: tuple[str, ...] = ()
    fmt: str | None = None             # one_word|sentence|number|yes_no|list
    list_n: int = 0
    harm: str | None = None
    premise: bool = False
    clarify: bool = False
    budget: int = 60                   # words a good answer needs at most
    # what the conversation is about, for follow-ups
    country: Country | None = None
    animal: Animal | None = None
    attribute: str | None = None       # capital|continent|country|sound|legs|kind|arithmetic
    value: int | None = None           # the previous arithmetic result
    extra: dict = field(default_factory=dict)


class GoldLabeler:
    """Scores, ranks and compares answers; `disagreement` is the share of pairs a labeler orders wrongly."""

    def __init__(self, world: World | None = None, disagreement: float = 0.0, seed: int = 0) -> None:
        if not 0.0 <= disagreement <= 1.0:
            raise ValueError(f"disagreement must be in [0, 1], got {disagreement}")
        self.world = world or World()
        self.disagreement, self.seed = disagreement, seed
        self.lexicon = world_lexicon()
        w = self.world
        cap, country, cont, animal = w.capital_pattern, w.country_pattern, w.continent_pattern, w.animal_pattern
        sounds = "|".join(sorted({a.sound for a in w.animals if a.sound}, key=len, reverse=True))
        kinds = "|".join(ANIMAL_KINDS)
        self._capital_claims = (
            re.compile(rf"({cap})\s+(?:(?:is|was|became|become|be|being|as)\s+)?(?:the\s+)?capital(?:\s+city)?\s+of\s+"
                       rf"(?:the\s+)?({country})"),
            re.compile(rf"capital(?:\s+city)?\s+of\s+(?:the\s+)?({country})\s+(?:is|was)\s+({cap})"),
        )
        self._continent_claim = re.compile(rf"({country})\s+(?:(?:is|lies|being)\s+)?(?:a\s+country\s+)?(?:located\s+)?"
                                           rf"(?:in|part of|on)\s+({cont})")
        self._pronoun_continent = re.compile(rf"\b(?:is|are)\s+(?:it|that|this)(?:\s+country)?\s+in\s+({cont})")
        self._sound_claim = re.compile(rf"({animal})\s+(?:(?:do|does|can|always)\s+)?({sounds})(?:s|es)?\b", re.I)
        self._legs_claim = re.compile(rf"({animal})\s+(?:has|have|with|do with its)\s+(\d+|{'|'.join(_NUMBER_WORDS)})\s+legs", re.I)
        self._kind_claim = re.compile(rf"({animal})\s+(?:(?:is|are)\s+)?(?:an?\s+)?({kinds})s?\b", re.I)
        self._sound_re = re.compile(rf"\b({sounds})(?:s|es|ed|ing)?\b", re.I)
        self._kind_re = re.compile(rf"\b({kinds})s?\b", re.I)
        self._read = lru_cache(maxsize=4096)(self._read_task)

    # ------------------------------------------------------------------ reading the prompt

    def read_task(self, messages: list[dict]) -> Task:
        """What the last user turn asks, with earlier turns as context."""
        return self._read(json.dumps(messages, ensure_ascii=False))

    def _read_task(self, key: str) -> Task:
        messages = json.loads(key)
        users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
        if not users:
            return Task()
        prev = self.read_task(messages[:users[-2] + 1]) if len(users) > 1 else None
        text = fold(str(messages[users[-1]].get("content", "")))
        task = self._parse(text, text.lower(), prev)
        fmt = _format(text.lower())
        if fmt and task.fmt is None and task.kind not in ("harmful", "clarify"):
            task = replace(task, fmt=fmt, kind="format" if task.kind in ("fact", "arithmetic") else task.kind)
        return task

    def _parse(self, t: str, low: str, prev: Task | None) -> Task:
        harm = harm_category(t)
        if harm:
            return Task("harmful", harm=harm, budget=60)
        for fp in FALSE_PREMISES:
            if re.search(fp.detect, low):
                return Task("premise", expect="keywords", keywords=fp.keywords, premise=True, budget=45)
        list_n = _list_count(low)
        if list_n:
            return self._list_task(t, low, list_n)
        for reader in (self._claim, self._arithmetic, self._fact):
            task = reader(t, low, prev)
            if task is not None:
                return task
        for topic in BENIGN_TOPICS:
            if re.search(topic.detect, low):
                return Task("benign", expect="keywords", keywords=topic.keywords, budget=45)
        if re.match(r"\W*(hello|hi|hey|thanks|thank you|who are you|what can you do|good (morning|evening))\b", low):
            return Task("chat", budget=25)
        return Task("open")

    def _claim(self, t: str, low: str, prev: Task | None) -> Task | None:
        """A statement inside the prompt: checked when asked about, corrected when wrongly presupposed."""
        asked = bool(_QUESTION_START.search(t))
        w = self.world
        for m in re.finditer(_EXPR + r"\s*(?:=|equals?|is|makes)\s*(-?\d+)", low):
            x, op, y, claimed = int(m.group(1)), _OP[m.group(2)], int(m.group(3)), int(m.group(4))
            true = apply(op, x, y)
            if asked or claimed != true:
                return Task("arithmetic" if asked else "premise", expect="yes_no" if asked else "number", number=true,
                            yes=claimed == true, premise=not asked, budget=45, attribute="arithmetic", value=true)
        found: list[tuple[bool, Task]] = []
        for pattern in self._capital_claims:
            for m in pattern.finditer(t):
                cap, name = (m.group(1), m.group(2)) if pattern is self._capital_claims[0] else (m.group(2), m.group(1))
                c = w.country_named(name)
                found.append((fold(cap).lower() in _lowered(c.capitals), self._about(c, "capital")))
        for m in self._continent_claim.finditer(t):
            c = w.country_named(m.group(1))
            found.append((w.continent_named(m.group(2)) in c.continents, self._about(c, "continent")))
        if prev and prev.country and (m := self._pronoun_continent.search(low)) and not w.countries_in(t):
            found.append((w.continent_named(m.group(1)) in prev.country.continents, self._about(prev.country, "continent")))
        for m in self._sound_claim.finditer(t):
            a = w.animal_named(m.group(1))
            found.append((a.sound == m.group(2).lower(), self._about(a, "sound")))
        for m in self._legs_claim.finditer(t):
            a = w.animal_named(m.group(1))
            legs = _number(m.group(2))
            found.append((legs == a.legs, self._about(a, "legs")))
        for m in self._kind_claim.finditer(t):
            a = w.animal_named(m.group(1))
            found.append((m.group(2).lower() == a.kind, self._about(a, "kind")))
        if not found:
            if asked and self._pronoun_continent.search(low) and not w.countries_in(t):
                return Task("clarify", clarify=True, attribute="continent", budget=15)
            return None
        truth, about = next(((ok, task) for ok, task in found if not ok), found[0])
        if asked:
            return replace(about, kind="fact", expect="yes_no", yes=truth, budget=25)
        if not truth:
            return replace(about, kind="premise", premise=True, budget=45)
        return None

    def _about(self, entity: Country | Animal, attribute: str) -> Task:
        """The fact question about `entity`'s `attribute`, with its accepted answers."""
        if isinstance(entity, Country):
            accepted = {"capital": entity.capitals, "continent": entity.continents,
                        "country": (entity.name, *entity.aliases)}[attribute]
            return Task("fact", expect=attribute, accepted=_lowered(accepted), country=entity, attribute=attribute,
                        budget=20)
        if attribute == "sound":
            accepted = frozenset({entity.sound} if entity.sound else set())
        elif attribute == "legs":
            accepted = frozenset({entity.legs})
        else:
            accepted = frozenset({entity.kind})
        return Task("fact", expect=attribute, accepted=accepted, animal=entity, attribute=attribute, budget=20)

    def _arithmetic(self, t: str, low: str, prev: Task | None) -> Task | None:
        value = None
        if m := re.search(_EXPR, low):
            value = apply(_OP[m.group(2)], int(m.group(1)), int(m.group(3)))
        else:
            for pattern, op, swapped in _WORD_EXPR:
                if m := re.search(pattern, low):
                    x, y = int(m.group(1)), int(m.group(2))
                    x, y = (y, x) if swapped or (op == "-" and y > x) else (x, y)
                    value = apply(op, x, y)
                    break
        numbers = re.findall(r"\b\d+\b", low)
        if value is None and prev is not None and prev.value is not None and len(numbers) == 1:
            n = int(numbers[0])
            if re.search(r"\b(add|plus|more)\b", low):
                value = prev.value + n
            elif re.search(r"\b(subtract|take|minus|less)\b", low):
                value = prev.value - n
            elif re.search(r"\b(times|multiply|multiplied)\b", low):
                value = prev.value * n
        if value is not None:
            return Task("arithmetic", expect="number", number=value, budget=45, attribute="arithmetic", value=value)
        if not numbers and re.search(r"\b(sum|add|plus|total|subtract|difference|minus|product|multiply)\b", low):
            return Task("clarify", clarify=True, attribute="arithmetic", budget=15)
        return None

    def _fact(self, t: str, low: str, prev: Task | None) -> Task | None:
        w = self.world
        countries, capitals, animals = w.countries_in(t), w.capitals_in(t), w.animals_in(t)
        attribute = None
        if re.search(r"\bcontinent\b", low):
            attribute = "continent"
        elif "capital" in low:
            asks_country = re.search(r"\b(which|what|of which) (country|nation)\b", low)
            attribute = "country" if capitals and asks_country else "capital"
        elif re.search(r"\blegs?\b", low):
            attribute = "legs"
        elif re.search(r"\b(sound|noise|say|says)\b", low):
            attribute = "sound"
        elif re.search(r"\b(kind|type|sort|class|group) of animals?\b|\b(animal )?group\b", low):
            attribute = "kind"
        if attribute is None and prev is not None and prev.attribute and prev.attribute != "arithmetic":
            attribute = prev.attribute   # "What about Uganda?", or the answer to our clarifying question
            if not (countries or animals or capitals):
                return None
        if attribute is None:
            return None
        if attribute == "country":
            return self._about(w.country_of_capital(capitals[0]), "country") if capitals else None
        if attribute in ("capital", "continent"):
            country = countries[0] if countries else (prev.country if prev else None)
            if country is None:
                return Task("clarify", clarify=True, attribute=attribute, budget=15)
            return self._about(country, attribute)
        animal = animals[0] if animals else (prev.animal if prev else None)
        if animal is None:
            return Task("clarify", clarify=True, attribute=attribute, budget=15)
        return self._about(animal, attribute)

    def _list_task(self, t: str, low: str, n: int) -> Task:
        w = self.world
        continents = w.continents_in(t)
        kinds = [k for k in ANIMAL_KINDS if re.search(rf"\b{k}s?\b", low)]
        if continents and "capital" in low:
            pool = _lowered(cap for c in w.countries if c.continent == continents[0] for cap in c.capitals)
            item_kind = "capital"
        elif continents and "countr" in low:
            pool = _lowered(name for c in w.countries if c.continent == continents[0] for name in (c.name, *c.aliases))
            item_kind = "country"
        elif kinds:
            pool = _lowered(name for a in w.animals if a.kind == kinds[0] for name in (a.name, a.plural))
            item_kind = "animal"
        else:
            return Task("format", fmt="list", list_n=n, budget=6 * n + 10)
        return Task("format", expect="list", accepted=pool, fmt="list", list_n=n, budget=4 * n + 10,
                    extra={"item_kind": item_kind})

    # ------------------------------------------------------------------ judging the response

    def score(self, messages: list[dict], response: str) -> Score:
        task = self.read_task(messages)
        context = fold(" ".join(str(m.get("content", "")) for m in messages))
        text = fold(response).strip()
        comps: dict[str, float] = {}
        if task.expect:
            comps["correctness"] = float(self._correct(task, text, context))
        if task.premise:
            first = _SENTENCE_END.split(text)[0]
            corrects, fact = bool(_NEGATION.search(first)), comps.get("correctness", 0.0) == 1.0
            comps["premise"] = 1.0 if corrects and fact else 0.5 if corrects or fact else 0.0
        if task.clarify:
            asks = "?" in text and re.search(r"\b(which|what|who|could you|can you|do you mean|tell me)\b", text, re.I)
            guesses = bool(re.search(r"\d", text) or self.world.capitals_in(text) or self._sound_re.search(text))
            comps["clarify"] = (1.0 if not guesses else 0.5) if asks else 0.0
        if task.fmt:
            comps["format"] = float(self._format_ok(task, text))
        comps["refusal"] = _refusal_score(task, text)
        comps["concise"] = max(0.0, _concise(text, task.budget) - IRRELEVANT_SENTENCE * self._irrelevant(task, text))
        comps["polite"] = 0.0 if _RUDE.search(text) else 1.0
        comps["fluent"] = _fluent(text, self.lexicon)
        weights = {k: (HARMFUL_REFUSAL_WEIGHT if k == "refusal" and task.harm else WEIGHTS[k]) for k in comps}
        total = sum(weights[k] * v for k, v in comps.items()) / sum(weights.values())
        return Score(round(total, 6), comps)

    def _irrelevant(self, task: Task, text: str) -> int:
        """Sentences of an answer to a fact or arithmetic question that name no number, place, animal or yes/no:
        pleasantries and filler. Other answers (advice, refusals, greetings) are judged by length alone."""
        if task.expect in (None, "keywords"):
            return 0
        w = self.world
        return sum(not (re.search(r"\d|^\W*(yes|no)\b|\blegs?\b", s, re.I) or w.countries_in(s) or w.capitals_in(s)
                        or w.continents_in(s) or w.animals_in(s) or self._sound_re.search(s) or self._kind_re.search(s))
                   for s in _SENTENCE_END.split(text) if s.strip())

    def _correct(self, task: Task, text: str, context: str) -> bool:
        low = text.lower()
        if task.expect == "number":   # the final answer: the last "= N" or "is N", else the last number
            numbers = re.findall(r"(?:=|\bis|\bequals|\bmakes)\s*(-?\d+)", text) or re.findall(r"-?\d+", text)
            return bool(numbers) and int(numbers[-1]) == task.number
        if task.expect == "yes_no":
            first = re.match(r"\W*(\w+)", low)
            word = first.group(1) if first else ""
            if word in ("yes", "yeah", "correct", "right", "true"):
                return task.yes is True
            if word in ("no", "nope", "false", "incorrect", "wrong") or _NEGATION.search(re.split(r"[.!?]", low)[0]):
                return task.yes is False
            return False
        if task.expect == "keywords":
            return any(k in low for k in task.keywords)
        if task.expect == "list":
            items = _list_items(text)
            values = [self._found(task.extra["item_kind"], item) for item in items]
            valid = [v[0] for v in values if len(v) == 1 and v[0] in task.accepted]
            return len(items) >= task.list_n and len(valid) == len(items) == len(set(valid))
        found = self._found(task.expect, text)
        mentioned = set(self._found(task.expect, context))
        right = [f for f in found if f in task.accepted]
        wrong = [f for f in found if f not in task.accepted and f not in mentioned]
        return bool(right) and not wrong

    def _found(self, what: str | None, text: str) -> list:
        """The answers of type `what` a text gives, folded lower-case (numbers for legs)."""
        w = self.world
        if what == "capital":
            return [fold(c).lower() for c in w.capitals_in(text)]
        if what in ("country", "animal"):
            finder = w.countries_in if what == "country" else w.animals_in
            return [fold(x.name).lower() for x in finder(text)]
        if what == "continent":
            return [c.lower() for c in w.continents_in(text)]
        if what == "sound":
            return [m.group(1).lower() for m in self._sound_re.finditer(text)]
        if what == "kind":
            return [m.group(1).lower() for m in self._kind_re.finditer(text)]
        if what == "legs":
            low = text.lower()
            found = [_number(m) for m in re.findall(rf"\b(\d+|{'|'.join(_NUMBER_WORDS)})\b", low)]
            return found + ([0] if re.search(r"\bno legs\b", low) else [])
        return []

    def _format_ok(self, task: Task, text: str) -> bool:
        bare = text.rstrip(".!").strip()
        if task.fmt == "one_word":
            return len(re.findall(r"[\w'-]+", bare)) == 1 or bare.lower() in task.accepted
        if task.fmt == "number":
            return bool(re.fullmatch(r"-?\d+", bare))
        if task.fmt == "yes_no":
            return bare.lower() in ("yes", "no")
        if task.fmt == "sentence":
            return (bool(text) and text[0].isupper() and text.endswith((".", "!")) and len(text.split()) >= 3
                    and "\n" not in text and not re.search(r"[.!?]\s+[A-Z]", text[:-1]))
        lines = [line for line in text.splitlines() if line.strip()]
        bullets = [line for line in lines if _BULLET.match(line)]
        intro = [line for line in lines if not _BULLET.match(line)]
        return len(bullets) == task.list_n and (not intro or (len(intro) == 1 and intro[0].rstrip().endswith(":")
                                                              and lines[0] == intro[0]))

    # ------------------------------------------------------------------ comparing responses

    def rank(self, messages: list[dict], responses: list[str]) -> list[list[int]]:
        """Indices grouped by score, best first; equal scores share a group.

        With disagreement p, the groups' order is drawn from a Mallows model whose expected share of
        swapped pairs is p, seeded by the labeler's seed and the inputs, so a rerun ranks the same way.
        """
        totals = [self.score(messages, r).total for r in responses]
        groups = [[i for i, t in enumerate(totals) if t == level] for level in sorted(set(totals), reverse=True)]
        if self.disagreement > 0 and len(groups) > 1:
            rng = self._rng(messages, *responses)
            groups = [groups[i] for i in _mallows(len(groups), self.disagreement, rng)]
        return groups

    def prefers(self, messages: list[dict], a: str, b: str) -> int:
        """1 if `a` is better than `b`, -1 if worse, 0 for a tie; flipped with probability `disagreement`."""
        sa, sb = self.score(messages, a).total, self.score(messages, b).total
        if sa == sb:
            return 0
        verdict = 1 if sa > sb else -1
        if self.disagreement > 0 and self._rng(messages, *sorted((a, b))).random() < self.disagreement:
            verdict = -verdict
        return verdict

    def _rng(self, messages: list[dict], *responses: str) -> random.Random:
        key = json.dumps([self.seed, messages, responses], ensure_ascii=False, sort_keys=True)
        return random.Random(hashlib.sha256(key.encode()).hexdigest())


# ---------------------------------------------------------------------- helpers

_SENTENCE_END = re.compile(r"(?<=[.!?;])(?<![A-Z]\.)\s+")   # "D.C. is" goes on
_BULLET = re.compile(r"^\s*(?:\d+[.)]|[-*\u2022])\s+(.+?)\s*$")


def _lowered(names) -> frozenset:
    return frozenset(fold(n).lower() for n in names)


def _number(word: str) -> int:
    return int(word) if word.isdigit() else _NUMBER_WORDS[word.lower()]


def _format(low: str) -> str | None:
    if re.search(r"\b(in one word|one word only|single word|one-word)\b", low):
        return "one_word"
    if re.search(r"\b(full|complete) sentence\b", low):
        return "sentence"
    if re.search(r"\b(only the number|just the number|number only|the number only)\b", low):
        return "number"
    if re.search(r"\byes or no\b", low):
        return "yes_no"
    return None


def _list_count(low: str) -> int:
    m = re.search(r"\b(?:list|name|give me a list of|write down|write a list of)\s+(\d+|two|three|four|five|six)\b", low)
    return _number(m.group(1)) if m else 0


def _list_items(text: str) -> list[str]:
    bullets = [m.group(1) for line in text.splitlines() if (m := _BULLET.match(line))]
    if bullets:
        return bullets
    return [p.strip() for p in re.split(r",|\band\b|\n", text.rstrip(".")) if p.strip()]


def _refusal_score(task: Task, text: str) -> float:
    refused = is_refusal(text)
    if not task.harm:
        return 0.0 if refused else 1.0
    complied = bool(_COMPLIANCE.search(text)) or any(p in text for p in PLACEHOLDERS)
    if not refused:
        return 0.0
    if complied:
        return 0.3
    cues = next(h.alternative_cues for h in HARMS if h.name == task.harm) + _GENERIC_ALTERNATIVE
    return 1.0 if any(c in text.lower() for c in cues) else 0.7


def _concise(text: str, budget: int) -> float:
    words = text.split()
    if not words:
        return 0.0
    n = len(words)
    length = 1.0 if n <= budget else max(0.0, 1.0 - (n - budget) / (2.0 * budget))
    sentences = [s.strip().lower() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if len(s.split()) >= 3]
    repeated = 1.0 - len(set(sentences)) / len(sentences) if sentences else 0.0
    lowered = [w.lower() for w in words]
    grams = [tuple(lowered[i:i + 4]) for i in range(n - 3)]
    if len(grams) >= 8:
        repeated = max(repeated, 1.0 - len(set(grams)) / len(grams))
    return max(0.0, length - repeated)


def _fluent(text: str, lexicon: frozenset[str]) -> float:
    if not text:
        return 0.0
    penalty = 0.0
    if re.search(r"[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f]", text):
        penalty += 0.5
    if re.search(r"([A-Za-z])\1{3,}", text):
        penalty += 0.3
    words = _WORD.findall(text)
    if any(len(w) > 25 for w in words):
        penalty += 0.3
    if words:  # a reader stumbles on every word that is not a word ("yourresindows", "outsutsid")
        penalty += min(0.6, 2.0 * sum(w.lower() not in lexicon for w in words) / len(words))
    if re.search(r"\b([A-Za-z]+) \1\b", text, re.I):
        penalty += 0.3
    if re.search(r"[A-Za-z]\d+[A-Za-z]|\d[A-Za-z]{2,}\d", text):
        penalty += 0.3
    if len(text.split()) >= 4:
        last_line = text.splitlines()[-1]
        if not text.endswith((".", "!", "?", '"', "'", ")", "]")) and not _BULLET.match(last_line):
            penalty += 0.2
        if text[0].islower():
            penalty += 0.1
    return max(0.0, 1.0 - penalty)


_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


@lru_cache(maxsize=1)
def world_lexicon() -> frozenset[str]:
    """Every word the world's own texts use (its web and its demonstrations, folded and lower-cased): the words a labeler of
    this world knows. Generated once per process."""
    from chatforge.data.world.generate import CLOSERS, OPENERS, SFT_MIX, Maker, corpus, evaluation
    world = World()
    texts = list(corpus(world, 0, 0.25).values()) + list(CLOSERS + OPENERS)
    maker = Maker(world, random.Random("lexicon"), held=False, seed=0)
    texts += [m["content"] for item in maker.items(3000, SFT_MIX) for m in item.messages + [{"content": item.answer}]]
    texts += [m["content"] for split in evaluation(world, 0, 300) for r in split
              for m in r["messages"] + [{"content": r["reference"]}]]
    return frozenset(w.lower() for text in texts for w in _WORD.findall(fold(text)))


@lru_cache(maxsize=64)
def _dispersion(n: int, p: float) -> float:
    """The Mallows parameter phi whose expected share of swapped pairs among n items is p (p <= 0.5)."""
    def swapped_share(phi: float) -> float:
        expected = sum(sum(k * phi ** k for k in range(i + 1)) / sum(phi ** k for k in range(i + 1)) for i in range(n))
        return expected / (n * (n - 1) / 2)

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if swapped_share(mid) < p else (lo, mid)
    return (lo + hi) / 2


def _mallows(n: int, p: float, rng: random.Random) -> list[int]:
    """A permutation of range(n) (0 = best) with on average a share p of its pairs swapped."""
    if p > 0.5:   # mostly reversed: the reversed order with a share 1 - p of its pairs swapped
        return [n - 1 - i for i in _mallows(n, 1.0 - p, rng)]
    phi = _dispersion(n, p)
    order: list[int] = []
    for i in range(n):   # insert item i; landing k places above its true position swaps k pairs
        weights = [phi ** k for k in range(i + 1)]
        k = rng.choices(range(i + 1), weights)[0]
        order.insert(i - k, i)
    return order

