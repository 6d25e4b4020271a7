"""Generation with a KV cache and continuous batching, and teacher-forced scoring: the one
inference engine that evaluation, RL and serving share.

    engine = Engine(model, tokenizer)
    outs = engine.generate(["Once upon a time", "User: hi\\nBot:"],
                           SamplingParams(max_tokens=50, temperature=0.8, top_p=0.95, seed=1, stop=["\\n"]))
    outs[0].text, outs[0].finish_reason                      # "stop" or "length"
    stream = engine.stream("Once upon a time", SamplingParams(max_tokens=50))
    for delta in stream:
        print(delta, end="", flush=True)
    stream.completion                                        # the whole Completion afterwards
    engine.logprobs([context_ids], [continuation_ids])      # summed log-probabilities (multiple choice, RL)

    batch = engine.new_batch(16)                             # what a server drives, one step at a time
    batch.add(engine.new_row(prompt, params))                # joins at any step
    finished = batch.step()                                  # one token for every row; done rows leave

Design decisions:
- Continuous batching (RunningBatch): up to batch_size requests share one KV cache; a request
  joins at any decode step (its prompt prefilled, newcomers of one step together, left-padded)
  and leaves the step it finishes, and its slot goes to the next one, so no request waits for
  another. Each row has its own positions and the cache marks which columns are its own, so a
  row generates exactly what it would generate alone (tested: batched == one at a time, greedy
  and sampled, with requests joining mid-flight and the cache shifting under them).
- The engine holds no request's state: a request's progress lives in its row (_Row), owned by
  the batch, so one engine can serve many callers.
- Every request brings its own SamplingParams (temperature, top-k, top-p, seed, max tokens, stop
  strings, stop tokens). Each row samples with its own torch.Generator, seeded per request, so a
  seed gives the same text whatever else is in the batch.
- Stop conditions: a stop token (by default the tokenizer's end tokens: eos and <|end|>), a stop
  string (the text ends before it; finish_reason "stop"), or max_tokens / the context
  (finish_reason "length").
- Streaming yields text deltas that are safe to show: never half a UTF-8 character (bytes that
  do not yet decode are held back) and never the start of a stop string that may still complete.
- Padding rows of the model's vocabulary (ids the tokenizer does not have) are never sampled.
- Forward passes run under autocast in the engine's dtype: bf16 on CUDA by default, fp32 on CPU,
  or what the caller passes (training hands in its --dtype, so samples match training).
- Token log-probabilities, for sampling and for scoring, come from model.token_logprobs, the
  same differentiable function SFT, DPO and PPO use.
- A decode step is model.decode_step: one cache column written at a tensor index, so with
  Engine(compile=True) torch.compile traces it once per batch width (CUDA graphs on a GPU);
  eager, it reads only the columns and slots in use. Measured on a 2-core CPU: compiled is 1.7x
  eager at batch 1 and 0.9x at batch 16, hence off by default (serve.py turns it on for CUDA).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from tqdm import tqdm

from nanofm.common import ConfigError, autocast
from nanofm.data import pad_batch
from nanofm.model import KVCache, Transformer, sample_next, token_logprobs
from nanofm.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # None: drawn from torch's global RNG
    stop: list[str] = field(default_factory=list)  # the text ends before the first of these
    stop_token_ids: list[int] | None = None  # None: the tokenizer's end tokens (eos, <|end|>)

    def __post_init__(self):
        problems = []
        if self.max_tokens < 1:
            problems.append(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.temperature < float("inf"):  # also refuses nan
            problems.append(f"temperature must be a number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            problems.append("stop strings must not be empty")
        if problems:
            raise ConfigError("bad sampling parameters: " + "; ".join(problems))


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # generated tokens (a stop token included, tokens after a stop string not)
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    token_logprobs: list[float]  # the model's log-probability of each generated token (temperature 1)


class _Row:
    """One request's progress through the running batch (the request's state lives here, never on
    the engine)."""

    def __init__(self, prompt: list[int], params: SamplingParams, stop_ids: set[int], block_size: int, device,
                 live_text: bool = False, images=None):
        self.prompt, self.params, self.stop_ids, self.prompt_len = prompt, params, stop_ids, len(prompt)
        self.images = images  # [N, C, S, S] for the prompt's <|image|> runs (a vision-language model), or None
        self.budget = min(params.max_tokens, block_size - len(prompt))  # the context bounds the new tokens too
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)))
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.ids, self.logprobs, self.text, self.finish_reason = [], [], "", None
        self.live_text = live_text  # keep .text current at every step (streaming)
        self.shown = 0  # characters of .text already handed out by new_text()

    def new_text(self) -> str:
        """The text that became safe to show since the last call (streams and the server read it)."""
        text = safe_prefix(self)
        delta, self.shown = text[self.shown:], max(self.shown, len(text))
        return delta

    def completion(self) -> "Completion":
        return Completion(self.text, self.ids, self.finish_reason, self.prompt_len, self.logprobs)


class RunningBatch:
    """Continuous batching: requests join at any decode step and leave when they finish.

        batch = RunningBatch(model, tokenizer, slots=16)
        batch.add(row)            # prefill the prompt into a free slot (while the others wait one step)
        finished = batch.step()   # one new token for every row; the rows that finished have left

    How the slots share one KV cache: the cache is 2 x block_size columns wide, and every row's
    tokens end at the same column, the pointer, where the next decode step writes for all rows. A
    newcomer's prompt is prefilled alone (its own positions 0..L-1) and its keys and values are
    copied into its row just left of the pointer; the columns before it are marked invalid, so it
    attends only to itself, exactly as if it ran alone (the cache's `valid` mask, the mechanism
    that already hides left padding). Each row has its own RoPE/position counter. When the
    pointer reaches the right edge, every column moves left by block_size: a row is never longer
    than the context, so every live token survives. A finished row frees its slot at once.
    Doubt: a decode step attends over all 2 x block_size columns (masked), not only a row's own;
    paged attention (vLLM) avoids that, at the price of a custom kernel.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, slots: int, device, dtype, end_ids: list[int],
                 decode=None):
        """decode: the decode step (model.decode_step, or a compiled copy of it, see Engine)."""
        self.model, self.tokenizer, self.device, self.dtype, self.end_ids = model, tokenizer, device, dtype, end_ids
        self.decode, self.compiled = decode or model.decode_step, decode is not None
        self.block = model.cfg.block_size
        self.cache = KVCache(model.cfg, slots, 2 * self.block, device, model.compute_dtype)
        self.cache.valid[:] = False
        self.cache.padded = True  # rows start at different columns: attention always reads the mask
        self.cache.pos = self.block  # the pointer: the next decode step writes this column
        self.cache.column = torch.full((1,), self.block, dtype=torch.long, device=device)  # the pointer, as a tensor
        if self.compiled and torch.device(device).type == "cuda":  # CUDA graphs replay these very tensors
            for t in [*self.cache.k, *self.cache.v, self.cache.valid, self.cache.column]:
                torch._dynamo.mark_static_address(t)
        self.rows: list[_Row | None] = [None] * slots
        self.next_pos = torch.zeros(slots, 1, dtype=torch.long, device=device)  # each row's next position
        self.last_logits = torch.zeros(slots, tokenizer.vocab_size, device=device)

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def free(self) -> int:
        return len(self.rows) - self.active

    def add(self, *rows: _Row) -> None:
        """Prefill newcomers (left-padded into one forward pass, each with its own positions) and
        give each a free slot; the caller checks .free first."""
        if len(rows) > self.free:
            raise ConfigError(f"{len(rows)} requests but {self.free} free slots")
        ids, mask = pad_batch([row.prompt for row in rows], left=True)
        ids, mask, width = ids.to(self.device), mask.to(self.device), ids.size(1)
        alone = KVCache(self.model.cfg, len(rows), width, self.device, self.cache.dtype)
        pictures = [row.images for row in rows if row.images is not None]  # in row order: the ids' reading order
        images = torch.cat(pictures).to(self.device) if pictures else None
        with torch.no_grad(), autocast(self.device, self.dtype):
            logits, _ = self.model(ids, attention_mask=mask, cache=alone, positions=(mask.cumsum(1) - 1).clamp(min=0),
                                   images=images)
        pointer = self.cache.pos
        for i, row in enumerate(rows):
            slot, n = self.rows.index(None), row.prompt_len
            for layer in range(len(self.cache.k)):
                self.cache.k[layer][slot, :, pointer - n:pointer] = alone.k[layer][i, :, width - n:]
                self.cache.v[layer][slot, :, pointer - n:pointer] = alone.v[layer][i, :, width - n:]
            self.cache.valid[slot] = False
            self.cache.valid[slot, pointer - n:pointer] = True
            self.next_pos[slot] = n
            self.last_logits[slot] = logits[i, -1, :self.tokenizer.vocab_size].float()
            self.rows[slot] = row
        self._narrow()

    def _narrow(self) -> None:
        """Attention reads only from the first column a live row uses (a decode step then costs
        the longest live row, not the cache's width). Not when compiled: a compiled step has
        fixed shapes and reads every column."""
        if self.compiled:
            return
        live = [b for b, row in enumerate(self.rows) if row is not None]
        firsts = self.cache.valid[live].int().argmax(1) if live else None
        self.cache.start = int(firsts.min()) if live else self.cache.pos

    def cancel(self, row: _Row) -> None:
        """Take a row out (a client that went away); its slot is free for the next request."""
        if row in self.rows:
            self._free(self.rows.index(row))

    def _free(self, slot: int) -> None:
        self.rows[slot] = None
        self.cache.valid[slot] = False
        self._narrow()

    @torch.no_grad()
    def step(self) -> list[_Row]:
        """Sample one token for every row, retire the rows that finished, then one forward pass
        of the rest. Returns the rows that finished in this step."""
        live = [(b, row) for b, row in enumerate(self.rows) if row is not None]
        if not live:
            return []
        tokens = self.last_logits.argmax(-1)  # greedy rows all at once; sampled rows each with its own generator
        for b, row in live:
            p = row.params
            if p.temperature > 0:
                tokens[b] = sample_next(self.last_logits[b:b + 1], p.temperature, p.top_k, p.top_p, row.generator)[0, 0]
        chosen_logprobs, token_list = token_logprobs(self.last_logits, tokens).tolist(), tokens.tolist()
        finished = []
        for b, row in live:
            token = token_list[b]
            row.ids.append(token)
            row.logprobs.append(chosen_logprobs[b])
            if _advance(row, token, self.tokenizer):
                finished.append(row)
                self._free(b)
        if self.active:
            if self.cache.pos == self.cache.max_len:  # the pointer is at the edge: move every column left
                self._shift_left(self.block)
            # the pointer column is every row's new token (a free slot's too: it sees itself, no NaN)
            self.cache.valid[:, self.cache.pos] = True
            self.cache.column.fill_(self.cache.pos)
            # eager: only the columns in use, and only the slots up to the last busy one (slots are
            # taken lowest first); compiled: always all of them (fixed shapes, one trace)
            self.cache.end = None if self.compiled else self.cache.pos + 1
            n = len(self.rows) if self.compiled else 1 + max(b for b, row in enumerate(self.rows) if row is not None)
            self.cache.rows = n
            with autocast(self.device, self.dtype):
                logits = self.decode(tokens[:n, None], self.next_pos[:n].clamp(max=self.block - 1), self.cache)
            self.cache.pos += 1
            self.next_pos += 1
            # copied out: a replayed CUDA graph writes its next output into the same memory
            self.last_logits[:n] = logits[:, -1, :self.tokenizer.vocab_size].float()
        return finished

    def _shift_left(self, n: int) -> None:
        cache = self.cache
        for t in [*cache.k, *cache.v]:
            t[:, :, :-n] = t[:, :, n:].clone()
        cache.valid[:, :-n] = cache.valid[:, n:].clone()
        cache.valid[:, -n:] = False
        cache.pos -= n
        self._narrow()


def _advance(row: _Row, token: int, tokenizer: Tokenizer) -> bool:
    """Apply the stop rules after `token` joined the row; True when the row is finished."""
    p = row.params
    done = token in row.stop_ids or len(row.ids) >= row.budget
    if p.stop or row.live_text or done:  # decoding every step costs time: only when something reads it
        row.text = tokenizer.decode([t for t in row.ids if t not in row.stop_ids])
    hits = [row.text.index(s) for s in p.stop if s in row.text]
    if hits:  # the text ends before the stop string; tokens after it are dropped
        row.text, row.finish_reason = row.text[:min(hits)], "stop"
    elif token in row.stop_ids:
        row.finish_reason = "stop"
    elif len(row.ids) >= row.budget:
        row.finish_reason = "length"
    return row.finish_reason is not None


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, device: str | torch.device | None = None,
                 batch_size: int = 16, dtype: torch.dtype | None = None, compile: bool = False):
        """dtype: the autocast precision of the forward passes; None = bf16 on CUDA, fp32 elsewhere
        (training passes its --dtype, so samples run in the precision the model trains in).
        compile: run decode steps through torch.compile (one trace per batch width; the first
        step of each width waits for the compiler, seconds), replayed as CUDA graphs on a GPU. On a
        2-core CPU it measured 2x at batch 1 and 1.1x at batch 16 (bench.py generate)."""
        if not model.cfg.causal:
            raise ConfigError("generation needs a causal (GPT-style) model; this one is bidirectional")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = dtype if dtype is not None else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.end_ids = sorted({tokenizer.eos_id, tokenizer.special_tokens.get("<|end|>", tokenizer.eos_id)})
        self.decode = None  # None: model.decode_step, eager
        if compile:  # CUDA graphs ("reduce-overhead") remove the launch cost of a step's many small kernels
            self.decode = torch.compile(model.decode_step, dynamic=False, fullgraph=True,
                                        mode="reduce-overhead" if self.device.type == "cuda" else None)

    @contextlib.contextmanager
    def _eval_mode(self):
        """No dropout while generating or scoring; a model in training (samples during pretraining)
        goes back to training mode afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def _autocast(self):
        return autocast(self.device, self.dtype)

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """A text prompt is encoded after a bos token; a list of ids is taken as it is."""
        ids = list(prompt) if not isinstance(prompt, str) else self.tokenizer.encode(prompt, bos=True)
        if not ids:
            raise ConfigError("empty prompt: give at least one token")
        if len(ids) >= self.model.cfg.block_size:
            raise ConfigError(f"the prompt is {len(ids)} tokens, but the context is {self.model.cfg.block_size}: "
                              f"shorten it to at most {self.model.cfg.block_size - 1}")
        return ids

    # ---------------------------------------------------------- generation

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False, images: list | None = None) -> list[Completion]:
        """Completions of every prompt, in order. Up to batch_size run at once; a finished one's
        slot goes to the next waiting prompt at the next step (continuous batching). images: one
        entry per prompt, None or the images [N, C, S, S] of its <|image|> runs."""
        params = params or SamplingParams()
        per_request = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_request) != len(prompts):
            raise ConfigError(f"{len(prompts)} prompts but {len(per_request)} sampling parameters")
        images = images if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise ConfigError(f"{len(prompts)} prompts but {len(images)} entries of images")
        rows = [self.new_row(p, sp, images=im) for p, sp, im in zip(prompts, per_request, images)]
        waiting = list(reversed(rows))
        with self._eval_mode(), tqdm(total=len(rows), desc="generate", disable=not progress) as bar:
            batch = self.new_batch(min(self.batch_size, len(rows)))
            while waiting or batch.active:
                if waiting and batch.free:  # newcomers take the free slots, prefilled together
                    batch.add(*[waiting.pop() for _ in range(min(batch.free, len(waiting)))])
                bar.update(len(batch.step()))
        return [row.completion() for row in rows]

    def new_row(self, prompt: str | list[int], params: SamplingParams, live_text: bool = False, images=None) -> _Row:
        """A request, ready to join a RunningBatch (checks the prompt and the settings; images: the
        prompt's images, whose count must match its <|image|> runs)."""
        stop_ids = set(params.stop_token_ids if params.stop_token_ids is not None else self.end_ids)
        ids = self.encode_prompt(prompt)
        cfg = self.model.cfg
        if cfg.vision is not None or images is not None:  # an error now, not in the middle of someone else's batch
            slots = sum(t == cfg.image_token_id for t in ids) if cfg.vision is not None else 0
            have = 0 if images is None else len(images)
            per_image = self.model.vision.cfg.n_tokens if cfg.vision is not None else 0
            if cfg.vision is None or slots != have * per_image:
                raise ConfigError(f"the prompt holds {slots} image tokens for {have} images"
                                  + (f" ({per_image} tokens each)" if per_image else ": this model reads no images"))
        return _Row(ids, params, stop_ids, cfg.block_size, self.device, live_text, images)

    def new_batch(self, slots: int | None = None) -> RunningBatch:
        """An empty running batch on this engine's model (the server keeps one and feeds it)."""
        return RunningBatch(self.model, self.tokenizer, slots or self.batch_size, self.device, self.dtype, self.end_ids,
                            self.decode)

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None, images=None) -> "Stream":
        """Text deltas of one completion as they become safe to show:
            stream = engine.stream("Once upon a time", params)
            for delta in stream: print(delta, end="")
            stream.completion    # the whole Completion, once the loop has ended"""
        return Stream(self, self.new_row(prompt, params or SamplingParams(), live_text=True, images=images))

    # ---------------------------------------------------------- scoring

    def logprobs(self, contexts: list[list[int]], continuations: list[list[int]], greedy: bool = False,
                 progress: bool = False) -> list[tuple]:
        """(summed log-probability, token count) of each continuation after its context, teacher
        forced, over the tokenizer's vocabulary (as generation samples); with greedy=True a third
        value says whether every continuation token is the model's argmax. Contexts longer than
        the room left are cut from the left."""
        with self._eval_mode(), torch.no_grad():
            return self._score(contexts, continuations, greedy, progress)

    def _score(self, contexts, continuations, greedy: bool, progress: bool) -> list[tuple]:
        model, block, results = self.model, self.model.cfg.block_size, []
        for start in tqdm(range(0, len(contexts), self.batch_size), desc="score", disable=not progress):
            pairs = []
            for ctx, cont in zip(contexts[start:start + self.batch_size], continuations[start:start + self.batch_size]):
                if not cont or not ctx:
                    raise ConfigError("a continuation and its context need at least one token each (e.g. bos)")
                if len(cont) >= block:
                    raise ConfigError(f"a continuation of {len(cont)} tokens does not fit the context of {block}")
                seq = (list(ctx) + list(cont))[-block - 1:]  # the first token is only ever input
                pairs.append((seq, len(cont)))
            idx, mask = pad_batch([seq[:-1] for seq, _ in pairs])
            # targets only on the continuation: -100 (ignored) for the context and the padding
            targets, _ = pad_batch([[-100] * (len(seq) - 1 - n) + seq[-n:] for seq, n in pairs], value=-100)
            idx, targets, mask = idx.to(self.device), targets.to(self.device), mask.to(self.device)
            with self._autocast():
                logits, _ = model(idx, attention_mask=mask)
            vocab = self.tokenizer.vocab_size  # normalised over the tokenizer's ids, as sampled
            picked = token_logprobs(logits, targets, vocab_limit=vocab)  # 0 where the target is ignored
            if greedy:
                is_top = (logits[..., :vocab].argmax(-1) == targets) | (targets < 0)
                results += [(float(picked[b].sum()), n, bool(is_top[b].all())) for b, (_, n) in enumerate(pairs)]
            else:
                results += [(float(picked[b].sum()), n) for b, (_, n) in enumerate(pairs)]
        return results


def safe_prefix(row: _Row) -> str:
    """The part of a row's text that may be shown: never half a UTF-8 character (bytes that do
    not decode yet), never the start of a stop string that may still complete."""
    if row.finish_reason:
        return row.text
    text = row.text.rstrip("\ufffd")  # a character whose bytes have not all arrived yet
    for stop in row.params.stop:  # hold back what may become a stop string
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                text = text[:-k]
                break
    return text


class Stream:
    """One completion's text deltas (iterate), then `.completion`. It runs its own one-row batch;
    the server instead feeds every request into one shared RunningBatch."""

    def __init__(self, engine: Engine, row: _Row):
        self.engine, self.row, self.completion = engine, row, None

    def __iter__(self) -> Iterator[str]:
        with self.engine._eval_mode():
            batch = self.engine.new_batch(1)
            batch.add(self.row)
            while batch.active:
                batch.step()
                delta = self.row.new_text()
                if delta:
                    yield delta
        self.completion = self.row.completion()
