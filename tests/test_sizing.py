"""Model sizing: the memory, token and time arithmetic, the budget recommendation, the CLI."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nanofm import sizing
from nanofm.common import ConfigError
from nanofm.model import ModelConfig, describe

ROOT = Path(__file__).resolve().parents[1]


def test_training_memory_terms():
    cfg = ModelConfig.preset("gpt2")
    memory = sizing.training_memory(cfg, batch_size=16, seq_len=1024, fused_loss=False)
    assert memory["states"] == 16 * 124_475_904
    assert memory["activations"] == 34 * 16 * 1024 * 768 * 12
    assert memory["logits"] == 4 * 16 * 1024 * 50304
    assert memory["total"] == memory["states"] + memory["activations"] + memory["logits"]
    assert sizing.training_memory(cfg, 16, 1024)["logits"] == 0  # the fused loss never holds them


def test_wall_time():
    # 1e18 FLOP on 2 H100s at 50% MFU
    assert sizing.wall_time_hours(1e18, 2, "H100", 0.5) == pytest.approx(1e18 / (2 * 989e12 * 0.5) / 3600)


@pytest.mark.parametrize("hours", [1, 100, 10_000])
def test_recommendation_is_compute_optimal(hours):
    budget = hours * 3600 * 989e12 * 0.4
    n_opt = math.sqrt(budget / 120)
    lines = sizing.recommend(hours, "H100", 0.4, 80, 50304, 1024, 16)
    layers = int(lines[2].split("): ")[1].split(" layers")[0])
    cfg = sizing.shape_for_params(n_opt, 50304, 1024)
    assert cfg.n_layer == layers and cfg.n_embd == 64 * layers
    non_embedding = 12 * layers * (64 * layers) ** 2
    assert 0.6 < non_embedding / n_opt < 1.6  # the nearest shape of this family
    tokens = float(lines[3].split(" = ")[-1].split(" ")[0].replace(",", ""))
    assert tokens * describe(cfg)["flops_per_token"] == pytest.approx(budget, rel=1e-6)


def sizing_cli(*args):
    return subprocess.run([sys.executable, "-m", "nanofm.sizing", *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def test_cli():
    out = sizing_cli("--preset", "gpt2", "--gpus", "8")
    assert out.returncode == 0 and "parameters: 124,475,904" in out.stdout and "GPU-hours" in out.stdout
    out = sizing_cli("--budget_gpu_hours", "100000", "--gpu_memory_gib", "80")
    assert out.returncode == 0 and "does not fit one GPU" in out.stdout and "--fsdp" in out.stdout


@pytest.mark.parametrize("flag, message", [("--mfu=2", "--mfu must be in (0, 1]"), ("--gpus=0", "--gpus must be at least 1"),
                                           ("--batch_size=-4", "--batch_size must be at least 1"),
                                           ("--tokens=-1e9", "--tokens must be positive"),
                                           ("--gpu_memory_gib=-80", "--gpu_memory_gib must be positive"),
                                           ("--n_layer=0", "--n_layer must be at least 1"), ("--gpu=V100", "unknown --gpu")])
def test_cli_bad_input(flag, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        sizing.main([flag])


def test_model_and_sizing_do_not_import_each_other():
    """model.py lists presets; sizing has its own entry point and imports model, never the reverse."""
    source = (ROOT / "nanofm" / "model.py").read_text()
    assert "sizing" not in source.split('if __name__ == "__main__"')[0].replace("python -m nanofm.sizing", "")
    out = subprocess.run([sys.executable, "-c", "import nanofm.model, sys; print('nanofm.sizing' in sys.modules)"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
