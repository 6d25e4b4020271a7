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
from nanofm.common import ConfigError
from nanofm.train import (Run, TrainConfig, TrainingError, lr_at, make_optimizer, read_metrics, setup, train,
                          wrap_model)
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
    tied_cfg = TrainConfig(tied_embedding_lr_mult=5.0)  # tied: the one matrix gets its own group when asked
    decay, no_decay, embedding = make_optimizer(model, tied_cfg, ctx).param_groups
    assert embedding["params"] == [model.transformer.wte.weight] and embedding["base_lr"] == 5.0 * cfg.lr
    assert not any(p is model.lm_head.weight for p in decay["params"])


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
    with pytest.raises(CheckpointError, match="could not write .*disk full.*step 2 was not saved"):
        save_checkpoint(tmp_path, 2, model, {"model": model.cfg.to_dict()})
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "latest").read_text() == "ckpt_0000001" and not (tmp_path / "ckpt_0000002").exists()
    loaded, meta = load_model(tmp_path)
    assert meta["step"] == 1 and torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    save_checkpoint(tmp_path, 3, model, {"model": model.cfg.to_dict()}, keep=1)  # clears the leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000003", "latest"]


class ExplodingObjective:
    """Causal LM loss that turns NaN from step `at` on."""

    def __init__(self, at: int):
        self.at = at

    def loss(self, model, batch, step):
        x, y = batch
        _, loss = model(x, y)
        return (loss * float("nan") if step >= self.at else loss), y.numel(), {}

    def evaluate(self, model):
        return {}

    def sample(self, model):
        assert all(torch.isfinite(p).all() for p in model.parameters()), "a NaN model must never be sampled"
        return "a sample"


def test_torchs_disk_full_message_becomes_a_clear_error(tmp_path, monkeypatch):
    """torch.save on a full disk raises an opaque RuntimeError; the checkpoint says what happened."""
    model = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=8))
    save_checkpoint(tmp_path, 1, model, {"model": model.cfg.to_dict()})

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match="the disk is full while writing .* MiB free.*step 2 was not saved"):
        save_checkpoint(tmp_path, 2, model, {"model": model.cfg.to_dict()})
    assert checkpoint.resolve(tmp_path).name == "ckpt_0000001" and not list(tmp_path.glob(".tmp-*"))
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("some bug")))
    with pytest.raises(RuntimeError, match="some bug"):  # not an I/O failure: a bug keeps its own error
        save_checkpoint(tmp_path, 3, model, {"model": model.cfg.to_dict()})


def test_nan_loss_stops_with_the_last_good_checkpoint(data_dir, tmp_path):
    cfg = TrainConfig(max_iters=20, batch_size=2, checkpoint_interval=2, log_interval=1, eval_interval=100,
                      eval_iters=1, device="cpu")
    ctx = setup(cfg)
    models = wrap_model(Transformer(ModelConfig(vocab_size=576, n_layer=1, n_head=2, n_embd=16, block_size=16)), cfg, ctx)
    loader = TokenLoader(data_dir, "train", 2, 16)
    with pytest.raises(TrainingError, match="NaN or inf by step 5.*ckpt_0000004"):
        train(cfg, ctx, models, ExplodingObjective(5), loader, Run(tmp_path, {"model": models.raw.cfg.to_dict()}))
    assert checkpoint.resolve(tmp_path).name == "ckpt_0000004"
    loaded, _ = load_model(tmp_path)
    assert all(torch.isfinite(p).all() for p in loaded.parameters())


def test_nan_just_before_an_evaluation_stops_before_the_sample(data_dir, tmp_path):
    """The NaN check runs before the evaluation and its sample (which would crash on NaN weights)."""
    cfg = TrainConfig(max_iters=20, batch_size=2, checkpoint_interval=100, log_interval=100, eval_interval=4,
                      eval_iters=1, device="cpu")
    ctx = setup(cfg)
    models = wrap_model(Transformer(ModelConfig(vocab_size=576, n_layer=1, n_head=2, n_embd=16, block_size=16)), cfg, ctx)
    with pytest.raises(TrainingError, match="NaN or inf by step 4"):
        train(cfg, ctx, models, ExplodingObjective(3), TokenLoader(data_dir, "train", 2, 16),
              Run(tmp_path, {"model": models.raw.cfg.to_dict()}))


def test_clear_errors(data_dir, tmp_path):
    code, log = run_script("--n_layers=3")
    assert code == 1 and "did you mean --n_layer" in log
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
    assert code == 1 and "--replay_ratio must be in [0, 1)" in log
    code, log = run_script("--data_dir", data_dir, "--replay_ratio=0.3")
    assert code == 1 and "needs --replay_dir" in log


def test_a_new_run_never_overwrites_another_run(data_dir, tmp_path):
    args = ["--data_dir", data_dir, "--out_dir", tmp_path / "run", "--max_iters=3", "--eval_interval=100"]
    pretrain(*args)
    before = weights(tmp_path / "run")
    code, log = run_script(*args)
    assert code == 1 and "already holds a run" in log and "--init_from=resume" in log and "--overwrite" in log
    assert all(torch.equal(before[k], weights(tmp_path / "run")[k]) for k in before)  # untouched
    result = pretrain(*args, "--overwrite", "--max_iters=2")  # asked for: the old run is replaced
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "run")] == ["ckpt_0000001"]
    assert result["checkpoint"].endswith("ckpt_0000001")
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train_loss" in r]
    assert steps == [0, 1]


def test_two_runs_cannot_write_one_directory_at_once(data_dir, tmp_path):
    import fcntl
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another run holds it
        held.write("pid 4242")
        held.flush()
        code, log = run_script("--data_dir", data_dir, "--out_dir", tmp_path / "run", "--max_iters=1")
    assert code == 1 and "another run (pid 4242) is writing to" in log
    assert not checkpoint.complete_checkpoints(tmp_path / "run")


def test_resume_after_a_kill_before_latest_and_no_repeated_rows(data_dir, tmp_path):
    """Killed after the checkpoint's rename but before `latest`, with a half-written metrics line:
    the run resumes, the log has each step once, and its training time keeps counting."""
    args = ["--data_dir", data_dir, "--max_iters=12", "--eval_interval=3", "--checkpoint_interval=100"]
    pretrain(*args, "--out_dir", tmp_path / "run", "--stop_step=5")
    (tmp_path / "run" / "latest").unlink()
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:  # rows written after the checkpoint, then cut short
        f.write(json.dumps({"step": 7, "train_loss": 1.0}) + "\n" + '{"step": 8, "train_lo')
    seconds_at_stop = max(r["train_seconds"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["step"] <= 5)
    state = torch.load(tmp_path / "run" / "ckpt_0000005" / "state.pt", weights_only=True)  # plain types only
    assert state["step"] == 5 and state["train_seconds"] == pytest.approx(seconds_at_stop, abs=1e-3)
    pretrain(*args, "--out_dir", tmp_path / "run", "--init_from=resume")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train_steps = [r["step"] for r in records if "train_loss" in r]
    eval_steps = [r["step"] for r in records if "val_loss" in r]
    assert train_steps == list(range(12)) and len(eval_steps) == len(set(eval_steps))
    resumed = [r["train_seconds"] for r in records if r["step"] > 5]
    assert min(resumed) >= seconds_at_stop  # time-to-loss counts the time before the stop too
    pretrain(*args, "--out_dir", tmp_path / "straight")
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_is_a_clear_error(tmp_path):
    from nanofm.train import Logger
    logger = Logger(tmp_path, TrainConfig(), setup(TrainConfig(device="cpu")), {})
    logger.path = tmp_path / "metrics.jsonl"
    logger.path.symlink_to("/dev/full")  # every write fails with ENOSPC, as on a full disk
    with pytest.raises(TrainingError, match="the disk is full while writing .*metrics.jsonl"):
        logger.log({"step": 0, "train_loss": 1.0})


@pytest.mark.parametrize("flag, message", [
    ("--seq_len=-5", "--seq_len must be >= 0"), ("--dtype=float16", "gradient scaler"),
    ("--device=cpuu", "unknown device 'cpuu'"), ("--compile=maybe", "--compile must be one of"),
    ("--learning_rate=1e-3", "did you mean --lr"), ("--lr=nan", "--lr must be a finite number"),
    ("--n_layer=0", "--n_layer must be at least 1"), ("--dropout=1.5", "--dropout must be in"),
])
def test_bad_flags_are_clear_errors(flag, message):
    with pytest.raises(ConfigError, match=message):
        pretrain(flag)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_and_out_dir_a_file(data_dir, tmp_path):
    code, log = run_script("--data_dir", data_dir, "--device=cuda", "--max_iters=1")
    assert code == 1 and "has no CUDA GPU" in log and "Traceback" not in log
    (tmp_path / "afile").write_text("mine")
    code, log = run_script("--data_dir", data_dir, "--out_dir", tmp_path / "afile", "--max_iters=1")
    assert code == 1 and "is a file" in log and (tmp_path / "afile").read_text() == "mine"


def test_token_ids_outside_the_vocabulary_name_the_shard(data_dir, tmp_path):
    import shutil

    import numpy as np

    from nanofm.data import write_shard
    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    write_shard(bad / "val_000000.bin", np.array([1, 2, 60000], dtype=np.uint16), 1)
    code, log = run_script("--data_dir", bad, "--out_dir", tmp_path / "run", "--max_iters=1")
    assert code == 1 and "val_000000.bin holds token id 60000" in log and "Traceback" not in log


def test_a_bug_keeps_its_traceback(tmp_path):
    """User errors print `error: ...`; anything else is a bug and shows where it happened."""
    script = tmp_path / "buggy.py"
    script.write_text("import sys; sys.path.insert(0, %r)\nfrom nanofm.common import run_cli, ConfigError\n"
                      "def main(kind):\n    raise ConfigError('bad flag') if kind == 'user' else KeyError('bug')\n"
                      "run_cli(main, sys.argv[1])\n" % str(ROOT))
    user = subprocess.run([sys.executable, str(script), "user"], capture_output=True, text=True)
    bug = subprocess.run([sys.executable, str(script), "bug"], capture_output=True, text=True)
    assert user.returncode == 1 and user.stderr.strip() == "error: bad flag"
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "KeyError: 'bug'" in bug.stderr


def test_non_contiguous_targets():
    model = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=16))
    x = torch.randint(0, 64, (2, 9))
    _, loss = model(x[:, :-1], x[:, 1:])  # a slice: not contiguous
    _, reference = model(x[:, :-1].contiguous(), x[:, 1:].contiguous())
    assert torch.isfinite(loss) and loss == reference


class TargetsObjective:
    """Causal LM on every other position (the rest ignored): n_targets is half the tokens."""

    def loss(self, model, batch, step):
        x, y = batch
        y = y.clone()
        y[:, ::2] = -100
        _, loss = model(x, y)
        return loss, (y != -100).sum(), {"ignored_share": float((y == -100).float().mean())}

    def evaluate(self, model):
        return {"val_metric": 1.5}  # no bits per byte: whatever the objective reports


def test_passed_optimizer_extra_head_and_real_target_tokens(data_dir, tmp_path):
    """A model with an extra head, an optimizer with its own groups (the head at 10x lr), an
    objective that ignores half the positions: the schedule keeps the groups' ratio, tokens count
    only real targets, and the objective's own metrics are logged."""
    cfg = TrainConfig(max_iters=4, batch_size=2, log_interval=1, eval_interval=2, eval_iters=1, device="cpu", lr=1e-3,
                      warmup_iters=0, min_lr_ratio=0.5)
    ctx = setup(cfg)
    model = Transformer(ModelConfig(vocab_size=576, n_layer=1, n_head=2, n_embd=16, block_size=16))
    model.value_head = torch.nn.Linear(16, 1)  # an extra head (PPO's value head, say)
    models = wrap_model(model, cfg, ctx)
    body = [p for n, p in model.named_parameters() if not n.startswith("value_head")]
    optimizer = torch.optim.AdamW([{"params": body, "lr": 1e-3}, {"params": model.value_head.parameters(), "lr": 1e-2}])
    result = train(cfg, ctx, models, TargetsObjective(), TokenLoader(data_dir, "train", 2, 16),
                   Run(tmp_path, {"model": model.cfg.to_dict()}), optimizer=optimizer)
    body_lr, head_lr = (g["lr"] for g in optimizer.param_groups)
    assert head_lr == pytest.approx(10 * body_lr) and body_lr < 1e-3  # scheduled alike
    assert result["tokens_seen"] == 4 * 2 * 8 and result["val_metric"] == 1.5 and "val_bpb" not in result
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert all(r["ignored_share"] == 0.5 for r in records if "train_loss" in r)
    assert [r["tokens_seen"] for r in records if "train_loss" in r] == [16, 32, 48, 64]
    saved = torch.load(checkpoint.resolve(tmp_path) / "model.pt", weights_only=True)
    assert "value_head.weight" in saved


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline wandb run file: a LevelDB-style log (32 KiB blocks of records with
    a 7-byte header: checksum, length, type) of protobuf Records, after a 7-byte ':W&B' file header."""
    from wandb.proto import wandb_internal_pb2
    data, pos, block, pending, rows = run_file.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, or LAST of a split record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or ".".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_logs_the_run(data_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is a listed dependency (requirements.txt); install it")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    pretrain("--data_dir", data_dir, "--out_dir", tmp_path / "w", "--max_iters=3", "--eval_interval=2",
             "--wandb_project=nanofm-test")
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    history = wandb_history(runs[0])
    logged = read_metrics(tmp_path / "w" / "metrics.jsonl")
    ours = {(r["step"], k): v for r in logged for k, v in r.items() if k in ("train_loss", "val_loss")}
    theirs = {(row["_step"], k): v for row in history for k, v in row.items() if k in ("train_loss", "val_loss")}
    assert len(ours) == 6 and theirs.keys() == ours.keys()  # 3 train rows, evals at steps 0, 2 and 3
    assert all(theirs[key] == pytest.approx(ours[key]) for key in ours)


FSDP_WITH_HEAD = """
import sys, torch
import torch.nn.functional as F
sys.path.insert(0, {root!r})
from nanofm.data import TokenLoader
from nanofm.model import ModelConfig, Transformer
from nanofm.train import Run, TrainConfig, setup, teardown, train, wrap_model

class PolicyWithValue(torch.nn.Module):  # a policy with a value head, as PPO builds it: a wrapper
    def __init__(self, cfg):
        super().__init__()
        self.policy = Transformer(cfg)
        self.value_head = torch.nn.Linear(cfg.n_embd, 1)

    def forward(self, idx, targets):
        h = self.policy.hidden_states(idx)
        loss = F.cross_entropy(self.policy.lm_head(h).flatten(0, 1), targets.flatten())
        return loss, self.value_head(h).pow(2).mean()

class Objective:
    def loss(self, model, batch, step):
        x, y = batch
        loss, value = model(x, y)
        return loss + value, y.numel(), {{"value_loss": value}}
    def evaluate(self, model):
        return {{}}

cfg = TrainConfig(max_iters=3, batch_size=2, grad_accum={accum}, eval_interval=100, log_interval=1, device="cpu",
                  fsdp={fsdp})
ctx = setup(cfg)
models = wrap_model(PolicyWithValue(ModelConfig(vocab_size=576, n_layer=2, n_head=2, n_embd=16, block_size=16)), cfg, ctx)
train(cfg, ctx, models, Objective(), TokenLoader({data!r}, "train", 2, 16, ctx.rank, ctx.world_size), Run({out!r}, {{}}))
teardown(ctx)
"""


def test_fsdp_shards_a_model_with_an_extra_head(data_dir, tmp_path):
    """Two FSDP processes train a policy wrapped with a value head like one process with the same
    total batch (grad_accum 2): the blocks are found inside the wrapper, the head is sharded with
    the root, and the checkpoint holds both whole."""
    results = {}
    for name, fsdp, procs in (("one", False, 1), ("two", True, 2)):
        script = tmp_path / f"{name}.py"
        script.write_text(FSDP_WITH_HEAD.format(root=str(ROOT), fsdp=fsdp, accum=3 - procs, data=str(data_dir),
                                                out=str(tmp_path / name)))
        extra = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
        done = subprocess.run([sys.executable, *extra, str(script)], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        results[name] = weights(tmp_path / name)
    a, b = results["one"], results["two"]
    assert "value_head.weight" in b and "policy.transformer.h.1.attn.c_attn.weight" in b and set(a) == set(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_the_pieces_serve_a_loop_of_its_own(data_dir, tmp_path):
    """An RL-style loop outside train(): OptimizerStep (schedule, accumulation, clipping),
    Checkpointer (save, then an exact restore), Logger (metrics.jsonl). Two runs of 3 + 3 steps
    through a restore equal one run of 6."""
    from nanofm.train import Checkpointer, Logger, OptimizerStep, Progress

    def run(out, steps, resume=False):
        cfg = TrainConfig(max_iters=6, batch_size=2, grad_accum=2, warmup_iters=2, device="cpu", lr=3e-3)
        ctx = setup(cfg)
        models = wrap_model(Transformer(ModelConfig(vocab_size=576, n_layer=1, n_head=2, n_embd=16, block_size=16)), cfg, ctx)
        optimizer = make_optimizer(models.raw, cfg, ctx)
        loader = TokenLoader(data_dir, "train", 2, 16)
        the_run = Run(out, {"model": models.raw.cfg.to_dict()}, resume_from=checkpoint.resolve(out) if resume else None)
        keeper = Checkpointer(the_run, cfg, ctx, models.raw, optimizer)
        progress = keeper.restore(loader) if resume else Progress()
        if resume:
            load = torch.load(checkpoint.resolve(out) / "model.pt", weights_only=True)
            models.raw.load_state_dict(load)
        logger = Logger(out, cfg, ctx, {}, resumed_at=progress.step - 1 if resume else None)
        stepper = OptimizerStep(cfg, ctx, models, optimizer)
        for step in range(progress.step, progress.step + steps):
            lr = stepper.start(step)
            for micro in range(cfg.grad_accum):
                with stepper.micro(micro):
                    _, loss = models.train(*loader.next_batch())
                stepper.backward(loss)
            stepper.finish()
            progress.tokens_seen += 2 * 2 * 16
            logger.log({"step": step, "train_loss": float(loss), "lr": lr})
        keeper.save(step, loader, progress, {"train_loss": float(loss)})
        return weights(out)

    run(tmp_path / "split", 3)
    split = run(tmp_path / "split", 3, resume=True)
    straight = run(tmp_path / "straight", 6)
    assert all(torch.equal(split[k], straight[k]) for k in split)
    assert [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")] == list(range(6))
    assert checkpoint.read_meta(tmp_path / "split")["tokens_seen"] == 6 * 64
