"""The feedback store: labelers, tasks and their submissions in SQLite (one file) or PostgreSQL, via SQLAlchemy 2.

    store = FeedbackStore.open("runs/demo/feedback.db")          # or "postgresql://user@host:5432/db"

Three tables: `labelers` (name, role, SHA-256 of the token), `tasks` (a conversation to continue and, for a
ranking, the K answers to order), `submissions` (one labeler's work on one task; unique per task and labeler,
so a retried request can never store a record twice). Every operation is one transaction committed before
it returns: a label the API has acknowledged survives a killed server.

SQLite runs in WAL mode with `synchronous=FULL` and takes the write lock at BEGIN (`BEGIN IMMEDIATE`), so
concurrent labelers queue on a busy timeout instead of failing half-way through a read-then-write.

Schema versions: a fresh database gets the tables as the models below declare them, stamped with the latest
version; an older one runs the steps in MIGRATIONS (version -> function of a connection) it has not run yet.
A change to the models therefore comes with a new numbered step that brings old databases to the same shape.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (JSON, DateTime, ForeignKey, Integer, String, UniqueConstraint, create_engine, event, func,
                        inspect, select, text)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from chatforge import ChatforgeError

ROLES = ("labeler", "admin")
TASK_KINDS = ("demonstration", "ranking", "chat")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

# version -> the step that brings a database from version - 1 to it. Version 1 is the models as first released.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {}


def now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Labeler(Base):
    __tablename__ = "labelers"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class Task(Base):
    """A conversation ending in a user turn. Ranking and chat tasks carry the answers; demonstration tasks
    carry model-written suggestions. A task with an owner is private (a labeler's own prompt or chat)."""
    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)  # content hash: the same task is never queued twice
    messages: Mapped[list[Any]]
    answers: Mapped[list[Any]]
    source: Mapped[str] = mapped_column(String(200), default="")  # prompt file, "labeler" or "chat"
    origin: Mapped[str] = mapped_column(String(500), default="")  # the checkpoint that wrote the answers
    labels_wanted: Mapped[int] = mapped_column(Integer, default=1)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("labelers.id"), default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Submission(Base):
    """One labeler's label for one task: {"ranking": [[i, ...], ...], "unsafe": [i, ...]},
    {"messages": [...]} for a demonstration, or {"ratings": [...], "preferred": i} for chat feedback."""
    __tablename__ = "submissions"
    __table_args__ = (UniqueConstraint("task_id", "labeler_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class SchemaVersion(Base):
    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(primary_key=True)


class Conflict(ChatforgeError):
    """The labeler already labelled this task, with a different label."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def task_key(kind: str, messages: list[dict], answers: list[str], private: str = "") -> str:
    blob = json.dumps([kind, messages, answers, private], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def database_url(db: str | Path) -> str:
    """A SQLAlchemy URL from a file path (SQLite) or a URL; postgresql:// URLs use psycopg 3."""
    db = str(db)
    if "://" not in db:
        path = Path(db).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    for prefix in ("postgresql://", "postgres://"):
        if db.startswith(prefix):
            return "postgresql+psycopg://" + db[len(prefix):]
    return db


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy's BEGIN below, not the driver's
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def migrate(engine: Engine, migrations: dict[int, Callable[[Connection], None]] | None = None) -> int:
    """Create or upgrade the schema; returns its version. Concurrent callers are serialised by the database."""
    migrations = MIGRATIONS if migrations is None else migrations
    latest = max([1, *migrations])
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(7331001)"))
        tables = set(inspect(conn).get_table_names())
        if "schema_version" not in tables:
            ours = {t.name for t in Base.metadata.sorted_tables}
            if tables & ours:
                raise ChatforgeError(f"{engine.url.render_as_string()}: has feedback tables but no schema_version; "
                                     "not a database this version of chatforge created")
            Base.metadata.create_all(conn)
            conn.execute(SchemaVersion.__table__.insert().values(version=latest))
            return latest
        version = conn.execute(select(func.max(SchemaVersion.version))).scalar_one()
        if version > latest:
            raise ChatforgeError(f"{engine.url.render_as_string()}: schema version {version} is newer than this "
                                 f"chatforge understands ({latest}); upgrade chatforge")
        for step in range(version + 1, latest + 1):
            migrations[step](conn)
            conn.execute(SchemaVersion.__table__.update().values(version=step))
        return latest


class FeedbackStore:
    """All reads and writes of the feedback database; each method is one committed transaction."""

    def __init__(self, engine: Engine, migrations: dict[int, Callable[[Connection], None]] | None = None) -> None:
        self.engine = engine
        self.version = migrate(engine, migrations)
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, db: str | Path, migrations: dict[int, Callable[[Connection], None]] | None = None) -> "FeedbackStore":
        url = database_url(db)
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            _sqlite_pragmas(engine)
        else:
            engine = create_engine(url, pool_pre_ping=True)
        return cls(engine, migrations)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # ------------------------------------------------------------------ labelers

    def add_labeler(self, name: str, role: str = "labeler") -> str:
        """Create a labeler and return their token (shown once: only its hash is stored)."""
        import secrets
        if not NAME_RE.match(name):
            raise ChatforgeError(f"labeler name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        if role not in ROLES:
            raise ChatforgeError(f"role {role!r}: expected one of {', '.join(ROLES)}")
        token = f"cf{role[0]}_{secrets.token_urlsafe(24)}"
        try:
            with self.transaction() as s:
                s.add(Labeler(name=name, role=role, token_hash=hash_token(token)))
        except IntegrityError:
            raise ChatforgeError(f"labeler {name!r} exists already (revoked names are not reused)") from None
        return token

    def revoke(self, name: str) -> None:
        with self.transaction() as s:
            labeler = s.scalar(select(Labeler).where(Labeler.name == name))
            if labeler is None:
                raise ChatforgeError(f"no labeler named {name!r}")
            labeler.revoked_at = labeler.revoked_at or now()

    def authenticate(self, token: str) -> Labeler | None:
        """The active labeler holding `token`, or None (unknown or revoked)."""
        with self.transaction() as s:
            labeler = s.scalar(select(Labeler).where(Labeler.token_hash == hash_token(token)))
        return labeler if labeler is not None and labeler.revoked_at is None else None

    def labelers(self) -> list[Labeler]:
        with self.transaction() as s:
            return list(s.scalars(select(Labeler).order_by(Labeler.id)))

    # ------------------------------------------------------------------ tasks

    def add_tasks(self, kind: str, items: list[tuple[list[dict], list[str]]], source: str = "", origin: str = "",
                  labels_wanted: int = 1) -> tuple[int, int]:
        """Queue (messages, answers) tasks for every labeler; returns (added, already queued)."""
        if kind not in ("demonstration", "ranking"):
            raise ChatforgeError(f"task kind {kind!r}: expected demonstration or ranking")
        added = 0
        with self.transaction() as s:
            for messages, answers in items:
                key = task_key(kind, messages, answers if kind == "ranking" else [])  # one demonstration a prompt
                if s.scalar(select(Task.id).where(Task.key == key)) is not None:
                    continue
                s.add(Task(kind=kind, key=key, messages=messages, answers=answers, source=source, origin=origin,
                           labels_wanted=labels_wanted))
                added += 1
        return added, len(items) - added

    def task(self, task_id: int) -> Task | None:
        with self.transaction() as s:
            return s.get(Task, task_id)

    def _open_tasks(self, labeler_id: int, kind: str):
        """Public tasks of `kind` this labeler has not labelled that still want labels."""
        labels = select(func.count(Submission.id)).where(Submission.task_id == Task.id).scalar_subquery()
        mine = select(Submission.id).where(Submission.task_id == Task.id, Submission.labeler_id == labeler_id)
        return (Task.kind == kind, Task.owner_id.is_(None), labels < Task.labels_wanted, ~mine.exists())

    def next_task(self, labeler_id: int, kind: str) -> Task | None:
        with self.transaction() as s:
            return s.scalar(select(Task).where(*self._open_tasks(labeler_id, kind)).order_by(Task.id).limit(1))

    def progress(self, labeler_id: int) -> dict[str, dict[str, int]]:
        """Per task kind: this labeler's submissions (done) and the tasks still open to them (to do)."""
        with self.transaction() as s:
            out = {}
            for kind in TASK_KINDS:
                done = s.scalar(select(func.count(Submission.id)).where(Submission.labeler_id == labeler_id,
                                                                        Submission.kind == kind))
                todo = s.scalar(select(func.count(Task.id)).where(*self._open_tasks(labeler_id, kind)))
                out[kind] = {"done": done, "todo": todo}
            return out

    # ------------------------------------------------------------------ submissions

    def submit(self, labeler_id: int, task_id: int, payload: dict[str, Any], retry: bool = True
               ) -> tuple[Submission, bool]:
        """Store a label; returns (submission, created). Resending the same label returns the stored one;
        a different label for a task already labelled raises Conflict (change it with `update`)."""
        try:
            with self.transaction() as s:
                task = s.get(Task, task_id)
                if task is None:
                    raise ChatforgeError(f"no task {task_id}")
                existing = s.scalar(select(Submission).where(Submission.task_id == task_id,
                                                             Submission.labeler_id == labeler_id))
                if existing is not None:
                    if existing.payload == payload:
                        return existing, False
                    raise Conflict(f"task {task_id} is already labelled by you (submission {existing.id}); "
                                   f"change it with PUT /label/api/submissions/{existing.id}")
                submission = Submission(task_id=task_id, labeler_id=labeler_id, kind=task.kind, payload=payload)
                s.add(submission)
                s.flush()
                return submission, True
        except IntegrityError:  # a concurrent request of the same labeler won the race: theirs is the record
            if not retry:
                raise
            return self.submit(labeler_id, task_id, payload, retry=False)

    def submit_private(self, labeler_id: int, kind: str, messages: list[dict], answers: list[str],
                       payload: dict[str, Any], client_key: str, retry: bool = True) -> tuple[Submission, bool]:
        """A task of the labeler's own (a prompt they typed, a chat) and its label, in one transaction.
        `client_key` names the draft: resending it returns the stored submission instead of a second one."""
        key = task_key(kind, [], [], private=f"{labeler_id}:{client_key}")
        try:
            with self.transaction() as s:
                task_id = s.scalar(select(Task.id).where(Task.key == key))
                if task_id is None:
                    task = Task(kind=kind, key=key, messages=messages, answers=answers, labels_wanted=1,
                                source="chat" if kind == "chat" else "labeler", owner_id=labeler_id)
                    s.add(task)
                    s.flush()
                    submission = Submission(task_id=task.id, labeler_id=labeler_id, kind=kind, payload=payload)
                    s.add(submission)
                    s.flush()
                    return submission, True
                return s.scalar(select(Submission).where(Submission.task_id == task_id)), False
        except IntegrityError:  # the same draft sent twice at once: the first one is the record
            if not retry:
                raise
            return self.submit_private(labeler_id, kind, messages, answers, payload, client_key, retry=False)

    def submission(self, submission_id: int) -> tuple[Submission, Task] | None:
        with self.transaction() as s:
            row = s.execute(select(Submission, Task).join(Task, Task.id == Submission.task_id)
                            .where(Submission.id == submission_id)).first()
            return (row[0], row[1]) if row else None

    def update(self, submission_id: int, payload: dict[str, Any], messages: list[dict] | None = None) -> Submission:
        """Replace a submission's label (and, for a private task, its conversation)."""
        with self.transaction() as s:
            submission = s.get(Submission, submission_id)
            submission.payload = payload
            submission.updated_at = now()
            if messages is not None:
                task = s.get(Task, submission.task_id)
                if task.owner_id is not None:
                    task.messages = messages
            return submission

    def submissions(self, labeler_id: int | None = None, kind: str | None = None,
                    after_id: int = 0) -> list[tuple[Submission, Task, str]]:
        """(submission, its task, labeler name), oldest first; filtered by labeler, kind and id."""
        query = (select(Submission, Task, Labeler.name).join(Task, Task.id == Submission.task_id)
                 .join(Labeler, Labeler.id == Submission.labeler_id).where(Submission.id > after_id)
                 .order_by(Submission.id))
        if labeler_id is not None:
            query = query.where(Submission.labeler_id == labeler_id)
        if kind is not None:
            query = query.where(Submission.kind == kind)
        with self.transaction() as s:
            return [(row[0], row[1], row[2]) for row in s.execute(query)]

    def counts(self) -> list[dict[str, Any]]:
        """Per labeler: name, role, revoked, and submissions of each kind."""
        with self.transaction() as s:
            rows = s.execute(select(Submission.labeler_id, Submission.kind, func.count(Submission.id))
                             .group_by(Submission.labeler_id, Submission.kind)).all()
            per = {}
            for labeler_id, kind, n in rows:
                per.setdefault(labeler_id, {})[kind] = n
            return [{"name": lab.name, "role": lab.role, "revoked": lab.revoked_at is not None,
                     **{kind: per.get(lab.id, {}).get(kind, 0) for kind in TASK_KINDS}}
                    for lab in s.scalars(select(Labeler).order_by(Labeler.id))]
