"""serve.py: a real server on 127.0.0.1 driven by the official openai client; the scheduler's
continuous batching behind it; OpenAI-style 400s for bad input."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from nanofm import chat
from nanofm.engine import Engine, SamplingParams
from nanofm.scheduler import Scheduler
from test_engine import PROMPTS, make_model, tok  # noqa: F401  (the engine tests' tokenizer fixture)

openai = pytest.importorskip("openai", reason="the serving tests use the official openai client (requirements-test.txt)")
uvicorn = pytest.importorskip("uvicorn", reason="serve.py needs uvicorn and fastapi (requirements.txt)")


def start(app):
    """Run `app` with uvicorn on a free port of 127.0.0.1 in a thread; returns (base url, server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(200):
        if server.started:
            return f"http://127.0.0.1:{port}", server
        time.sleep(0.05)
    raise RuntimeError("the server did not start")


@pytest.fixture(scope="module")
def served(tok, tmp_path_factory):  # noqa: F811
    import serve
    from nanofm.interactions import InteractionLog
    engine = Engine(make_model(tok), tok, batch_size=4)
    log = InteractionLog(tmp_path_factory.mktemp("serve") / "interactions.db")
    url, server = start(serve.make_app(engine, "tiny", chat.CHAT_FORMAT, slots=4, log=log, checkpoint="ckpt/x"))
    base_url, base_server = start(serve.make_app(Engine(make_model(tok), tok), "base", None, slots=2))
    yield {"url": url, "engine": engine, "base_url": base_url, "log": log}
    server.should_exit = base_server.should_exit = True


def post(url, body, raw: bytes | None = None):
    request = urllib.request.Request(url, data=raw if raw is not None else json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_openai_client_works_unchanged(served):
    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused")
    engine = served["engine"]
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.completions.create(model="tiny", prompt="The river", max_tokens=8, temperature=0)
    expected = engine.generate(["The river"], SamplingParams(max_tokens=8, temperature=0))[0]
    assert out.choices[0].text == expected.text and out.choices[0].finish_reason == expected.finish_reason
    assert out.usage.completion_tokens == len(expected.token_ids)
    assert out.usage.prompt_tokens == len(engine.encode_prompt("The river"))
    messages = [{"role": "user", "content": "Quiet and early the"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0.9, seed=3)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0.9,
                                                 seed=3, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == whole.choices[0].message.content  # the same seed, streamed or not
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason in ("stop", "length")
    prompt_ids = chat.render_prompt(engine.tokenizer, messages)
    alone = engine.generate([prompt_ids], SamplingParams(max_tokens=12, temperature=0.9, seed=3))[0]
    assert whole.choices[0].message.content == alone.text
    two = client.completions.create(model="tiny", prompt="A", max_tokens=6, temperature=1.0, seed=5, n=2)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens > 0


def test_concurrent_streams_are_batched_and_each_equals_its_request_alone(served):
    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused")
    engine, results = served["engine"], {}

    def ask(i):  # 8 streams through 4 slots: they join and leave the running batch at different steps
        stream = client.completions.create(model="tiny", prompt=PROMPTS[i % 4], max_tokens=4 + 3 * i,
                                           temperature=1.0, seed=i, stream=True)
        results[i] = "".join(chunk.choices[0].text for chunk in stream)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(8):
        alone = engine.generate([PROMPTS[i % 4]], SamplingParams(max_tokens=4 + 3 * i, temperature=1.0, seed=i))[0]
        assert results[i] == alone.text


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", {"model": "nope", "prompt": "a"}, 404, "model"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "word " * 200}, 400, "prompt"),  # longer than the context
    ("/v1/completions", {"model": "tiny", "prompt": "a", "stop": ["x"] * 100}, 400, "stop"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
])
def test_bad_requests_get_openai_style_errors(served, path, body, status, param):
    code, answer = post(served["url"] + path, body)
    assert code == status and answer["error"]["param"] == param and answer["error"]["message"]


def test_invalid_json_and_a_base_model_asked_to_chat(served):
    code, answer = post(served["url"] + "/v1/completions", None, raw=b"{not json")
    assert code == 400 and answer["error"]["type"] == "invalid_request_error"
    code, answer = post(served["base_url"] + "/v1/chat/completions",
                        {"model": "base", "messages": [{"role": "user", "content": "hi"}]})
    assert code == 400 and "not a chat model" in answer["error"]["message"] and "/v1/completions" in answer["error"]["message"]
    code, answer = post(served["base_url"] + "/v1/completions", {"model": "base", "prompt": "The river", "max_tokens": 3})
    assert code == 200 and answer["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_scheduler_cancels_a_request_and_keeps_serving(tok):  # noqa: F811
    model = make_model(tok)
    model.transformer.h[0].register_forward_pre_hook(lambda m, args: time.sleep(0.01))  # 60 tokens take > 0.6 s
    engine = Engine(model, tok)
    scheduler = Scheduler(engine, slots=1)
    events, done = [], threading.Event()
    long = scheduler.submit(engine.new_row("The river", SamplingParams(max_tokens=60, stop_token_ids=[], seed=1)),
                            lambda d, c, e: events.append(("long", d, c)))
    time.sleep(0.1)
    scheduler.cancel(long)  # the only slot: the next request gets it only if the cancel frees it
    scheduler.submit(engine.new_row("A", SamplingParams(max_tokens=3, stop_token_ids=[], seed=2)),
                     lambda d, c, e: (events.append(("short", d, c)), c and done.set()))
    assert done.wait(20)
    scheduler.close()
    assert any(name == "long" and d for name, d, _ in events)  # it had started...
    assert not any(name == "long" and c is not None for name, _, c in events)  # ...and never completed
    assert [c for name, _, c in events if name == "short" and c][0].finish_reason == "length"


def test_every_request_and_rating_lands_in_the_log(served):
    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused")
    log, before = served["log"], served["log"].count()
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "The river"}],
                                           max_tokens=5, temperature=0.7, seed=1)
    streamed_text = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="A", max_tokens=6, temperature=1.0, seed=2, stream=True))
    rows = {r["id"]: r for r in log.requests()}
    assert log.count() == before + 2
    row = rows[plain.id]
    assert row["endpoint"] == "chat" and row["prompt"] == [{"role": "user", "content": "The river"}]
    assert row["output"] == [plain.choices[0].message.content] and row["checkpoint"] == "ckpt/x"
    assert row["settings"]["temperature"] == 0.7 and row["settings"]["seed"] == 1 and row["latency_ms"] > 0
    assert (row["prompt_tokens"], row["completion_tokens"]) == (plain.usage.prompt_tokens, plain.usage.completion_tokens)
    streamed = [r for r in rows.values() if r["endpoint"] == "completions" and r["prompt"] == "A"][-1]
    assert streamed["output"] == [streamed_text] and streamed["finish_reason"] in ("stop", "length")
    for rating, stored in (("up", 1), ("down", -1), (4, 4)):  # the latest rating counts
        code, answer = post(served["url"] + "/v1/feedback", {"request_id": plain.id, "rating": rating, "comment": "ok"})
        assert code == 200 and answer["rating"] == stored
        assert {r["id"]: r for r in log.requests()}[plain.id]["rating"] == stored
    assert post(served["url"] + "/v1/feedback", {"request_id": "nope", "rating": "up"})[0] == 404
    code, answer = post(served["url"] + "/v1/feedback", {"request_id": plain.id, "rating": 7})
    assert code == 400 and answer["error"]["param"] == "rating"


def test_concurrent_requests_lose_no_log_row(served):
    client, log = openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused"), served["log"]
    before, ids = log.count(), []

    def ask(i):
        ids.append(client.completions.create(model="tiny", prompt=PROMPTS[i % 4], max_tokens=3, seed=i).id)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(ids) == 16 and log.count() == before + 16 and set(ids) <= {r["id"] for r in log.requests()}


from test_sft import base, corpus  # noqa: E402,F401  (a tiny base checkpoint with its tokenizer)


def test_the_log_survives_a_server_kill_and_a_corrupt_log_is_refused(base, tmp_path):  # noqa: F811
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path
    from nanofm.interactions import InteractionLog
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).resolve().parents[1] / "serve.py"
    db = tmp_path / "log.db"
    server = subprocess.Popen([sys.executable, str(script), "--ckpt", str(base), "--port", str(port), "--log", str(db),
                               "--name", "base"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        ids = [post(url + "/v1/completions", {"model": "base", "prompt": f"line {i}", "max_tokens": 4})[1]["id"]
               for i in range(3)]
    finally:
        os.kill(server.pid, signal.SIGKILL)  # no shutdown, no flush: only what was committed survives
        server.wait(10)
    assert [r["id"] for r in InteractionLog(db).requests()] == ids
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not a database" * 100)
    done = subprocess.run([sys.executable, str(script), "--ckpt", str(base), "--log", str(bad)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "cannot open the interaction log" in done.stdout + done.stderr
    assert bad.read_bytes() == b"this is not a database" * 100  # left as it was


def test_metrics_count_requests_tokens_and_latency(served):
    def scrape():
        text = urllib.request.urlopen(served["url"] + "/metrics", timeout=10).read().decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if not line.startswith("#")}
    before = scrape()
    code, answer = post(served["url"] + "/v1/completions", {"model": "tiny", "prompt": "The river", "max_tokens": 4})
    post(served["url"] + "/v1/completions", {"model": "tiny", "prompt": "a", "temperature": -1})
    after = scrape()
    ok, bad = 'nanofm_requests_total{path="/v1/completions",status="200"}', 'nanofm_requests_total{path="/v1/completions",status="400"}'
    assert after[ok] == before.get(ok, 0) + 1 and after[bad] == before.get(bad, 0) + 1
    done = 'nanofm_tokens_total{kind="completion"}'
    assert after[done] - before[done] == answer["usage"]["completion_tokens"]
    count = "nanofm_request_latency_seconds_count"
    assert after[count] == before[count] + 2 and after['nanofm_request_latency_seconds_bucket{le="+Inf"}'] == after[count]
    assert after["nanofm_queue_depth"] == 0 and after["nanofm_running_batch_size"] >= 0


def test_reload_keeps_in_flight_requests_on_the_old_model_and_survives_a_bad_checkpoint(tok):  # noqa: F811
    import serve
    from nanofm.checkpoint import CheckpointError
    old_model, new_model = make_model(tok), make_model(tok)
    torch.manual_seed(1)
    for p in new_model.parameters():  # another set of weights: the two models write different text
        p.data.normal_(0, 0.2)
    old_model.transformer.h[0].register_forward_pre_hook(lambda module, args: time.sleep(0.005))  # a slow old model: still busy at reload
    old, new = Engine(old_model, tok), Engine(new_model, tok)

    def load(path):
        if path != "new":
            raise CheckpointError(f"no checkpoint at {path}")
        return new, {"chat_format": chat.CHAT_FORMAT}, "ckpt/new"

    url, server = start(serve.make_app(old, "m", chat.CHAT_FORMAT, slots=2, checkpoint="ckpt/old", load=load))
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    params = dict(model="m", prompt="The river", max_tokens=40, temperature=1.0, seed=4)
    expect_old = old.generate(["The river"], SamplingParams(max_tokens=40, temperature=1.0, seed=4))[0].text
    expect_new = new.generate(["The river"], SamplingParams(max_tokens=40, temperature=1.0, seed=4))[0].text
    assert expect_old != expect_new
    pieces = []
    stream = client.completions.create(stream=True, **params)
    pieces.append(next(iter(stream)).choices[0].text)  # the old model has started on it
    code, answer = post(url + "/admin/reload", {"ckpt": "missing/dir"})
    assert code == 400 and "still serving ckpt/old" in answer["error"]["message"]
    code, answer = post(url + "/admin/reload", {"ckpt": "new"})
    assert code == 200 and answer["checkpoint"] == "ckpt/new"
    assert client.completions.create(**params).choices[0].text == expect_new  # new requests: the new model
    pieces += [chunk.choices[0].text for chunk in stream]
    assert "".join(pieces) == expect_old  # the request in flight finished on the old one, whole
    health = json.loads(urllib.request.urlopen(url + "/health").read())
    assert health["checkpoint"] == "ckpt/new"
    server.should_exit = True


def test_api_key_body_size_max_tokens_and_the_pending_limit(tok):  # noqa: F811
    import serve
    model = make_model(tok)
    model.transformer.h[0].register_forward_pre_hook(lambda module, args: time.sleep(0.005))  # slow enough to be caught in flight
    limits = serve.Limits(api_key="secret", max_body_bytes=2000, max_tokens_limit=30, max_pending=1)
    url, server = start(serve.make_app(Engine(model, tok), "m", chat.CHAT_FORMAT, slots=2, limits=limits))

    def call(body, key="secret", raw=None):
        data = raw if raw is not None else json.dumps(body).encode()
        headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
        try:
            with urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", data=data, headers=headers),
                                        timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    ok = {"model": "m", "prompt": "The river", "max_tokens": 3}
    assert call(ok, key=None)[0] == 401 and call(ok, key="wrong")[0] == 401
    assert call(ok)[0] == 200 and urllib.request.urlopen(url + "/health").status == 200  # health needs no key
    code, answer = call(None, raw=json.dumps({**ok, "prompt": "x" * 100_000}).encode())
    assert code == 413 and "2,000 bytes" in answer["error"]["message"]
    code, answer = call({**ok, "max_tokens": 31})
    assert code == 400 and answer["error"]["param"] == "max_tokens"
    client = openai.OpenAI(base_url=url + "/v1", api_key="secret", max_retries=0)
    stream = client.completions.create(model="m", prompt="A", max_tokens=30, stream=True, seed=1)
    next(iter(stream))  # one request in flight: the limit is 1
    code, answer = call(ok)
    assert code == 429 and answer["error"]["type"] == "rate_limit_error"
    list(stream)  # it finishes...
    for _ in range(50):  # ...and its place is free again (once the server has closed the stream)
        if call(ok)[0] == 200:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the finished stream's place was never freed")
    server.should_exit = True


def test_a_100_mb_body_gets_a_413_without_being_read_and_a_chunked_body_a_411(served):
    import http.client
    host, port = served["url"].removeprefix("http://").split(":")
    size, sent = 100 * 2**20, 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {size}\r\n\r\n".encode())
        chunk = b"x" * 2**20
        sock.sendall(chunk)
        sent += len(chunk)
        status = sock.recv(4096).split(b"\r\n")[0]
        assert b" 413 " in status + b" "  # answered after the headers, before the body
        try:  # the rest of the 100 MB: the server reads none of it (the connection may be closed under us)
            while sent < size:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
    assert urllib.request.urlopen(served["url"] + "/health", timeout=30).status == 200  # still serving
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", body=iter([b'{"model": "tiny", ', b'"prompt": "A"}']),
                 headers={"content-type": "application/json"}, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]["message"]
    conn.close()


def headless_chromium(tmp_path):
    """A headless Chromium driven by selenium; skips where it is missing, except in CI (.ci/run
    sets NANOFM_REQUIRE_BROWSER=1: there the browser must be present)."""
    import shutil
    import os
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if os.environ.get("NANOFM_REQUIRE_BROWSER") != "1":
        pytest.importorskip("selenium.webdriver", reason="the page test drives Chromium with selenium")
        if not chromium or not driver_path:
            pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
                        ".ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def test_the_chat_page_in_a_real_browser_streams_keeps_the_conversation_and_rates(tok, tmp_path):  # noqa: F811
    import serve
    from nanofm.interactions import InteractionLog
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser = headless_chromium(tmp_path)
    log = InteractionLog(tmp_path / "log.db")
    url, server = start(serve.make_app(Engine(make_model(tok), tok), "tiny", chat.CHAT_FORMAT, slots=2, log=log))
    try:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: b.find_element(By.ID, "model").text == "tiny")
        max_tokens = browser.find_element(By.ID, "max_tokens")
        max_tokens.clear()
        max_tokens.send_keys("6")  # the tiny model's context is 64 tokens: room for two turns
        replies = []
        for turn, text in enumerate(["The river", "Quiet and early the"]):
            browser.find_element(By.ID, "input").send_keys(text)
            browser.find_element(By.ID, "send").click()
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true']")) == turn + 1)
            replies.append(browser.find_elements(By.CSS_SELECTOR, ".assistant")[turn])
        rows = log.requests()
        assert len(rows) == 2
        # the second request carried the whole conversation, and each bubble shows what was logged
        assert [m["content"] for m in rows[1]["prompt"]] == ["The river", rows[0]["output"][0], "Quiet and early the"]
        for bubble, row in zip(replies, rows):
            assert bubble.get_attribute("data-request-id") == row["id"]
            assert bubble.find_element(By.CSS_SELECTOR, ".text").text == row["output"][0].strip()
        replies[1].find_element(By.CSS_SELECTOR, ".rate-down").click()
        wait.until(lambda b: replies[1].get_attribute("data-rating") == "down")
        assert {r["id"]: r["rating"] for r in log.requests()} == {rows[0]["id"]: None, rows[1]["id"]: -1}
    finally:
        browser.quit()
        server.should_exit = True


@pytest.mark.parametrize("raw", [b'{"model": "tiny", "prompt": "\xff\xfe caf\xc3"}', b"\xff" * 50, b"[1, 2, 3]", b'"just a string"',
                                 b'{"model": "tiny", "prompt": "a", "max_tokens": 1e309}'])
def test_undecodable_or_mis_shaped_bodies_are_400s(served, raw):
    code, answer = post(served["url"] + "/v1/completions", None, raw=raw)
    assert code == 400 and answer["error"]["type"] == "invalid_request_error"


def test_an_unknown_path_gets_an_openai_style_404(served):
    code, answer = post(served["url"] + "/v1/nothing", {"model": "tiny"})
    assert code == 404 and answer["error"]["message"] == "Not Found"


def test_schemathesis_finds_no_server_error(served, tmp_path):
    """Fuzz every operation of the server's own OpenAPI schema (bounded: 30 examples each, a fixed
    seed, about 500 requests in a few seconds) and check that nothing answers 5xx."""
    import subprocess
    import sys
    pytest.importorskip("schemathesis", reason="the fuzz test needs schemathesis (requirements-test.txt)")
    command = [sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
               "run", served["url"] + "/openapi.json", "--checks", "not_a_server_error", "--max-examples", "30",
               "--seed", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)  # its cache goes there
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "generated" in done.stdout


def test_watch_reloads_when_the_run_gets_a_new_latest_checkpoint(tok, tmp_path):  # noqa: F811
    from pathlib import Path
    import serve
    from nanofm.checkpoint import resolve
    run = tmp_path / "run"

    def checkpoint(step, good=True):
        ckpt = run / f"ckpt_{step:07d}"
        ckpt.mkdir(parents=True)
        (ckpt / "model.pt").write_bytes(b"weights" if good else b"corrupt")
        (ckpt / "meta.json").write_text("{}")
        (run / "latest").write_text(ckpt.name)
        return str(ckpt)

    engines = {}

    def load(path):  # stands in for load_for_inference: a corrupt checkpoint fails to load
        path = str(resolve(path))
        if (Path(path) / "model.pt").read_bytes() == b"corrupt":
            raise ValueError("corrupt model.pt")
        return engines.setdefault(path, Engine(make_model(tok), tok)), {"chat_format": chat.CHAT_FORMAT}, path

    first = checkpoint(1)
    engine, _, path = load(first)
    url, server = start(serve.make_app(engine, "m", chat.CHAT_FORMAT, checkpoint=path, load=load, watch=str(run),
                                       watch_seconds=0.1))

    def serving():
        return json.loads(urllib.request.urlopen(url + "/health").read())["checkpoint"]

    def wait_for(expected):
        for _ in range(100):
            if serving() == expected:
                return True
            time.sleep(0.05)
        return False

    assert serving() == first
    second = checkpoint(2)
    assert wait_for(second)  # picked up without a request
    checkpoint(3, good=False)
    time.sleep(0.5)
    assert serving() == second  # a checkpoint that fails to load leaves the old one serving
    fourth = checkpoint(4)
    assert wait_for(fourth)
    server.should_exit = True


def test_a_missing_or_corrupt_checkpoint_at_start_is_a_clear_error(base, tmp_path):  # noqa: F811
    import shutil
    import serve
    from nanofm.checkpoint import resolve
    from nanofm.common import NanofmError

    def start_up(ckpt):
        return serve.load_app(serve.parse_config(serve.ServeConfig, ["--ckpt", str(ckpt), "--log=", "--device=cpu"]))

    with pytest.raises(NanofmError, match="nowhere"):
        start_up(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(resolve(base), broken)
    (broken / "model.pt").write_bytes(b"not weights")
    with pytest.raises(NanofmError, match="corrupt"):
        start_up(broken)
    assert (broken / "model.pt").read_bytes() == b"not weights"  # left as it was
