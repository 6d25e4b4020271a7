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


def test_resized_vocab_keeps_the_old_rows():
    model = randomised(ModelConfig(**GPT2))
    bigger = model.resized_vocab(128)
    assert bigger.cfg.vocab_size == 128 and bigger.lm_head.weight is bigger.transformer.wte.weight
    assert torch.equal(bigger.transformer.wte.weight[:101], model.transformer.wte.weight)
    x = torch.randint(0, 101, (1, 10))
    with torch.no_grad():
        assert torch.allclose(bigger(x)[0][..., :101], model(x)[0], atol=1e-6)
    with pytest.raises(ValueError, match="cannot shrink"):
        model.resized_vocab(50)


def test_pretraining_starts_from_a_hugging_face_gpt2_directory(tmp_path):
    """As a user with GPT-2's weights on disk would: data with the gpt2 tokenizer, --init_from the HF dir."""
    import subprocess
    import sys
    from pathlib import Path

    from textgen import markov
    root = Path(__file__).resolve().parents[1]
    hf = to_hf(randomised(ModelConfig(**{**GPT2, "vocab_size": 50257, "block_size": 32})))
    hf.save_pretrained(tmp_path / "gpt2-like")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"d{i}.txt").write_text(markov(i))
    subprocess.run([sys.executable, str(root / "data" / "prepare.py"), "--input", str(src), "--out", str(tmp_path / "data"),
                    "--tokenizer=gpt2", "--languages=", "--progress=false", "--num_workers=1", "--val_fraction=0.2"],
                   check=True, capture_output=True)
    import train_pretrain
    result = train_pretrain.main(["--init_from", str(tmp_path / "gpt2-like"), "--data_dir", str(tmp_path / "data"),
                                  "--out_dir", str(tmp_path / "out"), "--max_iters=3", "--batch_size=2",
                                  "--eval_iters=1", "--eval_interval=100", "--sample_tokens=0"])
    from nanofm.checkpoint import load_model
    model, meta = load_model(tmp_path / "out")
    assert model.cfg.vocab_size == 50304 and meta["parent"] == str(tmp_path / "gpt2-like") and result["val_loss"] > 0
