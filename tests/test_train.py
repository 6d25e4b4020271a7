"""The training loop and train_pretrain.py: learning, exact resume, DDP equivalence, checkpoints, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanofm import checkpoint
from nanofm.checkpoint import CheckpointError, load_model, save_checkpoint
from nanofm.data import TokenLoader
from nanofm.model import ModelConfig, Transformer
from nanofm.train import TrainConfig, TrainingError, lr_at, make_optimizer, setup, train, wrap_model
from textgen import markov

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset=tiny", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--eval_iters=2", "--log_interval=1", "--sample_tokens=8", "--lr=3e-3", "--warmup_iters=2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    src = base / "src"
    src.mkdir()
    for i in range(60):
        (src / f"doc{i}.txt").write_text(markov(1000 + i))
    out = base / "data"
    result = subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), "--input", str(src), "--out", str(out),
                             "--vocab_size=520", "--val_fraction=0.1", "--languages=", "--progress=false",
                             "--num_workers=1"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out


def pretrain(*args):
    import train_pretrain
    return train_pretrain.main([*TINY, *map(str, args)])


def run_script(*args, torchrun=False):
    command = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command + [str(ROOT / "train_pretrain.py"), *TINY, *map(str, args)],
                            capture_output=True, text=True, timeout=600, env=env)
    return result.returncode, result.stdout + result.stderr


def weights(path):
    return torch.load(checkpoint.resolve(path) / "model.pt", weights_only=True)


def test_lr_schedules():
    cfg = TrainConfig(max_iters=100, lr=1.0, warmup_iters=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3) and lr_at(55, cfg) == pytest.approx(0.55, abs=0.01)
    wsd = TrainConfig(max_iters=100, lr=1.0, warmup_iters=10, schedule="wsd", decay_ratio=0.2, min_lr_ratio=0.0)
    assert lr_at(50, wsd) == 1.0 and lr_at(79, wsd) == 1.0 and lr_at(90, wsd) == pytest.approx(0.5)


def test_weight_decay_only_on_matrices():
    cfg = TrainConfig()
    model = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=8))
    ctx = setup(TrainConfig(device="cpu"))
    decay, no_decay = make_optimizer(model, cfg, ctx).param_groups  # tied: no embedding group
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    untied = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=8, tie_embeddings=False))
    decay, no_decay, embedding = make_optimizer(untied, cfg, ctx).param_groups
    assert embedding["params"] == [untied.transformer.wte.weight] and embedding["base_lr"] == 15.0 * cfg.lr
    assert embedding["weight_decay"] == 0.0 and any(p is untied.lm_head.weight for p in decay["params"])


def test_clm_run_learns_and_saves(data_dir, tmp_path):
    out = tmp_path / "clm"
    result = pretrain("--data_dir", data_dir, "--out_dir", out, "--max_iters=150", "--eval_interval=50")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val[-1] < val[0] - 1.0 and result["val_loss"] == val[-1]
    assert result["val_loss"] < result["unigram_entropy"]
    assert all(r["val_bpb"] > 0 for r in records if "val_bpb" in r)
    assert any("sample" in r and isinstance(r["sample"], str) for r in records)
    assert (out / "loss.png").stat().st_size > 10_000
    ckpt = checkpoint.resolve(out)
    assert ckpt.name == "ckpt_0000149" and (ckpt / "tokenizer.json").exists()
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["stage"] == "pretrain" and meta["objective"] == "clm" and meta["model"]["n_embd"] == 32
    assert meta["config"]["max_iters"] == 150 and meta["tokens_seen"] == 150 * 4 * 32
    model, _ = load_model(out)
    assert isinstance(model, Transformer) and model.cfg.causal


def test_mlm_run_learns(data_dir, tmp_path):
    out = tmp_path / "mlm"
    result = pretrain("--objective=mlm", "--data_dir", data_dir, "--out_dir", out, "--max_iters=40", "--eval_interval=20")
    val = [json.loads(line)["val_loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert val[-1] < val[0] - 1.0
    assert load_model(out)[0].cfg.causal is False and result["val_bpb"] is not None


def test_resume_is_bitwise_exact(data_dir, tmp_path):
    args = ["--data_dir", data_dir, "--max_iters=12", "--eval_interval=4", "--checkpoint_interval=100", "--dropout=0.1"]
    pretrain(*args, "--out_dir", tmp_path / "straight")
    pretrain(*args, "--out_dir", tmp_path / "split", "--stop_step=5")
    assert checkpoint.resolve(tmp_path / "split").name == "ckpt_0000005"
    pretrain(*args, "--out_dir", tmp_path / "split", "--init_from=resume")
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
             if "train_loss" in line]
    assert steps == list(range(12))  # the resumed run appended to the same log


def test_mlm_resume_is_exact_too(data_dir, tmp_path):
    args = ["--objective=mlm", "--data_dir", data_dir, "--max_iters=6", "--eval_interval=3"]
    pretrain(*args, "--out_dir", tmp_path / "straight")
    pretrain(*args, "--out_dir", tmp_path / "split", "--stop_step=2")
    pretrain(*args, "--out_dir", tmp_path / "split", "--init_from=resume")
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_two_processes_equal_one_with_double_accumulation(data_dir, tmp_path):
    common = ["--data_dir", data_dir, "--max_iters=4", "--eval_interval=100", "--batch_size=2", "--sample_tokens=0"]
    code, log = run_script(*common, "--grad_accum=2", "--out_dir", tmp_path / "one")
    assert code == 0, log
    code, log = run_script(*common, "--grad_accum=1", "--out_dir", tmp_path / "two", torchrun=True)
    assert code == 0, log
    assert "x 2" in log  # two processes
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=8))
    save_checkpoint(tmp_path, 1, model, {"model": model.cfg.to_dict()})
    real_save = torch.save

    def crash(obj, path, *a, **k):
        real_save(obj, path, *a, **k)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model, {"model": model.cfg.to_dict()})
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "latest").read_text() == "ckpt_0000001" and not (tmp_path / "ckpt_0000002").exists()
    loaded, meta = load_model(tmp_path)
    assert meta["step"] == 1 and torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    save_checkpoint(tmp_path, 3, model, {"model": model.cfg.to_dict()}, keep=1)  # clears the leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000003", "latest"]


def test_nan_loss_stops_with_the_last_good_checkpoint(data_dir, tmp_path):
    cfg = TrainConfig(max_iters=20, batch_size=2, checkpoint_interval=2, log_interval=1, eval_interval=100,
                      eval_iters=1, device="cpu")
    ctx = setup(cfg)
    model, raw = wrap_model(Transformer(ModelConfig(vocab_size=576, n_layer=1, n_head=2, n_embd=16, block_size=16)), cfg, ctx)

    def loss_fn(model, batch, step, reduction="mean"):
        x, y = batch
        _, loss = model(x, y)
        if step >= 5:
            loss = loss * float("nan")
        return loss if reduction == "mean" else (loss * y.numel(), y.numel(), y)

    loader = TokenLoader(data_dir, "train", 2, 16)
    with pytest.raises(TrainingError, match="NaN or inf by step 5.*ckpt_0000004"):
        train(cfg, ctx, model, raw, loss_fn, loader, lambda: TokenLoader(data_dir, "val", 2, 16), tmp_path,
              {"model": raw.cfg.to_dict()}, 32)
    assert checkpoint.resolve(tmp_path).name == "ckpt_0000004"
    loaded, _ = load_model(tmp_path)
    assert all(torch.isfinite(p).all() for p in loaded.parameters())


def test_clear_errors(data_dir, tmp_path):
    code, log = run_script("--n_layers=3")
    assert code == 2 and "did you mean --n_layer" in log
    code, log = run_script("--data_dir", tmp_path / "nothing")
    assert code == 1 and "python data/prepare.py --out" in log and "Traceback" not in log
    pretrain("--data_dir", data_dir, "--out_dir", tmp_path / "base", "--max_iters=2", "--eval_interval=100")
    code, log = run_script("--data_dir", data_dir, "--init_from", tmp_path / "base", "--n_embd=64", "--max_iters=1")
    assert code == 1 and "different shape than asked: n_embd=32 (asked 64)" in log
    code, log = run_script("--data_dir", data_dir, "--init_from", tmp_path / "base", "--objective=mlm", "--max_iters=1")
    assert code == 1 and "causal model" in log
    code, log = run_script("--data_dir", data_dir, "--init_from=resume", "--out_dir", tmp_path / "empty")
    assert code == 1 and "no checkpoint at" in log
    other = Transformer(ModelConfig(vocab_size=576, n_layer=1, n_head=2, n_embd=16, block_size=32))
    with pytest.raises(CheckpointError, match="do not fit this model"):
        checkpoint.load_weights(other, weights(tmp_path / "base"))


def test_continue_from_a_checkpoint_records_lineage(data_dir, tmp_path):
    pretrain("--data_dir", data_dir, "--out_dir", tmp_path / "a", "--max_iters=2", "--eval_interval=100")
    pretrain("--data_dir", data_dir, "--out_dir", tmp_path / "b", "--max_iters=2", "--eval_interval=100",
             "--init_from", tmp_path / "a")
    meta = checkpoint.read_meta(tmp_path / "b")
    assert meta["parent"] == str(checkpoint.resolve(tmp_path / "a")) and meta["lineage"] == [meta["parent"]]


def test_wandb_missing_is_a_warning_not_a_crash(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    result = pretrain("--data_dir", data_dir, "--out_dir", tmp_path / "w", "--max_iters=2", "--eval_interval=100",
                      "--wandb_project=nanofm-test")
    assert "wandb is not installed" in capsys.readouterr().out and result["checkpoint"]


def test_a_small_validation_split_is_evaluated_with_fewer_rows(data_dir, tmp_path):
    from nanofm.data import read_header
    val_tokens = read_header(data_dir / "val_000000.bin")["tokens"]
    batch = val_tokens // 32 + 4  # more rows than the validation split holds
    result = pretrain("--data_dir", data_dir, "--out_dir", tmp_path / "v", "--max_iters=1", f"--batch_size={batch}",
                      "--eval_interval=100")
    assert result["val_loss"] > 0


def test_muon_orthogonalizes():
    from nanofm.optim import orthogonalize
    torch.manual_seed(0)
    for shape in [(32, 64), (64, 32)]:
        g = torch.randn(*shape)
        x = orthogonalize(g)
        singular = torch.linalg.svdvals(x)
        assert singular.min() > 0.5 and singular.max() < 1.5  # Muon's quintic lands near 1, not on it
        u, _, vt = torch.linalg.svd(g, full_matrices=False)
        assert torch.nn.functional.cosine_similarity((u @ vt).flatten(), x.flatten(), dim=0) > 0.9


def test_muon_groups_and_training(data_dir, tmp_path):
    from nanofm.optim import CombinedOptimizer
    cfg = TrainConfig(optimizer="muon", lr=1e-3)
    model = Transformer(ModelConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=16, block_size=8, tie_embeddings=False))
    optimizer = make_optimizer(model, cfg, setup(TrainConfig(device="cpu")))
    assert isinstance(optimizer, CombinedOptimizer)
    adamw, muon = optimizer.optimizers
    block_matrices = {id(p) for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert {id(p) for p in muon.param_groups[0]["params"]} == block_matrices
    assert not block_matrices & {id(p) for g in adamw.param_groups for p in g["params"]}
    args = ["--optimizer=muon", "--data_dir", data_dir, "--max_iters=8", "--eval_interval=4"]
    result = pretrain(*args, "--out_dir", tmp_path / "straight")
    val = [json.loads(line)["val_loss"] for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
           if "val_loss" in line]
    assert val[-1] < val[0] - 0.3 and result["checkpoint"]
    pretrain(*args, "--out_dir", tmp_path / "split", "--stop_step=3")
    pretrain(*args, "--out_dir", tmp_path / "split", "--init_from=resume")
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)  # Muon's momentum is checkpointed too


def test_fsdp_two_processes_equal_one_with_double_accumulation_across_a_resume(data_dir, tmp_path):
    common = ["--data_dir", data_dir, "--max_iters=4", "--eval_interval=100", "--batch_size=2", "--sample_tokens=0"]
    code, log = run_script(*common, "--grad_accum=2", "--out_dir", tmp_path / "one")
    assert code == 0, log
    code, log = run_script(*common, "--fsdp", "--out_dir", tmp_path / "two", "--stop_step=1", torchrun=True)
    assert code == 0, log
    code, log = run_script(*common, "--fsdp", "--out_dir", tmp_path / "two", "--init_from=resume", torchrun=True)
    assert code == 0, log
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert set(a) == set(b) and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    code, log = run_script("--fsdp", "--data_dir", data_dir, "--max_iters=1")
    assert code == 1 and "torchrun" in log


@pytest.fixture(scope="module")
def other_data(data_dir, tmp_path_factory):
    """A second domain tokenized with data_dir's tokenizer, and one with a tokenizer of its own."""
    base = tmp_path_factory.mktemp("other")
    src = base / "src"
    src.mkdir()
    for i in range(30):
        (src / f"doc{i}.txt").write_text(markov(5000 + i, successors=3))
    dirs = {}
    for name, tokenizer in (("same", str(data_dir / "tokenizer.json")), ("own", "bpe")):
        result = subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), "--input", str(src), "--out",
                                 str(base / name), "--tokenizer", tokenizer, "--vocab_size=530", "--val_fraction=0.1",
                                 "--languages=", "--progress=false", "--num_workers=1"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        dirs[name] = base / name
    return dirs


def test_continued_pretraining_with_replay(data_dir, other_data, tmp_path):
    pretrain("--data_dir", data_dir, "--out_dir", tmp_path / "base", "--max_iters=6", "--eval_interval=100")
    args = ["--data_dir", other_data["same"], "--init_from", tmp_path / "base", "--replay_dir", data_dir,
            "--replay_ratio=0.5", "--max_iters=6", "--eval_interval=3"]
    result = pretrain(*args, "--out_dir", tmp_path / "straight")
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    old_domain = [r[f"val_loss_{data_dir.name}"] for r in records if "val_loss" in r]
    assert len(old_domain) == 3 and all(v > 0 for v in old_domain) and f"val_loss_{data_dir.name}" in result
    meta = checkpoint.read_meta(tmp_path / "straight")
    assert meta["parent"].endswith("ckpt_0000005") and meta["config"]["replay_ratio"] == 0.5
    pretrain(*args, "--out_dir", tmp_path / "split", "--stop_step=2")
    pretrain(*args, "--out_dir", tmp_path / "split", "--init_from=resume")
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)  # both data positions are restored


def test_continued_pretraining_errors(data_dir, other_data, tmp_path):
    pretrain("--data_dir", data_dir, "--out_dir", tmp_path / "base", "--max_iters=2", "--eval_interval=100")
    code, log = run_script("--data_dir", other_data["own"], "--init_from", tmp_path / "base", "--max_iters=1")
    assert code == 1 and "another tokenizer than the checkpoint" in log and "--tokenizer" in log
    code, log = run_script("--data_dir", data_dir, "--replay_dir", other_data["own"], "--replay_ratio=0.5", "--max_iters=1")
    assert code == 1 and "use different tokenizers" in log
    code, log = run_script("--data_dir", data_dir, "--replay_dir", data_dir, "--replay_ratio=1.0")
    assert code == 2 and "--replay_ratio must be in [0, 1)" in log
    code, log = run_script("--data_dir", data_dir, "--replay_ratio=0.3")
    assert code == 2 and "needs --replay_dir" in log
