"""The ASGI app: OpenAI-compatible API, web chat, health, built from routers so more can be added.

    app = create_app(Scheduler(engine), ServeSettings(model_name="sft"), moderator=None,
                     routers=(feedback_router(store),))      # more pages, e.g. the labelling app

Every error, from a malformed body to an over-long prompt, answers with OpenAI's error object
`{"error": {"message", "type", "param", "code"}}` naming the offending field. API keys and the body-size
limit are checked in ASGI middleware, before any body is parsed.
"""
from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatforge.safety import Moderator
from chatforge.serve.body_limit import BodyLimit

STATIC_DIR = resources.files("chatforge.serve") / "static"
# The page loads nothing from elsewhere and runs no inline script: a stray <script> in output cannot run.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                                           "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


@dataclass
class ServeSettings:
    model_name: str = "chatforge"
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # never printed
    max_prompt_tokens: int | None = None      # default: the model's context window minus one
    max_output_tokens: int = 512              # per choice; also capped by the context window
    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_n: int = 8
    max_stop: int = 4
    max_moderation_inputs: int = 64
    screen: bool = True                       # moderate chat input and output when a classifier is loaded


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# --- middleware (pure ASGI: runs before FastAPI reads the body) --------------------------------------------

def _body_too_large(max_bytes: int) -> JSONResponse:
    return APIError(413, f"request body is larger than the server's limit of {max_bytes} bytes",
                    param="body", code="request_too_large").response()


class APIKeyMiddleware:
    """401 for /v1/* without `Authorization: Bearer <one of the keys>`. Keys are compared in constant time."""

    def __init__(self, app, keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.keys and scope["path"].startswith("/v1/"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            ok = scheme.lower() == b"bearer" and any(hmac.compare_digest(token.strip(), k) for k in self.keys)
            if not ok:
                denied = APIError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                                  code="invalid_api_key")
                await denied.response({"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- error handlers ---------------------------------------------------------------------------------------

_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _param(loc: tuple) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"; union tags ("str", "list[str]", "TextPart") dropped."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in _TYPE_TAGS and "[" not in str(part) and not str(part)[:1].isupper():
            out += ("." if out else "") + str(part)
    return out or None


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": (), "type": ""}
    if first.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})",
                        param="body", code="invalid_json").response()
    param = _param(tuple(first.get("loc", ())))
    if first.get("type") == "missing":
        message = f"{param}: required field is missing"
    elif first.get("type") == "model_attributes_type":
        message = "request body must be a JSON object"
    else:
        got = first.get("input")
        shown = json.dumps(got)[:80] if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
        message = f"{param or 'body'}: {first['msg']} (got {shown})"
    return APIError(400, message, param=param).response()


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
    return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=kind).response()


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return APIError(500, "internal server error", type="server_error").response()


# --- web page and health ----------------------------------------------------------------------------------

def web_router() -> APIRouter:
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(str(STATIC_DIR / "index.html"), headers=PAGE_HEADERS)

    @router.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        state = request.app.state
        return {"status": "ok", "model": state.settings.model_name, "context_length": state.scheduler.context_length,
                "moderation": state.moderator is not None, "scheduler": state.scheduler.snapshot()}

    return router


def create_app(scheduler: Any, settings: ServeSettings | None = None, moderator: Moderator | None = None,
               routers: tuple[APIRouter, ...] = ()) -> FastAPI:
    """The app around a running scheduler (anything with `submit`, `snapshot`, `tokenizer`, `context_length`)."""
    from chatforge.serve.openai_api import openai_router
    settings = settings or ServeSettings()
    app = FastAPI(title="chatforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.settings, app.state.moderator = scheduler, settings, moderator
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.include_router(openai_router())
    app.include_router(web_router())
    for r in routers:
        app.include_router(r)
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    # Last added runs first: the key is checked before the body is read.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, reject=_body_too_large)
    app.add_middleware(APIKeyMiddleware, keys=settings.api_keys)
    return app
