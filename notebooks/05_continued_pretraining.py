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
# # Stage 4: continued pretraining, and forgetting
#
# A pretrained model can keep learning on new data (a new domain, fresher text), but it then
# forgets what it knew. Replay, a share of every batch drawn from the old data, holds the old
# skills for a small part of the new gain.
#
# The lifecycle's `continue` stage adapts the base model to code, with a quarter of each batch
# replayed from the original mixture:
#
#     python data/prepare.py --mix=code:1,prose:0,chat:0 --tokenizer runs/smoke/pretrain --out runs/smoke/data_code
#     python train_pretrain.py --init_from runs/smoke/pretrain --data_dir runs/smoke/data_code \
#         --replay_dir runs/smoke/data --replay_ratio=0.25 --out_dir runs/smoke/continue
#
# The new data must use the checkpoint's tokenizer: `--tokenizer` takes the run directory.

# %%
import sys
sys.path.insert(0, "..")  # the repository root, when Jupyter runs from notebooks/
import json

from IPython.display import Image, display

import bench
import lifecycle

run = lifecycle.ensure("continue")
rows = [r for r in map(json.loads, open(run["continue"] / "metrics.jsonl")) if "val_loss" in r]
print(f"code: {rows[0]['val_loss']:.3f} -> {rows[-1]['val_loss']:.3f} nats/token; "
      f"the original mixture: {rows[0]['val_loss_data']:.3f} -> {rows[-1]['val_loss_data']:.3f}")

# %% [markdown]
# That base already knew some code (half its data was code), so there was little to forget. To
# see forgetting, `python bench.py forgetting` trains a base on prose alone, then continues it
# on code with and without replay, and measures both domains. Here with the smoke model, 150
# steps of prose and 60 of code (the README has the default-size run: replay cut the prose
# forgetting from 2.22 to 0.30 nats/token while keeping 95% of the code gain).

# %%
base = ["--n_layer=2", "--n_head=2", "--n_kv_head=1", "--n_embd=64", "--block_size=128", "--batch_size=16"]
result = bench.bench_forgetting(["--out", str(run.out / "notebook_forgetting"), "--base_iters=150", "--continue_iters=60",
                                 *[f"--base_flags={flag}" for flag in base]])
display(Image(str(run.out / "notebook_forgetting" / "forgetting.png")))

# %% [markdown]
# ## Checks
# Both continued runs learn code; replaying prose forgets less prose than not replaying it.

# %%
assert rows[-1]["val_loss"] < rows[0]["val_loss"]
runs = result["runs"]
assert runs["replay 0"]["gain"] > 0 and runs["replay 0.25"]["gain"] > 0
assert runs["replay 0.25"]["forgetting"] < runs["replay 0"]["forgetting"]
