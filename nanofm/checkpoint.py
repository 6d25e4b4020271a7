"""Checkpoints: a directory per save, written to a temporary name and renamed into place.

    out/run/ckpt_0000500/
        model.pt      the plain (uncompiled, unwrapped) model's state dict; torch.load(weights_only=True)
        meta.json     model config, stage, training config, step, tokens seen, metrics, the tokenizer,
                      the checkpoint it came from (lineage)
        tokenizer.json  a copy, so every later stage inherits the tokenizer with the weights
        state.pt      optimizer, data-loader position and RNG states, for an exact resume
    out/run/latest    the name of the newest complete checkpoint

Design decisions:
- A crash while writing leaves a `.tmp-*` directory that is never read and is cleared by the next
  save; the previous checkpoint and `latest` stay intact.
- Only the last `keep` checkpoints are kept; deleting happens after the new one is in place.
- `load_checkpoint` accepts a checkpoint directory or a run directory (it follows `latest`), and
  a state dict that does not fit the model is an error that names the differing shapes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from nanofm.model import ModelConfig, Transformer


class CheckpointError(ValueError):
    pass


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint or run directory."""
    path = Path(path)
    if (path / "model.pt").is_file():
        return path
    if (path / "latest").is_file():
        return path / (path / "latest").read_text().strip()
    raise CheckpointError(f"no checkpoint at {path} (expected model.pt, or a run directory with a 'latest' file)")


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module | dict, meta: dict, state: dict | None = None,
                    tokenizer_path: str | Path | None = None, keep: int = 3) -> Path:
    """Write a checkpoint of `model` (a module, or its full state dict, e.g. gathered from FSDP)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".tmp-*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    final = run_dir / f"ckpt_{step:07d}"
    tmp = run_dir / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    torch.save(model if isinstance(model, dict) else model.state_dict(), tmp / "model.pt")
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")},
                                              indent=1, default=str))
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
    if state is not None:
        torch.save(state, tmp / "state.pt")
    if final.exists():  # re-saving the same step (a resumed run ending where it began)
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = run_dir / "latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, run_dir / "latest")
    for old in sorted(run_dir.glob("ckpt_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_meta(path: str | Path) -> dict:
    return json.loads((resolve(path) / "meta.json").read_text())


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, dict]:
    """The model of a checkpoint and its meta.json."""
    ckpt = resolve(path)
    meta = read_meta(ckpt)
    model = Transformer(ModelConfig(**meta["model"]))
    load_weights(model, torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True), ckpt)
    return model.to(device), meta


def load_weights(model: torch.nn.Module, state_dict: dict, source: str | Path = "checkpoint") -> None:
    own = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if mismatched or missing or unexpected:
        details = "; ".join(mismatched[:3] + [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in unexpected[:3]])
        raise CheckpointError(f"the weights in {source} do not fit this model ({details}); "
                              f"use the checkpoint's own model config (its meta.json) or another checkpoint")
    model.load_state_dict(state_dict)


def load_state(path: str | Path) -> dict:
    ckpt = resolve(path)
    if not (ckpt / "state.pt").is_file():
        raise CheckpointError(f"{ckpt} has no state.pt (optimizer and data position), so it cannot be resumed; "
                              f"start a new run from it with --init_from={ckpt}")
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
