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
# # Stage 9: feedback and monitoring
#
# A served model meets traffic it was not trained on. `monitor.py` reads the interaction log
# `serve.py` writes, cuts it into windows, compares each with a reference window (drift of the
# prompts, of the replies, of the ratings), turns ratings into training data, and retrains a
# candidate that must pass a gate before it replaces the served model.
#
# The lifecycle's last stages did all of it on the smoke-scale model:
# - `serve`: `serve.py` on a copy of the DPO model, then `monitor.py simulate`: checkable
#   questions whose users rate each reply by its answer, turning to code snippets half-way;
# - `monitor`: `monitor.py report` and `monitor.py check` (exit status 2 on an alarm);
# - `retrain`: `monitor.py retrain`, which on the alarm trains a candidate and gates it.

# %%
import sys
sys.path.insert(0, "..")  # the repository root, when Jupyter runs from notebooks/
import json

import numpy as np
from IPython.display import Image, Markdown, display

import lifecycle
import monitor
from nanofm import drift

run = lifecycle.ensure("retrain")
display(Markdown((run.monitor / "report.md").read_text()))
display(Image(str(run.monitor / "report.png")))

# %% [markdown]
# ## The drift statistics, on samples we control
# Each is written from scratch (`nanofm/drift.py`) and tested against scipy or scikit-learn.
# The same distribution should not alarm; a shifted one should.

# %%
rng = np.random.default_rng(0)
same, shifted = rng.normal(0, 1, 200), rng.normal(0.5, 1, 200)
reference = rng.normal(0, 1, 200)
for name, current in (("same distribution", same), ("shifted by half a standard deviation", shifted)):
    statistic, p = drift.ks_2samp(reference, current)
    print(f"{name:>38}: KS {statistic:.3f} (p = {p:.3g}), PSI {drift.psi(reference, current):.3f}, "
          f"Wasserstein {drift.wasserstein(reference, current):.3f}")
words_ref, words_cur = {"sort": 40, "count": 35, "upper": 25}, {"def": 50, "return": 30, "sort": 20}
print(f"Jensen-Shannon distance of two word histograms: {drift.js_distance(words_ref, words_cur):.3f} (max 0.83)")

# %% [markdown]
# ## What the monitor decided, and the feedback it learned from
# `check` gives one JSON status a scheduler can read; `retrain` writes one line per decision.
# `export` turns the ratings into data: replies rated up become SFT conversations, an up and a
# down reply to the same prompt a preference pair, and every prompt a document of a corpus.

# %%
status = json.loads((run.monitor / "check.json").read_text())
print("check:", "drift" if status["drift"] else "no drift", {g: v["alarm"] for g, v in status["groups"].items()})
decisions = [json.loads(line) for line in open(run.retrain / "decisions.jsonl")]
for d in decisions:
    print(f"retrain: {d['action']}: {d['reason']}")
counts = monitor.export(["--db", str(run.serve / "interactions.db"), "--out_dir", str(run.out / "notebook_feedback")])

# %% [markdown]
# At the default scale the README's stage 9 shows the alarm at the first window after the shift,
# and what the gate did with each candidate.

# %% [markdown]
# ## Checks

# %%
assert drift.ks_2samp(reference, shifted)[1] < 0.05 < drift.ks_2samp(reference, same)[1]
assert decisions and decisions[-1]["action"] in ("promoted", "rejected", "failed", "skipped")
# the log holds what the report read, and the chat stage's requests that came after it
assert counts["requests"] >= json.loads((run.monitor / "report.json").read_text())["requests"] > 0
