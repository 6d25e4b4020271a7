"""nanofm.quantize: int8 weight-only export, against the plain dequantize-then-matmul reference,
and loaded by checkpoint.load_model and serve.py."""

import pytest
import torch

from nanofm import quantize
from nanofm.checkpoint import load_model, save_checkpoint
from nanofm.common import ConfigError
from nanofm.engine import Engine, SamplingParams
from nanofm.quantize import Int8Embedding, Int8Linear, dequantize, quantize_per_channel, reference_matmul
from test_engine import make_model, tok  # noqa: F401  (the engine tests' tokenizer fixture)


def test_per_channel_quantization_is_symmetric_and_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different sizes
    w[5] = 0  # an all-zero row stays zero
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert (q.abs().amax(1)[torch.arange(48) != 5] == 127).all()  # every row uses its full range
    assert (q[5] == 0).all()
    error = (dequantize(q, scale) - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()  # rounding: at most half a step, per row's own step
    # per channel matters: one scale for the whole matrix would round the small rows to zero
    assert (w[:4].abs() / (w.abs().max() / 127) < 0.5).all() and (q[:4] != 0).any()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 15, 80])  # decode steps take the fused loop, a prefill (> 32 rows) the GEMM
def test_int8_linear_equals_the_dequantizing_reference(bias, dtype, rows):
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 40, bias=bias)
    layer = Int8Linear.from_float(linear)
    x = torch.randn(rows, 1, 64)
    expected = reference_matmul(x, layer.weight, layer.weight_scale, linear.bias if bias else None)
    got = layer(x.to(dtype)).float()
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, expected.detach(), rtol=tolerance, atol=tolerance)
    # and close to the float layer it came from (int8 error, not a different function)
    assert (got - linear(x)).abs().max() < 0.05 * linear(x).abs().max()


def test_the_eager_fallback_computes_the_same_as_the_fused_loop():
    torch.manual_seed(2)
    q, scale = quantize_per_channel(torch.randn(24, 32))
    x = torch.randn(4, 32)
    torch.testing.assert_close(quantize._gemv_eager(x, q, scale), quantize._gemv(x, q, scale), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(quantize._gemv_eager(x, q, scale), reference_matmul(x, q, scale), rtol=1e-5, atol=1e-5)


def save(model, tok, tmp_path, name="full"):  # noqa: F811
    tok.save(tmp_path / "tokenizer.json")
    return save_checkpoint(tmp_path / name, 1, model, {"stage": "sft", "model": model.cfg.__dict__, "lineage": []},
                           tokenizer_path=tmp_path / "tokenizer.json")


@pytest.mark.parametrize("tied", [False, True])
def test_export_is_smaller_loads_as_int8_and_generates_like_the_full_model(tok, tmp_path, tied):  # noqa: F811
    model = make_model(tok, tie_embeddings=tied)
    full = save(model, tok, tmp_path)
    exported = quantize.export(full, tmp_path / "int8")
    int8, meta = load_model(exported)
    assert meta["quantization"]["bits"] == 8 and meta["parent"] == str(full)
    assert isinstance(int8.lm_head, Int8Linear) and isinstance(int8.transformer.wte, Int8Embedding)
    assert isinstance(int8.transformer.h[0].attn.c_attn, Int8Linear) and int8.compute_dtype == torch.float32
    if tied:  # one table for the embedding and the head
        assert int8.lm_head.weight is int8.transformer.wte.weight
    # the file: int8 matrices (1 byte) instead of fp32 (4 bytes), plus a scale per row and the norms
    ratio = (exported / "model.pt").stat().st_size / (full / "model.pt").stat().st_size
    assert ratio < 0.33, ratio
    ids = torch.randint(0, tok.vocab_size, (2, 40))
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = int8(ids)
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    greedy = SamplingParams(max_tokens=12, temperature=0)
    texts = [Engine(m, tok).generate(["The river"], greedy)[0].text for m in (model, int8)]
    assert texts[0] == texts[1]
    with pytest.raises(ConfigError, match="already quantized"):
        quantize.export(exported, tmp_path / "again")


def test_an_int8_export_refuses_to_train(tok, tmp_path):  # noqa: F811
    from nanofm.train import TrainConfig, setup, wrap_model
    int8, _ = load_model(quantize.export(save(make_model(tok), tok, tmp_path), tmp_path / "int8"))
    cfg = TrainConfig(device="cpu")
    with pytest.raises(ConfigError, match="int8 export.*parent"):
        wrap_model(int8, cfg, setup(cfg))


def test_serve_int8_flag_quantizes_at_load_and_an_export_loads_without_it(tok, tmp_path):  # noqa: F811
    pytest.importorskip("fastapi", reason="serve.py needs fastapi (requirements.txt)")
    import serve
    from fastapi.testclient import TestClient
    full = save(make_model(tok), tok, tmp_path)
    exported = quantize.export(full, tmp_path / "int8")
    with pytest.raises(ConfigError, match="--compile must be"):
        serve.load_app(serve.parse_config(serve.ServeConfig, ["--ckpt", str(full), "--compile=yes"]))
    for ckpt, flag in [(full, ["--int8", "--compile=true"]), (exported, []), (full, [])]:
        cfg = serve.parse_config(serve.ServeConfig, ["--ckpt", str(ckpt), "--log=", "--device=cpu", *flag])
        app = serve.load_app(cfg)
        client = TestClient(app)
        out = client.post("/v1/completions", json={"model": ckpt.parent.name, "prompt": "The river", "max_tokens": 5,
                                                   "temperature": 0}).json()
        assert out["choices"][0]["finish_reason"] in ("stop", "length")
        health = client.get("/health").json()
        assert health["quantization"] == (None if ckpt == full and not flag else quantize.METHOD), (ckpt, flag)


def test_an_int8_model_decodes_the_same_compiled_and_eager(tok):  # noqa: F811
    int8 = quantize.quantize_model(make_model(tok))
    params = SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[])
    prompts = ["The river", "A"]
    eager = Engine(int8, tok).generate(prompts, params)
    compiled = Engine(int8, tok, compile=True).generate(prompts, params)
    assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
