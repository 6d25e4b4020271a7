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
# # Stages 3-4: pretraining, causal and masked
#
# Pretraining is next-token prediction (causal LM, GPT) or fill-in-the-blank (masked LM, BERT)
# over the token shards, with one training loop (`nanofm/train.py`) that every `train_*.py` uses:
# AdamW (or Muon), warmup and cosine decay, gradient clipping, bf16 autocast where the hardware
# has it, checkpoints you can resume bit-exactly, DDP/FSDP under torchrun.
#
# Here we call `train_pretrain.main` (what `python train_pretrain.py` runs) with the smoke
# model (2 layers, 64 wide) for 200 steps, evaluating every 25. The default run is the `tiny`
# preset for 600 steps (3.6 minutes on 2 cores).

# %%
import sys
sys.path.insert(0, "..")  # the repository root, when Jupyter runs from notebooks/
import json

import matplotlib.pyplot as plt

import lifecycle
import train_pretrain
from nanofm.data import unigram_entropy

run = lifecycle.ensure("prepare")
out = run.out / "notebook_pretraining"
model_flags = lifecycle.SMOKE_MODEL + ["--batch_size=16", "--max_iters=200", "--eval_interval=25", "--eval_iters=4",
                                       "--warmup_iters=10", "--sample_tokens=0", "--overwrite", "--data_dir", str(run.data)]


def evaluations(run_dir):
    return [row for row in map(json.loads, open(run_dir / "metrics.jsonl")) if "val_loss" in row]


train_pretrain.main(model_flags + ["--out_dir", str(out / "clm")])
train_pretrain.main(model_flags + ["--objective=mlm", "--out_dir", str(out / "mlm")])
clm, mlm = evaluations(out / "clm"), evaluations(out / "mlm")

# %% [markdown]
# ## Loss curves
# The unigram entropy is what a model scores if it only learns how often each token is: a
# masked LM must get below it to show it uses the context around the blank. Bits per byte
# divides the causal loss by the bytes each token covers, so tokenizers can be compared.

# %%
entropy = unigram_entropy(run.data)
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
axes[0].plot([r["step"] for r in clm], [r["val_loss"] for r in clm], "o-", label="causal LM")
axes[0].plot([r["step"] for r in mlm], [r["val_loss"] for r in mlm], "o-", label="masked LM (50% masked)")
axes[0].axhline(entropy, color="gray", ls="--", label=f"unigram entropy {entropy:.2f}")
axes[0].set(xlabel="step", ylabel="validation loss (nats/token)", title="pretraining")
axes[0].legend()
axes[1].plot([r["step"] for r in clm], [r["induction_score"] for r in clm], "o-")
axes[1].set(xlabel="step", ylabel="nats", title="copying (induction) score")
fig.tight_layout()
plt.show()
print(f"causal LM: {clm[0]['val_bpb']:.3f} -> {clm[-1]['val_bpb']:.3f} bits per byte")

# %% [markdown]
# The copying score is how much better the model predicts the second copy of a random run of
# tokens than the first (eval.py's induction task). A model with induction heads copies and
# scores several nats; the default model at its CPU budget scores about 0.01 (the README's
# copying study lists what was tried). `--copy_rows` mixes such runs into training.

# %% [markdown]
# ## Checks
# Both objectives learn: the validation loss falls well below where it started.

# %%
assert clm[-1]["val_loss"] < clm[0]["val_loss"] - 1.0
assert mlm[-1]["val_loss"] < mlm[0]["val_loss"] - 1.0
assert clm[-1]["val_bpb"] < clm[0]["val_bpb"]
