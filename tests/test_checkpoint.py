"""The checkpoint schema: meta.json built in one place with a format version, old checkpoints
still load, and every unusable checkpoint is a clear error naming the file."""

import json

import pytest
import torch

from nanofm import checkpoint
from nanofm.checkpoint import CheckpointError, load_model, make_meta, read_meta, resolve, save_checkpoint
from nanofm.model import ModelConfig, Transformer


def tiny():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=8))


def test_make_meta_versions_and_inherits(tmp_path):
    model = tiny()
    parent = make_meta(stage="sft", model=model.cfg, config={"lr": 1}, tokenizer="bpe-576", objective="chat",
                       chat_format="nanofm-chat-v1", labels=["a", "b"])
    parent["lineage"] = ["out/pretrain/ckpt_0000599"]
    child = make_meta(stage="rlhf", model=model.cfg, config={}, tokenizer="bpe-576", objective="dpo",
                      parent="out/sft/ckpt_0000099", parent_meta=parent, adapters={"rank": 8}, heads=["value"])
    assert child["format_version"] == checkpoint.FORMAT_VERSION and child["stage"] == "rlhf"
    assert child["chat_format"] == "nanofm-chat-v1" and child["labels"] == ["a", "b"]  # inherited
    assert child["lineage"] == ["out/pretrain/ckpt_0000599", "out/sft/ckpt_0000099"]
    assert child["adapters"] == {"rank": 8} and child["heads"] == ["value"] and child["model"]["n_embd"] == 16
    save_checkpoint(tmp_path, 3, model, child)
    meta = read_meta(tmp_path)
    assert meta["step"] == 3 and meta["objective"] == "dpo" and meta["format_version"] == 1


def test_a_checkpoint_written_before_the_schema_still_loads(tmp_path):
    """meta.json as train_pretrain wrote it before format versions (no format_version, no chat_format)."""
    model = tiny()
    save_checkpoint(tmp_path, 599, model, {})
    old = {"model": model.cfg.to_dict(), "stage": "pretrain", "objective": "clm", "config": {"max_iters": 600},
           "tokenizer": "bpe-8192", "data_dir": "data/default", "parent": None, "lineage": [], "nanofm_version": "0.1.0",
           "tokens_seen": 1228800, "metrics": {"val_loss": 5.3162}, "step": 599, "saved_at": "2026-11-20T10:00:00"}
    (tmp_path / "ckpt_0000599" / "meta.json").write_text(json.dumps(old))
    loaded, meta = load_model(tmp_path)
    assert meta["format_version"] == 1 and meta["chat_format"] is None and meta["metrics"]["val_loss"] == 5.3162
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_unusable_checkpoints_are_clear_errors(tmp_path):
    model = tiny()
    ckpt = save_checkpoint(tmp_path / "run", 1, model, {"model": model.cfg.to_dict()})
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="version 99, newer than this nanofm"):
        load_model(ckpt)
    (ckpt / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "model"}))
    with pytest.raises(CheckpointError, match="no 'model' section"):
        load_model(ckpt)
    (ckpt / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json is not valid JSON"):
        load_model(ckpt)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    (ckpt / "model.pt").write_bytes(b"garbage, not a zip file")
    with pytest.raises(CheckpointError, match="model.pt cannot be read as model weights") as exc:
        load_model(ckpt)
    assert "weights_only=False" not in str(exc.value)  # never advise loading untrusted pickles
    with pytest.raises(CheckpointError, match="is a file"):
        resolve(ckpt / "meta.json")


def test_latest_missing_after_a_kill_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    model = tiny()
    save_checkpoint(tmp_path, 4, model, {"model": model.cfg.to_dict()})
    save_checkpoint(tmp_path, 10, model, {"model": model.cfg.to_dict()})
    (tmp_path / "latest").unlink()  # killed between the rename and the update of `latest`
    (tmp_path / ".tmp-ckpt_0000012").mkdir()  # and a half-written one, never read
    assert resolve(tmp_path).name == "ckpt_0000010"
    (tmp_path / "latest").write_text("ckpt_0000099")  # names a checkpoint that is gone
    assert resolve(tmp_path).name == "ckpt_0000010"


def test_rotation_keeps_the_newest_by_step(tmp_path):
    model = tiny()
    for step in (9, 10, 100, 1000):
        save_checkpoint(tmp_path, step, model, {"model": model.cfg.to_dict()}, keep=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["ckpt_0000100", "ckpt_0001000"]
