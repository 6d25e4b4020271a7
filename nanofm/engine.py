"""Batched generation with a KV cache, and teacher-forced scoring: the one inference engine that
evaluation, RL and serving share.

    engine = Engine(model, tokenizer)
    outs = engine.generate(["Once upon a time", "User: hi\\nBot:"],
                           SamplingParams(max_tokens=50, temperature=0.8, top_p=0.95, seed=1, stop=["\\n"]))
    outs[0].text, outs[0].finish_reason                      # "stop" or "length"
    for delta in engine.stream("Once upon a time", SamplingParams(max_tokens=50)):
        print(delta, end="", flush=True)
    engine.logprobs([context_ids], [continuation_ids])      # summed log-probabilities (multiple choice, RL)

Design decisions:
- Prompts of unequal length are left-padded into one batch; each row gets its own positions and
  the cache remembers the padding, so a row generates exactly what it would generate alone
  (tested: batched == one at a time, greedy and sampled).
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
    """One request's progress through the batch."""

    def __init__(self, prompt_len: int, params: SamplingParams, stop_ids: set[int], room: int, device):
        self.params, self.stop_ids, self.prompt_len = params, stop_ids, prompt_len
        self.budget = min(params.max_tokens, room)  # the context bounds the new tokens too
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)))
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.ids, self.logprobs, self.text, self.finish_reason = [], [], "", None


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, device: str | torch.device | None = None,
                 batch_size: int = 16, dtype: torch.dtype | None = None):
        """dtype: the autocast precision of the forward passes; None = bf16 on CUDA, fp32 elsewhere
        (training passes its --dtype, so samples run in the precision the model trains in)."""
        if not model.cfg.causal:
            raise ConfigError("generation needs a causal (GPT-style) model; this one is bidirectional")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = dtype if dtype is not None else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.end_ids = sorted({tokenizer.eos_id, tokenizer.special_tokens.get("<|end|>", tokenizer.eos_id)})

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
                 progress: bool = False) -> list[Completion]:
        params = params or SamplingParams()
        per_request = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_request) != len(prompts):
            raise ConfigError(f"{len(prompts)} prompts but {len(per_request)} sampling parameters")
        encoded = [self.encode_prompt(p) for p in prompts]
        results: list[Completion] = []
        for start in tqdm(range(0, len(encoded), self.batch_size), desc="generate", disable=not progress):
            rows = None
            for rows in self._run(encoded[start:start + self.batch_size], per_request[start:start + self.batch_size]):
                pass
            results += [Completion(r.text, r.ids, r.finish_reason, r.prompt_len, r.logprobs) for r in rows]
        return results

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one completion as they become safe to show; `last_completion` holds the
        whole Completion afterwards."""
        params = params or SamplingParams()
        shown = 0
        for (row,) in self._run([self.encode_prompt(prompt)], [params], live_text=True):
            safe = row.text if row.finish_reason else self._safe_prefix(row)
            if len(safe) > shown:
                yield safe[shown:]
                shown = len(safe)
        self.last_completion = Completion(row.text, row.ids, row.finish_reason, row.prompt_len, row.logprobs)

    def _safe_prefix(self, row: _Row) -> str:
        text = row.text.rstrip("\ufffd")  # a character whose bytes have not all arrived yet
        for stop in row.params.stop:  # hold back what may become a stop string
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    text = text[:-k]
                    break
        return text

    def _run(self, prompts: list[list[int]], params: list[SamplingParams], live_text: bool = False) -> Iterator[list[_Row]]:
        """Generate for one batch, yielding the rows after every step (with live_text, each row's
        text is kept current at every step, for streaming)."""
        with self._eval_mode():
            yield from self._decode(prompts, params, live_text)

    @torch.no_grad()
    def _decode(self, prompts: list[list[int]], params: list[SamplingParams], live_text: bool) -> Iterator[list[_Row]]:
        model, device, block = self.model, self.device, self.model.cfg.block_size
        vocab = self.tokenizer.vocab_size
        rows = [_Row(len(ids), p, set(p.stop_token_ids if p.stop_token_ids is not None else self.end_ids),
                     block - len(ids), device) for ids, p in zip(prompts, params)]
        B, L = len(prompts), max(map(len, prompts))
        steps = max(r.budget for r in rows)
        idx, mask = pad_batch(prompts, left=True)  # every prompt ends at column L - 1
        idx, mask = idx.to(device), mask.to(device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = KVCache(model.cfg, B, L + steps, device, model.lm_head.weight.dtype)
        with self._autocast():
            logits, _ = model(idx, attention_mask=mask, cache=cache, positions=positions)
        next_pos = positions[:, -1:] + 1
        for _ in range(steps):
            last = logits[:, -1, :vocab].float()
            tokens = torch.zeros(B, 1, dtype=torch.long, device=device)
            for b, row in enumerate(rows):
                if not row.finish_reason:
                    p = row.params
                    tokens[b, 0] = sample_next(last[b:b + 1], p.temperature, p.top_k, p.top_p, row.generator)[0, 0]
            chosen_logprobs = token_logprobs(last, tokens[:, 0]).tolist()
            for b, row in enumerate(rows):
                if row.finish_reason:
                    continue
                p, token = row.params, int(tokens[b, 0])
                row.ids.append(token)
                row.logprobs.append(chosen_logprobs[b])
                done = token in row.stop_ids or len(row.ids) >= row.budget
                if p.stop or live_text or done:  # decoding every step costs time: only when something reads it
                    row.text = self.tokenizer.decode([t for t in row.ids if t not in row.stop_ids])
                hits = [row.text.index(s) for s in p.stop if s in row.text]
                if hits:  # the text ends before the stop string; tokens after it are dropped
                    row.text, row.finish_reason = row.text[:min(hits)], "stop"
                elif token in row.stop_ids:
                    row.finish_reason = "stop"
                elif len(row.ids) >= row.budget:
                    row.finish_reason = "length"
            yield rows
            if all(r.finish_reason for r in rows):
                return
            alive = torch.tensor([[0 if r.finish_reason else 1] for r in rows], device=device)
            with self._autocast():
                logits, _ = model(tokens, attention_mask=alive, cache=cache, positions=next_pos.clamp(max=block - 1))
            next_pos = next_pos + 1

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
