"""The GPU code paths, proven on CPU as far as a CPU can: torch.compile trains like eager, a bf16
autocast step trains, and the engine runs in the dtype it is given."""

import pytest
import torch

from nanofm import common
from nanofm.common import ConfigError, resolve_dtype
from nanofm.engine import Engine, SamplingParams
from nanofm.model import ModelConfig, Transformer
from nanofm.tokenizer import Tokenizer, train_bpe

SHAPE = dict(vocab_size=320, n_layer=1, n_head=2, n_kv_head=1, n_embd=32, block_size=16, norm="rmsnorm", pos="rope",
             mlp="swiglu", bias=False)


def train_steps(compiled: bool, steps: int = 3, dtype=None):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SHAPE))
    step_model = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 320, (4, 17), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False):
            _, loss = step_model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses, model


@pytest.mark.slow
def test_torch_compile_on_cpu_trains_like_eager():
    eager_losses, eager = train_steps(compiled=False)
    compiled_losses, compiled = train_steps(compiled=True)
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-4)
    assert eager_losses[-1] < eager_losses[0]
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4), name


def test_bf16_autocast_training_step_on_cpu():
    fp32_losses, _ = train_steps(compiled=False, steps=5)
    bf16_losses, model = train_steps(compiled=False, steps=5, dtype=torch.bfloat16)
    assert all(torch.isfinite(torch.tensor(bf16_losses))) and bf16_losses[-1] < bf16_losses[0] - 0.1
    assert bf16_losses != fp32_losses  # bf16 really ran ...
    assert bf16_losses == pytest.approx(fp32_losses, abs=0.05)  # ... and trains like fp32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps fp32 master weights


def test_dtype_choice(monkeypatch, tmp_path):
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16 and resolve_dtype("auto", "mps") == torch.float32
    assert resolve_dtype("auto", "cpu") == torch.float32  # conftest pins NANOFM_CPU_DTYPE=float32
    monkeypatch.delenv("NANOFM_CPU_DTYPE")
    # auto on a CPU follows its flags: AMX or AVX-512 BF16 -> bf16, an older CPU -> fp32
    for flags, expected in (("fpu sse avx2 avx512f avx512_bf16", torch.bfloat16), ("fpu amx_tile amx_bf16", torch.bfloat16),
                            ("fpu sse avx2 avx512f avx512_vnni", torch.float32)):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(common, "CPUINFO", cpuinfo)
        assert resolve_dtype("auto", "cpu") == expected, flags
    monkeypatch.setenv("NANOFM_CPU_DTYPE", "float16")
    with pytest.raises(ConfigError, match="NANOFM_CPU_DTYPE"):
        resolve_dtype("auto", "cpu")
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ConfigError, match="gradient scaler"):
        resolve_dtype("float16", "cuda")


def test_engine_runs_in_the_dtype_it_is_given():
    tok = Tokenizer.from_merges(train_bpe(["the cat sat on the mat"] * 10, 300, progress=False))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**SHAPE, "block_size": 32})).eval()
    contexts, continuations = [[tok.bos_id] + tok.encode("the cat")], [tok.encode(" sat on")]
    fp32 = Engine(model, tok).logprobs(contexts, continuations)[0][0]
    bf16_engine = Engine(model, tok, dtype=torch.bfloat16)
    bf16 = bf16_engine.logprobs(contexts, continuations)[0][0]
    assert fp32 != bf16 and fp32 == pytest.approx(bf16, abs=0.1)
    out = bf16_engine.generate(["the"], SamplingParams(max_tokens=4, temperature=0))[0]
    assert len(out.token_ids) == 4 and all(lp <= 0 for lp in out.token_logprobs)
