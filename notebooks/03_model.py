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
# # Stage 3: the model, and what attention looks at
#
# One Transformer (`nanofm/model.py`) serves both families: GPT (causal: each position sees only
# the positions before it, so it can be trained to predict the next token) and BERT
# (bidirectional: every position sees every other, so it is trained to fill in masked tokens).
# The only difference is the attention mask.
#
# `python -m nanofm.model` lists the presets with their parameters and FLOPs per token, and
# `python -m nanofm.sizing` picks a size for a compute budget.

# %%
import sys
sys.path.insert(0, "..")  # the repository root, when Jupyter runs from notebooks/

import matplotlib.pyplot as plt
import torch

import lifecycle
from nanofm.checkpoint import load_for_inference
from nanofm.model import PRESETS, ModelConfig, Transformer, attention_maps, describe

for name in ("tiny", "gpt2", "bert-base"):
    info = describe(ModelConfig.preset(name, vocab_size=PRESETS[name].get("vocab_size", 8192)))
    print(f"{name:>10}: {info['params'] / 1e6:6.1f} M parameters, {info['flops_per_token'] / 1e6:8.1f} MFLOPs per token")

# %% [markdown]
# ## The causal mask, tested rather than drawn
# Change the last token of a sequence. In a causal model the outputs at every earlier position
# stay exactly the same: nothing can look ahead. In a bidirectional model they all move.

# %%
torch.manual_seed(0)
small = dict(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16)
x = torch.randint(0, 64, (1, 12))
x_changed = x.clone()
x_changed[0, -1] = (x[0, -1] + 1) % 64
for causal in (True, False):
    model = Transformer(ModelConfig(**small, causal=causal)).eval()
    with torch.no_grad():
        before, after = model.hidden_states(x), model.hidden_states(x_changed)
    moved = (before - after).abs().amax(dim=-1)[0, :-1]
    print(f"causal={causal}: largest change at the first 11 positions: {moved.max().item():.2e}")
    if causal:
        assert moved.max().item() == 0.0
    else:
        assert moved.min().item() > 0

# %% [markdown]
# ## Attention maps of the pretrained model
# The smoke-scale base model (2 layers, trained for a few seconds) reads a sequence that repeats
# a random run of tokens. An induction head would attend, from the second copy, to the token
# after the same token in the first copy: a bright diagonal offset by the run's length. A model
# this small and this briefly trained shows little of it; the README's copying study measures
# the default model.

# %%
run = lifecycle.ensure("pretrain")
model, meta, tokenizer = load_for_inference(run.pretrain)
torch.manual_seed(1)
ordinary = tokenizer.vocab_size - len(tokenizer.special_tokens)
half = torch.randint(0, ordinary, (1, 24))
sequence = torch.cat([half, half], dim=1)
maps = attention_maps(model, sequence)  # [layers, heads, T, T]
print("attention maps:", tuple(maps.shape))
fig, axes = plt.subplots(maps.shape[0], maps.shape[1], figsize=(3 * maps.shape[1], 3 * maps.shape[0]), squeeze=False)
for layer in range(maps.shape[0]):
    for head in range(maps.shape[1]):
        axes[layer][head].imshow(maps[layer, head], cmap="viridis")
        axes[layer][head].set_title(f"layer {layer} head {head}", fontsize=9)
        axes[layer][head].axis("off")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Checks
# Every row of an attention map is a probability distribution over the positions it may see,
# and a causal model gives no weight to the future.

# %%
assert torch.allclose(maps.sum(-1), torch.ones(maps.shape[:-1]), atol=1e-5)
assert maps.triu(diagonal=1).abs().max() == 0
induction = maps[..., 24:, :].diagonal(offset=1, dim1=-2, dim2=-1).mean(-1)  # query 24 + i -> key i + 1
print("mean attention from the second copy to the token after its first occurrence, per head:\n", induction)
