"""Hugging Face interop: exported models give our logits (fp32, 1e-4), and import round-trips."""

import pytest
import torch

from nanofm.checkpoint import save_checkpoint
from nanofm.convert import ConversionError, architecture, from_hf, main, to_hf
from nanofm.model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")

GPT2 = dict(vocab_size=101, n_layer=2, n_head=4, n_embd=32, block_size=24)
LLAMA = dict(vocab_size=101, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=24, norm="rmsnorm", pos="rope",
             mlp="swiglu", bias=False, tie_embeddings=False)


def randomised(cfg):
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # norms and biases away from their 1/0 init, so every mapping is exercised
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("layout", [GPT2, LLAMA, {**LLAMA, "tie_embeddings": True, "n_kv_head": 4}])
def test_exported_logits_match(layout):
    model = randomised(ModelConfig(**layout))
    hf = to_hf(model)
    x = torch.randint(0, 101, (2, 24))
    with torch.no_grad():
        ours, _ = model(x)
        theirs = hf(x).logits
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    back = from_hf(hf)
    with torch.no_grad():
        assert torch.allclose(back(x)[0], ours, atol=1e-5)
    assert back.cfg.to_dict() == model.cfg.to_dict()


def test_layouts_that_cannot_be_held_are_refused():
    with pytest.raises(ConversionError, match="post-norm"):
        architecture(ModelConfig(**{**GPT2, "causal": False}))
    with pytest.raises(ConversionError, match="neither GPT-2's"):
        architecture(ModelConfig(**{**GPT2, "pos": "rope"}))


def test_cli_round_trip_and_errors(tmp_path, capsys):
    model = randomised(ModelConfig(**GPT2))
    save_checkpoint(tmp_path / "run", 5, model, {"model": model.cfg.to_dict()})
    assert main(["--export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert main(["--import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    from nanofm.checkpoint import load_model
    back, meta = load_model(tmp_path / "back")
    assert meta["stage"] == "imported" and all(torch.equal(a, b) for a, b in zip(back.state_dict().values(),
                                                                                 model.state_dict().values()))
    with pytest.raises(SystemExit):
        main(["--export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")])  # exists: refused
    bert = Transformer(ModelConfig(**{**GPT2, "causal": False}))
    save_checkpoint(tmp_path / "bert", 1, bert, {"model": bert.cfg.to_dict()})
    assert main(["--export", str(tmp_path / "bert"), "--out", str(tmp_path / "hf_bert")]) == 1
    assert "post-norm" in capsys.readouterr().err and not (tmp_path / "hf_bert").exists()
