"""Labelled data for classification fine-tuning: built-in tasks, and user files.

    items, labels = load("sentiment", "data/default", split="train")   # [{"text": ..., "label": ...}], sorted labels
    load("domain", ...); load("quality", ...)                           # the other built-in tasks
    load("csv:reviews.csv", ...); load("jsonl:mine.jsonl", ...)          # text,label columns / fields
    load("sst2:sst2.jsonl", ...); load("imdb:imdb.jsonl", ...)           # the hub datasets' formats (tested offline)

Built-in tasks:
- `domain`: prose, code or chat, the curated corpus's documents (data/prepare.py's domains).
- `quality`: `real` prose from the curated corpus against `markov` pastiches, the 792 Markov-chain
  imitations of novels shipped in the markov-draftjs package (fluent-looking nonsense). Doubt: the
  real prose is Shakespeare and the Python reference, the pastiches are novels, so style separates
  them as much as quality does.
- `sentiment`: sentences made from the VADER lexicon (vaderSentiment's vader_lexicon.txt, 7.5k
  words with human valence ratings): a word rated >= 1.5 or <= -1.5 in a template, sometimes
  after an intensifier ("very"), sometimes negated ("not"), which flips the label. A fifth of the
  words (by hash) appear only in the test split, so the test asks about words never seen in
  training.

Design decisions:
- Splits are stable hashes (of a document's root id, a pastiche's index, a lexicon word), a tenth
  held out (a fifth of the sentiment words), so train and test never share a source.
- Texts are cut to about 600 characters: a classifier reads the first tokens up to its context.
- User data: every row needs a text and a label; labels seen only in the test split, a single
  class, or an empty file are errors naming the file.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from nanofm.common import NanofmError

TASKS = ("domain", "quality", "sentiment")
FORMATS = ("csv", "jsonl", "sst2", "imdb")
TEXT_CHARS = 600


class LabelError(NanofmError, ValueError):
    pass


def _hash_split(key: str, seed: int, held_out: float) -> str:
    from nanofm.sources import stable_hash

    return "test" if stable_hash(f"labels:{seed}:{key}") % 1000 < held_out * 1000 else "train"


def _curated(data_dir: str | Path) -> list[dict]:
    from nanofm.tasks import val_docs

    val_docs(data_dir)  # checks the directory (the message says how to make it)
    with open(Path(data_dir) / "curated.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def domain(data_dir, split: str, seed: int = 0) -> list[dict]:
    return [{"text": d["text"][:TEXT_CHARS], "label": d["domain"]} for d in _curated(data_dir)
            if d.get("domain") in ("prose", "code", "chat")
            and _hash_split(d.get("meta", {}).get("root_id", d["id"]), seed, 0.1) == split]


def _chunks(text: str, size: int = TEXT_CHARS) -> list[str]:
    """Whole paragraphs gathered into pieces of about `size` characters."""
    pieces, current = [], ""
    for paragraph in (p.strip() for p in text.split("\n\n")):
        if paragraph:
            current = f"{current}\n\n{paragraph}" if current else paragraph
            if len(current) >= size:
                pieces.append(current[:size])
                current = ""
    return pieces


def quality(data_dir, split: str, seed: int = 0) -> list[dict]:
    from nanofm.sources import package_files

    real = [{"text": piece, "label": "real"} for d in _curated(data_dir) if d.get("domain") == "prose"
            and _hash_split(d.get("meta", {}).get("root_id", d["id"]), seed, 0.1) == split for piece in _chunks(d["text"])]
    (path,) = package_files("markov-draftjs", "markov_draftjs/", "content.json")
    pastiches = []
    for i, doc in enumerate(json.loads(path.read_text("utf-8"))):
        if _hash_split(f"markov{i}", seed, 0.1) == split:
            text = "\n\n".join(block["text"] for block in doc.get("blocks", []) if block.get("text", "").strip())
            pastiches += [{"text": piece, "label": "markov"} for piece in _chunks(text)]
    return real + pastiches


TEMPLATES = ["The movie was {w}.", "I found the service {w}.", "What a {w} day it has been.", "Honestly, it felt {w}.",
             "The food here is {w}.", "My week was {w}.", "That song sounds {w}.", "Everyone said the book was {w}."]
INTENSIFIERS = ["very", "really", "extremely", "quite"]


def lexicon() -> dict[str, float]:
    from nanofm.sources import package_files

    (path,) = package_files("vaderSentiment", "vaderSentiment/", "vader_lexicon.txt")
    words = {}
    for line in path.read_text("utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0].isalpha():  # words, not emoticons
            words[parts[0]] = float(parts[1])
    return words


def sentiment(data_dir, split: str, seed: int = 0, per_word: int = 2) -> list[dict]:
    rng = random.Random(f"{seed}:sentiment:{split}")
    items = []
    for word, valence in sorted(lexicon().items()):
        if abs(valence) < 1.5 or _hash_split(word, seed, 0.2) != split:
            continue
        for _ in range(per_word):
            negated, phrase = rng.random() < 0.3, word
            if rng.random() < 0.3:
                phrase = f"{rng.choice(INTENSIFIERS)} {word}"
            if negated:
                phrase = f"not {phrase}"
            positive = (valence > 0) != negated
            items.append({"text": rng.choice(TEMPLATES).format(w=phrase), "label": "positive" if positive else "negative"})
    return items


BUILTIN = {"domain": domain, "quality": quality, "sentiment": sentiment}


def read_file(kind: str, path: str | Path) -> list[dict]:
    """Rows of a user file as {"text", "label"}: csv/jsonl with text and label; sst2 (sentence,
    label 0/1) and imdb (text, label 0/1) as negative/positive."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path} does not exist")
    if kind == "csv":
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    else:
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise LabelError(f"{path} line {number} is not valid JSON ({exc})") from None
    text_field = "sentence" if kind == "sst2" else "text"
    items = []
    for number, row in enumerate(rows, 1):
        text, label = (row.get(text_field), row.get("label")) if isinstance(row, dict) else (None, None)
        if not isinstance(text, str) or not text.strip() or label in (None, ""):
            raise LabelError(f"{path} row {number} needs a non-empty {text_field!r} and a 'label'")
        if kind in ("sst2", "imdb"):
            if str(label) not in ("0", "1"):
                raise LabelError(f"{path} row {number}: {kind} labels are 0 (negative) or 1 (positive), got {label!r}")
            label = ("negative", "positive")[int(label)]
        items.append({"text": text, "label": str(label)})
    if not items:
        raise LabelError(f"{path} holds no labelled rows")
    return items


def load(spec: str, data_dir: str | Path, split: str = "train", seed: int = 0) -> tuple[list[dict], list[str]]:
    """(items of the split, the task's sorted labels). spec: a built-in task, or FORMAT:PATH."""
    if split not in ("train", "test"):
        raise LabelError(f"split must be train or test, got {split!r}")
    if spec in BUILTIN:
        train = BUILTIN[spec](data_dir, "train", seed)
        items = train if split == "train" else BUILTIN[spec](data_dir, "test", seed)
    else:
        kind, sep, path = spec.partition(":")
        if not sep or kind not in FORMATS:
            raise LabelError(f"unknown labelled data {spec!r}: a built-in task ({', '.join(TASKS)}) or FORMAT:PATH "
                             f"with FORMAT one of {', '.join(FORMATS)}")
        rows = read_file(kind, path)
        train = [r for r in rows if _hash_split(r["text"], seed, 0.1) == "train"]
        items = train if split == "train" else [r for r in rows if _hash_split(r["text"], seed, 0.1) == "test"]
    labels = sorted({item["label"] for item in train})
    if len(labels) < 2:
        raise LabelError(f"{spec}: a classifier needs at least two classes; the training rows have {labels}")
    unseen = sorted({item["label"] for item in items} - set(labels))
    if unseen:
        raise LabelError(f"{spec}: the test rows have labels the training rows never have: {unseen}")
    if not items:
        raise LabelError(f"{spec}: the {split} split is empty")
    return items, labels
