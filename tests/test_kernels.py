"""Triton kernels vs their PyTorch references: on CPU under TRITON_INTERPRET=1 (set in conftest),
and in bf16 on a GPU (skipped without CUDA)."""

import pytest
import torch

from nanofm import kernels
from nanofm.kernels import linear_cross_entropy, linear_cross_entropy_reference, rms_norm, rms_norm_reference

pytestmark = pytest.mark.skipif(not kernels.HAVE_TRITON, reason="triton is not installed")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    out.backward()
    return out.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n, d, v, chunk", [(37, 16, 301, 10), (9, 8, 3000, 4), (1, 4, 5, 4)])
def test_linear_cross_entropy_matches_reference(reduction, n, d, v, chunk):
    torch.manual_seed(n + v)
    h, w = torch.randn(n, d), torch.randn(v, d) * 0.5
    targets = torch.randint(0, v, (n,))
    if n > 2:
        targets[::3] = -100  # ignored rows (an SFT mask)
    ours, (dh, dw) = grads(lambda h, w: linear_cross_entropy(h, w, targets, reduction=reduction, chunk_size=chunk,
                                                              use_triton=True), h, w)
    ref, (dh_ref, dw_ref) = grads(lambda h, w: linear_cross_entropy_reference(h, w, targets, reduction=reduction), h, w)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(dh, dh_ref, rtol=1e-5, atol=1e-5) and torch.allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)


def test_linear_cross_entropy_is_stable_for_large_logits():
    torch.manual_seed(0)
    h, w = torch.randn(8, 16) * 30, torch.randn(700, 16) * 3  # logits in the hundreds
    targets = torch.randint(0, 700, (8,))
    ours, (dh, _) = grads(lambda h, w: linear_cross_entropy(h, w, targets, use_triton=True), h, w)
    ref, (dh_ref, _) = grads(lambda h, w: linear_cross_entropy_reference(h, w, targets), h, w)
    assert torch.isfinite(ours) and torch.allclose(ours, ref, rtol=1e-5) and torch.allclose(dh, dh_ref, atol=1e-4)


def test_linear_cross_entropy_scales_with_the_upstream_gradient():
    torch.manual_seed(1)
    h, w, targets = torch.randn(6, 8), torch.randn(50, 8), torch.randint(0, 50, (6,))
    _, (dh, _) = grads(lambda h, w: 3.0 * linear_cross_entropy(h, w, targets, use_triton=True), h, w)
    _, (dh_ref, _) = grads(lambda h, w: 3.0 * linear_cross_entropy_reference(h, w, targets), h, w)
    assert torch.allclose(dh, dh_ref, atol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, targets, reduction="none")


@pytest.mark.parametrize("shape", [(3, 5, 37), (1, 64), (7, 1)])
def test_rms_norm_matches_reference(shape):
    torch.manual_seed(sum(shape))
    x, weight = torch.randn(*shape) * 2 + 0.5, torch.rand(shape[-1]) + 0.5
    upstream = torch.randn(*shape)
    ours, (dx, dw) = grads(lambda x, w: (rms_norm(x, w, 1e-5, use_triton=True) * upstream).sum(), x, weight)
    ref, (dx_ref, dw_ref) = grads(lambda x, w: (rms_norm_reference(x, w, 1e-5) * upstream).sum(), x, weight)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(dx, dx_ref, rtol=1e-5, atol=1e-5) and torch.allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)


def test_kernels_are_off_on_cpu_by_default_and_can_be_disabled():
    x = torch.randn(4, 8)
    assert not kernels.use_kernels(x)  # CPU training runs the references
    kernels.set_enabled(False)
    try:
        assert not kernels.use_kernels(x) and kernels.use_kernels(x, use_triton=True)
    finally:
        kernels.set_enabled(True)


@cuda
def test_bf16_on_gpu():
    torch.manual_seed(0)
    h = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(50304, 768, device="cuda") * 0.02).to(torch.bfloat16)
    targets = torch.randint(0, 50304, (4096,), device="cuda")
    ours, (dh, dw) = grads(lambda h, w: linear_cross_entropy(h, w, targets), h, w)
    ref, (dh_ref, dw_ref) = grads(lambda h, w: linear_cross_entropy_reference(h.float(), w.float(), targets), h, w)
    assert abs(ours.item() - ref.item()) < 1e-2
    assert torch.allclose(dh.float(), dh_ref.float(), atol=1e-3) and torch.allclose(dw.float(), dw_ref.float(), atol=1e-3)
    x = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16)
    assert torch.allclose(rms_norm(x, torch.ones(768, device="cuda", dtype=torch.bfloat16), 1e-5).float(),
                          rms_norm_reference(x.float(), torch.ones(768, device="cuda"), 1e-5), atol=2e-2)


@cuda
def test_training_converges_the_same_with_and_without_kernels():
    from nanofm.model import ModelConfig, Transformer

    def run(enabled):
        kernels.set_enabled(enabled)
        torch.manual_seed(0)
        model = Transformer(ModelConfig.preset("tiny", vocab_size=512)).cuda()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        data = torch.randint(0, 512, (8, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        losses = []
        for _ in range(32):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(data, data)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    try:
        with_kernels, without = run(True), run(False)
    finally:
        kernels.set_enabled(True)
    assert abs(with_kernels[-1] - without[-1]) < 0.05 * without[-1] and with_kernels[-1] < with_kernels[0] - 1
