"""The interaction log against both stores: SQLite (a file) and a real PostgreSQL server (started
by the postgres_url fixture in conftest.py)."""

import threading
import uuid

import pytest

from nanofm.interactions import InteractionLog, LogError


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "log.db")
    return fresh_database(request.getfixturevalue("postgres_url")["url"])


def fresh_database(url: str) -> str:
    """A new, empty database on the test server: its URL."""
    import psycopg
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return url.rsplit("/", 1)[0] + "/" + name


def row(i, **extra):
    return {"id": f"cmpl-{i}", "model": "m", "checkpoint": "ckpt", "endpoint": "chat",
            "prompt": [{"role": "user", "content": f"question {i} é 東"}], "output": [f"answer {i}"],
            "settings": {"temperature": 0.5}, "latency_ms": 12.5, "prompt_tokens": 7, "completion_tokens": 3,
            "finish_reason": "stop", **extra}


def test_requests_ratings_and_windows_round_trip(target):
    log = InteractionLog(target)
    for i, created in enumerate([100.0, 200.0, 300.0]):
        log.record_request(row(i, created=created))
    assert log.count() == 3
    assert log.record_feedback("cmpl-1", -1, "wrong") and log.record_feedback("cmpl-1", 1, "fine after all")
    assert not log.record_feedback("cmpl-404", 1)  # unknown: nothing written
    rows = log.requests()
    assert [r["id"] for r in rows] == ["cmpl-0", "cmpl-1", "cmpl-2"]
    assert rows[0]["prompt"] == [{"role": "user", "content": "question 0 é 東"}] and rows[0]["settings"] == {"temperature": 0.5}
    assert rows[0]["created"] == 100.0 and rows[0]["latency_ms"] == 12.5 and rows[0]["rating"] is None
    assert (rows[1]["rating"], rows[1]["comment"]) == (1, "fine after all")  # the latest rating counts
    assert [r["id"] for r in log.requests(since=150.0, until=300.0)] == ["cmpl-1"]  # [since, until)
    log.close()
    assert InteractionLog(target).count() == 3  # it is on disk / in the server


def test_concurrent_writers_lose_nothing(target):
    logs = [InteractionLog(target) for _ in range(2)]  # two servers sharing one store
    errors = []

    def write(w):
        try:
            for i in range(25):
                logs[w % 2].record_request(row(f"{w}-{i}"))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and logs[0].count() == 200 and len({r["id"] for r in logs[1].requests()}) == 200


def test_an_unreachable_postgresql_server_is_a_clear_error():
    with pytest.raises(LogError, match="PostgreSQL at 127.0.0.1:1/nanofm"):
        InteractionLog("postgresql://someone:secret@127.0.0.1:1/nanofm")


def test_a_postgresql_server_that_goes_away_and_comes_back(postgres_url):
    import subprocess
    log = InteractionLog(postgres_url["url"])
    log.record_request(row("before-" + uuid.uuid4().hex))
    before = log.count()
    pg_ctl = postgres_url["pg_ctl"]
    subprocess.run(pg_ctl + ["-D", postgres_url["data"], "-m", "fast", "stop"], check=True, capture_output=True)
    try:
        with pytest.raises(LogError, match="unreachable") as info:
            log.record_request(row("during"))
        assert "secret" not in str(info.value)
    finally:
        subprocess.run(pg_ctl + ["-D", postgres_url["data"], "-l", postgres_url["log"], "-w", "-o",
                                 f"-p {postgres_url['port']} -k {postgres_url['sockets']} -c listen_addresses=127.0.0.1",
                                 "start"], check=True, capture_output=True)
    log.record_request(row("after-" + uuid.uuid4().hex))  # a fresh connection, no restart of the caller
    assert log.count() == before + 1  # the failed write did not land half-way


def test_serve_writes_to_postgresql_and_answers_503_when_it_is_gone(postgres_url):
    pytest.importorskip("fastapi", reason="serve.py needs fastapi (requirements.txt)")
    import serve
    from fastapi.testclient import TestClient
    from nanofm import chat
    from nanofm.engine import Engine
    from nanofm.tokenizer import Tokenizer, train_bpe
    from test_engine import make_model
    tokenizer = Tokenizer.from_merges(train_bpe(["the river runs by the garden"] * 20, vocab_size=300, progress=False))
    engine = Engine(make_model(tokenizer), tokenizer)
    target = fresh_database(postgres_url["url"])
    log = InteractionLog(target)
    client = TestClient(serve.make_app(engine, "m", chat.CHAT_FORMAT, slots=2, log=log, checkpoint="ckpt/x"))
    answer = client.post("/v1/completions", json={"model": "m", "prompt": "the river", "max_tokens": 3}).json()
    assert [r["id"] for r in InteractionLog(target).requests()] == [answer["id"]]
    log.db.close()  # as if the server had gone: the next write fails, the reconnect is refused
    log.target = "postgresql://nanofm@127.0.0.1:1/postgres"
    gone = client.post("/v1/completions", json={"model": "m", "prompt": "the river", "max_tokens": 3})
    assert gone.status_code == 503 and "not kept" in gone.json()["error"]["message"]
    rated = client.post("/v1/feedback", json={"request_id": answer["id"], "rating": "up"})
    assert rated.status_code == 503


def test_rating_scales_and_a_log_from_before_them(target, tmp_path):
    log = InteractionLog(target)
    log.record_request(row(1))
    assert log.record_feedback("cmpl-1", 1, scale="stars")  # one star: not a thumbs-up
    assert log.requests()[0]["rating"] == 1 and log.requests()[0]["rating_scale"] == "stars"
    with pytest.raises(LogError, match="thumbs"):
        log.record_feedback("cmpl-1", 4)  # thumbs are -1 or 1
    with pytest.raises(LogError, match="stars"):
        log.record_feedback("cmpl-1", 9, scale="stars")
    import sqlite3
    old = tmp_path / "old.db"  # the feedback table as it was before the scale column
    db = sqlite3.connect(old)
    db.executescript("CREATE TABLE feedback (request_id TEXT NOT NULL, created REAL NOT NULL, rating INTEGER NOT NULL, "
                     "comment TEXT); INSERT INTO feedback VALUES ('cmpl-x', 1.0, -1, NULL);")
    db.commit()
    db.close()
    migrated = InteractionLog(old)
    migrated.record_request(row("x"))
    assert migrated.requests()[0]["rating"] == -1 and migrated.requests()[0]["rating_scale"] is None
