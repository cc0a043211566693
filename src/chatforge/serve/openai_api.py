"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/moderations.

Requests are validated strictly (wrong types are errors, not coerced) and checked against the server's limits
before any work is queued. Chat prompts use the tokenizer's chat template, the only one. With a moderation
classifier loaded, the newest user message is screened before generation and each answer while it
streams (before its text is sent); a flagged exchange gets a refusal (`content` and `refusal`),
`finish_reason: "content_filter"`, and the screening in OpenAI's moderated-completion shape,
`moderation: {"input": {"type": "moderation_results", "results": [...]}, "output": {...}}`.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from fastapi import APIRouter, Request
from jinja2 import TemplateError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from chatforge import ChatforgeError
from chatforge.safety import REFUSAL, ModerationResult
from chatforge.serve.app import APIError, ServeSettings
from chatforge.serve.scheduler import ChoiceDelta, GenerationFailed, GenerationRequest, QueueFull, Ticket

ROLES = ("system", "user", "assistant")
# The classifier learned from whole requests: on the first word or two of an answer it is noise, so output
# is screened from this many words on, and always when a choice ends.
SCREEN_MIN_WORDS = 4


class _Strict(BaseModel):
    # Wrong types are errors; fields other clients send (user, logit_bias, ...) are accepted and ignored.
    model_config = ConfigDict(strict=True, extra="allow")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool | None = False


class ModerationRequest(_Strict):
    input: str | list[str]
    model: str | None = None


# --- validation -------------------------------------------------------------------------------------------

def chat_messages(req: ChatRequest, settings: ServeSettings) -> list[dict[str, str]]:
    if not req.messages:
        raise APIError(400, "messages: must contain at least one message", param="messages")
    if len(req.messages) > settings.max_messages:
        raise APIError(400, f"messages: {len(req.messages)} messages is over the limit of {settings.max_messages}",
                       param="messages")
    out = []
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise APIError(400, f"messages[{i}].role: unknown role {m.role!r} (supported: {', '.join(ROLES)})",
                           param=f"messages[{i}].role")
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        out.append({"role": m.role, "content": content})
    if all(m["role"] == "system" for m in out):
        raise APIError(400, "messages: needs a user or assistant message, not only system messages", param="messages")
    return out


def sampling(req: _Sampling, prompt_lens: list[int], context: int, settings: ServeSettings,
             default_max_tokens: int | None, max_tokens: int | None) -> tuple[int, dict[str, Any]]:
    """(max_tokens, GenerationRequest keyword arguments) after checking every field against the limits."""
    if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
        raise APIError(400, f"temperature: {req.temperature} is out of range [0, 2]", param="temperature")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise APIError(400, f"top_p: {req.top_p} is out of range (0, 1]", param="top_p")
    n = 1 if req.n is None else req.n
    if not 1 <= n <= settings.max_n:
        raise APIError(400, f"n: {n} is out of range [1, {settings.max_n}]", param="n")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > settings.max_stop:
        raise APIError(400, f"stop: at most {settings.max_stop} stop sequences, got {len(stop)}", param="stop")
    if any(len(s) > 256 for s in stop):
        raise APIError(400, "stop: each stop sequence must be at most 256 characters", param="stop")
    longest = max(prompt_lens)
    prompt_limit = min(settings.max_prompt_tokens or context - 1, context - 1)
    if longest > prompt_limit:
        what = "the model's context window" if prompt_limit == context - 1 else "the server's max_prompt_tokens"
        raise APIError(400, f"the prompt is {longest} tokens, over {what} limit of {prompt_limit} prompt tokens "
                            f"(the context window is {context} tokens for prompt and answer together)",
                       param="messages" if isinstance(req, ChatRequest) else "prompt", code="context_length_exceeded")
    room = context - longest
    output_limit = min(settings.max_output_tokens, room)
    if max_tokens is None:
        max_tokens = min(default_max_tokens or output_limit, output_limit)
    else:
        param = "max_completion_tokens" if isinstance(req, ChatRequest) and req.max_tokens is None else "max_tokens"
        if not 1 <= max_tokens <= settings.max_output_tokens:
            raise APIError(400, f"{param}: {max_tokens} is out of range [1, {settings.max_output_tokens}]", param=param)
        if max_tokens > room:
            raise APIError(400, f"{param}: {longest} prompt tokens + {max_tokens} answer tokens is over the "
                                f"context window of {context} tokens", param=param, code="context_length_exceeded")
    seed = req.seed
    if seed is not None and not 0 <= seed < 2 ** 63:
        raise APIError(400, f"seed: {seed} is out of range [0, 2^63)", param="seed")
    temperature = 1.0 if req.temperature is None else req.temperature
    return max_tokens, dict(n=n, temperature=temperature, top_p=1.0 if req.top_p is None else req.top_p,
                            seed=seed, stop=tuple(stop))


# --- generation with moderation ---------------------------------------------------------------------------

MODERATION_MODEL = "chatforge-moderation"


@dataclass
class _Choice:
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    screened: ModerationResult | None = None  # the latest screen of this choice's text

    @property
    def refused(self) -> bool:
        return self.finish_reason == "content_filter"


class _Update(NamedTuple):
    index: int
    text: str
    finish_reason: str | None
    refusal: str | None = None


def moderation_results(results: list[ModerationResult]) -> dict[str, Any]:
    """OpenAI's `moderation_results` object (the shape of moderated chat completions)."""
    return {"type": "moderation_results", "model": MODERATION_MODEL,
            "results": [{"type": "moderation_result", "model": MODERATION_MODEL, "flagged": r.flagged,
                         "categories": r.categories, "category_scores": r.category_scores,
                         "category_applied_input_types": {c: ["text"] for c in r.categories}} for r in results]}


class _Exchange:
    """One API call: its tickets (one per prompt), its choices, and moderation of what goes in and out."""

    def __init__(self, request: Request, prompts: list[list[int]], gen: dict[str, Any], max_tokens: int,
                 screen_text: str) -> None:
        state = request.app.state
        self.scheduler, self.settings = state.scheduler, state.settings
        self.moderator = state.moderator if state.settings.screen else None
        self.prompts, self.gen, self.max_tokens = prompts, gen, max_tokens
        self.n = gen["n"]
        self.choices = [_Choice() for _ in range(len(prompts) * self.n)]
        self.tickets: list[Ticket] = []
        self.input_screen = self.moderator.moderate([screen_text])[0] if self.moderator else None
        self.input_flagged = bool(self.input_screen and self.input_screen.flagged)
        self.id_suffix = uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def moderation(self) -> dict[str, Any] | None:
        """Input and output screening so far, as OpenAI reports moderated completions; None when off."""
        if self.input_screen is None:
            return None
        return {"input": moderation_results([self.input_screen]),
                "output": moderation_results([c.screened for c in self.choices if c.screened is not None])}

    def submit(self) -> None:
        """Queue the prompts (none when the input was refused); 503 when the queue is full."""
        if self.tickets or self.input_flagged:
            return
        try:
            for p in self.prompts:
                self.tickets.append(self.scheduler.submit(GenerationRequest(p, self.max_tokens, **self.gen)))
        except QueueFull as e:
            self.cancel()
            raise APIError(503, f"the server is busy ({e}); retry shortly", type="server_error",
                           code="queue_full") from None

    def cancel(self) -> None:
        for t in self.tickets:
            t.cancel()

    async def updates(self) -> AsyncIterator[_Update]:
        """New text per choice, screened as it grows; a flagged choice ends with a refusal."""
        if self.input_flagged:
            for i, c in enumerate(self.choices):
                c.text, c.finish_reason = REFUSAL, "content_filter"
                yield _Update(i, REFUSAL, "content_filter", REFUSAL)
            return
        self.submit()
        async for k, d in _merge(self.tickets):
            i = k * self.n + d.index
            c = self.choices[i]
            c.tokens += d.tokens
            candidate = c.text + d.text
            if self.moderator and (d.finish_reason or d.text and len(candidate.split()) >= SCREEN_MIN_WORDS):
                # Screened before it is sent (a tiny model: well under a millisecond per piece).
                c.screened = self.moderator.moderate([candidate])[0]
                if c.screened.flagged:
                    self.tickets[k].drop(d.index)
                    c.finish_reason = "content_filter"
                    yield _Update(i, "", "content_filter", REFUSAL)
                    continue
            c.text, c.finish_reason = candidate, d.finish_reason
            yield _Update(i, d.text, d.finish_reason)


async def _merge(tickets: list[Ticket]) -> AsyncIterator[tuple[int, ChoiceDelta]]:
    """(ticket number, delta) from several tickets as they come."""
    if len(tickets) == 1:
        async for deltas in tickets[0].events():
            for d in deltas:
                yield 0, d
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, t: Ticket) -> None:
        try:
            async for deltas in t.events():
                for d in deltas:
                    await queue.put((k, d))
        except GenerationFailed as e:
            await queue.put(e)
        await queue.put(None)

    tasks = [asyncio.create_task(pump(k, t)) for k, t in enumerate(tickets)]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


async def _until_disconnect(request: Request, exchange: _Exchange) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            exchange.cancel()
            return


async def _collect(request: Request, exchange: _Exchange) -> None:
    watcher = asyncio.create_task(_until_disconnect(request, exchange))
    try:
        async for _ in exchange.updates():
            pass
    except GenerationFailed as e:
        raise APIError(500, f"generation failed: {e}", type="server_error") from None
    finally:
        watcher.cancel()
        exchange.cancel()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _stream(exchange: _Exchange, chunk, include_usage: bool, first: list[dict]) -> StreamingResponse:
    """SSE in OpenAI's chunk format, ending with [DONE]. The prompts are queued before the response starts,
    so a full queue is a 503, not a broken stream."""
    exchange.submit()

    async def body() -> AsyncIterator[str]:
        try:
            for c in first:
                yield _sse(c)
            try:
                async for update in exchange.updates():
                    out = chunk([update])
                    if update.finish_reason is not None and (moderation := exchange.moderation()) is not None:
                        out["moderation"] = moderation
                    yield _sse(out)
            except GenerationFailed as e:
                yield _sse(APIError(500, f"generation failed: {e}", type="server_error").body())
                return
            if include_usage:
                yield _sse(chunk([], usage=exchange.usage()))
            yield "data: [DONE]\n\n"
        finally:
            exchange.cancel()  # done, or the client went away: free the rows either way

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _chunker(head: dict[str, Any], kind: str):
    def chunk(updates: list[_Update], usage: dict[str, int] | None = None) -> dict[str, Any]:
        if kind == "chat":
            choices = [{"index": u.index, "delta": {**({"content": u.text} if u.text else {}),
                                                    **({"refusal": u.refusal} if u.refusal else {})},
                        "logprobs": None, "finish_reason": u.finish_reason} for u in updates]
        else:
            choices = [{"index": u.index, "text": u.text, "logprobs": None, "finish_reason": u.finish_reason}
                       for u in updates]
        out = {**head, "object": "chat.completion.chunk" if kind == "chat" else "text_completion", "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out
    return chunk


def _body(exchange: _Exchange, head: dict[str, Any], kind: str, echo: list[str]) -> dict[str, Any]:
    choices = []
    for i, c in enumerate(exchange.choices):
        text = REFUSAL if c.refused else c.text
        if kind == "chat":
            choices.append({"index": i, "message": {"role": "assistant", "content": text,
                                                    "refusal": REFUSAL if c.refused else None},
                            "logprobs": None, "finish_reason": c.finish_reason})
        else:
            choices.append({"index": i, "text": echo[i // exchange.n] + text, "logprobs": None,
                            "finish_reason": c.finish_reason})
    body = {**head, "object": "chat.completion" if kind == "chat" else "text_completion", "choices": choices,
            "usage": exchange.usage()}
    if (moderation := exchange.moderation()) is not None:
        body["moderation"] = moderation
    return body


# --- routes -----------------------------------------------------------------------------------------------

def openai_router() -> APIRouter:
    router = APIRouter(prefix="/v1")

    def model_card(settings: ServeSettings) -> dict[str, Any]:
        return {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "chatforge"}

    @router.get("/models")
    async def list_models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [model_card(request.app.state.settings)]}

    @router.get("/models/{model_id}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        settings = request.app.state.settings
        if model_id != settings.model_name:
            raise APIError(404, f"model {model_id!r} does not exist (this server has {settings.model_name!r})",
                           param="model", code="model_not_found")
        return model_card(settings)

    @router.post("/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        state = request.app.state
        messages = chat_messages(req, state.settings)
        try:
            prompt = state.scheduler.tokenizer.prompt(messages)
        except (ChatforgeError, TemplateError) as e:  # an imported model's template can refuse a conversation
            raise APIError(400, f"messages: the model's chat template rejected them ({e})", param="messages") from None
        asked = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        max_tokens, gen = sampling(req, [len(prompt)], state.scheduler.context_length, state.settings, None, asked)
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        exchange = _Exchange(request, [prompt], gen, max_tokens, last_user)
        head = {"id": f"chatcmpl-{exchange.id_suffix}", "created": exchange.created, "model": state.settings.model_name}
        if req.stream:
            chunk = _chunker(head, "chat")
            first = {**chunk([]), "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}
                                              for i in range(len(exchange.choices))]}
            return _stream(exchange, chunk, bool(req.stream_options and req.stream_options.include_usage), [first])
        await _collect(request, exchange)
        return JSONResponse(_body(exchange, head, "chat", []))

    @router.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        state = request.app.state
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not texts or len(texts) > state.settings.max_n:
            raise APIError(400, f"prompt: give 1 to {state.settings.max_n} prompts, got {len(texts)}", param="prompt")
        tok = state.scheduler.tokenizer
        bos = [tok.bos_id] if tok.bos_id is not None else []
        prompts = [bos + tok.encode(t) for t in texts]
        max_tokens, gen = sampling(req, [len(p) for p in prompts], state.scheduler.context_length, state.settings,
                                   16, req.max_tokens)
        if len(prompts) * gen["n"] > state.settings.max_n:
            raise APIError(400, f"n: {len(prompts)} prompts x n={gen['n']} is over the limit of "
                                f"{state.settings.max_n} choices", param="n")
        exchange = _Exchange(request, prompts, gen, max_tokens, "\n".join(texts))
        head = {"id": f"cmpl-{exchange.id_suffix}", "created": exchange.created, "model": state.settings.model_name}
        echo = [t if req.echo else "" for t in texts]
        if req.stream:
            chunk = _chunker(head, "text")
            first = [chunk([_Update(i, echo[i // gen["n"]], None)]) for i in range(len(exchange.choices)) if req.echo]
            return _stream(exchange, chunk, bool(req.stream_options and req.stream_options.include_usage), first)
        await _collect(request, exchange)
        return JSONResponse(_body(exchange, head, "text", echo))

    @router.post("/moderations")
    async def moderations(req: ModerationRequest, request: Request) -> dict[str, Any]:
        state = request.app.state
        if state.moderator is None:
            raise APIError(404, "moderation is not configured on this server (start it with --moderation DIR)",
                           param="model", code="moderation_not_configured")
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts or len(texts) > state.settings.max_moderation_inputs:
            raise APIError(400, f"input: give 1 to {state.settings.max_moderation_inputs} texts, got {len(texts)}",
                           param="input")
        results = state.moderator.moderate(texts)
        return {"id": f"modr-{uuid.uuid4().hex[:24]}", "model": MODERATION_MODEL,
                "results": [{"flagged": r.flagged, "categories": r.categories,
                             "category_scores": r.category_scores} for r in results]}

    return router
