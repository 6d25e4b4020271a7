"""The engine: batched == one at a time, == the model's naive generate; stops; streaming; scoring."""

import pytest
import torch
import torch.nn.functional as F

from nanofm.engine import Engine, SamplingParams
from nanofm.model import ModelConfig, Transformer
from nanofm.tokenizer import Tokenizer, train_bpe
from textgen import prose


@pytest.fixture(scope="module")
def tok():
    corpus = [prose(i) for i in range(10)] + ["naïve café 東京 🙂 " * 20]
    return Tokenizer.from_merges(train_bpe(corpus, vocab_size=330, progress=False))


def make_model(tok, **layout):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=384, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=64,
                                norm="rmsnorm", pos="rope", mlp="swiglu", bias=False), **layout})
    return Transformer(cfg).eval()


PROMPTS = ["The river", "Quiet and early the", "A", "Before the teacher opens the window of the"]


@pytest.mark.parametrize("layout", [dict(), dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, n_kv_head=4)])
def test_batched_equals_one_at_a_time(tok, layout):
    engine = Engine(make_model(tok, **layout), tok, batch_size=4)
    for params in (SamplingParams(max_tokens=12, temperature=0),
                   [SamplingParams(max_tokens=5 + i, temperature=1.0, top_k=50, top_p=0.9, seed=i) for i in range(4)]):
        batched = engine.generate(PROMPTS, params)
        alone = [engine.generate([p], params if isinstance(params, SamplingParams) else [params[i]])[0]
                 for i, p in enumerate(PROMPTS)]
        assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
        assert [c.text for c in batched] == [c.text for c in alone]
        for a, b in zip(batched, alone):
            assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)


def test_same_tokens_as_the_models_naive_generate(tok):
    model = make_model(tok)
    engine = Engine(model, tok)
    prompt = tok.encode("The garden", bos=True)
    naive = model.generate(torch.tensor([prompt]), 15, temperature=0.9, top_k=40, use_cache=False,
                           generator=torch.Generator().manual_seed(7), vocab_limit=tok.vocab_size)
    out = engine.generate([prompt], SamplingParams(max_tokens=15, temperature=0.9, top_k=40, seed=7, stop_token_ids=[]))[0]
    assert out.token_ids == naive[0, len(prompt):].tolist() and out.finish_reason == "length"
    assert max(out.token_ids) < tok.vocab_size  # padding rows never sampled


def test_stop_strings_and_stop_tokens(tok):
    engine = Engine(make_model(tok), tok)
    free = engine.generate(["The river"], SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[]))[0]
    assert len(free.token_ids) == 30 and free.finish_reason == "length"
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 3]
    cut = engine.generate(["The river"], SamplingParams(max_tokens=30, temperature=0, stop=[stop], stop_token_ids=[]))[0]
    assert cut.text == free.text[:free.text.index(stop)] and cut.finish_reason == "stop"
    third = free.token_ids[2]
    ended = engine.generate(["The river"], SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[third]))[0]
    first = free.token_ids.index(third)
    assert ended.token_ids == free.token_ids[:first + 1] and ended.finish_reason == "stop"
    assert ended.text == tok.decode(free.token_ids[:first])  # the stop token is not text


def test_context_bounds_the_completion(tok):
    engine = Engine(make_model(tok), tok)
    long_prompt = list(range(1, 61))  # 60 of 64 positions
    out = engine.generate([long_prompt], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[]))[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="the context is 64"):
        engine.generate([list(range(1, 65))])
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[]])


def test_stream_deltas_are_safe_prefixes(tok):
    engine = Engine(make_model(tok), tok)
    for seed in range(6):  # a random model emits arbitrary bytes: partial UTF-8 characters happen
        params = SamplingParams(max_tokens=40, temperature=1.5, seed=seed, stop=["e t", "\n"], stop_token_ids=[])
        final = engine.generate(["naïve café"], params)[0].text
        shown = ""
        stream = engine.stream("naïve café", params)
        for delta in stream:
            shown += delta
            assert final.startswith(shown)  # nothing shown is ever taken back (no half characters, no stop text)
        assert shown == final == stream.completion.text


def test_logprobs_are_the_models(tok):
    model = make_model(tok)
    engine = Engine(model, tok, batch_size=3)
    contexts = [tok.encode("The river", bos=True), tok.encode("A", bos=True), tok.encode("Quiet and early the", bos=True)]
    conts = [tok.encode(" keeps the"), tok.encode(" lantern"), tok.encode(" window opens slowly")]
    scores = engine.logprobs(contexts, conts)
    for (total, n), ctx, cont in zip(scores, contexts, conts):
        seq = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = F.log_softmax(model(seq)[0][0, :-1, :tok.vocab_size], dim=-1)
        expected = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
        assert n == len(cont) and total == pytest.approx(expected, abs=1e-4)
    greedy = engine.generate([contexts[0]], SamplingParams(max_tokens=6, temperature=0, stop_token_ids=[]))[0]
    assert sum(greedy.token_logprobs) == pytest.approx(engine.logprobs([contexts[0]], [greedy.token_ids])[0][0], abs=1e-4)


def test_bad_parameters(tok):
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a number >= 0"):
            SamplingParams(temperature=bad)
    for bad in (0, 2, float("nan")):
        with pytest.raises(ValueError, match="top_p must be in"):
            SamplingParams(top_p=bad)
    with pytest.raises(ValueError, match="max_tokens must be at least 1"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="bidirectional"):
        Engine(make_model(tok, causal=False), tok)
    with pytest.raises(ValueError, match="2 prompts but 1"):
        Engine(make_model(tok), tok).generate(["a", "b"], [SamplingParams()])


def test_continuous_batching_requests_join_mid_flight_and_leave_when_done(tok):
    engine = Engine(make_model(tok), tok)
    params = [SamplingParams(max_tokens=n, temperature=1.0, seed=i, stop_token_ids=[]) for i, n in enumerate((20, 3, 12))]
    alone = [engine.generate([p], [sp])[0] for p, sp in zip(PROMPTS, params)]
    rows = [engine.new_row(p, sp) for p, sp in zip(PROMPTS, params)]
    batch = engine.new_batch(2)
    batch.add(rows[0])
    for _ in range(5):
        assert batch.step() == []
    batch.add(rows[1])  # joins while row 0 is at its 6th token
    finished_at = {}
    for step in range(6, 40):
        for row in batch.step():
            finished_at[rows.index(row)] = step
        if batch.free and rows[2] not in batch.rows and 2 not in finished_at:
            batch.add(rows[2])  # takes the slot row 1 left
        if not batch.active:
            break
    assert finished_at[1] < finished_at[0]  # the short request left first; nobody waited for the long one
    assert [r.completion().token_ids for r in rows] == [c.token_ids for c in alone]


def test_the_shared_cache_shifts_left_and_a_cancelled_request_frees_its_slot(tok):
    engine = Engine(make_model(tok), tok, batch_size=2)
    prompts = [f"{p} {i}" for i in range(3) for p in PROMPTS]  # 12 requests through 2 slots: far more steps than columns
    params = [SamplingParams(max_tokens=25, temperature=0.8, seed=i, stop_token_ids=[]) for i in range(len(prompts))]
    batched = engine.generate(prompts, params)
    alone = [engine.generate([p], [sp])[0] for p, sp in zip(prompts, params)]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    batch = engine.new_batch(2)
    again = SamplingParams(max_tokens=25, temperature=0.8, seed=0, stop_token_ids=[])
    expected = engine.generate([PROMPTS[0]], [again])[0].token_ids
    second = engine.new_row(PROMPTS[1], params[1])
    batch.add(engine.new_row(PROMPTS[0], again))
    batch.add(second)
    shifts, done = 0, []
    for _ in range(200):  # keep one slot busy for > 2 x block_size steps: the pointer must wrap
        before = batch.cache.pos
        done += batch.step()
        shifts += batch.cache.pos < before
        if second in batch.rows:
            batch.cancel(second)
        if batch.free == 2:
            batch.add(engine.new_row(PROMPTS[0], again))
    assert shifts >= 2 and second.finish_reason is None and second not in batch.rows  # cancelled, not finished
    assert len(done) >= 7 and all(row.ids == expected for row in done)  # still exact across the shifts


def test_compiled_decode_steps_give_the_eager_tokens_and_trace_once(tok):
    """torch.compile on CPU (the CUDA-graph path's trace, minus the graphs): the same tokens as
    eager decoding, through joins, leaves and shifts of the shared cache, from one trace."""
    from torch._dynamo.utils import counters
    model = make_model(tok)
    eager, compiled = Engine(model, tok, batch_size=2), Engine(model, tok, batch_size=2, compile=True)
    prompts = [f"{p} {i}" for i in range(2) for p in PROMPTS]  # 8 requests through 2 slots: the pointer wraps
    params = [SamplingParams(max_tokens=25, temperature=0 if i % 3 == 0 else 0.8, seed=i, stop_token_ids=[])
              for i in range(len(prompts))]
    counters.clear()
    got = compiled.generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in eager.generate(prompts, params)]
    assert counters["stats"]["unique_graphs"] == 1  # one trace serves every step
    for a, b in zip(got, eager.generate(prompts, params)):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
