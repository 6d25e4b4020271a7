"""Model choice for a compute budget: parameters, FLOPs, training memory, tokens and wall time.

    python -m nanofm.sizing --preset gpt2 --batch_size 16 --gpus 8 --gpu H100 --mfu 0.4
    python -m nanofm.sizing --budget_gpu_hours 100 --gpu H100 --gpu_memory_gib 80

The arithmetic (each printed with its numbers):
- training FLOPs per token = 6 N + 12 L H Q T (PaLM appendix B; N without lookup tables);
- compute-optimal tokens D = 20 N (Chinchilla: Hoffmann et al. 2022), so C = 6 N D = 120 N^2 and,
  for a budget C, N = sqrt(C / 120);
- memory with bf16 autocast and AdamW: fp32 weights, gradients and two moments = 16 bytes per
  parameter; activations about 34 B T d bytes per layer (Korthikanti et al. 2022, with a fused
  attention kernel that does not store the T x T scores), plus the fp32 logits B T V x 4 bytes
  unless the fused cross-entropy kernel keeps them away;
- wall time = total FLOPs / (GPUs x peak FLOP/s x MFU).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Optional

from nanofm.common import PEAK_FLOPS, ConfigError, run_cli
from nanofm.config import parse_config
from nanofm.model import PRESETS, ModelConfig, describe

TOKENS_PER_PARAM = 20  # Chinchilla's compute-optimal ratio
BYTES_PER_PARAM_TRAINING = 16  # fp32 weights (4) + gradients (4) + AdamW moments (8)


def training_memory(cfg: ModelConfig, batch_size: int, seq_len: int, fused_loss: bool = True) -> dict:
    """Bytes needed to train on one device (no sharding): states, activations, logits."""
    params = describe(cfg)["params"]
    states = BYTES_PER_PARAM_TRAINING * params
    activations = 34 * batch_size * seq_len * cfg.n_embd * cfg.n_layer
    logits = 0 if fused_loss else 4 * batch_size * seq_len * cfg.vocab_size
    return {"params": params, "states": states, "activations": activations, "logits": logits,
            "total": states + activations + logits}


def wall_time_hours(flops: float, gpus: int, gpu: str, mfu: float) -> float:
    return flops / (gpus * PEAK_FLOPS[gpu] * mfu) / 3600


def shape_for_params(n_params: float, vocab_size: int, block_size: int) -> ModelConfig:
    """A GPT-2-style shape with about n_params non-embedding parameters: width = 64 x layers
    (heads of 64), so 12 L d^2 = 49,152 L^3."""
    layers = max(2, round((n_params / 49_152) ** (1 / 3)))
    width = 64 * layers
    return ModelConfig(n_layer=layers, n_head=layers, n_embd=width, block_size=block_size, vocab_size=vocab_size)


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def report(cfg: ModelConfig, batch_size: int, gpus: int, gpu: str, mfu: float, tokens: float | None = None) -> list[str]:
    info = describe(cfg)
    n, per_token = info["params"], info["flops_per_token"]
    tokens = tokens or TOKENS_PER_PARAM * n
    memory = training_memory(cfg, batch_size, cfg.block_size)
    total_flops = per_token * tokens
    hours = wall_time_hours(total_flops, gpus, gpu, mfu)
    return [
        f"shape: {cfg.n_layer} layers x {cfg.n_embd} wide, {cfg.n_head} heads, context {cfg.block_size}, vocab {cfg.vocab_size}",
        f"parameters: {n:,} ({info['params_non_embedding']:,} without lookup tables)",
        f"FLOPs per token: 6 x {info['params_non_embedding']:,} + 12 x {cfg.n_layer} x {cfg.n_head} x {cfg.head_dim}"
        f" x {cfg.block_size} = {per_token / 1e9:.3f} GFLOP",
        f"memory per GPU at batch {batch_size} (no sharding): states 16 B x {n:,} = {gib(memory['states'])}; "
        f"activations 34 x {batch_size} x {cfg.block_size} x {cfg.n_embd} x {cfg.n_layer} = {gib(memory['activations'])}; "
        f"total {gib(memory['total'])} (+{gib(4 * batch_size * cfg.block_size * cfg.vocab_size)} of fp32 logits without "
        f"the fused loss kernel)",
        f"tokens: {tokens:,.0f}" + (" (compute-optimal: 20 per parameter)" if tokens == TOKENS_PER_PARAM * n else ""),
        f"training compute: {per_token / 1e9:.3f} GFLOP x {tokens:,.0f} tokens = {total_flops:.3e} FLOP",
        f"wall time on {gpus} x {gpu} at {mfu:.0%} MFU: {total_flops:.3e} / ({gpus} x {PEAK_FLOPS[gpu]:.3g} x {mfu}) "
        f"= {hours:,.2f} h ({hours * gpus:,.1f} GPU-hours)",
    ]


def recommend(gpu_hours: float, gpu: str, mfu: float, memory_gib: float, vocab_size: int, block_size: int,
              batch_size: int) -> list[str]:
    """The compute-optimal shape and token count for a budget, with the arithmetic."""
    budget = gpu_hours * 3600 * PEAK_FLOPS[gpu] * mfu
    n_opt = math.sqrt(budget / (6 * TOKENS_PER_PARAM))
    cfg = shape_for_params(n_opt, vocab_size, block_size)
    info = describe(cfg)
    tokens = budget / info["flops_per_token"]  # spend the whole budget on this shape
    memory = training_memory(cfg, batch_size, block_size)
    fits = memory["total"] <= memory_gib * 2**30
    lines = [
        f"budget: {gpu_hours:,.1f} GPU-hours x 3600 x {PEAK_FLOPS[gpu]:.3g} FLOP/s x {mfu} MFU = {budget:.3e} FLOP",
        f"compute-optimal size: N = sqrt(C / (6 x 20)) = sqrt({budget:.3e} / 120) = {n_opt:,.0f} parameters",
        f"shape with heads of 64 and width = 64 x layers (12 L d^2 = 49,152 L^3 = N): {cfg.n_layer} layers x {cfg.n_embd}"
        f" -> {info['params_non_embedding']:,} parameters without lookup tables",
        f"tokens: C / FLOPs per token = {budget:.3e} / {info['flops_per_token']:.3e} = {tokens:,.0f} "
        f"({tokens / info['params']:.1f} per parameter)",
        f"memory at batch {batch_size}: {gib(memory['total'])} of {memory_gib:g} GiB per GPU -> "
        + ("fits with DDP" if fits else "does not fit one GPU: use --fsdp, a smaller --batch_size with --grad_accum, or both"),
        f"command: torchrun --standalone --nproc_per_node=8 train_pretrain.py --preset=gpt2 --n_layer={cfg.n_layer} "
        f"--n_head={cfg.n_head} --n_embd={cfg.n_embd} --block_size={block_size}"
        f"{' --fsdp' if not fits else ''} --max_iters=<tokens / tokens per step>",
    ]
    return lines


@dataclass
class SizingConfig:
    """Memory, tokens and wall time for a model shape, or a compute-optimal shape for a budget."""
    preset: str = "gpt2"  # the shape to size (see python -m nanofm.model); overrides below
    n_layer: Optional[int] = None  # override the preset's layers
    n_head: Optional[int] = None  # override the preset's heads
    n_embd: Optional[int] = None  # override the preset's width
    block_size: Optional[int] = None  # override the preset's context length
    vocab_size: Optional[int] = None  # vocabulary (default: the preset's, else 50304)
    batch_size: int = 16  # sequences per GPU per micro-step
    gpus: int = 8  # number of GPUs
    gpu: str = "H100"  # GPU kind (sets the peak FLOP/s)
    mfu: float = 0.4  # model FLOPs utilisation to assume
    tokens: Optional[float] = None  # training tokens (default: 20 per parameter)
    budget_gpu_hours: Optional[float] = None  # recommend a shape for this budget instead
    gpu_memory_gib: float = 80  # memory per GPU, for the recommendation

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown --preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.gpu not in PEAK_FLOPS:
            raise ConfigError(f"unknown --gpu {self.gpu!r}; choose one of {', '.join(PEAK_FLOPS)}")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"--mfu must be in (0, 1], got {self.mfu}")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size", "gpus"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be at least 1, got {value}")
        for name in ("tokens", "budget_gpu_hours", "gpu_memory_gib"):
            value = getattr(self, name)
            if value is not None and not value > 0:  # also refuses nan
                raise ConfigError(f"--{name} must be positive, got {value}")


def main(argv=None) -> list[str]:
    cfg = parse_config(SizingConfig, argv)
    if cfg.budget_gpu_hours is not None:
        lines = recommend(cfg.budget_gpu_hours, cfg.gpu, cfg.mfu, cfg.gpu_memory_gib, cfg.vocab_size or 50304,
                          cfg.block_size or 1024, cfg.batch_size)
    else:
        shape = ModelConfig.preset(cfg.preset, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                   n_embd=cfg.n_embd, block_size=cfg.block_size)
        lines = report(shape, cfg.batch_size, cfg.gpus, cfg.gpu, cfg.mfu, cfg.tokens)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
