"""The labeling API and pages, as one FastAPI router mounted under /label (by `chatforge label`, or
inside `chatforge serve --labeling`).

    GET  /label/                            the pages (sign in, rank, write, chat, admin)
    GET  /label/api/me                      who am I, and progress (done / to do) per task kind
    GET  /label/api/tasks/next?kind=K       the next open ranking or demonstration task, or null
    GET  /label/api/tasks/{id}
    POST /label/api/submissions             {"task_id", "ranking": [[i], [j, k], ...], "unsafe": [i]}
                                            {"task_id"?, "messages": [...], "client_key"?}  a demonstration
    GET  /label/api/submissions[?kind=K]    your own submissions
    GET  /label/api/submissions/{id}        yours only (403 otherwise)
    PUT  /label/api/submissions/{id}        change yours (403 otherwise)
    POST /label/api/chat/feedback           {"messages", "answers", "ratings" | "preferred", "client_key"}
    POST /label/api/generate                {"messages", "n"}: model answers (suggestions, regenerate)
    GET  /label/api/admin/labelers          per-labeler counts          (admin token)
    GET  /label/api/admin/agreement         inter-labeler agreement     (admin token)
    GET  /label/api/admin/export?kind=sft|comparisons   JSONL           (admin token)

Answer indices always refer to the task's stored answer order; each labeler is shown the answers in an
order shuffled for them (seeded by task and labeler), so position does not bias the rankings.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from importlib import resources
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field

from chatforge import ChatforgeError
from chatforge.data.jsonl import to_jsonl
from chatforge.feedback.agreement import agreement
from chatforge.feedback.auth import admin_dependency, labeler_dependency
from chatforge.feedback.export import KINDS as EXPORT_KINDS
from chatforge.feedback.export import export_records
from chatforge.feedback.store import Conflict, FeedbackStore, Labeler, Submission, Task
from chatforge.serve.body_limit import BodyLimit

PAGES_DIR = resources.files("chatforge.feedback") / "pages"
PAGES = {"index.html", "rank.html", "write.html", "chat.html", "admin.html", "common.js", "index.js", "rank.js",
         "write.js", "chat.js", "admin.js", "style.css"}
# Pages load nothing from elsewhere and run no inline script: a stray <script> in a label cannot run.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                                           "connect-src 'self'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
MAX_TEXT = 20_000       # characters in one message or answer
MAX_TURNS = 64
MAX_ANSWERS = 9
MAX_BODY = 256 * 1024   # bytes

# (conversation, n) -> n model answers
Sampler = Callable[[list[dict[str, str]], int], list[str]]


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_TEXT)


class SubmissionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task_id: int | None = None
    ranking: list[list[int]] | None = Field(default=None, max_length=MAX_ANSWERS)
    unsafe: list[int] = Field(default_factory=list, max_length=MAX_ANSWERS)
    messages: list[MessageIn] | None = Field(default=None, max_length=MAX_TURNS)
    client_key: str | None = Field(default=None, min_length=1, max_length=64)


class ChatFeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[MessageIn] = Field(max_length=MAX_TURNS)
    answers: list[str] = Field(min_length=1, max_length=MAX_ANSWERS)
    ratings: list[Literal[-1, 0, 1]] | None = None
    preferred: int | None = None
    client_key: str = Field(min_length=1, max_length=64)


class GenerateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[MessageIn] = Field(min_length=1, max_length=MAX_TURNS)
    n: int = Field(default=1, ge=1, le=MAX_ANSWERS)


def bad(message: str) -> HTTPException:
    return HTTPException(400, message)


# ---------------------------------------------------------------- checks of labels

def check_ranking(task: Task, ranking: list[list[int]] | None, unsafe: list[int]) -> dict[str, Any]:
    """The stored payload of a ranking: tiers best first, each sorted; every answer exactly once."""
    k = len(task.answers)
    if not ranking:
        raise bad(f"ranking: task {task.id} asks to rank its {k} answers; send 'ranking' as groups of answer "
                  "indices, best first, e.g. [[2], [0, 3], [1]] (one group holds answers ranked equal)")
    flat = [i for tier in ranking for i in tier]
    unknown = sorted({i for i in flat if not 0 <= i < k})
    repeated = sorted({i for i in flat if flat.count(i) > 1})
    missing = sorted(set(range(k)) - set(flat))
    if any(not tier for tier in ranking):
        raise bad("ranking: a group is empty")
    if unknown or repeated or missing:
        problems = [f"{name} {values}" for name, values in (("unknown answers", unknown), ("ranked twice", repeated),
                                                             ("missing", missing)) if values]
        raise bad(f"ranking does not match task {task.id}'s answers 0..{k - 1}: {'; '.join(problems)}; "
                  "rank every answer exactly once")
    bad_flags = sorted({i for i in unsafe if not 0 <= i < k})
    if bad_flags or len(set(unsafe)) != len(unsafe):
        raise bad(f"unsafe: flags must name answers 0..{k - 1} once each, got {unsafe}")
    return {"ranking": [sorted(tier) for tier in ranking], "unsafe": sorted(unsafe)}


def check_conversation(messages: list[MessageIn], ends_with: str, field: str = "messages") -> list[dict[str, str]]:
    """An optional system turn, then user and assistant turns alternating from a user turn, none empty."""
    if not messages:
        raise bad(f"{field}: the conversation is empty")
    out = [{"role": m.role, "content": m.content} for m in messages]
    start = 1 if out[0]["role"] == "system" else 0
    for i, m in enumerate(out):
        if i >= start:
            expected = "user" if (i - start) % 2 == 0 else "assistant"
            if m["role"] != expected:
                raise bad(f"{field}[{i}].role: expected {expected} (turns alternate user, assistant, ...), "
                          f"got {m['role']}")
        if not m["content"].strip():
            raise bad(f"{field}[{i}].content: empty {m['role']} turn; write it or remove the turn")
    if out[-1]["role"] != ends_with:
        raise bad(f"{field}: must end with a{'n' if ends_with == 'assistant' else ''} {ends_with} turn, "
                  f"got {out[-1]['role']}")
    return out


def check_demonstration(task: Task | None, messages: list[MessageIn] | None) -> dict[str, Any]:
    if not messages:
        raise bad("messages: a demonstration needs the conversation, ending with your assistant answer")
    conversation = check_conversation(messages, "assistant")
    if task is not None and conversation[:len(task.messages)] != task.messages:
        raise bad(f"messages: must begin with task {task.id}'s prompt ({len(task.messages)} turns) unchanged")
    return {"messages": conversation}


def check_chat_feedback(body: ChatFeedbackIn) -> tuple[list[dict[str, str]], dict[str, Any]]:
    conversation = check_conversation(body.messages, "user")
    k = len(body.answers)
    if any(not a.strip() for a in body.answers) or any(len(a) > MAX_TEXT for a in body.answers):
        raise bad(f"answers: each must be non-empty and at most {MAX_TEXT} characters")
    if len(set(body.answers)) != k:
        raise bad("answers: the same answer appears twice")
    if (body.ratings is None) == (body.preferred is None):
        raise bad("send either 'ratings' (thumbs: 1, -1 or 0 per answer) or 'preferred' (the better answer's index)")
    if body.ratings is not None:
        if len(body.ratings) != k:
            raise bad(f"ratings: one per answer ({k}), got {len(body.ratings)}")
        if not any(body.ratings):
            raise bad("ratings: all 0; rate at least one answer")
        return conversation, {"ratings": list(body.ratings)}
    if k < 2 or not 0 <= body.preferred < k:
        raise bad(f"preferred: the index of the better of {k} answers (0..{k - 1}), got {body.preferred}; "
                  "comparing needs two or more answers")
    return conversation, {"preferred": body.preferred}


# ---------------------------------------------------------------- views

def answer_order(task: Task, labeler_id: int) -> list[int]:
    order = list(range(len(task.answers)))
    random.Random(f"{task.id}:{labeler_id}").shuffle(order)
    return order


def task_view(task: Task, labeler_id: int) -> dict[str, Any]:
    view = {"id": task.id, "kind": task.kind, "messages": task.messages, "source": task.source}
    if task.kind == "demonstration":
        view["suggestions"] = task.answers
    else:
        view["answers"] = [{"index": i, "text": task.answers[i]} for i in answer_order(task, labeler_id)]
    return view


def submission_view(sub: Submission, task: Task) -> dict[str, Any]:
    return {"id": sub.id, "task_id": sub.task_id, "kind": sub.kind, "payload": sub.payload,
            "messages": task.messages, "answers": task.answers if task.kind != "demonstration" else [],
            "created_at": sub.created_at.isoformat(), "updated_at": sub.updated_at.isoformat()}


# ---------------------------------------------------------------- the router

def limit_body(request: Request) -> None:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise bad(f"request body is larger than the limit of {MAX_BODY} bytes")


def feedback_router(store: FeedbackStore, sampler: Sampler | None = None) -> APIRouter:
    """The API and pages over `store`; `sampler` (if given) writes suggestions and regenerated answers."""
    router = APIRouter(prefix="/label", dependencies=[Depends(limit_body)])
    labeler_auth, admin_auth = labeler_dependency(store), admin_dependency(store)

    @router.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(str(PAGES_DIR / "index.html"), headers=PAGE_HEADERS)

    @router.get("/api/me")
    def me(labeler: Labeler = Depends(labeler_auth)) -> dict[str, Any]:
        return {"name": labeler.name, "role": labeler.role, "progress": store.progress(labeler.id),
                "model": sampler is not None}

    @router.get("/api/tasks/next")
    def next_task(kind: Literal["ranking", "demonstration"] = Query("ranking"),
                  labeler: Labeler = Depends(labeler_auth)) -> dict[str, Any]:
        task = store.next_task(labeler.id, kind)
        return {"task": task_view(task, labeler.id) if task else None, "progress": store.progress(labeler.id)[kind]}

    def visible_task(task_id: int, labeler: Labeler) -> Task:
        task = store.task(task_id)
        if task is None:
            raise HTTPException(404, f"no task {task_id}")
        if task.owner_id is not None and task.owner_id != labeler.id:
            raise HTTPException(403, f"task {task_id} belongs to another labeler")
        return task

    @router.get("/api/tasks/{task_id}")
    def get_task(task_id: int, labeler: Labeler = Depends(labeler_auth)) -> dict[str, Any]:
        return task_view(visible_task(task_id, labeler), labeler.id)

    def own_submission(submission_id: int, labeler: Labeler) -> tuple[Submission, Task]:
        found = store.submission(submission_id)
        if found is None:
            raise HTTPException(404, f"no submission {submission_id}")
        if found[0].labeler_id != labeler.id:
            raise HTTPException(403, f"submission {submission_id} belongs to another labeler")
        return found

    @router.post("/api/submissions", status_code=201)
    def submit(body: SubmissionIn, response: Response, labeler: Labeler = Depends(labeler_auth)) -> dict[str, Any]:
        if body.task_id is None:  # a demonstration for a prompt the labeler typed
            if not body.client_key:
                raise bad("client_key: a demonstration without task_id needs a client_key naming the draft "
                          "(resending it never stores a second copy)")
            payload = check_demonstration(None, body.messages)
            prompt = payload["messages"][:-1]
            sub, created = store.submit_private(labeler.id, "demonstration", prompt, [], payload, body.client_key)
            if not created and sub.payload != payload:
                raise HTTPException(409, f"draft {body.client_key!r} is already submitted (submission {sub.id}); "
                                         f"change it with PUT /label/api/submissions/{sub.id}")
        else:
            task = visible_task(body.task_id, labeler)
            if task.kind == "ranking":
                if body.messages is not None:
                    raise bad(f"task {task.id} is a ranking: send 'ranking' (and 'unsafe'), not 'messages'")
                payload = check_ranking(task, body.ranking, body.unsafe)
            elif task.kind == "demonstration":
                if body.ranking is not None:
                    raise bad(f"task {task.id} is a demonstration: send 'messages', not 'ranking'")
                payload = check_demonstration(task, body.messages)
            else:
                raise bad(f"task {task.id} is chat feedback: change it with PUT /label/api/submissions/<id>")
            try:
                sub, created = store.submit(labeler.id, task.id, payload)
            except Conflict as e:
                raise HTTPException(409, str(e)) from None
        if not created:
            response.status_code = 200
        return submission_view(*store.submission(sub.id))

    @router.get("/api/submissions")
    def my_submissions(kind: Literal["ranking", "demonstration", "chat"] | None = None,
                       labeler: Labeler = Depends(labeler_auth)) -> dict[str, Any]:
        rows = store.submissions(labeler_id=labeler.id, kind=kind)
        return {"submissions": [submission_view(sub, task) for sub, task, _ in rows]}

    @router.get("/api/submissions/{submission_id}")
    def get_submission(submission_id: int, labeler: Labeler = Depends(labeler_auth)) -> dict[str, Any]:
        return submission_view(*own_submission(submission_id, labeler))

    @router.put("/api/submissions/{submission_id}")
    def change_submission(submission_id: int, body: SubmissionIn,
                          labeler: Labeler = Depends(labeler_auth)) -> dict[str, Any]:
        sub, task = own_submission(submission_id, labeler)
        if body.task_id is not None and body.task_id != task.id:
            raise bad(f"task_id: submission {submission_id} is for task {task.id}, not {body.task_id}")
        messages = None
        if task.kind == "ranking":
            payload = check_ranking(task, body.ranking, body.unsafe)
        elif task.kind == "demonstration":
            payload = check_demonstration(None if task.owner_id else task, body.messages)
            messages = payload["messages"][:-1]
        else:
            raise bad("chat feedback is changed by sending it again with the same client_key")
        store.update(sub.id, payload, messages)
        return submission_view(*store.submission(sub.id))

    @router.post("/api/chat/feedback", status_code=201)
    def chat_feedback(body: ChatFeedbackIn, response: Response,
                      labeler: Labeler = Depends(labeler_auth)) -> dict[str, Any]:
        conversation, payload = check_chat_feedback(body)
        sub, created = store.submit_private(labeler.id, "chat", conversation, body.answers, payload, body.client_key)
        if not created:
            _, task = store.submission(sub.id)
            if task.messages != conversation or task.answers != body.answers:
                raise HTTPException(409, f"client_key {body.client_key!r} was used for other answers "
                                         f"(submission {sub.id}); use a new key")
            if sub.payload != payload:  # a changed thumb on the same answers: the latest one counts
                store.update(sub.id, payload)
            response.status_code = 200
        return submission_view(*store.submission(sub.id))

    @router.post("/api/generate")
    def generate(body: GenerateIn, labeler: Labeler = Depends(labeler_auth)) -> dict[str, Any]:
        if sampler is None:
            raise HTTPException(503, "no model loaded: start `chatforge label CKPT` with a checkpoint")
        conversation = check_conversation(body.messages, "user")
        try:
            return {"answers": sampler(conversation, body.n)}
        except ChatforgeError as e:
            raise bad(str(e)) from None

    @router.get("/api/admin/labelers")
    def labelers(admin: Labeler = Depends(admin_auth)) -> dict[str, Any]:
        return {"labelers": store.counts()}

    @router.get("/api/admin/agreement")
    def labeler_agreement(admin: Labeler = Depends(admin_auth)) -> dict[str, Any]:
        rows = store.submissions(kind="ranking")
        return agreement([(task.id, name, sub.payload["ranking"]) for sub, task, name in rows])

    @router.get("/api/admin/export")
    def export(kind: str = Query(...), after: int = Query(0, ge=0),
               admin: Labeler = Depends(admin_auth)) -> PlainTextResponse:
        if kind not in EXPORT_KINDS:
            raise bad(f"kind: expected one of {', '.join(EXPORT_KINDS)}, got {kind!r}")
        records, skipped = export_records(store, kind, after)
        headers = {"Content-Disposition": f'attachment; filename="{kind}.jsonl"',
                   "X-Records": str(len(records)), **{f"X-Skipped-{k.replace('_', '-')}": str(v)
                                                      for k, v in skipped.items()}}
        return PlainTextResponse(to_jsonl(records), media_type="application/x-ndjson", headers=headers)

    @router.get("/{page}", include_in_schema=False)
    def page(page: str) -> FileResponse:
        if page not in PAGES:
            raise HTTPException(404, f"no page {page!r}")
        return FileResponse(str(PAGES_DIR / page), headers=PAGE_HEADERS)

    return router


# ---------------------------------------------------------------- the app of `chatforge label`

def _body_too_large(max_bytes: int) -> JSONResponse:
    return JSONResponse({"detail": f"request body is larger than the limit of {max_bytes} bytes"}, status_code=400)


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """400 naming the first bad field, e.g. "messages[1].content: String should have at most 20000 characters"."""
    first = (exc.errors() or [{"loc": (), "msg": "invalid request"}])[0]
    if first.get("type") == "json_invalid":
        return JSONResponse({"detail": "request body is not valid JSON"}, status_code=400)
    loc = [p for p in first.get("loc", ()) if p != "body"]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "body"
    return JSONResponse({"detail": f"{where}: {first['msg']}"}, status_code=400)


def label_app(store: FeedbackStore, sampler: Sampler | None = None) -> FastAPI:
    """The labeling app on its own: the router, 400s for malformed bodies, / redirecting to the pages."""
    app = FastAPI(title="chatforge labeling", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.include_router(feedback_router(store, sampler))

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/label/")

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, Any]:
        return {"status": "ok", "schema_version": store.version, "model": sampler is not None}

    app.add_middleware(BodyLimit, max_bytes=MAX_BODY, reject=_body_too_large)
    return app
