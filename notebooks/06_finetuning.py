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
# # Stage 5: fine-tuning
#
# A pretrained model continues text; a fine-tuned one follows instructions, or labels text.
# `train_sft.py` does both with the same loop as pretraining:
# - **chat SFT**: conversations in one chat format (`nanofm/chat.py`), the loss only on the
#   assistant's tokens; the built-in task families have checkable answers, so exact match
#   measures it;
# - **classification**: a head on the pooled hidden state (sentiment, domain, quality);
# - **LoRA**: low-rank adapters beside frozen weights (`nanofm/lora.py`), far fewer trained
#   numbers.

# %%
import sys
sys.path.insert(0, "..")  # the repository root, when Jupyter runs from notebooks/
import json

import matplotlib.pyplot as plt

import lifecycle
import train_sft
from nanofm import chat, instructions
from nanofm.checkpoint import load_for_inference
from nanofm.engine import Engine, SamplingParams

run = lifecycle.ensure("sft")
model, meta, tokenizer = load_for_inference(run.sft)

# %% [markdown]
# ## The chat format, and which tokens are trained
# Every stage after this one (alignment, evaluation, serving) renders conversations with this
# same function. Tokens in **[brackets]** carry the loss.

# %%
messages = [{"role": "user", "content": "Sort these words: pear apple fig"},
            {"role": "assistant", "content": "apple fig pear"}]
ids, mask = chat.render(tokenizer, messages)
print("".join(f"[{tokenizer.decode([i])}]" if m else tokenizer.decode([i]) for i, m in zip(ids, mask)))
assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "apple fig pear<|end|>"

# %% [markdown]
# ## The SFT run
# The lifecycle's `sft` stage (`python train_sft.py --init_from runs/smoke/pretrain ...`, here
# 120 steps; the default is 2,500 on the `tiny` base and reaches 0.36-0.38 exact match).

# %%
rows = [json.loads(line) for line in open(run.sft / "metrics.jsonl")]
train = [r for r in rows if "train_loss" in r]
plt.plot([r["step"] for r in train], [r["train_loss"] for r in train], label="train")
val = [r for r in rows if "val_loss" in r]
plt.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="held out")
plt.xlabel("step"), plt.ylabel("loss on the assistant's tokens"), plt.legend(), plt.show()

engine = Engine(model, tokenizer)
questions = instructions.builtin(str(run.data), "val", per_family=1, seed=0, families=("upper", "count", "sort"))
replies = engine.generate([chat.render_prompt(tokenizer, q["messages"][:1]) for q in questions],
                          SamplingParams(max_tokens=16, temperature=0))
for q, r in zip(questions, replies):
    print(f"Q: {q['messages'][0]['content']!r}\n   model: {r.text!r}   answer: {q['messages'][1]['content']!r}")

# %% [markdown]
# ## Classification, full fine-tuning against LoRA
# The same base, 60 steps each on the built-in sentiment labels. LoRA trains rank-8 adapters on
# the attention and MLP matrices and, as PEFT's `modules_to_save`, the embeddings; the rest stays
# frozen. `python bench.py lora` runs the comparison at the default size (within 0.021 F1 on every
# task).

# %%
common = ["--task=classify", "--labels=sentiment", "--init_from", str(run.pretrain), "--max_iters=60", "--batch_size=16",
          "--seq_len=64", "--eval_interval=60", "--eval_iters=2", "--overwrite"]
full = train_sft.main(common + ["--out_dir", str(run.out / "notebook_finetuning" / "full")])
adapters = train_sft.main(common + ["--out_dir", str(run.out / "notebook_finetuning" / "lora"), "--lora_rank=8",
                                    "--lora_modules_to_save=transformer.wte"])
for name, result in (("full", full), ("LoRA", adapters)):
    print(f"{name:>5}: {result['trainable_params']:>8,} trained numbers, held-out macro F1 {result['val_f1_macro']:.3f}")

# %% [markdown]
# ## Checks
# SFT lowered the held-out loss; LoRA trains fewer numbers than full fine-tuning.

# %%
assert val[-1]["val_loss"] < val[0]["val_loss"]
assert adapters["trainable_params"] < full["trainable_params"]
