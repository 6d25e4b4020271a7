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
# # Stage 8: serving
#
# `serve.py` puts a checkpoint behind an OpenAI-compatible API (`/v1/chat/completions`, with
# streaming), a web chat page, and an interaction log. Underneath is one engine
# (`nanofm/engine.py`) that evaluation and RL use too: a KV cache, and **continuous batching**,
# where a request joins the running batch at any decode step and leaves it when it finishes, so
# a short reply never waits for a long one.

# %%
import sys
sys.path.insert(0, "..")  # the repository root, when Jupyter runs from notebooks/

import matplotlib.pyplot as plt
from fastapi.testclient import TestClient

import lifecycle
import serve
from nanofm import chat
from nanofm.checkpoint import load_for_inference
from nanofm.engine import Engine, SamplingParams

run = lifecycle.ensure("sft")
model, meta, tokenizer = load_for_inference(run.sft)
engine = Engine(model, tokenizer, batch_size=4)

# %% [markdown]
# ## The running batch, step by step
# Eight requests with different lengths, four slots. We drive the batch by hand (what
# `Engine.generate` and the server's scheduler do) and count the busy slots at each step.

# %%
prompts = [chat.render_prompt(tokenizer, [{"role": "user", "content": f"Count the words: {' '.join(['fig'] * n)}"}])
           for n in range(1, 9)]
params = [SamplingParams(max_tokens=4 + 3 * i, temperature=0, stop_token_ids=[]) for i in range(8)]
rows = [engine.new_row(p, sp) for p, sp in zip(prompts, params)]
waiting, busy, batch = list(reversed(rows)), [], engine.new_batch(4)
with engine._eval_mode():
    while waiting or batch.active:
        if waiting and batch.free:
            batch.add(*[waiting.pop() for _ in range(min(batch.free, len(waiting)))])
        busy.append(batch.active)
        batch.step()
plt.step(range(len(busy)), busy, where="post")
plt.xlabel("decode step"), plt.ylabel("requests in the batch"), plt.ylim(0, 4.5)
plt.title(f"8 requests, 4 slots: {len(busy)} steps (one at a time: {sum(sp.max_tokens for sp in params)})")
plt.show()

# %% [markdown]
# ## The same answers, batched or alone
# Batching must not change a greedy reply: left padding, per-row positions and the padding mask
# make each row see exactly what it would see alone.

# %%
together = [row.completion().token_ids for row in rows]
alone = [engine.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
print("identical:", together == alone)

# %% [markdown]
# ## A request through the API
# The same app `python serve.py --ckpt runs/smoke/sft` serves, called in-process here. Any
# OpenAI client works against the real server (`base_url="http://127.0.0.1:8000/v1"`).

# %%
app = serve.make_app(Engine(model, tokenizer), "sft", meta.get("chat_format"), slots=4)
with TestClient(app) as client:
    body = {"model": "sft", "messages": [{"role": "user", "content": "Sort these words: pear apple fig"}],
            "max_tokens": 12, "temperature": 0}
    response = client.post("/v1/chat/completions", json=body)
    print(response.status_code, response.json()["choices"][0], response.json()["usage"])
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    print(f"{len(events)} server-sent events, the last: {events[-1]}")
    bad = client.post("/v1/chat/completions", json={**body, "temperature": -1})
    print(bad.status_code, bad.json()["error"]["message"])

# %% [markdown]
# ## Checks

# %%
assert together == alone
assert len(busy) < sum(sp.max_tokens for sp in params)
assert response.status_code == 200 and events[-1] == "data: [DONE]" and bad.status_code == 400
