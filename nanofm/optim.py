"""Optimizers: AdamW for everything, or Muon for the hidden matrices and AdamW for the rest.

Muon (Keller Jordan, 2024; used by modded-nanogpt and nanochat) keeps SGD momentum for each
weight matrix and, instead of the raw momentum, applies its nearest semi-orthogonal matrix: the
update U V^T of the momentum's SVD U S V^T, approximated by five Newton-Schulz iterations. Every
direction of the update then has the same size, so rare directions are not drowned by common
ones. It is for 2-D hidden weights only: embeddings, the output head, norms and biases keep AdamW.

Design decisions:
- Newton-Schulz runs in bf16 on CUDA (it is stable there and tensor cores make it cheap), fp32
  elsewhere; the quintic coefficients (3.4445, -4.7750, 2.0315) are the tuned ones from Muon.
- The update is scaled by sqrt(max(1, rows / cols)) so tall and wide matrices move alike.
- Under DDP the gradients are already averaged, so every rank computes the same update.
- `CombinedOptimizer` presents several optimizers as one to the training loop (step, zero_grad,
  param_groups for the schedule, state_dict for checkpoints). Each group carries `base_lr`; the
  schedule multiplies it.
"""

from __future__ import annotations

import torch

from nanofm.common import ConfigError


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T, by a quintic Newton-Schulz iteration."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16) if g.is_cuda else g.float()
    transposed = x.size(0) > x.size(1)
    if transposed:  # iterate on the wide side: X X^T is the smaller product
        x = x.t()
    x = x / (x.norm() + eps)  # singular values <= 1, where the iteration converges
    for _ in range(steps):
        xxt = x @ x.t()
        x = a * x + (b * xxt + c * xxt @ xxt) @ x
    return (x.t() if transposed else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() != 2:
                    raise ConfigError(f"Muon is for 2-D weight matrices; got a parameter of shape {tuple(p.shape)}")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad)
                g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                update = orthogonalize(g, group["ns_steps"]) * max(1.0, p.size(0) / p.size(1)) ** 0.5
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])


class CombinedOptimizer:
    """Several optimizers stepping together, seen by the training loop as one."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state):
        if len(state.get("optimizers", [])) != len(self.optimizers):
            raise ConfigError("the checkpoint's optimizer state belongs to another --optimizer; resume with the same one")
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)
