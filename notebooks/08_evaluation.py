# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Stage 7: evaluation
#
# `eval.py` is a thin command over `nanofm/evaluate.py`: a table of tasks (perplexity, the
# built-in instruction families, safety, multiple choice, LAMBADA, HellaSwag, robustness,
# fairness, explanations), each run on any checkpoint, with the metrics written from scratch in
# `nanofm/metrics.py` and tested against sacrebleu, rouge-score and scikit-learn.
#
# The lifecycle's `eval` stage scored every model on the same held-out questions:
#
#     python eval.py --ckpt runs/smoke/sft --ckpt runs/smoke/dpo --ckpt runs/smoke/grpo --ckpt runs/smoke/pretrain \
#         --tasks instructions --tasks safety

# %%
import sys
sys.path.insert(0, "..")  # the repository root, when Jupyter runs from notebooks/
import json

from IPython.display import Markdown, display

import lifecycle
from nanofm import evaluate, metrics

run = lifecycle.ensure("eval")
report = json.loads((run.eval / "report.json").read_text())
display(Markdown((run.eval / "report.md").read_text()))

# %% [markdown]
# ## Paired differences
# Two models answered the same questions, so the fair comparison is per question: the mean of
# (after - before) and its standard error, stratified by task family. Two separate means with
# their own errors would hide how much the models agree.

# %%
for name, pair in report["paired"].items():
    print(f"{name} - {pair['against']}: {pair['difference']:+.3f} (se {pair['se']:.3f}) on {pair['n']} questions")
before, after, families = [1, 0, 0, 1, 1, 0], [1, 1, 0, 1, 1, 1], ["a", "a", "a", "b", "b", "b"]
print("a hand example:", metrics.paired_difference(before, after, families))

# %% [markdown]
# ## The metrics, on examples you can check by eye

# %%
print("exact match:", metrics.exact_match(["Paris", "the cat "], ["paris", "The cat"]))
print("precision, recall, F1:", metrics.precision_recall_f1([1, 1, 0, 0], [1, 0, 1, 0]))
print("BLEU:", round(metrics.corpus_bleu(["the cat sat on the mat"], [["the cat sat on the mat"]])["score"], 1),
      round(metrics.corpus_bleu(["the cat sat on a mat"], [["the cat sat on the mat"]])["score"], 1))
print("ROUGE-L F:", round(metrics.rouge("the cat sat on the mat", "a cat sat on the mat")["rougeL"]["fmeasure"], 3))

# %% [markdown]
# ## Robustness and fairness of the SFT model
# Robustness: the same questions with typos and case changes; fairness: the same questions
# with names from different groups swapped in. A gap between the two columns is the finding.

# %%
subject = evaluate.Subject.load(run.sft)
extra = evaluate.run_tasks(subject, ["robustness", "fairness"], evaluate.Settings(max_items=20))
for task, result in extra["results"].items():
    print(task, evaluate.headline(task, result))

# %% [markdown]
# ## Checks

# %%
assert set(report["checkpoints"]) == {"sft", "dpo", "grpo", "pretrain", "vlm"}  # vlm: the image chat model (notebook 11)
assert metrics.exact_match(["Paris"], ["paris"]) == 1.0
assert abs(metrics.paired_difference(before, after, families)["difference"] - 1 / 3) < 1e-9
assert set(extra["results"]) == {"robustness", "fairness"}
