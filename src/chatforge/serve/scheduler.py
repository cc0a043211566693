"""Batches concurrent requests through the shared engine, in one worker thread.

Requests that arrive together form a *cohort*: one `engine.stream` over all their rows (n samples each), so
they share every forward pass. Cohorts group requests whose sampling settings agree (a seeded request gets
its own cohort, so its output does not depend on other traffic). Several cohorts run at once, interleaved
one decode step each, so a request arriving mid-generation starts within a step instead of waiting for
the running batch to finish.

The worker never waits on a client: each request owns an unbounded asyncio queue (bounded in practice by
its max_tokens) filled with `call_soon_threadsafe`, so a slow reader only delays itself, and a client that
disconnects cancels its rows at the next step. Admission is bounded: past `max_queue` waiting requests,
`submit` raises `QueueFull` (the API answers 503).
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch

from chatforge.tokenizer import Tokenizer


class QueueFull(Exception):
    """Too many requests are waiting; retry later."""


class GenerationFailed(Exception):
    """The engine raised while serving this request."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class ChoiceDelta:
    """New text for one choice. `tokens` counts the tokens generated since the previous delta (a stop token
    is not counted)."""
    index: int
    text: str
    tokens: int
    finish_reason: str | None = None  # "stop" | "length" | None while generating


class Ticket:
    """The client's side of one request: `async for deltas in ticket.events()`; `cancel()` frees its rows."""

    _ids = itertools.count()

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.id = next(self._ids)
        self.request = request
        self.loop = loop
        self.cancelled = threading.Event()
        self.dropped: set[int] = set()   # choices the client no longer wants (e.g. moderation stopped them)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._open = set(range(request.n))

    def push(self, deltas: list[ChoiceDelta]) -> None:
        """Called from the worker thread."""
        self.loop.call_soon_threadsafe(self._queue.put_nowait, deltas)

    def fail(self, error: Exception) -> None:
        self.loop.call_soon_threadsafe(self._queue.put_nowait, error)

    def cancel(self) -> None:
        self.cancelled.set()

    def drop(self, index: int) -> None:
        """Stop generating one choice; `events()` no longer waits for it."""
        self.dropped.add(index)
        self._open.discard(index)

    def wants(self, index: int) -> bool:
        return not self.cancelled.is_set() and index not in self.dropped

    async def events(self) -> AsyncIterator[list[ChoiceDelta]]:
        """Lists of deltas until every choice has finished; raises GenerationFailed if the engine failed."""
        while self._open:
            item = await self._queue.get()
            if isinstance(item, Exception):
                raise GenerationFailed(str(item)) from item
            item = [d for d in item if d.index not in self.dropped]
            self._open -= {d.index for d in item if d.finish_reason is not None}
            if item:
                yield item


class IncrementalText:
    """Turns one choice's growing token ids into text deltas, honouring stop strings.

    Text is held back while it ends in an incomplete UTF-8 character or in a prefix of a stop string, so a
    client never sees bytes that later change or the start of a stop sequence.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = ""

    def add(self, token_id: int) -> tuple[str, bool]:
        """(new text to send, whether a stop string ended the choice)."""
        self.ids.append(token_id)
        full = self.tokenizer.decode(self.ids)
        for s in self.stop:
            at = full.find(s, max(0, len(self.sent) - len(s)))
            if at >= 0:
                return self._take(full[:at]), True
        end = len(full)
        while end > len(self.sent) and full[end - 1] == "\ufffd":
            end -= 1
        for s in self.stop:
            for k in range(min(len(s) - 1, end - len(self.sent)), 0, -1):
                if full[end - k:end] == s[:k]:
                    end -= k
                    break
        return self._take(full[:end]), False

    def flush(self) -> str:
        """Everything held back, when the choice ends for another reason."""
        return self._take(self.tokenizer.decode(self.ids))

    def _take(self, upto: str) -> str:
        if not upto.startswith(self.sent) or len(upto) <= len(self.sent):
            return ""
        new = upto[len(self.sent):]
        self.sent = upto
        return new


@dataclass
class _Row:
    ticket: Ticket
    index: int
    text: IncrementalText
    budget: int                     # this choice's max_tokens
    generated: int = 0
    unsent_tokens: int = 0
    done: bool = False


@dataclass
class _Cohort:
    key: tuple
    rows: list[_Row]
    stream: Any = None              # the engine's Stream: next() = one decode step, cancel(row)
    max_tokens: int = 0


@dataclass
class SchedulerStats:
    decode_steps: int = 0
    batched_steps: int = 0          # steps whose forward pass served two or more requests
    requests: int = 0
    rejected: int = 0
    cancelled: int = 0
    max_rows_in_step: int = 0


class Scheduler:
    """Serves `GenerationRequest`s through an `Engine` from one worker thread."""

    def __init__(self, engine: Any, max_batch_rows: int = 32, max_queue: int = 64,
                 batch_window: float = 0.005) -> None:
        self.engine = engine
        self.tokenizer: Tokenizer = engine.tokenizer
        self.context_length: int = engine.config.max_position_embeddings
        self.max_batch_rows = max_batch_rows
        self.max_queue = max_queue
        self.batch_window = batch_window
        self.stats = SchedulerStats()
        self._pending: deque[Ticket] = deque()
        self._lock = threading.Condition()
        self._closing = False
        self._cohorts: list[_Cohort] = []
        self._thread = threading.Thread(target=self._run, name="chatforge-scheduler", daemon=True)
        self._thread.start()

    # --- client side (event loop thread) ---
    def submit(self, request: GenerationRequest) -> Ticket:
        ticket = Ticket(request, asyncio.get_running_loop())
        with self._lock:
            if len(self._pending) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"{len(self._pending)} requests are already waiting")
            self._pending.append(ticket)
            self.stats.requests += 1
            self._lock.notify()
        return ticket

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            waiting = len(self._pending)
        active = sum(1 for c in self._cohorts for r in c.rows if not r.done)
        return {"waiting": waiting, "active_rows": active, "decode_steps": self.stats.decode_steps,
                "batched_steps": self.stats.batched_steps, "requests": self.stats.requests,
                "rejected": self.stats.rejected, "cancelled": self.stats.cancelled,
                "max_rows_in_step": self.stats.max_rows_in_step}

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._thread.join(timeout=10)

    # --- worker thread ---
    def _run(self) -> None:
        with torch.inference_mode():
            while self._admit(block=not self._cohorts):
                for cohort in list(self._cohorts):
                    try:
                        self._step(cohort)
                    except Exception as e:  # noqa: BLE001 - reported to its clients; the worker keeps serving
                        self._fail(cohort, e)
                self._cohorts = [c for c in self._cohorts if not all(r.done for r in c.rows)]

    def _admit(self, block: bool) -> bool:
        """Move waiting requests into new cohorts while rows are free. False when closing."""
        with self._lock:
            if block:
                while not self._pending and not self._closing:
                    self._lock.wait()
                if self._closing:
                    return False
                # A short window lets requests sent together land in one cohort.
                deadline = time.monotonic() + self.batch_window
                while (left := deadline - time.monotonic()) > 0 and len(self._pending) < self.max_batch_rows:
                    self._lock.wait(left)
            if self._closing:
                return False
            free = self.max_batch_rows - sum(1 for c in self._cohorts for r in c.rows if not r.done)
            taken: list[Ticket] = []
            # In arrival order while rows are free; a request wider than the whole batch runs alone.
            while self._pending and (self._pending[0].request.n <= free or not taken and free == self.max_batch_rows):
                t = self._pending.popleft()
                free -= t.request.n
                taken.append(t)
        fresh: list[_Cohort] = []
        for t in taken:
            if t.cancelled.is_set():
                self.stats.cancelled += 1
                continue
            req = t.request
            key = (req.temperature if req.temperature > 0 else 0.0,
                   req.top_p if req.temperature > 0 else 1.0,
                   ("seed", req.seed, t.id) if req.seed is not None else None)
            home = next((c for c in fresh if c.key == key), None)
            if home is None:
                home = _Cohort(key, [])
                fresh.append(home)
            home.rows += [_Row(t, i, IncrementalText(self.tokenizer, req.stop), req.max_tokens) for i in range(req.n)]
            # The engine caps each row at the context window itself; a row's own max_tokens is enforced here.
            home.max_tokens = max(home.max_tokens, req.max_tokens)
        for c in fresh:
            self._start(c)
        return True

    def _start(self, cohort: _Cohort) -> None:
        from chatforge.infer.engine import SamplingParams
        temperature, top_p, seeded = cohort.key
        req = cohort.rows[0].ticket.request
        params = SamplingParams(max_new_tokens=cohort.max_tokens, temperature=temperature, top_p=top_p,
                                seed=req.seed if seeded else None)
        prompts = [r.ticket.request.prompt_ids for r in cohort.rows]
        try:
            cohort.stream = self.engine.stream(prompts, params)
        except Exception as e:  # noqa: BLE001 - reported to the clients, the worker keeps serving
            self._fail(cohort, e)
            return
        self._cohorts.append(cohort)

    def _step(self, cohort: _Cohort) -> None:
        self.stats.cancelled += len({r.ticket for r in cohort.rows if not r.done and r.ticket.cancelled.is_set()})
        for i, row in enumerate(cohort.rows):
            if not row.done and not row.ticket.wants(row.index):
                self._drop(cohort, i)
        if all(r.done for r in cohort.rows):
            return
        step: list[tuple[int, int]] | None = next(cohort.stream, None)
        out: dict[Ticket, list[ChoiceDelta]] = {}
        if step is None:  # the engine ran out of max_new_tokens for every remaining row
            for row in cohort.rows:
                if not row.done:
                    self._finish(row, "length", out)
        else:
            self.stats.decode_steps += 1
            served = {cohort.rows[i].ticket.id for i, _ in step if not cohort.rows[i].done}
            self.stats.batched_steps += len(served) >= 2
            self.stats.max_rows_in_step = max(self.stats.max_rows_in_step, len(step))
            for i, token in step:
                row = cohort.rows[i]
                if row.done:
                    continue
                if token in self.tokenizer.stop_ids:  # not counted, as in the engine's Generation.ids
                    self._finish(row, "stop", out)
                    self._drop(cohort, i)
                    continue
                row.generated += 1
                row.unsent_tokens += 1
                text, stopped = row.text.add(token)
                if stopped:
                    self._emit(row, text, "stop", out)
                    self._drop(cohort, i)
                elif row.generated >= row.budget:
                    self._emit(row, text + row.text.flush(), "length", out)
                    self._drop(cohort, i)
                elif text:
                    self._emit(row, text, None, out)
        for ticket, deltas in out.items():
            ticket.push(deltas)

    def _emit(self, row: _Row, text: str, finish: str | None, out: dict[Ticket, list[ChoiceDelta]]) -> None:
        out.setdefault(row.ticket, []).append(ChoiceDelta(row.index, text, row.unsent_tokens, finish))
        row.unsent_tokens = 0
        if finish is not None:
            row.done = True

    def _finish(self, row: _Row, reason: str, out: dict[Ticket, list[ChoiceDelta]]) -> None:
        self._emit(row, row.text.flush(), reason, out)

    def _drop(self, cohort: _Cohort, i: int) -> None:
        """Stop computing row i: finished, or its client went away."""
        cohort.rows[i].done = True
        cohort.stream.cancel(i)

    def _fail(self, cohort: _Cohort, error: Exception) -> None:
        for t in {r.ticket for r in cohort.rows}:
            t.fail(error)
        for r in cohort.rows:
            r.done = True

