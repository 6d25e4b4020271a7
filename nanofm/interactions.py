"""The interaction log: every request served and every rating given, for monitoring (monitor.py
reads it) and for turning feedback into training data. SQLite (WAL mode) by default; PostgreSQL
when given a postgresql:// URL, so several server replicas can share one log.

    log = InteractionLog("out/serve/interactions.db")        # or "postgresql://user@host:5432/db"
    log.record_request({"id": "chatcmpl-...", "model": "sft", "checkpoint": "out/sft/ckpt_0002999",
                        "endpoint": "chat", "prompt": [...messages...], "output": ["reply"], "settings": {...},
                        "latency_ms": 41.5, "prompt_tokens": 15, "completion_tokens": 7, "finish_reason": "stop"})
    log.record_feedback("chatcmpl-...", rating=1, comment="right answer")   # thumbs: up = 1, down = -1
    log.record_feedback("chatcmpl-...", rating=4, scale="stars")            # or 1..5 stars
    log.requests(since=None, until=None)   # rows as dicts, oldest first, ratings joined by request id
    log.close()

Design decisions:
- SQLite in WAL mode: readers (a monitor, a report) never block the server's writes, and a row is
  on disk once its insert is committed, so killing the server loses no answered request. Each
  write is its own transaction, committed before the client gets its answer (serve.py).
- One connection shared by the server's threads behind a lock, with a busy timeout so other
  processes writing the same file (several server processes on one machine) wait instead of
  failing.
- PostgreSQL (psycopg 3, autocommit): the same tables and queries; only the placeholders, the
  float type and the insertion-order column differ (`Dialect`). A server that goes away is retried
  once with a fresh connection, then a LogError that names it: the caller decides (serve.py
  answers 503 rather than answering without logging).
- Prompts, outputs and settings are JSON text columns: the log keeps what was asked and said,
  as it was, and a schema change is a new column, not a migration of nested data.
- Ratings are a separate table joined by request id: feedback may come long after the request,
  more than once (the latest counts in `requests()`), and only for requests that exist. Each
  rating names its scale (thumbs or stars), so a thumbs-up (1) is never read as one star.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from nanofm.common import NanofmError

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,{seq}
    created {float} NOT NULL,        -- unix time the request arrived
    model TEXT NOT NULL,
    checkpoint TEXT,
    endpoint TEXT NOT NULL,          -- completions | chat
    prompt TEXT NOT NULL,            -- JSON: the prompt text, or the chat messages
    output TEXT NOT NULL,            -- JSON: one text per choice
    settings TEXT NOT NULL,          -- JSON: temperature, top_p, max_tokens, seed, n, stream, ...
    latency_ms {float},
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    finish_reason TEXT               -- stop | length | cancelled | error (the first choice's)
);
CREATE INDEX IF NOT EXISTS requests_created ON requests(created);
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT NOT NULL REFERENCES requests(id),{seq}
    created {float} NOT NULL,
    rating INTEGER NOT NULL,         -- -1 (down) or 1 (up) on the thumbs scale; 1..5 on the stars scale
    comment TEXT,
    scale TEXT                       -- thumbs | stars (NULL in logs written before it existed)
);
CREATE INDEX IF NOT EXISTS feedback_request ON feedback(request_id);
"""

COLUMNS = ("id", "created", "model", "checkpoint", "endpoint", "prompt", "output", "settings", "latency_ms",
           "prompt_tokens", "completion_tokens", "finish_reason")
JSON_COLUMNS = ("prompt", "output", "settings")


class LogError(NanofmError):
    pass


@dataclass(frozen=True)
class Dialect:
    placeholder: str  # how a query parameter is written
    float_type: str  # unix times need double precision (PostgreSQL's REAL is 4 bytes)
    order: str  # the column that keeps insertion order
    seq_column: str  # its declaration, where it is not built in


SQLITE = Dialect("?", "REAL", "rowid", "")
POSTGRES = Dialect("%s", "DOUBLE PRECISION", "seq", "\n    seq BIGSERIAL,")


def is_url(target: str | Path) -> bool:
    return str(target).startswith(("postgresql://", "postgres://"))


class InteractionLog:
    def __init__(self, target: str | Path):
        """target: a file path (SQLite) or a postgresql:// URL."""
        self.target, self.lock = str(target), threading.Lock()
        self.dialect = POSTGRES if is_url(target) else SQLITE
        self.db = self._connect()

    def describe(self) -> str:
        return self.describe_target(self.target)

    @staticmethod
    def describe_target(target: str | Path) -> str:
        """The log's file, or its server without user and password, for messages and reports."""
        if not is_url(target):
            return str(target)
        from urllib.parse import urlsplit
        parts = urlsplit(str(target))
        return f"PostgreSQL at {parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"

    def _connect(self):
        schema = SCHEMA.format(seq=self.dialect.seq_column, float=self.dialect.float_type)
        if self.dialect is SQLITE:
            path = Path(self.target)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process kill
                db.executescript(schema)
                if "scale" not in [column[1] for column in db.execute("PRAGMA table_info(feedback)")]:
                    db.execute("ALTER TABLE feedback ADD COLUMN scale TEXT")  # a log from before the column
            except sqlite3.DatabaseError as exc:
                raise LogError(f"cannot open the interaction log {path}: {exc} (is it an SQLite file?)") from None
            return db
        try:
            import psycopg
        except ImportError:
            raise LogError("a postgresql:// interaction log needs psycopg: pip install 'psycopg[binary]'") from None
        try:
            db = psycopg.connect(self.target, autocommit=True, connect_timeout=10)
            db.execute(schema)
            db.execute("ALTER TABLE feedback ADD COLUMN IF NOT EXISTS scale TEXT")
        except psycopg.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LogError(f"cannot open the interaction log ({self.describe()}): {first}") from None
        return db

    def _run(self, sql: str, params=(), fetch: bool = False):
        """One statement (its own transaction); a PostgreSQL connection that broke is replaced once."""
        sql = sql.replace("?", self.dialect.placeholder).replace("{order}", self.dialect.order)
        with self.lock:
            for attempt in (1, 2):
                try:
                    cursor = self.db.execute(sql, params)
                    return cursor.fetchall() if fetch else None
                except sqlite3.Error as exc:
                    raise LogError(f"the interaction log {self.target} failed: {exc}") from None
                except Exception as exc:  # psycopg's errors (imported lazily)
                    if self.dialect is SQLITE or not _is_connection_error(exc):
                        raise
                    if attempt == 2:
                        raise LogError(f"the interaction log ({self.describe()}) is unreachable: "
                                       f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
                                       ) from None
                    try:
                        self.db.close()
                        self.db = self._connect()
                    except LogError as again:
                        raise LogError(f"the interaction log is unreachable: {again}") from None

    def record_request(self, row: dict) -> None:
        values = {**{c: None for c in COLUMNS}, "created": time.time(), **row}
        for column in JSON_COLUMNS:
            values[column] = json.dumps(values[column], ensure_ascii=False)
        self._run(f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                  [values[c] for c in COLUMNS])

    def record_feedback(self, request_id: str, rating: int, comment: str | None = None, scale: str = "thumbs") -> bool:
        """A rating on the thumbs scale (-1 down, 1 up) or the stars scale (1..5); False when no
        request has that id (nothing is written)."""
        allowed = {"thumbs": (-1, 1), "stars": (1, 2, 3, 4, 5)}
        if scale not in allowed or int(rating) not in allowed[scale]:
            raise LogError(f"a {scale!r} rating must be one of {allowed.get(scale, 'thumbs or stars')}, not {rating!r}")
        if not self._run("SELECT 1 FROM requests WHERE id = ?", (request_id,), fetch=True):
            return False
        self._run("INSERT INTO feedback (request_id, created, rating, comment, scale) VALUES (?, ?, ?, ?, ?)",
                  (request_id, time.time(), int(rating), comment, scale))
        return True

    def requests(self, since: float | None = None, until: float | None = None) -> list[dict]:
        """Every request that arrived in [since, until) (unix times), oldest first, with its
        latest rating and comment."""
        latest = ("(SELECT {field} FROM feedback f WHERE f.request_id = r.id "
                  "ORDER BY f.created DESC, f.{order} DESC LIMIT 1)")
        query = (f"SELECT {', '.join('r.' + c for c in COLUMNS)}, {latest.format(field='rating', order='{order}')}, "
                 f"{latest.format(field='comment', order='{order}')}, {latest.format(field='scale', order='{order}')} "
                 "FROM requests r WHERE r.created >= ? AND r.created < ? ORDER BY r.created, r.{order}")
        rows = self._run(query, (since or 0.0, until if until is not None else float("inf")), fetch=True)
        out = []
        for values in rows:
            row = dict(zip(COLUMNS + ("rating", "comment", "rating_scale"), values))
            for column in JSON_COLUMNS:
                row[column] = json.loads(row[column])
            out.append(row)
        return out

    def count(self) -> int:
        return self._run("SELECT COUNT(*) FROM requests", fetch=True)[0][0]

    def close(self) -> None:
        with self.lock:
            self.db.close()


def _is_connection_error(exc: Exception) -> bool:
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))
