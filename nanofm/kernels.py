"""Triton fused kernels, each beside its plain PyTorch reference.

    loss = linear_cross_entropy(h, weight, targets)             # picks the kernel on CUDA
    y = rms_norm(x, weight, eps)

1. Linear + cross-entropy without the [tokens, vocab] logits. The LM head and the loss are the
   biggest activation in a small model: 16k tokens x 50k vocab in fp32 is 3.3 GB, and eager
   PyTorch keeps several such tensors for the backward pass. Here the tokens are processed in
   chunks: for each chunk, logits = h @ W^T (one matmul), then one Triton kernel per row reads
   the logits twice (an online max and sum of exponentials over vocabulary blocks, then
   softmax - one_hot) and writes the gradient over the logits in place; two more matmuls give
   dh and accumulate dW. The loss and both gradients exist after the forward call, so backward
   only scales them. Supports ignore_index (SFT masks) and mean or sum reduction.
2. RMSNorm forward and backward: one row per program, the normalised row recomputed in the
   backward from the saved 1/rms instead of stored.

Design decisions:
- Each kernel is wrapped in an autograd.Function; `linear_cross_entropy` and `rms_norm` use it
  on CUDA when Triton is importable, and the PyTorch reference elsewhere. `set_enabled(False)`
  (--kernels=false in the training scripts) turns them off; `use_triton=True` forces them (the
  tests run them on CPU under TRITON_INTERPRET=1).
- The kernels do their arithmetic in fp32 whatever the storage type (bf16 logits on GPU);
  under TRITON_INTERPRET=1 (the tests on CPU) bf16 arithmetic would be silently wrong anyway.
- torch.compile does not trace the loss call (torch.compiler.disable): the graph breaks once, at
  the loss. RMSNorm uses its kernel in eager mode only; compiled, inductor fuses the norm itself.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # CPU-only installs: the references run
    HAVE_TRITON = False

_ENABLED = True


def set_enabled(flag: bool) -> None:
    global _ENABLED
    _ENABLED = flag


def use_kernels(tensor: torch.Tensor, use_triton: bool | None = None) -> bool:
    """Auto (None): Triton on CUDA tensors when enabled. True forces it, e.g. on CPU under the
    interpreter (TRITON_INTERPRET=1) in the tests; False forces the reference."""
    if use_triton is not None:
        if use_triton and not HAVE_TRITON:
            raise RuntimeError("Triton is not installed (pip install triton)")
        if use_triton and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("Triton kernels run on CPU tensors only with TRITON_INTERPRET=1 set before import")
        return use_triton
    return _ENABLED and HAVE_TRITON and tensor.is_cuda


# ------------------------------------------------------------------ references

def linear_cross_entropy_reference(h, weight, targets, ignore_index: int = -100, reduction: str = "mean"):
    logits = (h @ weight.t()).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


def rms_norm_reference(x, weight, eps: float):
    return F.rms_norm(x, (x.size(-1),), weight, eps)


# ------------------------------------------------------------------ cross-entropy kernel

if HAVE_TRITON:
    @triton.jit
    def _cross_entropy_kernel(logits_ptr, stride, targets_ptr, losses_ptr, n_cols, ignore_index, scale,
                              BLOCK: tl.constexpr):
        """One row: loss = logsumexp(x) - x[target]; then x <- (softmax(x) - one_hot) * scale."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        target = tl.load(targets_ptr + row)
        # pass 1: running max m and sum s of exp(x - m), one vocabulary block at a time
        m = float("-inf")
        s = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        ignored = target == ignore_index
        safe_target = tl.where(ignored, 0, target)
        target_logit = tl.load(base + safe_target).to(tl.float32)
        tl.store(losses_ptr + row, tl.where(ignored, 0.0, lse - target_logit))
        # pass 2: the gradient of the (scaled) loss with respect to this row's logits
        row_scale = tl.where(ignored, 0.0, scale)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            grad = (tl.exp(x - lse) - tl.where(cols == safe_target, 1.0, 0.0)) * row_scale
            tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < n_cols)


def cross_entropy_rows_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, scale: float) -> torch.Tensor:
    """Per-row losses (fp32); the logits are overwritten with scale * d(loss)/d(logits)."""
    n_rows, n_cols = logits.shape
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    block = min(4096 if logits.is_cuda else 1024, triton.next_power_of_2(n_cols))
    _cross_entropy_kernel[(n_rows,)](logits, logits.stride(0), targets, losses, n_cols, ignore_index, scale,
                                     BLOCK=block, num_warps=8 if logits.is_cuda else 1)
    return losses


class LinearCrossEntropy(torch.autograd.Function):
    """Chunked linear + cross-entropy; the gradients are computed during the forward pass."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, reduction, chunk_size):
        compute_dtype = torch.get_autocast_dtype("cuda") if (h.is_cuda and torch.is_autocast_enabled("cuda")) else h.dtype
        with torch.autocast(device_type=h.device.type, enabled=False):
            h_c, w_c = h.to(compute_dtype), weight.to(compute_dtype)
            n_valid = int((targets != ignore_index).sum())
            scale = 1.0 / max(1, n_valid) if reduction == "mean" else 1.0
            dh = torch.empty_like(h_c)
            dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for start in range(0, h.size(0), chunk_size):
                rows = slice(start, start + chunk_size)
                logits = h_c[rows] @ w_c.t()  # [chunk, vocab]: the only logits that ever exist
                total += cross_entropy_rows_(logits, targets[rows].contiguous(), ignore_index, scale).sum()
                dh[rows] = logits @ w_c  # logits now hold the gradient
                if compute_dtype == torch.float32:
                    dw.addmm_(logits.t(), h_c[rows])
                else:  # a bf16 matmul per chunk, summed in fp32 (no fp32 copy of the chunk's logits)
                    dw += (logits.t() @ h_c[rows]).float()
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (h.dtype, weight.dtype)
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        return (dh * grad_loss).to(ctx.dtypes[0]), (dw * grad_loss).to(ctx.dtypes[1]), None, None, None, None


@torch.compiler.disable
def linear_cross_entropy(h, weight, targets, ignore_index: int = -100, reduction: str = "mean",
                         chunk_size: int = 2048, use_triton: bool | None = None):
    """Cross-entropy of (h @ weight^T) against targets; h [N, D], weight [V, D], targets [N]."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
    if not use_kernels(h, use_triton):
        return linear_cross_entropy_reference(h, weight, targets, ignore_index, reduction)
    return LinearCrossEntropy.apply(h, weight, targets, ignore_index, reduction, chunk_size)


# ------------------------------------------------------------------ RMSNorm kernels

if HAVE_TRITON:
    @triton.jit
    def _rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, stride, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        tl.store(rstd_ptr + row, rstd)
        tl.store(y_ptr + row * stride + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_backward_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, stride, n_rows, n_cols,
                                  rows_per_program, BLOCK: tl.constexpr):
        """dx = rstd * (dy*w - x_hat * mean(dy*w*x_hat)); dw partial sums of dy * x_hat per program."""
        program = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(0, rows_per_program):
            row = (program * rows_per_program + i).to(tl.int64)
            if row < n_rows:
                x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(rstd_ptr + row)
                x_hat = x * rstd
                dyw = dy * w
                dx = rstd * (dyw - x_hat * tl.sum(dyw * x_hat, axis=0) / n_cols)
                tl.store(dx_ptr + row * stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
                dw += dy * x_hat
        tl.store(dw_partial_ptr + program * n_cols + cols, dw, mask=mask)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        y = torch.empty_like(x2)
        rstd = torch.empty(x2.size(0), dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(x2.size(1))
        _rms_norm_forward_kernel[(x2.size(0),)](x2, weight, y, rstd, x2.stride(0), x2.size(1), eps, BLOCK=block)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(-1, x2.size(1)).contiguous()
        dx = torch.empty_like(x2)
        n_rows, n_cols = x2.shape
        programs = min(n_rows, 4 * (torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 2))
        rows_per_program = -(-n_rows // programs)
        dw_partial = torch.empty(programs, n_cols, dtype=torch.float32, device=x2.device)
        _rms_norm_backward_kernel[(programs,)](dy2, x2, weight, rstd, dx, dw_partial, x2.stride(0), n_rows, n_cols,
                                               rows_per_program, BLOCK=triton.next_power_of_2(n_cols))
        return dx.view(dy.shape), dw_partial.sum(0).to(weight.dtype), None


def rms_norm(x, weight, eps: float, use_triton: bool | None = None):
    """RMSNorm; the Triton kernel in eager mode. Under torch.compile the reference is traced and
    inductor generates its own fused kernel (an interpreted or opaque call would break the graph
    at every norm)."""
    if torch.compiler.is_compiling() or not use_kernels(x, use_triton):
        return rms_norm_reference(x, weight, eps)
    return RMSNormFunction.apply(x, weight, eps)
