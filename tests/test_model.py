"""The Transformer: causality, padding, KV cache == recompute, presets, layouts, sampling, MLM masks."""

import itertools

import pytest
import torch

from nanofm.data import mask_tokens
from nanofm.model import KVCache, ModelConfig, Transformer, describe, param_count_formula, sample_next


def small(**overrides):
    base = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=64, norm="rmsnorm",
                pos="rope", mlp="swiglu", bias=False)
    return ModelConfig(**{**base, **overrides})


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_gpt_is_causal(pos):
    model = Transformer(small(pos=pos)).eval()
    x = torch.randint(0, 97, (2, 20))
    changed = x.clone()
    changed[:, 11] = (x[:, 11] + 1) % 97
    a, _ = model(x)
    b, _ = model(changed)
    assert torch.equal(a[:, :11], b[:, :11])
    assert not torch.allclose(a[:, 11:], b[:, 11:])


def test_bert_is_bidirectional_and_ignores_padding():
    model = Transformer(small(causal=False, pos="learned", norm="layernorm", mlp="gelu", bias=True)).eval()
    x = torch.randint(0, 97, (2, 20))
    changed = x.clone()
    changed[:, 15] = (x[:, 15] + 1) % 97
    a, _ = model(x)
    b, _ = model(changed)
    assert not torch.allclose(a[:, :15], b[:, :15])  # earlier positions see the later token
    # padding: a sequence padded with junk gives the same outputs on its real tokens
    padded = torch.cat([x[:, :12], torch.randint(0, 97, (2, 8))], dim=1)
    mask = torch.cat([torch.ones(2, 12), torch.zeros(2, 8)], dim=1)
    full, _ = model(x[:, :12])
    masked, _ = model(padded, attention_mask=mask)
    assert torch.allclose(full, masked[:, :12], atol=1e-5)


@pytest.mark.parametrize("layout", [dict(), dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, n_kv_head=4),
                                    dict(norm_position="post", mlp="gelu_exact", head_bias=True)])
def test_kv_cache_equals_full_recompute(layout):
    model = Transformer(small(**layout)).eval()
    prompt = torch.randint(0, 97, (3, 7))
    greedy = model.generate(prompt, 20, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, 20, temperature=0, use_cache=False))
    sampled = model.generate(prompt, 20, temperature=1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    again = model.generate(prompt, 20, temperature=1.0, top_k=20, top_p=0.9, use_cache=False,
                           generator=torch.Generator().manual_seed(3))
    assert torch.equal(sampled, again)
    # logits: a prefill, then a chunk of 5 (the explicit mask path), then single tokens
    seq = torch.randint(0, 97, (3, 30))
    full, _ = model(seq)
    cache = KVCache(model.cfg, 3, 30, "cpu", torch.float32)
    parts = [model(seq[:, :10], cache=cache)[0], model(seq[:, 10:15], cache=cache)[0]]
    parts += [model(seq[:, i:i + 1], cache=cache)[0] for i in range(15, 30)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_generation_errors():
    model = Transformer(small())
    with pytest.raises(ValueError, match="exceeds the context"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="causal"):
        Transformer(small(causal=False)).generate(torch.zeros(1, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    assert sample_next(logits, temperature=0).item() == 1
    draws = {sample_next(logits, 1.0, top_k=1).item() for _ in range(20)}
    assert draws == {1}
    draws = {sample_next(logits, 1.0, top_k=2).item() for _ in range(200)}
    assert draws == {1, 3}
    draws = {sample_next(logits, 1.0, top_p=0.5).item() for _ in range(200)}  # 1 alone has p = 0.46 < 0.5
    assert draws == {1, 3}


def test_gpt2_preset_parameter_count():
    cfg = ModelConfig.preset("gpt2")
    assert describe(cfg)["params"] == param_count_formula(cfg) == 124_475_904
    cfg = ModelConfig.preset("gpt2", vocab_size=50257)
    assert describe(cfg)["params"] == param_count_formula(cfg) == 124_439_808  # GPT-2's published 124M
    info = describe(ModelConfig.preset("gpt2"))
    # 6N + 12 L H Q T with N without the position embeddings
    assert info["flops_per_token"] == 6 * (124_475_904 - 1024 * 768) + 12 * 12 * 12 * 64 * 1024


@pytest.mark.parametrize("norm, pos, mlp, position", list(itertools.product(["layernorm", "rmsnorm"], ["learned", "rope"],
                                                                            ["gelu", "gelu_exact", "swiglu"], ["pre", "post"])))
def test_every_layout_trains(norm, pos, mlp, position):
    model = Transformer(small(norm=norm, pos=pos, mlp=mlp, norm_position=position, tie_embeddings=False, dropout=0.1))
    x = torch.randint(0, 97, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_config_errors():
    with pytest.raises(ValueError, match="divisible by n_head"):
        ModelConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="divisible by n_kv_head"):
        ModelConfig(n_head=12, n_kv_head=5)
    with pytest.raises(ValueError, match="norm must be one of"):
        ModelConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="norm_position must be one of"):
        ModelConfig(norm_position="sandwich")
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        ModelConfig.preset("gpt5")


def test_mlm_masking_statistics():
    vocab, specials = 1000, [990, 991, 992]
    x = torch.randint(0, 990, (64, 512))
    x[:, 0] = 990  # a bos at the start of every row: never chosen
    inputs, targets = mask_tokens(x, vocab, mask_id=992, special_ids=specials, prob=0.15,
                                  generator=torch.Generator().manual_seed(0))
    chosen = targets != -100
    assert not chosen[:, 0].any() and torch.equal(targets[chosen], x[chosen])
    assert abs(chosen.float().mean().item() - 0.15 * 511 / 512) < 0.005
    n = chosen.sum().item()
    masked = (inputs[chosen] == 992).sum().item() / n
    kept = (inputs[chosen] == x[chosen]).sum().item() / n
    randomised = 1 - masked - kept
    assert abs(masked - 0.8) < 0.015 and abs(kept - 0.1) < 0.015 and abs(randomised - 0.1) < 0.015
    assert torch.equal(inputs[~chosen], x[~chosen])  # unchosen tokens are untouched
    assert inputs[chosen & (inputs != 992)].max() < 990  # random tokens are regular tokens


def test_a_bidirectional_model_learns_to_use_context_on_a_copy_task():
    """Rows [w, w] (a random half, then the same half again): a masked token's only clue is its twin
    in the other half, so masked-token accuracy above chance means the model reads its context.
    It fails if attention cannot see both sides (a causal mask, a broken padding mask, ...)."""
    from nanofm.data import mask_tokens
    torch.manual_seed(0)
    vocab, half, specials = 40, 8, [38, 39]  # 38 = <|mask|>
    model = Transformer(ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, n_embd=64, block_size=2 * half, causal=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)

    def batch(n):
        first = torch.randint(0, 38, (n, half), generator=generator)
        return torch.cat([first, first], dim=1)

    for _ in range(400):
        x = batch(64)
        inputs, targets = mask_tokens(x, vocab, 38, specials, 0.4, generator)
        _, loss = model(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x = batch(256)
    inputs, targets = mask_tokens(x, vocab, 38, specials, 0.4, generator)
    twin_visible = torch.roll(targets, half, dims=1) < 0  # the other copy was not chosen for prediction
    chosen = (targets >= 0) & twin_visible
    with torch.no_grad():
        predicted = model(inputs)[0].argmax(-1)
    accuracy = float((predicted[chosen] == targets[chosen]).float().mean())
    assert accuracy > 0.9, accuracy  # chance is 1/38


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pool", ["auto", "first", "last", "mean"])
def test_the_classification_head_reads_the_same_token_with_left_and_right_padding(causal, pool):
    from nanofm.data import pad_batch
    torch.manual_seed(0)
    body = Transformer(ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=16, causal=causal,
                                   norm="rmsnorm", pos="rope", mlp="swiglu", bias=False))
    model = body.with_classifier(3, pool=pool).eval()
    assert torch.equal(model.transformer.wte.weight, body.transformer.wte.weight)  # the body is kept
    rows = [[5, 6, 7, 8, 9], [1, 2, 3]]
    with torch.no_grad():
        alone = torch.cat([model.classify(torch.tensor([r])) for r in rows])
        for left in (False, True):
            idx, mask = pad_batch(rows, value=0, left=left)
            assert torch.allclose(model.classify(idx, mask), alone, atol=1e-5), (pool, left)


def test_a_value_head_shares_the_body_and_comes_off_for_export():
    torch.manual_seed(0)
    lm = Transformer(ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16))
    critic = lm.with_value_head()
    idx = torch.randint(0, 64, (3, 10))
    logits, values = critic(idx, head="values")
    assert values.shape == (3, 10) and torch.equal(logits, lm(idx)[0])  # the policy is untouched by the new head
    changed = idx.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 64
    later = critic(changed, head="values")[1]
    assert torch.equal(later[:, :5], values[:, :5]) and not torch.equal(later[:, 5:], values[:, 5:])  # causal values
    plain = critic.with_value_head(False)
    assert not plain.cfg.value_head and "value_head.weight" not in plain.state_dict()
    assert torch.equal(plain(idx)[0], logits)
    with pytest.raises(Exception, match="no value head"):
        lm(idx, head="values")
    pytest.importorskip("transformers")
    from nanofm.convert import to_hf
    hf = to_hf(critic)
    assert torch.allclose(hf(idx).logits, logits, atol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_maps_are_the_fused_kernels_probabilities(causal):
    """With the identity as values, scaled_dot_product_attention returns its probabilities: the
    maps must equal them, layer by layer (grouped-query attention and RoPE included)."""
    import torch.nn.functional as F
    from nanofm.common import ConfigError
    from nanofm.model import attention_maps
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16,
                                    pos="rope", norm="rmsnorm", causal=causal)).eval()
    idx = torch.randint(0, 50, (1, 10))
    maps = attention_maps(model, idx)
    assert maps.shape == (2, 4, 10, 10)
    x, rope = model._embed(idx, torch.arange(10))
    for layer, block in enumerate(model.transformer.h):
        q, k, _ = block.attn.project(block.ln_1(x), rope)
        eye = torch.eye(10).expand(1, 2, 10, 10)
        expected = F.scaled_dot_product_attention(q, k, eye, is_causal=causal, enable_gqa=True)[0]
        assert torch.allclose(maps[layer], expected, atol=1e-5)
        x = block(x, rope)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 4, 10)) and (maps.triu(1).abs().max() == 0) == causal
    with pytest.raises(ConfigError, match="one sequence"):
        attention_maps(model, torch.zeros(2, 5, dtype=torch.long))
