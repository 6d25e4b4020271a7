"""MinHash LSH against exact Jaccard and against datasketch; exact dedup; union-find clusters."""

import random

import numpy as np
import pytest

from nanofm.dedup import MinHasher, UnionFind, estimated_jaccard, exact_key, near_duplicate_clusters, word_ngrams

VOCAB = [f"w{i}" for i in range(5000)]


def mutate(words, rate, rng):
    return [rng.choice(VOCAB) if rng.random() < rate else w for w in words]


def jaccard(a, b):
    sa, sb = set(word_ngrams(a)), set(word_ngrams(b))
    return len(sa & sb) / len(sa | sb)


def make_pairs(n, low, high, seed):
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        base = [rng.choice(VOCAB) for _ in range(300)]
        other = mutate(base, rng.uniform(low, high), rng)
        a, b = " ".join(base), " ".join(other)
        pairs.append((a, b, jaccard(a, b)))
    return pairs


@pytest.fixture(scope="module")
def pairs():
    return make_pairs(400, 0.0, 0.03, seed=1) + make_pairs(400, 0.05, 0.25, seed=2)


def test_candidate_recall_follows_the_banding_curve(pairs):
    hasher = MinHasher()
    similar = [(a, b) for a, b, j in pairs if j >= 0.8]
    dissimilar = [(a, b) for a, b, j in pairs if j <= 0.5]
    assert len(similar) > 200 and len(dissimilar) > 200
    recall = np.mean([hasher.is_candidate(hasher.signature(a), hasher.signature(b)) for a, b in similar])
    false_rate = np.mean([hasher.is_candidate(hasher.signature(a), hasher.signature(b)) for a, b in dissimilar])
    assert recall >= 0.9, recall
    assert false_rate <= 0.05, false_rate


def test_signature_estimates_jaccard(pairs):
    hasher = MinHasher()
    errors = [abs(estimated_jaccard(hasher.signature(a), hasher.signature(b)) - j) for a, b, j in pairs[::4]]
    # the standard error of a 112-hash estimate is at most sqrt(0.25 / 112) = 0.047
    assert np.mean(errors) < 0.04 and np.max(errors) < 0.2


def test_agrees_with_datasketch(pairs):
    datasketch = pytest.importorskip("datasketch")

    def ds_signature(text):
        m = datasketch.MinHash(num_perm=112, seed=1)
        m.update_batch([" ".join(s).encode() for s in set(word_ngrams(text))])
        return m

    hasher = MinHasher()
    sample = pairs[::8]
    ours = np.array([estimated_jaccard(hasher.signature(a), hasher.signature(b)) for a, b, _ in sample])
    theirs = np.array([ds_signature(a).jaccard(ds_signature(b)) for a, b, _ in sample])
    exact = np.array([j for _, _, j in sample])
    assert np.corrcoef(ours, theirs)[0, 1] > 0.95
    assert abs(np.mean(np.abs(ours - exact)) - np.mean(np.abs(theirs - exact))) < 0.02

    # the same 14 x 8 banding in datasketch's LSH finds the same similar pairs
    lsh = datasketch.MinHashLSH(num_perm=112, params=(14, 8))
    similar = [(a, b) for a, b, j in pairs if j >= 0.8][:100]
    for i, (a, _) in enumerate(similar):
        lsh.insert(f"a{i}", ds_signature(a))
    ds_found = np.mean([f"a{i}" in lsh.query(ds_signature(b)) for i, (_, b) in enumerate(similar)])
    our_found = np.mean([hasher.is_candidate(hasher.signature(a), hasher.signature(b)) for a, b in similar])
    assert ds_found >= 0.9 and our_found >= 0.9 and abs(ds_found - our_found) <= 0.06


def test_clusters_keep_the_first_of_each_group():
    rng = random.Random(0)
    base1 = [rng.choice(VOCAB) for _ in range(200)]
    base2 = [rng.choice(VOCAB) for _ in range(200)]
    texts = [" ".join(base1), " ".join(base2), " ".join(base1[:-1] + ["changed"]), "unrelated words " * 3,
             " ".join(base2[1:]), " ".join(base1[:-2] + ["x", "y"])]
    hasher = MinHasher()
    roots = near_duplicate_clusters(np.stack([hasher.signature(t) for t in texts]), hasher)
    assert roots == [0, 1, 0, 3, 1, 0]


def test_documents_without_words_never_match():
    hasher = MinHasher()
    sigs = np.stack([hasher.signature(""), hasher.signature("!!!"), hasher.signature("some words here")])
    valid = sigs.min(axis=1) < 0xFFFFFFFF
    assert valid.tolist() == [False, False, True]
    assert near_duplicate_clusters(sigs, hasher, valid) == [0, 1, 2]


def test_signatures_are_stable_across_instances_and_order():
    text = "the same text gives the same signature in every process and run " * 3
    assert np.array_equal(MinHasher().signature(text), MinHasher().signature(text))
    assert not np.array_equal(MinHasher(seed=1).signature(text), MinHasher(seed=2).signature(text))


def test_exact_key_ignores_case_punctuation_and_spacing():
    assert exact_key("Hello,  World!\n") == exact_key("hello world")
    assert exact_key("hello world") != exact_key("hello there world")


def test_union_find():
    uf = UnionFind(5)
    uf.union(3, 4)
    uf.union(4, 1)
    assert [uf.find(i) for i in range(5)] == [0, 1, 2, 1, 1]


def test_bad_band_setup():
    with pytest.raises(ValueError, match="multiple of bands"):
        MinHasher(num_perm=100, bands=14)
