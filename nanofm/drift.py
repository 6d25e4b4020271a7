"""Drift statistics, from scratch (numpy): is what the model sees now different from what it was
built on? Each is tested against scipy or scikit-learn.

    js_distance(ref_counts, cur_counts)        Jensen-Shannon distance of two histograms (natural log, as scipy)
    js_permutation_p_value(ref_docs, cur_docs) how likely that distance is by chance (few short documents: large)
    psi(ref_values, cur_values)                population stability index, on the reference's deciles
    psi_p_value(ref_values, cur_values)        how likely that PSI is by chance (small samples have large PSI)
    ks_2samp(a, b)                             Kolmogorov-Smirnov statistic and p-value
    chi2_homogeneity(ref_counts, cur_counts)   chi-square test that two samples share categories' shares
    wasserstein(a, b)                          earth mover's distance of two 1-D samples
    domain_classifier_auc(ref_docs, cur_docs)  how well a classifier tells the two apart (0.5 = not at all)
    column_drift(ref, cur, kind)               Evidently's default test for a column, with its verdict

Design decisions:
- Thresholds and tests follow Evidently's defaults (REFERENCES.md), so a reader can compare:
  a numerical column with <= 1000 reference rows gets KS at p < 0.05, more rows the Wasserstein
  distance divided by the reference's standard deviation >= 0.1; a categorical column gets
  chi-square at p < 0.05, or Jensen-Shannon >= 0.1. PSI >= 0.1 is drift, >= 0.25 large.
- p-values without scipy: KS uses the asymptotic Kolmogorov distribution (with Stephens'
  small-sample correction), chi-square the regularised incomplete gamma function (series and
  continued fraction, Numerical Recipes 6.2). Doubt: for tiny samples scipy's exact KS differs in
  the third decimal; the tests bound that.
- The domain classifier is logistic regression on hashed bag-of-words features, trained on half
  of each side and scored (ROC AUC) on the other half. Its alarm needs both AUC > 0.55 (Evidently's
  default) and a permutation p-value < 0.05 (the held-out labels shuffled 100 times), so a small
  window cannot alarm by luck more than 5% of the time.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter

import numpy as np

from nanofm.metrics import roc_auc

EPS = 1e-4  # the share given to an empty bin (PSI, JS): a category never seen is rare, not impossible


# ------------------------------------------------------------------ distances between histograms

def _shares(ref_counts: dict, cur_counts: dict) -> tuple[np.ndarray, np.ndarray]:
    keys = sorted(set(ref_counts) | set(cur_counts), key=str)
    p = np.array([ref_counts.get(k, 0) for k in keys], dtype=np.float64)
    q = np.array([cur_counts.get(k, 0) for k in keys], dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("both histograms need at least one count")
    return p / p.sum(), q / q.sum()


def js_distance(ref_counts: dict, cur_counts: dict) -> float:
    """sqrt of the Jensen-Shannon divergence (natural log) between two histograms {value: count}:
    0 for the same shares, at most sqrt(ln 2) = 0.83 for disjoint ones."""
    p, q = _shares(ref_counts, cur_counts)
    m = (p + q) / 2

    def kl(a, b):
        mask = a > 0
        return float(np.sum(a[mask] * np.log(a[mask] / b[mask])))
    return math.sqrt(max(0.0, (kl(p, m) + kl(q, m)) / 2))


def js_permutation_p_value(reference: list[Counter], current: list[Counter], shuffles: int = 100, seed: int = 0) -> float:
    """How often the documents, dealt at random into two groups of the same sizes, are at least as far
    apart (Jensen-Shannon) as the real groups: a permutation p-value. Needed because few short
    documents have a large JS distance by chance (50 chat prompts against 50 others: about 0.55)."""
    rng = np.random.default_rng(seed)
    docs, n = list(reference) + list(current), len(reference)

    def distance(order):
        left, right = Counter(), Counter()
        for i in order[:n]:
            left.update(docs[i])
        for i in order[n:]:
            right.update(docs[i])
        return js_distance(left, right)
    observed = distance(np.arange(len(docs)))
    null = [distance(rng.permutation(len(docs))) for _ in range(shuffles)]
    return (1 + sum(d >= observed for d in null)) / (1 + shuffles)


def psi(reference, current, bins: int = 10) -> float:
    """Population stability index: sum over bins of (cur% - ref%) * ln(cur% / ref%), the bins being
    the reference's quantiles (equal shares of the reference; ties merge bins)."""
    reference, current = np.asarray(reference, dtype=np.float64), np.asarray(current, dtype=np.float64)
    if len(reference) == 0 or len(current) == 0:
        raise ValueError("PSI needs values on both sides")
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    ref = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1) / len(reference)
    cur = np.bincount(np.searchsorted(edges, current, side="right"), minlength=len(edges) + 1) / len(current)
    ref, cur = np.maximum(ref, EPS), np.maximum(cur, EPS)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def psi_p_value(reference, current, bins: int = 10) -> float:
    """How likely a PSI this large is between two samples of one distribution: PSI is a symmetric
    KL divergence, and n m / (n + m) x PSI is asymptotically chi-square with (bins - 1) degrees of
    freedom (Yurdakul 2018). Small samples have large PSI by chance; this says how large."""
    n, m = len(reference), len(current)
    edges = np.unique(np.quantile(np.asarray(reference, dtype=np.float64), np.linspace(0, 1, bins + 1)[1:-1]))
    return chi2_sf(psi(reference, current, bins) * n * m / (n + m), len(edges))


def wasserstein(a, b) -> float:
    """The 1-D earth mover's distance: the area between the two empirical CDFs."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    values = np.sort(np.concatenate([a, b]))
    widths = np.diff(values)
    cdf_a = np.searchsorted(a, values[:-1], side="right") / len(a)
    cdf_b = np.searchsorted(b, values[:-1], side="right") / len(b)
    return float(np.sum(np.abs(cdf_a - cdf_b) * widths))


# ------------------------------------------------------------------ tests with p-values

def kolmogorov_sf(x: float) -> float:
    """P(K > x) for the Kolmogorov distribution: 2 sum_k (-1)^(k-1) exp(-2 k^2 x^2)."""
    if x <= 0:
        return 1.0
    if x < 0.2:  # the alternating series converges slowly here; the value is 1 to double precision
        return 1.0
    total = sum((-1) ** (k - 1) * math.exp(-2 * k * k * x * x) for k in range(1, 101))
    return min(1.0, max(0.0, 2 * total))


def ks_2samp(a, b) -> tuple[float, float]:
    """Two-sided two-sample KS: (D = the largest gap between the empirical CDFs, p-value)."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        raise ValueError("KS needs values on both sides")
    values = np.concatenate([a, b])
    d = float(np.max(np.abs(np.searchsorted(a, values, side="right") / n - np.searchsorted(b, values, side="right") / m)))
    en = math.sqrt(n * m / (n + m))
    return d, kolmogorov_sf((en + 0.12 + 0.11 / en) * d)  # Stephens' correction for finite samples


def _gamma_q(a: float, x: float) -> float:
    """The regularised upper incomplete gamma function Q(a, x) = Gamma(a, x) / Gamma(a)."""
    if x <= 0:
        return 1.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:  # the series for P converges fast here
        term = total = 1.0 / a
        ap = a
        for _ in range(1000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    # Lentz's continued fraction for Q
    tiny = 1e-300
    b, c, d = x + 1 - a, 1 / tiny, 1 / (x + 1 - a)
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return min(1.0, math.exp(log_front) * h)


def chi2_sf(statistic: float, dof: int) -> float:
    return _gamma_q(dof / 2, statistic / 2)


def chi2_homogeneity(ref_counts: dict, cur_counts: dict) -> tuple[float, float, int]:
    """Chi-square test that the two samples come from one categorical distribution: (statistic,
    p-value, degrees of freedom) of the 2 x k table (no continuity correction)."""
    keys = sorted(set(ref_counts) | set(cur_counts), key=str)
    table = np.array([[ref_counts.get(k, 0) for k in keys], [cur_counts.get(k, 0) for k in keys]], dtype=np.float64)
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        return 0.0, 1.0, 0  # one category on both sides: nothing can differ
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    statistic = float(np.sum((table - expected) ** 2 / expected))
    dof = table.shape[1] - 1
    return statistic, chi2_sf(statistic, dof), dof


# ------------------------------------------------------------------ domain classifier

WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def hashed_features(docs: list[str], dim: int = 2048) -> np.ndarray:
    """Bag of words and punctuation, hashed into `dim` buckets (crc32: the same in every process),
    log-scaled and L2-normalised per document."""
    x = np.zeros((len(docs), dim), dtype=np.float64)
    for i, doc in enumerate(docs):
        for token, count in Counter(WORD.findall(doc.lower())).items():
            x[i, zlib.crc32(token.encode()) % dim] += 1 + math.log(count)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _logistic_regression(x: np.ndarray, y: np.ndarray, steps: int = 200, lr: float = 0.5, l2: float = 1e-3):
    """Full-batch gradient descent on the mean log loss (+ L2): (weights, bias)."""
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(x @ w + b)))
        grad = p - y
        w -= lr * (x.T @ grad / len(y) + l2 * w)
        b -= lr * float(grad.mean())
    return w, b


def domain_classifier_auc(reference: list[str], current: list[str], seed: int = 0, shuffles: int = 100) -> dict:
    """Train a classifier to tell current documents (1) from reference ones (0) on half of each,
    score the other half: {"auc", "p_value" (the share of label shufflings that score as well),
    "drifted" (auc > 0.55 and p_value < 0.05)}. 0.5 = indistinguishable, 1 = entirely different."""
    if len(reference) < 4 or len(current) < 4:
        raise ValueError("the domain classifier needs at least 4 documents on each side")
    rng = np.random.default_rng(seed)
    x = hashed_features(list(reference) + list(current))
    y = np.array([0.0] * len(reference) + [1.0] * len(current))
    train = np.zeros(len(y), dtype=bool)
    for label in (0, 1):  # half of each side trains, the other half is scored
        members = np.flatnonzero(y == label)
        train[rng.permutation(members)[:len(members) // 2]] = True
    w, b = _logistic_regression(x[train], y[train])
    scores, held = x[~train] @ w + b, y[~train]
    auc = roc_auc(held.tolist(), scores.tolist())
    # a permutation test: how often do shuffled labels score as well? (+1 on both sides: a valid
    # p-value, P(p <= 0.05) <= 5% when the two sides are the same distribution)
    null = [roc_auc(rng.permutation(held).tolist(), scores.tolist()) for _ in range(shuffles)]
    p_value = (1 + sum(n >= auc for n in null)) / (1 + shuffles)
    return {"auc": auc, "p_value": p_value, "drifted": bool(auc > 0.55 and p_value < 0.05)}


# ------------------------------------------------------------------ Evidently's default per column

def column_drift(reference, current, kind: str, threshold: float | None = None) -> dict:
    """The verdict on one column, with Evidently's default test for its kind and size:
    kind "num": KS p-value < 0.05 (<= 1000 reference rows) or normed Wasserstein >= 0.1;
    kind "cat": chi-square p-value < 0.05 (<= 1000 rows) or Jensen-Shannon >= 0.1.
    Returns {"method", "value", "threshold", "drifted"}; `threshold` overrides the default."""
    reference, current = list(reference), list(current)
    if not reference or not current:
        raise ValueError("a drift test needs values on both sides")
    small = len(reference) <= 1000
    if kind == "num":
        if small:
            _, p = ks_2samp(reference, current)
            method, value, limit, drifted = "ks_p_value", p, threshold or 0.05, None
            drifted = value < limit
        else:
            scale = float(np.std(reference)) or 1.0
            method, value, limit = "wasserstein_normed", wasserstein(reference, current) / scale, threshold or 0.1
            drifted = value >= limit
    elif kind == "cat":
        ref_counts, cur_counts = Counter(reference), Counter(current)
        if small:
            _, p, _ = chi2_homogeneity(ref_counts, cur_counts)
            method, value, limit = "chi2_p_value", p, threshold or 0.05
            drifted = value < limit
        else:
            method, value, limit = "jensen_shannon", js_distance(ref_counts, cur_counts), threshold or 0.1
            drifted = value >= limit
    else:
        raise ValueError(f"kind must be 'num' or 'cat', not {kind!r}")
    return {"method": method, "value": float(value), "threshold": limit, "drifted": bool(drifted)}
