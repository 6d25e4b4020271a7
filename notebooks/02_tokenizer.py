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
# # Stage 2: the tokenizer
#
# The model reads integers, not text. A byte-level BPE (byte-pair encoding) starts from the 256
# bytes and repeatedly merges the most frequent adjacent pair into a new token, so common words
# become one token and any string can still be written as bytes. `nanofm/tokenizer.py` trains it
# from scratch; tiktoken encodes with the learned merges.
#
# `data/prepare.py` trained one on the curated corpus (here, at the smoke scale, 1,024 tokens;
# the default is 8,192). We look at it, then train a small one ourselves.

# %%
import sys
sys.path.insert(0, "..")  # the repository root, when Jupyter runs from notebooks/
import json

import lifecycle
from nanofm.tokenizer import SPLIT_PATTERN, Tokenizer, encode_reference, merges_to_ranks, train_bpe

run = lifecycle.ensure("prepare")
tokenizer = Tokenizer.load(run.data / "tokenizer.json")
print(tokenizer.name, "vocabulary:", tokenizer.vocab_size, "special tokens:", list(tokenizer.special_tokens)[:6], "...")

# %% [markdown]
# ## How a sentence is cut
# Digits are split one per token (`--split_digits`, the default), so `1234` is four tokens and
# a model can learn column arithmetic; GPT-4's pattern would make `123` one token.

# %%
def pieces(text):
    return [tokenizer.decode([i]) for i in tokenizer.encode(text)]


for text in ("To be, or not to be: that is the question.", "def add(a, b):\n    return a + b", "12 + 1234 = 1246"):
    print(f"{len(tokenizer.encode(text)):>3} tokens: {pieces(text)}")

# %% [markdown]
# ## Bytes per token
# The compression on the held-out documents: more bytes per token means more text per step of a
# fixed context. A larger vocabulary compresses better but has more rows to learn.

# %%
docs = [json.loads(line)["text"] for line in open(run.data / "curated.jsonl")]
sample = docs[::20]
print(f"{tokenizer.bytes_per_token(sample):.2f} bytes per token with {tokenizer.vocab_size} tokens")

# %% [markdown]
# ## Training a BPE from scratch
# `train_bpe` counts the chunks the split pattern cuts (words, numbers, punctuation runs), then
# merges the most frequent pair, again and again. Here 300 tokens on a slice of the corpus.

# %%
small_merges = train_bpe(sample, vocab_size=300, progress=False)
small = Tokenizer.from_merges(small_merges)
for a, b in small_merges[:12]:
    print(repr(small.id_to_bytes(a) + small.id_to_bytes(b)), end="  ")
print()
print(f"\n{small.bytes_per_token(sample):.2f} bytes per token with {small.vocab_size} tokens "
      f"(vs {tokenizer.bytes_per_token(sample):.2f} with {tokenizer.vocab_size})")

# %% [markdown]
# ## Checks
# tiktoken's fast encoder and the plain-Python reference encoder give the same ids; decoding
# gives the text back; the bigger vocabulary compresses better.

# %%
text = docs[3][:2000]
assert small.encode(text) == encode_reference(text, merges_to_ranks(small_merges), SPLIT_PATTERN)
assert tokenizer.decode(tokenizer.encode(text)) == text
assert pieces("1234") == ["1", "2", "3", "4"]
assert tokenizer.bytes_per_token(sample) > small.bytes_per_token(sample)
