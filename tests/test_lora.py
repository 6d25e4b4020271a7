"""LoRA: starts equal to the base, merged == unmerged, only adapters get gradients, adapter
checkpoints load onto their own base only, and bad targets are clear errors."""

import pytest
import torch

from nanofm import lora
from nanofm.checkpoint import CheckpointError, load_model, make_meta, save_checkpoint
from nanofm.common import ConfigError
from nanofm.model import ModelConfig, Transformer

CFG = dict(vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, block_size=16, norm="rmsnorm", pos="rope",
           mlp="swiglu", bias=False)


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**CFG, **kw})).eval()


def test_starts_equal_merges_equal_and_trains_only_adapters():
    base, adapted = model(), model()
    names = lora.apply(adapted, lora.LoRAConfig(rank=4, alpha=8, targets=["attn.c_attn", "mlp.c_proj"]))
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_attn",
                     "transformer.h.1.mlp.c_proj"]
    x = torch.randint(0, 64, (2, 12))
    assert torch.equal(base(x)[0], adapted(x)[0])  # B = 0: the adapted model starts as the base
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    _, loss = adapted(x[:, :-1], x[:, 1:])
    loss.backward()
    assert all(p.grad is None for n, p in adapted.named_parameters() if not lora.is_adapter(n))
    assert all(p.grad is not None for n, p in adapted.named_parameters() if n.endswith("lora_B"))
    with torch.no_grad():  # move the adapters away from zero, then merge
        for n, p in adapted.named_parameters():
            if lora.is_adapter(n):
                p.normal_(0, 0.1)
    unmerged = adapted(x)[0]
    assert not torch.allclose(unmerged, base(x)[0])
    lora.merge(adapted)
    assert not any(isinstance(m, lora.LoRALinear) for m in adapted.modules())
    assert torch.allclose(adapted(x)[0], unmerged, atol=1e-5)
    assert set(adapted.state_dict()) == set(base.state_dict())  # a plain checkpoint again


def test_the_scaling_is_alpha_over_rank():
    layer = torch.nn.Linear(5, 3)
    adapted = lora.LoRALinear(layer, lora.LoRAConfig(rank=2, alpha=6))
    with torch.no_grad():
        adapted.lora_B.normal_()
    x = torch.randn(4, 5)
    expected = layer(x) + 3.0 * x @ adapted.lora_A.T @ adapted.lora_B.T
    assert torch.allclose(adapted(x), expected, atol=1e-6)


def test_adapter_checkpoint_loads_onto_its_base_only(tmp_path):
    base = model()
    base_ckpt = save_checkpoint(tmp_path / "base", 0, base, {"model": base.cfg.to_dict()})
    adapted = model()
    config = lora.LoRAConfig(rank=2, targets=["attn.c_proj"])
    lora.apply(adapted, config)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if lora.is_adapter(n):
                p.normal_(0, 0.1)
    x = torch.randint(0, 64, (1, 8))
    expected = adapted(x)[0]
    adapters = {"config": config.to_dict(), "base": str(base_ckpt), "base_fingerprint": lora.fingerprint(base.state_dict())}
    meta = make_meta(stage="sft", model=adapted.cfg, config={}, tokenizer="t", adapters=adapters, parent=str(base_ckpt))
    ckpt = save_checkpoint(tmp_path / "sft", 1, lora.adapter_state_dict(adapted), meta)
    assert (ckpt / "model.pt").stat().st_size < (base_ckpt / "model.pt").stat().st_size / 10  # a small file
    loaded, _ = load_model(ckpt)
    assert torch.allclose(loaded(x)[0], expected, atol=1e-5)
    other = model(seed=1)  # the base checkpoint replaced by another model's weights
    save_checkpoint(tmp_path / "base", 0, other, {"model": other.cfg.to_dict()})
    with pytest.raises(CheckpointError, match="adapters trained on another base"):
        load_model(ckpt)


def test_bad_targets_and_settings():
    with pytest.raises(ConfigError, match="'attn.q_proj' matches no linear layer"):
        lora.apply(model(), lora.LoRAConfig(targets=["attn.q_proj"]))
    for bad in (dict(rank=0), dict(alpha=0), dict(dropout=1.0), dict(targets=[])):
        with pytest.raises(ConfigError):
            lora.LoRAConfig(**bad)


@pytest.mark.parametrize("tied", [False, True])
def test_modules_to_save_train_in_full_and_travel_with_the_adapters(tmp_path, tied):
    base = model(tie_embeddings=tied)
    base_ckpt = save_checkpoint(tmp_path / "base", 0, base, {"model": base.cfg.to_dict()})
    adapted = model(tie_embeddings=tied)
    config = lora.LoRAConfig(rank=2, targets=["attn.c_proj"], modules_to_save=["wte"])
    assert lora.saved_modules(adapted, config) == ["transformer.wte"]
    lora.apply(adapted, config)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert "transformer.wte.weight" in trainable and not any(".mlp." in n or "ln_f" in n for n in trainable)
    x = torch.randint(0, 64, (2, 8))
    _, loss = adapted(x[:, :-1], x[:, 1:])
    loss.backward()
    torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.5).step()  # embeddings and adapters move
    assert not torch.equal(adapted.transformer.wte.weight, base.transformer.wte.weight)
    expected = adapted(x)[0]
    adapters = {"config": config.to_dict(), "base": str(base_ckpt), "base_fingerprint": lora.fingerprint(base.state_dict())}
    meta = make_meta(stage="sft", model=adapted.cfg, config={}, tokenizer="t", adapters=adapters, parent=str(base_ckpt))
    saved = lora.adapter_state_dict(adapted, also=("transformer.wte.",))
    assert "transformer.wte.weight" in saved and ("lm_head.weight" in saved) == tied  # a tied head goes along
    loaded, _ = load_model(save_checkpoint(tmp_path / "sft", 1, saved, meta))
    assert torch.allclose(loaded(x)[0], expected, atol=1e-5)  # the trained embeddings, not the base's
    with pytest.raises(ConfigError, match="'embeddings' matches no module"):
        lora.apply(model(), lora.LoRAConfig(modules_to_save=["embeddings"]))
