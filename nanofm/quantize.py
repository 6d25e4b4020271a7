"""Int8 weight-only quantization: the edge export (stage 8), for CPUs and small devices.

    python -m nanofm.quantize --ckpt out/sft --out out/sft-int8   # a checkpoint ~4x smaller
    python serve.py --ckpt out/sft-int8                            # the checkpoint says it is int8
    python serve.py --ckpt out/sft --int8                          # or quantize a full one at load
    python bench.py edge                                           # size, decode speed, bits per byte

What it does: every linear layer's weight W [out, in] (and the token embedding, whose rows are
the untied head's or the tied head's output channels) is stored as int8 with one float scale per
output channel (row):
    scale[o] = max_i |W[o, i]| / 127,   q[o, i] = round(W[o, i] / scale[o])  in [-127, 127]
Symmetric (no zero point: weights are centred on 0), per channel (one outlier row does not crush
the precision of the others), weight-only (activations stay float, so no calibration data is
needed). Norms, biases and position embeddings stay float: they are a sliver of the bytes.

Design decisions:
- The reference is the plain definition: dequantize (q * scale) and multiply (`reference_matmul`).
  The fast path (`int8_matmul`) factors the scale out of the sum. A decode step (a few rows) is
  memory-bound, so it reads the int8 matrix once and converts in registers: a fused loop that
  torch.compile generates from three lines of PyTorch. A prefill (many rows) is compute-bound, so
  it dequantizes once and calls the BLAS matrix multiply. Both are tested equal to the reference.
  Measured and rejected: PyTorch's own int8 weight-only CPU kernel (torch._weight_int8pack_mm) is
  2-20x slower than fp32 on this CPU; casting the whole matrix to float every step reads more
  bytes than fp32 does. Where torch.compile cannot run (no C++ compiler), the cast path is used,
  with a warning: the same numbers, slower.
- The export is a normal nanofm checkpoint (model.pt, meta.json, tokenizer.json) whose meta.json
  has a `quantization` section and whose parent is the full checkpoint; checkpoint.load_model
  rebuilds the int8 modules from it, so every stage that loads models can serve it. It is for
  inference: training refuses it (train from its parent).
- Tied embeddings stay tied: the int8 table and its scales are shared by the embedding and the
  head, so the file holds them once.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanofm.common import ConfigError, run_cli

METHOD = "int8 weight-only, symmetric, per output channel"


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scale float32 [out]) with weight ~= q * scale[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # an all-zero row gets a tiny scale and q = 0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


def reference_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
    """The definition the fast path is tested against: dequantize, then an ordinary linear layer."""
    return F.linear(x, dequantize(q, scale, x.dtype), bias)


GEMV_ROWS = 32  # up to this many input rows (decode steps) take the fused path; more (prefill) dequantize once


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ (q * scale).T, the same sum as reference_matmul, computed two ways:
    - a few rows (a decode step: memory-bound, the weights are read once per token): one fused
      pass over the int8 matrix, each weight turned into a float in registers and the row's scale
      applied to the output (torch.compile generates the loop; 4x fewer bytes read than fp32);
    - many rows (a prefill: compute-bound): dequantize once and use the BLAS matrix multiply.
    """
    flat = x.reshape(-1, x.size(-1))
    if flat.size(0) <= GEMV_ROWS:
        out = _gemv(flat, q, scale)
    else:
        out = F.linear(flat, dequantize(q, scale, x.dtype))
    return out.reshape(*x.shape[:-1], q.size(0))


def _gemv_fused(x, q, scale):
    # written as a broadcast and a sum so that the compiler emits one loop over q; eager PyTorch
    # would build the [rows, out, in] product in memory, so it never runs this uncompiled
    return (x.unsqueeze(-2) * q.to(x.dtype)).sum(-1) * scale.to(x.dtype)


def _gemv_eager(x, q, scale):
    return (x @ q.to(x.dtype).t()) * scale.to(x.dtype)


_compiled_gemv = None  # compiled on first use (seconds); None after a failure means: eager from now on


def _gemv(x, q, scale):
    global _compiled_gemv
    if torch.compiler.is_compiling():  # inside a compiled decode step: part of its graph
        return _gemv_fused(x, q, scale)
    if _compiled_gemv is None:
        _compiled_gemv = torch.compile(_gemv_fused, dynamic=True)  # one graph for every shape
    if _compiled_gemv is not False:
        try:
            return _compiled_gemv(x, q, scale)
        except Exception as exc:  # no C++ compiler, an unsupported device: correct but slower
            print(f"warning: torch.compile of the int8 matmul failed ({type(exc).__name__}: {str(exc)[:120]}); "
                  f"using the eager int8 matmul", file=sys.stderr)
            _compiled_gemv = False
    return _gemv_eager(x, q, scale)


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 with per-output-channel scales (buffers, not parameters:
    nothing here trains)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        layer.weight, layer.weight_scale = quantize_per_channel(linear.weight)
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().float().clone()
        return layer

    def forward(self, x):
        out = int8_matmul(x, self.weight, self.weight_scale)
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with one scale per row: look up, then dequantize."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))

    def forward(self, idx):
        return self.weight[idx].float() * self.weight_scale[idx, None]


def _swap(model: nn.Module, make_linear, make_embedding) -> nn.Module:
    """Every nn.Linear and the token embedding replaced by what the makers build; a tied head then
    reads the embedding's int8 rows and scales; nothing trains. Returns the model in eval mode."""
    tied = getattr(model.cfg, "tie_embeddings", False)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, make_linear(child))
            elif type(child) is nn.Embedding and f"{name}.{child_name}".lstrip(".") == "transformer.wte":
                setattr(module, child_name, make_embedding(child))
    if tied:
        model.lm_head.weight, model.lm_head.weight_scale = model.transformer.wte.weight, model.transformer.wte.weight_scale
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def quantize_model(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear and the token embedding with int8 versions, in place (returns the
    model, in eval mode). A tied head shares the embedding's int8 table and scales."""

    def embedding(e: nn.Embedding) -> Int8Embedding:
        table = Int8Embedding(e.num_embeddings, e.embedding_dim)
        table.weight, table.weight_scale = quantize_per_channel(e.weight)
        return table
    return _swap(model.float(), Int8Linear.from_float, embedding)


def prepare_for_loading(model: nn.Module) -> nn.Module:
    """Empty int8 modules in place of the float ones, ready for an int8 checkpoint's state dict."""
    return _swap(model, lambda lin: Int8Linear(lin.in_features, lin.out_features, lin.bias is not None),
                 lambda e: Int8Embedding(e.num_embeddings, e.embedding_dim))


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules())


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write an int8 copy of `checkpoint` to `out` (a new run directory); returns the checkpoint path."""
    from nanofm.checkpoint import load_model, resolve, save_checkpoint

    source = resolve(checkpoint)
    model, meta = load_model(source)
    if not model.cfg.causal:
        raise ConfigError(f"{source} is a bidirectional (MLM) model; the int8 export is for generation (causal models)")
    if meta.get("quantization"):
        raise ConfigError(f"{source} is already quantized ({meta['quantization']['method']})")
    quantize_model(model)
    # a tied head's table is the embedding's tensor: torch.save writes shared storage once
    meta = {**meta, "quantization": {"method": METHOD, "bits": 8}, "parent": str(source), "adapters": None,
            "stage": "export-int8"}
    return save_checkpoint(out, int(meta.get("step", 0)), model.state_dict(), meta, None, source / "tokenizer.json")


@dataclass
class QuantizeConfig:
    ckpt: str = "out/sft"  # the full checkpoint (or run directory: its latest)
    out: str = "out/sft-int8"  # the new run directory


def main(argv=None) -> Path:
    from nanofm.config import parse_config

    cfg = parse_config(QuantizeConfig, argv, description="int8 weight-only export of a checkpoint")
    from nanofm.checkpoint import resolve

    source = resolve(cfg.ckpt)
    path = export(source, cfg.out)
    before, after = os.path.getsize(source / "model.pt"), os.path.getsize(path / "model.pt")
    print(f"{source} ({before / 2**20:.1f} MiB) -> {path} ({after / 2**20:.1f} MiB, {before / after:.2f}x smaller); "
          f"{METHOD}", file=sys.stderr)
    return path


if __name__ == "__main__":
    run_cli(main)
