"""Who is calling: a labeler or an admin, from `Authorization: Bearer <token>` (only its hash is stored).

An unknown or revoked token is 401; a labeler calling an admin endpoint is 403.
"""
from __future__ import annotations

from collections.abc import Callable

from fastapi import HTTPException, Request

from chatforge.feedback.store import FeedbackStore, Labeler

CHALLENGE = {"WWW-Authenticate": "Bearer"}


def bearer_token(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "sign in: send the header 'Authorization: Bearer <labeler token>'", CHALLENGE)
    return token.strip()


def labeler_dependency(store: FeedbackStore) -> Callable[[Request], Labeler]:
    def current_labeler(request: Request) -> Labeler:
        labeler = store.authenticate(bearer_token(request))
        if labeler is None:
            raise HTTPException(401, "unknown or revoked token: ask an admin for a new one", CHALLENGE)
        return labeler
    return current_labeler


def admin_dependency(store: FeedbackStore) -> Callable[[Request], Labeler]:
    current_labeler = labeler_dependency(store)

    def current_admin(request: Request) -> Labeler:
        labeler = current_labeler(request)
        if labeler.role != "admin":
            raise HTTPException(403, f"{labeler.name} is a labeler: this needs an admin token")
        return labeler
    return current_admin
