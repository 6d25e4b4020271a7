"""The interaction log: every request served and every rating given, in SQLite (WAL mode), for
monitoring (monitor.py reads it) and for turning feedback into training data.

    log = InteractionLog("out/serve/interactions.db")
    log.record_request({"id": "chatcmpl-...", "model": "sft", "checkpoint": "out/sft/ckpt_0002999",
                        "endpoint": "chat", "prompt": [...messages...], "output": ["reply"], "settings": {...},
                        "latency_ms": 41.5, "prompt_tokens": 15, "completion_tokens": 7, "finish_reason": "stop"})
    log.record_feedback("chatcmpl-...", rating=1, comment="right answer")   # up = 1, down = -1, or 1..5
    log.requests(since=None)        # rows as dicts, oldest first, ratings joined by request id
    log.close()

Design decisions:
- SQLite in WAL mode: readers (a monitor, a report) never block the server's writes, and a row is
  on disk once its insert is committed, so killing the server loses no answered request. Each
  write is its own transaction, committed before the client gets its answer (serve.py).
- One connection shared by the server's threads behind a lock, with a busy timeout so other
  processes writing the same file (several server processes on one machine) wait instead of
  failing. Several machines need one shared store: PostgreSQL, the monitoring stage (issue 14).
- Prompts, outputs and settings are JSON text columns: the log keeps what was asked and said,
  as it was, and a schema change is a new column, not a migration of nested data.
- Ratings are a separate table joined by request id: feedback may come long after the request,
  more than once (the latest counts in `requests()`), and only for requests that exist.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from nanofm.common import NanofmError

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,           -- unix time the request arrived
    model TEXT NOT NULL,
    checkpoint TEXT,
    endpoint TEXT NOT NULL,          -- completions | chat
    prompt TEXT NOT NULL,            -- JSON: the prompt text, or the chat messages
    output TEXT NOT NULL,            -- JSON: one text per choice
    settings TEXT NOT NULL,          -- JSON: temperature, top_p, max_tokens, seed, n, stream, ...
    latency_ms REAL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    finish_reason TEXT               -- stop | length | cancelled | error (the first choice's)
);
CREATE INDEX IF NOT EXISTS requests_created ON requests(created);
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT NOT NULL REFERENCES requests(id),
    created REAL NOT NULL,
    rating INTEGER NOT NULL,         -- -1 (down), 1 (up), or 1..5
    comment TEXT
);
CREATE INDEX IF NOT EXISTS feedback_request ON feedback(request_id);
"""

COLUMNS = ("id", "created", "model", "checkpoint", "endpoint", "prompt", "output", "settings", "latency_ms",
           "prompt_tokens", "completion_tokens", "finish_reason")
JSON_COLUMNS = ("prompt", "output", "settings")


class LogError(NanofmError):
    pass


class InteractionLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process kill
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise LogError(f"cannot open the interaction log {self.path}: {exc} (is it an SQLite file?)") from None
        self.lock = threading.Lock()

    def record_request(self, row: dict) -> None:
        values = {**{c: None for c in COLUMNS}, "created": time.time(), **row}
        for column in JSON_COLUMNS:
            values[column] = json.dumps(values[column], ensure_ascii=False)
        with self.lock:
            self.db.execute(f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                            [values[c] for c in COLUMNS])

    def record_feedback(self, request_id: str, rating: int, comment: str | None = None) -> bool:
        """False when no request has that id (nothing is written)."""
        with self.lock:
            if self.db.execute("SELECT 1 FROM requests WHERE id = ?", (request_id,)).fetchone() is None:
                return False
            self.db.execute("INSERT INTO feedback (request_id, created, rating, comment) VALUES (?, ?, ?, ?)",
                            (request_id, time.time(), int(rating), comment))
        return True

    def requests(self, since: float | None = None) -> list[dict]:
        """Every request (since a unix time), oldest first, with its latest rating and comment."""
        query = (f"SELECT {', '.join('r.' + c for c in COLUMNS)}, "
                 "(SELECT rating FROM feedback f WHERE f.request_id = r.id ORDER BY f.created DESC, f.rowid DESC LIMIT 1), "
                 "(SELECT comment FROM feedback f WHERE f.request_id = r.id ORDER BY f.created DESC, f.rowid DESC LIMIT 1) "
                 "FROM requests r WHERE r.created >= ? ORDER BY r.created, r.rowid")
        with self.lock:
            rows = self.db.execute(query, (since or 0.0,)).fetchall()
        out = []
        for values in rows:
            row = dict(zip(COLUMNS + ("rating", "comment"), values))
            for column in JSON_COLUMNS:
                row[column] = json.loads(row[column])
            out.append(row)
        return out

    def count(self) -> int:
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]

    def close(self) -> None:
        with self.lock:
            self.db.close()
