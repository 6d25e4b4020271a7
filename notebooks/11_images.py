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
# # A second modality: images through the same lifecycle
#
# A vision-language model is a language model with one more way in. An image is cut into a
# grid of tokens by a **stem** (a small CNN, or the ViT's patch embedding), a **projector** maps
# each to the Transformer's width, and those vectors take the place of `<|image|>` tokens in the
# chat. Everything after that (attention, the KV cache, the heads, the engine, serving) is the
# text model's. Here: the data and its curation, the two stems side by side, classifiers
# against scikit-learn, a chat model that learns to read digits, evaluation, and serving an
# OpenAI `image_url` request.

# %%
import sys
sys.path.insert(0, "..")  # the repository root, when Jupyter runs from notebooks/

import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from fastapi.testclient import TestClient

import lifecycle
import serve
from nanofm import chat, images, tasks, vision
from nanofm.checkpoint import load_for_inference
from nanofm.engine import Engine, SamplingParams

run = lifecycle.ensure("vlm")  # the smoke run, up to the image chat model

# %% [markdown]
# ## The data
# Scikit-learn's 1,797 handwritten digits (8x8, shipped inside the package) and scenes of 1-4
# shapes drawn here (anti-aliased, with their count and kind as captions).

# %%
digits, scenes = images.digits(), images.shapes(8, seed=0)
fig, axes = plt.subplots(2, 8, figsize=(12, 3.4))
for ax, item in zip(axes.flat, digits[:8] + scenes):
    ax.imshow(item["image"], cmap="gray_r"), ax.set_title(item["caption"], fontsize=8), ax.axis("off")
plt.show()

# %% [markdown]
# ## Curation
# A folder of a user's images with the usual problems: a truncated file, an empty one, text
# named .png, an icon too small to read, a banner, an exact copy and a re-encoded JPEG copy. Each
# is a counted removal with its reason (near-duplicates by a 64-bit difference hash); the files
# on disk are not touched.

# %%
folder = Path(tempfile.mkdtemp()) / "photos"
rng = np.random.default_rng(0)
smooth = lambda: images.resize(rng.random((12, 12)).astype(np.float32), 64, 64)  # noqa: E731
originals = [smooth() for _ in range(4)]
for i, picture in enumerate(originals):
    (folder / ("cats" if i < 2 else "dogs")).mkdir(parents=True, exist_ok=True)
    (folder / ("cats" if i < 2 else "dogs") / f"{i}.png").write_bytes(images.encode_png(picture))
(folder / "cats" / "copy.png").write_bytes(images.encode_png(originals[0]))
(folder / "dogs" / "brighter.png").write_bytes(images.encode_png(np.clip(originals[2] + 0.04, 0, 1)))
(folder / "dogs" / "truncated.png").write_bytes(images.encode_png(smooth())[:150])
(folder / "dogs" / "empty.png").write_bytes(b"")
(folder / "dogs" / "notes.png").write_bytes(b"not an image")
(folder / "cats" / "icon.png").write_bytes(images.encode_png(smooth()[:5, :5]))
(folder / "cats" / "banner.png").write_bytes(images.encode_png(np.zeros((8, 64), dtype=np.float32)))
kept, report = images.curate(images.load_folder(folder))
print(f"{report['images_in']} files -> {report['images_kept']} kept; removed: {report['removed']}")
print("per class, in -> kept:", report["classes_in"], "->", report["classes_kept"])
print("first errors:", *report["errors"], sep="\n  ")

# %% [markdown]
# ## Two stems
# Change one pixel at the corner of the first patch. The ViT's patch embedding is a linear map
# of each patch alone: one token moves. The CNN's 3x3 windows overlap, so the change reaches the
# neighbouring tokens too: a larger receptive field, and weights shared across the image.

# %%
x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
y = x.clone()
y[0, 0, 3, 3] += 0.5
fig, axes = plt.subplots(1, 2, figsize=(7, 3))
for ax, stem in zip(axes, ("vit", "cnn")):
    torch.manual_seed(0)
    encoder = vision.ImageEncoder(vision.VisionConfig(stem, 16, 1, 4, 32), n_embd=32)
    with torch.no_grad():
        moved = (encoder(x) - encoder(y)).norm(dim=-1).reshape(4, 4)
    ax.imshow(moved > 1e-6, cmap="Reds"), ax.set_title(f"{stem}: {int((moved > 1e-6).sum())} token(s) changed")
plt.show()

# %% [markdown]
# ## Classifiers, and scikit-learn as the reference
# The lifecycle's `vision` stage trained both stems into the same small Transformer (at toy
# size here; `python train_vision.py` is the default, about a minute each). The SVM and the
# logistic regression are fit on the same split of the 8x8 pixels.

# %%
cnn, vit = (json.loads((run.out / name / "report.json").read_text()) for name in ("vision_cnn", "vision_vit"))
print(f"CNN stem accuracy {cnn['accuracy']:.3f}, ViT stem {vit['accuracy']:.3f}; scikit-learn: "
      + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in cnn["sklearn"].items()))
print("robustness (CNN):", {k: round(v["accuracy"], 3) for k, v in cnn["robustness"].items()})
classifier, _, _ = load_for_inference(run.vision_cnn)
held_out = images.split(images.digits(), 0.2, 1337)[1]
x_test = images.to_tensor(held_out, classifier.vision.cfg.image_size)
noisy = images.perturb(x_test[:6], noise=0.3, generator=torch.Generator().manual_seed(0))
fig, axes = plt.subplots(2, 6, figsize=(9, 3.4))
for col in range(6):
    for row, batch in enumerate((x_test[col:col + 1], noisy[col:col + 1])):
        guess = int(vision.predict(classifier, batch).argmax())
        axes[row, col].imshow(batch[0, 0], cmap="gray_r"), axes[row, col].axis("off")
        axes[row, col].set_title(f"says {guess}", fontsize=9)
plt.suptitle("clean (top) and with noise of std 0.3 (bottom)")
plt.show()

# %% [markdown]
# ## The chat model reads digits
# The `vlm` stage started from the SFT chat model, gave its tokenizer `<|image|>` and its
# body the CNN classifier's stem with a new projector, and fine-tuned on "what digit is this?"
# (mixed with text conversations). The prompt holds one `<|image|>` per image token.

# %%
model, meta, tokenizer = load_for_inference(run.vlm)
n_tokens = model.vision.cfg.n_tokens
questions = images.chats(held_out[:8], seed=1)
prompts = [chat.render_prompt(tokenizer, q["messages"][:1], image_tokens=n_tokens) for q in questions]
print(f"{n_tokens} image tokens per image; a prompt: {tokenizer.decode(prompts[0])!r}")
engine = Engine(model, tokenizer, batch_size=8)
replies = engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0),
                          images=[images.to_tensor([{"image": chat.images_of(q["messages"])[0]}], model.vision.cfg.image_size)
                                  for q in questions])
for q, r in zip(questions, replies):
    print(f"  image of a {q['answer']}: the model says {r.text!r}")
scores = tasks.image_chat_task(engine, images.chats(held_out, seed=1))
print("held-out exact match:", scores["exact_match"])

# %% [markdown]
# ## Serving: an OpenAI image_url part
# The image travels as a data URL; the log keeps its hash and size, never its bytes.

# %%
client = TestClient(serve.make_app(Engine(model, tokenizer), "vlm", meta["chat_format"], log=None))
url = images.data_url(held_out[0]["image"])  # PNG: the pixels are rounded to 8 bits on the way
content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What digit is this?"}]
answer = client.post("/v1/chat/completions", json={"model": "vlm", "messages": [{"role": "user", "content": content}],
                                                   "max_tokens": 4, "temperature": 0}).json()
print(f"the digit {held_out[0]['label']}: the server says {answer['choices'][0]['message']['content']!r}")
received = images.decode(images.from_data_url(url))  # what the server read: the engine's reply to it is the server's
same = chat.render_prompt(tokenizer, [{"role": "user", "content": [{"type": "image", "image": received},
                                                                    {"type": "text", "text": "What digit is this?"}]}],
                          image_tokens=n_tokens)
local = engine.generate([same], SamplingParams(max_tokens=4, temperature=0),
                        images=[images.to_tensor([{"image": received}], model.vision.cfg.image_size)])[0]
bad = client.post("/v1/chat/completions", json={"model": "vlm", "messages": [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]})
print(bad.status_code, bad.json()["error"]["message"])

# %% [markdown]
# ## Checks
# Curation removed each bad file for its reason; the stems differ as described; the
# classifiers beat chance by far; the chat model answers more digits right than chance; the
# server answered the image and refused the non-image.

# %%
assert report["removed"] == {"undecodable": 3, "too_small": 1, "aspect": 1, "exact_duplicate": 1, "near_duplicate": 1}
assert cnn["accuracy"] > 0.5 and cnn["sklearn"]["svm_rbf"]["accuracy"] > 0.95
assert scores["exact_match"]["image_digit"] > 0.15  # chance is 0.1; the smoke run gets 0.25
assert answer["choices"][0]["message"]["content"] == local.text
assert bad.status_code == 400 and "not an image" in bad.json()["error"]["message"]
