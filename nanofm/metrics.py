"""Evaluation metrics, written from scratch and checked against the reference libraries.

    accuracy(y_true, y_pred)
    precision_recall_f1(y_true, y_pred, average="macro", zero_division=0)    # as scikit-learn
    confusion_matrix(y_true, y_pred)
    roc_auc(y_true, scores)                      # as sklearn.metrics.roc_auc_score (binary)
    corpus_bleu(hypotheses, [references])        # as sacrebleu.corpus_bleu: 13a, exp smoothing, 0-100
    rouge(target, prediction)                    # as rouge_score.RougeScorer: rouge1/2/L/Lsum P, R, F
    exact_match(predictions, references)         # SQuAD-style normalised string equality
    paired_difference(before, after, groups)     # a gain on the same items, with its standard error
    sliding_window_nll(model, docs, stride=...)  # -> perplexity(...) and bits_per_byte(...)

Design decisions:
- Each function follows its reference's semantics exactly, edge cases included (the tests compare
  on random and tricky inputs): scikit-learn's labels (sorted union of true and predicted), its
  `zero_division` (a number, "warn" = 0, or nan that averages skip), F1 computed as
  2 tp / (2 tp + fp + fn) so that F is 0 whenever tp is 0 but something was predicted or true;
  sacrebleu's closest reference length (ties to the shorter), `None` references skipped, the
  hypothesis and reference right-stripped before tokenising, the early 0 when nothing matches;
  rouge-score's tokeniser (lowercase, every run of characters other than a-z and 0-9 is a
  separator, so "café" is "caf"), its LCS backtracking order and its summary-level union LCS
  (sentences split on newlines) for ROUGE-Lsum.
- Porter stemming for ROUGE comes from nltk (a well-kept implementation; the lesson here is ROUGE,
  not stemming) and is only imported when asked for.
- Perplexity = exp(sum NLL / sum tokens) and bits per byte = sum NLL / (ln 2 * UTF-8 bytes), both
  summed over the whole dataset, never averaged per document. A document longer than the context
  is scored with a sliding window: every token is predicted exactly once, each with at least
  context - stride tokens of history (Hugging Face's strided perplexity).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Sequence

import torch

# ------------------------------------------------------------------ classification


def _check_pair(y_true, y_pred):
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    if not len(y_true):
        raise ValueError("no labels to score: y_true and y_pred are empty")


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    _check_pair(y_true, y_pred)
    return sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)


def confusion_matrix(y_true: Sequence, y_pred: Sequence, labels: Sequence | None = None) -> list[list[int]]:
    """counts[i][j] = examples of true label i predicted as j (labels sorted, or as given; pairs
    with a label outside `labels` are left out)."""
    _check_pair(y_true, y_pred)
    labels = list(labels) if labels is not None else sorted(set(y_true) | set(y_pred))
    index = {label: i for i, label in enumerate(labels)}
    counts = [[0] * len(labels) for _ in labels]
    for t, p in zip(y_true, y_pred):
        if t in index and p in index:
            counts[index[t]][index[p]] += 1
    return counts


def _zero_division_value(zero_division) -> float:
    if zero_division == "warn":
        return 0.0
    if isinstance(zero_division, float) and math.isnan(zero_division) or zero_division in (0, 1):
        return float(zero_division)
    raise ValueError(f'zero_division must be "warn", 0, 1 or nan, got {zero_division!r}')


def precision_recall_f1(y_true: Sequence, y_pred: Sequence, average: str | None = "binary", pos_label=1,
                        labels: Sequence | None = None, zero_division="warn") -> dict:
    """Precision, recall and F1 as scikit-learn's precision_recall_fscore_support (beta 1).

    average: "binary" (pos_label only), "micro" (pooled counts), "macro" (mean over labels),
    "weighted" (mean weighted by true counts), or None (one value per label, with support)."""
    _check_pair(y_true, y_pred)
    if average not in ("binary", "micro", "macro", "weighted", None):
        raise ValueError(f"average must be binary, micro, macro, weighted or None, got {average!r}")
    zero = _zero_division_value(zero_division)
    present = sorted(set(y_true) | set(y_pred))
    if average == "binary":
        if len(present) > 2:
            raise ValueError(f"average='binary' needs at most 2 labels, got {len(present)}: {present[:5]}; "
                             f"choose micro, macro or weighted")
        if pos_label not in present and len(present) >= 2:
            raise ValueError(f"pos_label={pos_label!r} is not a valid label; it should be one of {present}")
        labels = [pos_label]
    elif labels is None:
        labels = present
    labels = list(labels)
    tp = [sum(t == label and p == label for t, p in zip(y_true, y_pred)) for label in labels]
    predicted = [sum(p == label for p in y_pred) for label in labels]
    true = [sum(t == label for t in y_true) for label in labels]
    if average == "micro":
        tp, predicted, true = [sum(tp)], [sum(predicted)], [sum(true)]

    def divide(num, den):
        return [n / d if d else zero for n, d in zip(num, den)]

    precision, recall = divide(tp, predicted), divide(tp, true)
    f1 = divide([2 * x for x in tp], [t + p for t, p in zip(true, predicted)])
    if average is None:
        return {"labels": labels, "precision": precision, "recall": recall, "f1": f1, "support": true}
    weights = true if average == "weighted" else None
    return {"precision": _nan_average(precision, weights), "recall": _nan_average(recall, weights),
            "f1": _nan_average(f1, weights), "support": None}


def _nan_average(values: list[float], weights: list[int] | None) -> float:
    """Mean (weighted) that skips nan values; all weights zero falls back to the plain mean."""
    keep = [i for i, v in enumerate(values) if not math.isnan(v)]
    if not keep:
        return math.nan
    if weights is not None and sum(weights[i] for i in keep) > 0:
        return sum(values[i] * weights[i] for i in keep) / sum(weights[i] for i in keep)
    return sum(values[i] for i in keep) / len(keep)


def classification_report(y_true: Sequence, y_pred: Sequence, zero_division=0) -> dict:
    """Accuracy, macro / weighted / micro P-R-F1, per-label scores and the confusion matrix."""
    labels = sorted(set(y_true) | set(y_pred))
    per = precision_recall_f1(y_true, y_pred, average=None, zero_division=zero_division)
    report = {"accuracy": accuracy(y_true, y_pred), "labels": labels,
              "confusion_matrix": confusion_matrix(y_true, y_pred, labels),
              "per_label": {str(label): {k: per[k][i] for k in ("precision", "recall", "f1", "support")}
                            for i, label in enumerate(labels)}}
    for average in ("macro", "weighted", "micro"):
        scores = precision_recall_f1(y_true, y_pred, average=average, zero_division=zero_division)
        report.update({f"{k}_{average}": scores[k] for k in ("precision", "recall", "f1")})
    return report


# ------------------------------------------------------------------ BLEU

_BLEU_RULES = [  # mteval-v13a's tokenisation, after the language-independent part
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation and symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma unless after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period and comma unless before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
]


def tokenize_13a(line: str) -> list[str]:
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, replacement in _BLEU_RULES:
        line = pattern.sub(replacement, line)
    return line.split()


def _ngrams(tokens: list[str], max_n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str | None]], lowercase: bool = False,
                max_n: int = 4) -> dict:
    """Corpus BLEU (0-100) as sacrebleu.corpus_bleu(hypotheses, references): `references` is a list
    of reference streams, each parallel to the hypotheses (None = no reference there)."""
    if isinstance(references, str) or (references and isinstance(references[0], str)):
        raise ValueError("references must be a list of reference streams: corpus_bleu(hyps, [refs])")
    for k, stream in enumerate(references):
        if len(stream) != len(hypotheses):
            raise ValueError(f"reference stream {k} has {len(stream)} segments but there are {len(hypotheses)} hypotheses")

    def prepare(text: str) -> list[str]:
        return tokenize_13a((text.lower() if lowercase else text).rstrip())

    correct, total, sys_len, ref_len = [0] * max_n, [0] * max_n, 0, 0
    for i, hyp in enumerate(hypotheses):
        refs = [prepare(stream[i]) for stream in references if stream[i] is not None]
        ref_counts = Counter()
        for ref in refs:
            for gram, count in _ngrams(ref, max_n).items():
                ref_counts[gram] = max(ref_counts[gram], count)
        hyp_tokens = prepare(hyp)
        sys_len += len(hyp_tokens)
        # the closest reference length; a tie goes to the shorter reference
        ref_len += min((abs(len(r) - len(hyp_tokens)), len(r)) for r in refs)[1] if refs else 0
        for gram, count in _ngrams(hyp_tokens, max_n).items():
            total[len(gram) - 1] += count
            correct[len(gram) - 1] += min(count, ref_counts.get(gram, 0))
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0)
    precisions = [0.0] * max_n
    if any(correct):
        smooth = 1.0
        for n in range(max_n):
            if total[n] == 0:
                break
            if correct[n] == 0:  # "exp" smoothing (NIST): 1 / 2^k for the k-th order with no match
                smooth *= 2
                precisions[n] = 100.0 / (smooth * total[n])
            else:
                precisions[n] = 100.0 * correct[n] / total[n]
        log_mean = sum(math.log(p) if p > 0 else -9999999999 for p in precisions) / max_n
        score = bp * math.exp(log_mean)
    else:
        score = 0.0
    return {"score": score, "precisions": precisions, "bp": bp, "sys_len": sys_len, "ref_len": ref_len,
            "counts": correct, "totals": total}


# ------------------------------------------------------------------ ROUGE

_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")
_VALID_TOKEN = re.compile(r"^[a-z0-9]+$")


def rouge_tokenize(text: str, stem: bool = False) -> list[str]:
    tokens = re.split(r"\s+", _NON_ALPHANUMERIC.sub(" ", text.lower()))
    if stem:
        stemmer = _porter()
        tokens = [stemmer.stem(t) if len(t) > 3 else t for t in tokens]  # rouge-score stems words of 4+ letters
    return [t for t in tokens if _VALID_TOKEN.match(t)]


_STEMMER = []


def _porter():
    if not _STEMMER:
        try:
            from nltk.stem import porter
        except ImportError:
            raise ImportError("ROUGE with stemming needs nltk's Porter stemmer: pip install nltk") from None
        _STEMMER.append(porter.PorterStemmer())
    return _STEMMER[0]


def _prf(overlap: int, predicted: int, target: int) -> dict:
    precision, recall = overlap / max(predicted, 1), overlap / max(target, 1)
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "fmeasure": f}


def _lcs_table(a: list[str], b: list[str]) -> list[list[int]]:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
    return table


def _lcs_indices(ref: list[str], cand: list[str]) -> list[int]:
    """Indices into ref of one longest common subsequence (rouge-score's backtracking order)."""
    table, i, j, picked = _lcs_table(ref, cand), len(ref), len(cand), []
    while i > 0 and j > 0:
        if ref[i - 1] == cand[j - 1]:
            picked.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return picked[::-1]


def _rouge_lsum(target: str, prediction: str, stem: bool) -> dict:
    """Summary-level LCS: for each reference sentence, the union of its LCS with every candidate
    sentence; a token counts once only while both sides still have it."""
    refs = [rouge_tokenize(s, stem) for s in target.split("\n") if s]
    cands = [rouge_tokenize(s, stem) for s in prediction.split("\n") if s]
    m, n = sum(map(len, refs)), sum(map(len, cands))
    if not refs or not cands or not m or not n:
        return {"precision": 0.0, "recall": 0.0, "fmeasure": 0.0}
    left_ref, left_cand = Counter(t for s in refs for t in s), Counter(t for s in cands for t in s)
    hits = 0
    for ref in refs:
        union = sorted(set().union(*[_lcs_indices(ref, cand) for cand in cands]))
        for token in (ref[i] for i in union):
            if left_cand[token] > 0 and left_ref[token] > 0:
                hits += 1
                left_cand[token] -= 1
                left_ref[token] -= 1
    return _prf(hits, n, m)


def rouge(target: str, prediction: str, types: Sequence[str] = ("rouge1", "rouge2", "rougeL", "rougeLsum"),
          stem: bool = False) -> dict:
    """{type: {precision, recall, fmeasure}} as rouge_score.RougeScorer(types, use_stemmer=stem).score(target, prediction)."""
    target_tokens, prediction_tokens = rouge_tokenize(target, stem), rouge_tokenize(prediction, stem)
    scores = {}
    for kind in types:
        if kind == "rougeL":
            if not target_tokens or not prediction_tokens:
                scores[kind] = {"precision": 0.0, "recall": 0.0, "fmeasure": 0.0}
            else:
                lcs = _lcs_table(target_tokens, prediction_tokens)[-1][-1]
                scores[kind] = _prf(lcs, len(prediction_tokens), len(target_tokens))
        elif kind == "rougeLsum":
            scores[kind] = _rouge_lsum(target, prediction, stem)
        elif re.fullmatch(r"rouge[1-9]", kind):
            n = int(kind[5:])
            t = Counter(tuple(target_tokens[i:i + n]) for i in range(len(target_tokens) - n + 1))
            p = Counter(tuple(prediction_tokens[i:i + n]) for i in range(len(prediction_tokens) - n + 1))
            scores[kind] = _prf(sum(min(c, p[g]) for g, c in t.items()), sum(p.values()), sum(t.values()))
        else:
            raise ValueError(f"unknown ROUGE type {kind!r}: use rouge1 ... rouge9, rougeL or rougeLsum")
    return scores


# ------------------------------------------------------------------ exact match

def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]], normalize: bool = True) -> float:
    """Share of predictions equal to (any of) their reference(s), after normalize_answer."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references, at least one (got {len(predictions)} and {len(references)})")
    norm = normalize_answer if normalize else (lambda s: s)
    hits = 0
    for pred, refs in zip(predictions, references):
        refs = [refs] if isinstance(refs, str) else refs
        hits += any(norm(pred) == norm(r) for r in refs)
    return hits / len(predictions)


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The chance that at least one of k replies, drawn without replacement from n sampled replies
    of which `correct` are right, is right: 1 - C(n - c, k) / C(n, k), the unbiased estimator of
    Chen et al. 2021 (Codex), as a running product so large n does not overflow."""
    if not 0 <= correct <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= correct <= n and 1 <= k <= n, got n={n}, correct={correct}, k={k}")
    if n - correct < k:
        return 1.0
    miss = 1.0
    for i in range(n - correct + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def paired_difference(before: Sequence[float], after: Sequence[float], groups: Sequence | None = None) -> dict:
    """How much `after` beats `before` on the same items (per-item scores, e.g. 0/1 exact match),
    with the standard error of that difference. Pairing removes the items' own difficulty from the
    noise, so a gain far smaller than either score's own spread can still be told from chance.
    With `groups` (an item's family), the difference is the mean over groups of each group's mean
    difference (what a mean over families compares) and its standard error is
    sqrt(sum_g var_g / n_g) / G (a stratified mean; var with n - 1, 0 for a group of one item)."""
    if len(before) != len(after) or not before:
        raise ValueError(f"a paired difference needs the same non-zero number of items, got {len(before)} and {len(after)}")
    groups = list(groups) if groups is not None else [None] * len(before)
    if len(groups) != len(before):
        raise ValueError(f"{len(groups)} groups for {len(before)} items")
    by_group: dict = {}
    for g, a, b in zip(groups, before, after):
        by_group.setdefault(g, []).append(b - a)
    means, variances = [], []
    for diffs in by_group.values():
        m = sum(diffs) / len(diffs)
        means.append(m)
        var = sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1) if len(diffs) > 1 else 0.0
        variances.append(var / len(diffs))
    g = len(by_group)
    return {"difference": sum(means) / g, "se": math.sqrt(sum(variances)) / g, "n": len(before), "groups": g}


def roc_auc(y_true: Sequence, scores: Sequence[float]) -> float:
    """Area under the ROC curve for labels 0/1: the chance that a random positive scores above a
    random negative (ties count half), from the ranks (Mann-Whitney U)."""
    if len(y_true) != len(scores):
        raise ValueError(f"{len(y_true)} labels but {len(scores)} scores")
    positives = sum(1 for y in y_true if y == 1)
    negatives = len(y_true) - positives
    if positives == 0 or negatives == 0:
        raise ValueError("ROC AUC needs both classes among the labels")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # tied scores share their average rank
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, y_true) if y == 1)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


# ------------------------------------------------------------------ language modelling

def perplexity(total_nll: float, tokens: int) -> float:
    return math.exp(total_nll / tokens)


def bits_per_byte(total_nll: float, n_bytes: int) -> float:
    return total_nll / (math.log(2) * n_bytes)


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) windows over a sequence: the window feeds tokens [begin, end)
    and scores the predictions of tokens [first_scored, end). The first window scores all it can;
    each later one scores `stride` new tokens with context - stride tokens of history before them.
    Every token after the first is predicted exactly once."""
    if not 0 < stride < context:
        raise ValueError(f"stride must be in [1, context - 1 = {context - 1}], got {stride}")
    out, first = [], 1
    while first < n_tokens:
        end = min(n_tokens, context if first == 1 else first + stride)
        out.append((max(0, end - context), end, first))
        first = end
    return out


@torch.no_grad()
def sliding_window_nll(model, docs: Sequence[Sequence[int]], stride: int | None = None, batch_size: int = 8,
                       progress: bool = False) -> tuple[float, int, list[float]]:
    """(total NLL in nats, tokens predicted, NLL per document) of a causal model over token
    sequences (each starting with bos, which is never predicted)."""
    from tqdm import tqdm

    from nanofm.data import pad_batch
    from nanofm.model import token_logprobs

    context = model.cfg.block_size
    stride = stride or context // 2
    jobs = [(d, b, e, s) for d, ids in enumerate(docs) for b, e, s in windows(len(ids), context, stride)]
    per_doc = [0.0] * len(docs)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for i in tqdm(range(0, len(jobs), batch_size), desc="perplexity", disable=not progress):
            batch = jobs[i:i + batch_size]
            idx, _ = pad_batch([docs[d][b:e - 1] for d, b, e, _ in batch])
            # only the predictions not scored by an earlier window; -100 (ignored) elsewhere
            targets, _ = pad_batch([[-100] * (s - b - 1) + list(docs[d][s:e]) for d, b, e, s in batch], value=-100)
            logits, _ = model(idx.to(device))
            nll = -token_logprobs(logits, targets.to(device)).sum(dim=1)
            for row, (d, *_rest) in enumerate(batch):
                per_doc[d] += float(nll[row])
    finally:
        model.train(was_training)
    return sum(per_doc), sum(len(ids) - 1 for ids in docs), per_doc
