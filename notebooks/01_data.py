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
# # Stages 1-2: collect and curate the data
#
# A model learns what its data says, so the first stage decides what it reads. `data/prepare.py`
# collects the built-in corpus (plays, Python code, chat transcripts that ship inside pip
# packages), curates it (decode, normalise, quality rules, language ID, PII masking, exact and
# near-duplicate removal, a domain mix), trains a BPE tokenizer and writes token shards.
#
# This notebook runs the lifecycle's smoke scale (`python lifecycle.py --scale=smoke`), whose
# first stage is exactly `python data/prepare.py` with a small vocabulary (1,024 tokens instead
# of 8,192). Finished stages are reused, so running it again is quick.

# %%
import sys
sys.path.insert(0, "..")  # the repository root, when Jupyter runs from notebooks/
import json

from IPython.display import Image, display

import lifecycle
run = lifecycle.ensure("prepare")
report = json.loads((run.data / "report.json").read_text())

# %% [markdown]
# ## What came in, and what each curation step removed
#
# Every step counts what it dropped and why. The quality rules are Gopher's, C4's and
# FineWeb's (thresholds in `../shared/REFERENCES.md` and `python data/prepare.py --help`).

# %%
print(f"in:  {report['input']['docs']:,} documents, {report['input']['chars']:,} characters")
for step in report["steps"]:
    removed = ", ".join(f"{why} {n}" for why, n in sorted(step["removed"].items(), key=lambda kv: -kv[1])[:3])
    print(f"{step['step']:>12}: {step['docs_in']:>5,} -> {step['docs_out']:>5,} documents  {removed}")
print(f"out: {report['output']['docs']:,} documents, {report['output']['chars']:,} characters, "
      f"domain shares {report['output']['domain_share_chars']}")

# %%
display(Image(str(run.data / "report.png")))

# %% [markdown]
# ## Near duplicates: MinHash
#
# Exact dedup catches copies; MinHash catches copies with small edits. Each document becomes the
# set of its word 5-grams; 112 random hash functions each keep their minimum over the set, and
# two documents agree on a minimum with probability equal to their Jaccard similarity. Banding
# (14 bands of 8) then finds candidate pairs without comparing every pair (`nanofm/dedup.py`).

# %%
from nanofm import dedup

hasher = dedup.MinHasher()
docs = [json.loads(line)["text"] for line in open(run.data / "curated.jsonl")][:200]
original = max(docs, key=len)[:3000]
words = original.split()
edited = " ".join(words[:len(words) // 2] + ["an", "inserted", "phrase"] + words[len(words) // 2:])
unrelated = docs[1] if docs[1] != original else docs[2]


def exact_jaccard(a, b):
    grams = lambda t: set(dedup.word_ngrams(t, 5))  # noqa: E731
    return len(grams(a) & grams(b)) / len(grams(a) | grams(b))


for name, other in (("edited copy", edited), ("unrelated", unrelated)):
    estimate = dedup.estimated_jaccard(hasher.signature(original), hasher.signature(other))
    print(f"{name:>12}: Jaccard {exact_jaccard(original, other):.3f}, MinHash estimate {estimate:.3f}, "
          f"candidate pair: {hasher.is_candidate(hasher.signature(original), hasher.signature(other))}")

# %% [markdown]
# ## Checks
# Curation removed something, and MinHash tells the edited copy from the unrelated text.

# %%
assert report["output"]["docs"] < report["input"]["docs"]
assert hasher.is_candidate(hasher.signature(original), hasher.signature(edited))
assert not hasher.is_candidate(hasher.signature(original), hasher.signature(unrelated))
