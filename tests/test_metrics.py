"""Every metric equals its reference library (scikit-learn, sacrebleu, rouge-score) on random and
tricky inputs; the LM metrics equal a token-by-token computation."""

import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from nanofm import metrics
from nanofm.model import ModelConfig, Transformer

sklearn_metrics = pytest.importorskip("sklearn.metrics")
sacrebleu = pytest.importorskip("sacrebleu")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


def label_cases():
    rng = random.Random(0)
    cases = [([0, 0, 0], [0, 0, 0]), ([1, 1], [0, 0]), ([0, 1, 1, 0], [1, 1, 1, 1]), (["b", "a"], ["a", "a"]),
             ([2, 2, 2], [0, 1, 2])]
    for _ in range(60):
        n, k = rng.randint(1, 30), rng.randint(1, 5)
        cases.append(([rng.randrange(k) for _ in range(n)], [rng.randrange(k) for _ in range(n)]))
    return cases


@pytest.mark.parametrize("zero_division", ["warn", 0, 1, float("nan")])
def test_precision_recall_f1_equal_sklearn(zero_division):
    for y_true, y_pred in label_cases():
        present = sorted(set(y_true) | set(y_pred))
        averages = ["micro", "macro", "weighted", None] + (["binary"] if len(present) <= 2 else [])
        label_sets = [None] + ([present + [99]] if isinstance(present[0], int) else [])  # a label never seen
        for average in averages:
            for labels in label_sets if average != "binary" else [None]:
                pos = present[-1] if average == "binary" else 1
                ours = metrics.precision_recall_f1(y_true, y_pred, average=average, labels=labels,
                                                   zero_division=zero_division, pos_label=pos)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    p, r, f, s = sklearn_metrics.precision_recall_fscore_support(
                        y_true, y_pred, average=average, labels=labels, zero_division=zero_division, pos_label=pos)
                if average is None:
                    assert all(same(a, float(b)) for a, b in zip(ours["precision"] + ours["recall"] + ours["f1"],
                                                                 list(p) + list(r) + list(f))), (y_true, y_pred)
                    assert ours["support"] == list(s)
                else:
                    assert same(ours["precision"], float(p)) and same(ours["recall"], float(r)), (y_true, y_pred, average)
                    assert same(ours["f1"], float(f)), (y_true, y_pred, average, labels)


def test_accuracy_and_confusion_matrix_equal_sklearn():
    for y_true, y_pred in label_cases():
        assert metrics.accuracy(y_true, y_pred) == pytest.approx(sklearn_metrics.accuracy_score(y_true, y_pred))
        assert metrics.confusion_matrix(y_true, y_pred) == sklearn_metrics.confusion_matrix(y_true, y_pred).tolist()
    assert metrics.confusion_matrix([0, 1, 2], [0, 2, 2], labels=[2, 0]) == \
        sklearn_metrics.confusion_matrix([0, 1, 2], [0, 2, 2], labels=[2, 0]).tolist()


def test_classification_errors():
    with pytest.raises(ValueError, match="at most 2 labels"):
        metrics.precision_recall_f1([0, 1, 2], [0, 1, 1])
    with pytest.raises(ValueError, match="pos_label=1 is not a valid label"):
        metrics.precision_recall_f1(["a", "b"], ["a", "a"])
    with pytest.raises(ValueError, match="3 labels but y_pred has 2"):
        metrics.accuracy([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        metrics.accuracy([], [])
    with pytest.raises(ValueError, match="zero_division"):
        metrics.precision_recall_f1([0, 1], [0, 1], zero_division=2)


SENTENCES = ["The cat sat on the mat.", "Hello, world! It's 3.14 or 1,000-2 items.", "", "   ", "naïve café Ünïcödé 東京",
             "a a a a a", "U.S.A. & co. &amp; &quot;quoted&quot; <skipped> self-\nmade", "the the the cat",
             "Numbers: 1.5, 2,000 and 3-4.", "Ending with a space ", "🙂 emoji 🙂 test", "x"]


def random_sentence(rng):
    words = ["the", "cat", "dog", "sat", "on", "mat", "a", ",", ".", "!", "3.5", "1,000", "run", "runs", "running",
             "café", "Über", "-", "(", ")", "don't", "it's", "\n"]
    return " ".join(rng.choice(words) for _ in range(rng.randint(0, 25)))


def test_bleu_equals_sacrebleu():
    rng = random.Random(1)
    for trial in range(60):
        n = rng.randint(1, 6)
        pool = SENTENCES + [random_sentence(rng) for _ in range(10)]
        hyps = [rng.choice(pool) for _ in range(n)]
        streams = [[rng.choice(pool) for _ in range(n)] for _ in range(rng.randint(1, 3))]
        if trial % 5 == 0:  # near-copies score high
            streams[0] = [h.replace("cat", "dog") for h in hyps]
        for lowercase in (False, True):
            ours = metrics.corpus_bleu(hyps, streams, lowercase=lowercase)
            ref = sacrebleu.corpus_bleu(hyps, streams, lowercase=lowercase)
            assert ours["score"] == pytest.approx(ref.score, abs=1e-9), (hyps, streams)
            assert (ours["sys_len"], ours["ref_len"], ours["counts"], ours["totals"]) == \
                (ref.sys_len, ref.ref_len, ref.counts, ref.totals)
    # None = no reference for that segment in this stream
    hyps, streams = ["the cat sat", "a dog"], [["the cat sat down", None], ["a cat", "a dog ran"]]
    assert metrics.corpus_bleu(hyps, streams)["score"] == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score)
    with pytest.raises(ValueError, match="list of reference streams"):
        metrics.corpus_bleu(["a"], ["a"])
    with pytest.raises(ValueError, match="has 1 segments but there are 2"):
        metrics.corpus_bleu(["a", "b"], [["a"]])


@pytest.mark.parametrize("stem", [False, True])
def test_rouge_equals_rouge_score(stem):
    types = ["rouge1", "rouge2", "rouge3", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=stem)
    rng = random.Random(2)
    pairs = [(a, b) for a in SENTENCES[:6] for b in SENTENCES[:6]]
    pairs += [(random_sentence(rng), random_sentence(rng)) for _ in range(100)]
    pairs += [("one line\ntwo lines here\n\nthree", "two lines\none line three"), ("running runs ran", "run runner")]
    for target, prediction in pairs:
        ours, ref = metrics.rouge(target, prediction, types, stem=stem), scorer.score(target, prediction)
        for kind in types:
            got, want = ours[kind], ref[kind]
            assert (got["precision"], got["recall"], got["fmeasure"]) == \
                pytest.approx((want.precision, want.recall, want.fmeasure), abs=1e-12), (kind, target, prediction)
    with pytest.raises(ValueError, match="unknown ROUGE type"):
        metrics.rouge("a", "a", ["bleu"])


def test_exact_match():
    assert metrics.exact_match(["The Cat!", "dog", "x y"], ["cat", ["Dog", "hound"], "y x"]) == pytest.approx(2 / 3)
    assert metrics.exact_match(["The Cat!"], ["cat"], normalize=False) == 0.0
    with pytest.raises(ValueError, match="as many predictions"):
        metrics.exact_match(["a"], [])


def test_windows_predict_every_token_once():
    for n in (1, 2, 5, 16, 17, 40, 100):
        for context, stride in ((16, 15), (16, 8), (16, 1), (16, 5)):
            scored = []
            for begin, end, first in metrics.windows(n, context, stride):
                assert end - begin <= context and begin < first <= end
                assert first - begin >= min(first, context - stride)  # at least context - stride of history
                scored += range(first, end)
            assert scored == list(range(1, n))
    with pytest.raises(ValueError, match="stride"):
        metrics.windows(10, 8, 8)


def test_sliding_window_nll_equals_token_by_token():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=12, norm="rmsnorm",
                                    pos="rope", mlp="swiglu", bias=False)).eval()
    docs = [torch.randint(0, 50, (n,)).tolist() for n in (5, 12, 30)]
    stride = 4
    total, count, per_doc = metrics.sliding_window_nll(model, docs, stride=stride, batch_size=3)
    expected = []
    with torch.no_grad():  # the same windows, one token at a time
        for ids in docs:
            nll = 0.0
            for begin, end, first in metrics.windows(len(ids), 12, stride):
                logp = F.log_softmax(model(torch.tensor([ids[begin:end]]))[0][0], dim=-1)
                nll -= sum(float(logp[j - begin - 1, ids[j]]) for j in range(first, end))
            expected.append(nll)
    assert per_doc == pytest.approx(expected, abs=1e-4) and count == 4 + 11 + 29
    # a document that fits the context: exactly the full-sequence cross-entropy
    with torch.no_grad():
        full = F.cross_entropy(model(torch.tensor([docs[1][:-1]]))[0][0], torch.tensor(docs[1][1:]), reduction="sum")
    assert per_doc[1] == pytest.approx(float(full), abs=1e-4)
    assert metrics.perplexity(total, count) == pytest.approx(math.exp(total / count))
    assert metrics.bits_per_byte(math.log(2) * 10, 5) == pytest.approx(2.0)


def test_pass_at_k_is_the_chance_that_one_of_k_drawn_replies_is_right():
    import itertools
    for n, correct, k in [(4, 0, 1), (4, 1, 1), (4, 1, 4), (5, 2, 2), (10, 3, 4), (8, 8, 3), (6, 1, 6)]:
        replies = [True] * correct + [False] * (n - correct)
        draws = list(itertools.combinations(range(n), k))  # every way to draw k of the n replies
        brute = sum(any(replies[i] for i in draw) for draw in draws) / len(draws)
        assert metrics.pass_at_k(n, correct, k) == pytest.approx(brute), (n, correct, k)
    assert metrics.pass_at_k(4, 1, 1) == pytest.approx(0.25) and metrics.pass_at_k(200, 10, 100) == pytest.approx(
        1 - math.comb(190, 100) / math.comb(200, 100))
    with pytest.raises(ValueError):
        metrics.pass_at_k(4, 5, 1)


def test_paired_difference_and_its_standard_error_by_hand():
    # d = after - before = [1, 0, 1, -1]: mean 0.25, sample variance (0.5625 + 0.0625 + 0.5625 + 1.5625) / 3
    out = metrics.paired_difference([0, 1, 0, 1], [1, 1, 1, 0])
    assert out["difference"] == pytest.approx(0.25) and out["n"] == 4
    assert out["se"] == pytest.approx(math.sqrt((0.5625 + 0.0625 + 0.5625 + 1.5625) / 3 / 4))
    # pairing: the same +1 on every item has no noise at all, however the items' scores spread
    assert metrics.paired_difference([0, 5, 2], [1, 6, 3])["se"] == 0.0
    # stratified: the mean of the groups' mean differences (a: +1 on 1 item, b: 0 and +1 -> 0.5) -> 0.75;
    # se = sqrt(0 / 1 + var(b) / 2) / 2 with var(b) = 0.5
    grouped = metrics.paired_difference([0, 0, 0], [1, 0, 1], groups=["a", "b", "b"])
    assert grouped["difference"] == pytest.approx(0.75) and grouped["groups"] == 2
    assert grouped["se"] == pytest.approx(math.sqrt(0.5 / 2) / 2)
    for bad in (([], []), ([1], [1, 0])):
        with pytest.raises(ValueError):
            metrics.paired_difference(*bad)
    with pytest.raises(ValueError, match="groups"):
        metrics.paired_difference([1], [0], groups=["a", "b"])
