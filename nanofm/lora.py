"""LoRA: low-rank adapters on chosen linear layers (Hu et al. 2021), written from scratch.

    from nanofm import lora
    names = lora.apply(model, lora.LoRAConfig(rank=8, alpha=16, dropout=0.05, targets=["attn.c_attn", "attn.c_proj"]))
    # train: only lora_A / lora_B require gradients
    state = lora.adapter_state_dict(model)      # the adapters alone: a small file
    lora.merge(model)                           # W + (alpha / r) B A, back to plain nn.Linear layers

A LoRA layer computes  y = W x + b + (alpha / r) * B A dropout(x)  with W frozen, A (r x in) drawn
like a Linear layer's weight (Kaiming-uniform) and B (out x r) zeros, so the adapted model starts
exactly equal to its base.

Design decisions:
- LoRALinear is an nn.Linear that shares the base layer's weight and bias Parameters and adds
  lora_A and lora_B, so the base's state-dict keys do not change (a base checkpoint loads into an
  adapted model, and an adapted model's base weights save under their usual names).
- apply() freezes every parameter that is not an adapter; a layer is chosen when its name ends
  with one of the targets ("attn.c_attn" matches every block's); a target that matches nothing is
  an error, not a silent no-op.
- An adapter checkpoint holds only lora_A/lora_B, and its meta.json's `adapters` names the base
  checkpoint and a fingerprint of the base weights (sha256 of their bytes), so loading it onto
  another base is refused (nanofm/checkpoint.py).
- modules_to_save (PEFT's name) trains whole modules beside the adapters, typically the input
  embeddings: a task learnt mostly in the words' embeddings (sentiment) is out of reach of adapters
  on the blocks' linears. They are saved with the adapters, so the checkpoint grows by their size.
- merge() folds the adapters into the weights (W + scale B A) and returns plain nn.Linear layers:
  the merged model is a normal checkpoint, with outputs equal to the unmerged one's (tested).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanofm.common import ConfigError

DEFAULT_TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]  # every linear layer of the blocks


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # modules trained in full beside the adapters and saved with them (PEFT's modules_to_save), e.g.
    # "transformer.wte" (the input embeddings: what sentiment needs most) or "lm_head"
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"LoRA rank must be at least 1, got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError("LoRA needs at least one target layer name")

    def to_dict(self) -> dict:
        return asdict(self)


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        nn.Module.__init__(self)  # no fresh weight: the base layer's Parameters are shared
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.scaling = cfg.alpha / cfg.rank
        self.dropout = cfg.dropout  # a number, not an nn.Dropout: the body's set_dropout must not change the adapters'
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, cfg.rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def forward(self, x):
        update = F.linear(F.linear(F.dropout(x, self.dropout, self.training), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    def merged(self) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device,
                          dtype=self.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.weight + self.scaling * (self.lora_B @ self.lora_A).to(self.weight.dtype))
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def saved_modules(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """The full names of the modules that cfg.modules_to_save names (by suffix, like the targets)."""
    names = [name for name, _ in model.named_modules() if name]
    found = []
    for wanted in cfg.modules_to_save:
        hits = [n for n in names if n == wanted or n.endswith("." + wanted)]
        if not hits:
            tops = sorted({n for n in names if n.count(".") <= 1 and ".h" not in n and not n.endswith(".h")})
            raise ConfigError(f"--lora_modules_to_save {wanted!r} matches no module; modules of this model include: "
                              f"{', '.join(tops[:10])}")
        found += [n for n in hits if not any(n.startswith(f + ".") for f in found) and n not in found]
    return found


def apply(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap every nn.Linear whose name ends with a target; freeze everything else but the modules to
    save (trained in full). Returns the adapted layers' names."""
    chosen = [name for name, module in model.named_modules()
              if type(module) is nn.Linear and any(name == t or name.endswith("." + t) for t in cfg.targets)]
    unmatched = [t for t in cfg.targets if not any(n == t or n.endswith("." + t) for n in chosen)]
    if unmatched:
        linears = sorted({n.split(".", 3)[-1] for n, m in model.named_modules() if type(m) is nn.Linear})
        raise ConfigError(f"LoRA target {unmatched[0]!r} matches no linear layer; the model's linear layers end with: "
                          f"{', '.join(linears[:8])}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in saved_modules(model, cfg):
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    for name in chosen:
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), cfg))
    return chosen


def is_adapter(name: str) -> bool:
    return name.endswith(("lora_A", "lora_B"))


def adapter_state_dict(model: nn.Module | dict, also: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The adapters alone (and the weights whose names start with `also`, e.g. a new head), from a
    model or from its state dict."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    kept = {k for k in state if is_adapter(k) or k.startswith(also)}
    shared = {state[k].data_ptr() for k in kept if not is_adapter(k)}  # a tied lm_head goes with its embeddings
    return {k: v.detach().cpu() for k, v in state.items() if k in kept or v.data_ptr() in shared}


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight, leaving plain nn.Linear layers."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, leaf = _parent(model, name)
            setattr(parent, leaf, module.merged())
    return model


def merged_state_dict(state: dict[str, torch.Tensor], cfg: LoRAConfig) -> dict[str, torch.Tensor]:
    """A state dict with adapters, folded into plain weights (W + alpha / r B A), adapters removed."""
    merged = {k: v for k, v in state.items() if not is_adapter(k)}
    for key in state:
        if key.endswith(".lora_A"):
            layer = key[:-len(".lora_A")]
            weight = merged[f"{layer}.weight"]
            update = (state[f"{layer}.lora_B"].float() @ state[key].float()) * (cfg.alpha / cfg.rank)
            merged[f"{layer}.weight"] = (weight.float() + update).to(weight.dtype)
    return merged


def fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of a model's base weights (adapters left out), in key order: which base an adapter fits."""
    digest = hashlib.sha256()
    for key in sorted(k for k in state_dict if not is_adapter(k)):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
