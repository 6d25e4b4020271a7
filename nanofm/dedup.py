"""Exact and near-duplicate removal: a hash of normalised text, and MinHash LSH from scratch.

Near dedup follows FineWeb: shingles are word 5-grams of normalised text (lowercase, no
punctuation, collapsed whitespace); each document gets a signature of 112 MinHash values, cut
into 14 bands of 8 rows; two documents whose signatures agree on every row of any band are
candidate duplicates; candidates are joined into clusters with union-find and one document per
cluster is kept (the first seen). The chance that a pair with Jaccard similarity s becomes a
candidate is 1 - (1 - s^8)^14: 92% at s = 0.8, 5% at s = 0.5.

Design decisions (why it is fast in numpy):
- a word is hashed once (crc32, the same in every process), a 5-gram's hash combines its five
  word hashes with multiply-add in uint64 arithmetic, then a splitmix64 finaliser mixes it;
- the 112 "permutations" are multiply-shift hashes h_k(x) = (a_k * x + b_k) mod 2^64 >> 32 with
  random odd a_k: one multiply and one add per shingle and permutation, all vectorised,
  instead of datasketch's per-shingle SHA-1 and modulo-prime arithmetic;
- banding groups equal band rows with np.unique on a byte view, not a Python dict per band.

Run `python bench.py data` to compare with datasketch on the built-in corpus.
"""

from __future__ import annotations

import hashlib
import string
import zlib

import numpy as np
from nanofm.common import ConfigError

# punctuation becomes a space (str.translate is 2x faster than a regex here); "_" stays, as in \w
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation.replace("_", "") + "“”‘’–—…«»„‚‹›¡¿·•"})


def normalise_for_dedup(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def exact_key(text: str) -> str:
    """Exact-duplicate key: a hash of the normalised text (case, punctuation, spacing ignored)."""
    return hashlib.blake2b(normalise_for_dedup(text).encode("utf-8"), digest_size=16).hexdigest()


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def word_ngrams(text: str, n: int = 5) -> list[tuple[str, ...]]:
    """The shingles, as tuples of words (used by the tests and by the datasketch comparison)."""
    words = normalise_for_dedup(text).split()
    if len(words) < n:
        return [tuple(words)] if words else []
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


class MinHasher:
    def __init__(self, num_perm: int = 112, bands: int = 14, ngram: int = 5, seed: int = 1234):
        if num_perm % bands:
            raise ConfigError(f"num_perm ({num_perm}) must be a multiple of bands ({bands})")
        rng = np.random.default_rng(seed)
        self.num_perm, self.bands, self.rows, self.ngram = num_perm, bands, num_perm // bands, ngram
        self.a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.mix = rng.integers(1, 2**63, size=ngram, dtype=np.uint64) * np.uint64(2) + np.uint64(1)

    def shingle_hashes(self, text: str) -> np.ndarray:
        words = normalise_for_dedup(text).split()
        if not words:
            return np.zeros(0, dtype=np.uint64)
        h = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words), dtype=np.uint64, count=len(words))
        n = min(self.ngram, len(words))
        count = len(words) - n + 1
        combined = np.zeros(count, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for i in range(n):
                combined = combined * np.uint64(0x100000001B3) + h[i:i + count] * self.mix[i]
        return _splitmix64(combined)

    def signature(self, text: str, block: int = 8192) -> np.ndarray:
        """112 uint32 MinHash values; all 0xFFFFFFFF for a text without words."""
        shingles = self.shingle_hashes(text)
        if not len(shingles):
            return np.full(self.num_perm, 0xFFFFFFFF, dtype=np.uint32)
        signature = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        buffer = np.empty((min(block, len(shingles)), self.num_perm), dtype=np.uint64)
        for start in range(0, len(shingles), block):  # bounded memory for huge documents
            x = shingles[start:start + block, None]
            out = buffer[:len(x)]
            np.multiply(x, self.a[None, :], out=out)  # in place: no temporaries, wraps mod 2^64
            np.add(out, self.b[None, :], out=out)
            np.minimum(signature, out.min(axis=0), out=signature)
        # >> 32 is monotonic, so the min of the top 32 bits is the top 32 bits of the min
        return (signature >> np.uint64(32)).astype(np.uint32)

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """[docs, bands] integer ids; equal ids within a band column mean identical band rows."""
        keys = np.empty((len(signatures), self.bands), dtype=np.int64)
        for band in range(self.bands):
            rows = np.ascontiguousarray(signatures[:, band * self.rows:(band + 1) * self.rows])
            view = rows.view(np.dtype((np.void, rows.dtype.itemsize * self.rows))).ravel()
            keys[:, band] = np.unique(view, return_inverse=True)[1].ravel()
        return keys

    def is_candidate(self, sig_a: np.ndarray, sig_b: np.ndarray) -> bool:
        equal = (sig_a == sig_b).reshape(self.bands, self.rows)
        return bool(equal.all(axis=1).any())


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:  # the smaller index becomes the root, so the first document is kept
            self.parent[max(ri, rj)] = min(ri, rj)


def near_duplicate_clusters(signatures: np.ndarray, hasher: MinHasher, valid: np.ndarray | None = None) -> list[int]:
    """For each document, the index of the document it duplicates (itself if it is kept).

    `valid` marks documents that take part (documents without words never match anything)."""
    n = len(signatures)
    union_find = UnionFind(n)
    if n:
        valid = np.ones(n, dtype=bool) if valid is None else valid
        keys = hasher.band_keys(signatures)
        index = np.flatnonzero(valid)
        for band in range(hasher.bands):
            column = keys[index, band]
            order = np.argsort(column, kind="stable")
            same = column[order][1:] == column[order][:-1]
            for left, right in zip(index[order][:-1][same], index[order][1:][same]):
                union_find.union(int(left), int(right))
    return [union_find.find(i) for i in range(n)]
