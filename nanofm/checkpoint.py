"""The checkpoint schema: one directory per save, written to a temporary name and renamed; one
place that builds meta.json and one place that loads a checkpoint, for training or inference.

    out/run/ckpt_0000500/
        model.pt      the plain (uncompiled, unwrapped) model's state dict; torch.load(weights_only=True)
        meta.json     make_meta(...): format version, stage, objective or algorithm, model config,
                      full config, step, tokens, metrics, tokenizer, data, chat format, labels,
                      adapters, extra heads, parent and lineage
        tokenizer.json  a copy, so every later stage inherits the tokenizer with the weights
        state.pt      optimizer, data-loader position, RNG states, training time: an exact resume
                      (also weights_only=True: plain tensors, numbers, strings)
    out/run/latest    the name of the newest complete checkpoint

    meta = make_meta(stage="pretrain", model=cfg, config=config_to_dict(run_cfg), tokenizer=tok.name,
                     objective="clm", data_dir="data/default", parent=None)
    save_checkpoint(run_dir, step, model, meta, state, tokenizer_path, keep=3)
    model, meta, tokenizer = load_for_inference("out/sft")           # eval, serving
    model, meta, parent = load_for_training("out/pretrain", tokenizer)  # the next stage

Design decisions:
- meta.json carries FORMAT_VERSION. Files without one (written before the schema had a version)
  are read as version 0 and upgraded in memory; a newer version than this code knows is refused
  with a message saying so. A stage that adds a field adds it here, not in its own script.
- A later stage inherits what it does not set: the chat format and labels of the parent (a
  checkpoint fine-tuned with a chat format keeps using it in eval, RLHF and serving).
- A crash while writing leaves a `.tmp-*` directory that is never read and is cleared by the next
  save; the previous checkpoint and `latest` stay intact. A crash between the rename and the
  update of `latest` leaves a complete checkpoint that `latest` does not name yet: resolve()
  falls back to the newest complete ckpt_* directory, so the run still resumes.
- Only the last `keep` checkpoints are kept (by step number, never the one just written);
  deleting happens after the new one is in place.
- Every way a checkpoint can be unusable (missing, corrupt model.pt, meta.json without a model,
  weights that do not fit, another tokenizer than the data's) is a CheckpointError naming the
  file, never a torch traceback.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from nanofm import __version__
from nanofm.common import NanofmError, atomic_write_text, disk_error
from nanofm.model import ModelConfig, Transformer

FORMAT_VERSION = 1  # stages so far: pretrain, sft, rlhf, imported


class CheckpointError(NanofmError, ValueError):
    pass


# ------------------------------------------------------------------ meta.json

def make_meta(*, stage: str, model: ModelConfig | dict, config: dict, tokenizer: str, objective: str | None = None,
              data_dir: str | None = None, parent: str | Path | None = None, parent_meta: dict | None = None,
              chat_format: str | None = None, labels: list[str] | None = None, adapters: dict | None = None,
              heads: list[str] | None = None, **extra) -> dict:
    """The meta.json of every checkpoint. What a stage leaves out (chat_format, labels) is
    inherited from the parent checkpoint; lineage lists every ancestor, oldest first."""
    parent_meta = parent_meta or {}
    return {
        "format_version": FORMAT_VERSION, "nanofm_version": __version__, "stage": stage, "objective": objective,
        "model": model.to_dict() if isinstance(model, ModelConfig) else dict(model), "config": config,
        "tokenizer": tokenizer, "data_dir": data_dir,
        "chat_format": chat_format if chat_format is not None else parent_meta.get("chat_format"),
        "labels": labels if labels is not None else parent_meta.get("labels"),
        "adapters": adapters, "heads": heads or [],
        "parent": str(parent) if parent else None,
        "lineage": parent_meta.get("lineage", []) + ([str(parent)] if parent else []),
        **extra,
    }


def upgrade_meta(meta: dict, source: str | Path) -> dict:
    """A meta.json of any known version, as the current version."""
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{source} has checkpoint format version {version!r}, newer than this nanofm reads "
                              f"({FORMAT_VERSION}); update nanofm")
    if "model" not in meta or not isinstance(meta["model"], dict):
        raise CheckpointError(f"{source} has no 'model' section (the model's shape), so no model can be built from it; "
                              f"it was not written by nanofm, or was edited")
    if version == 0:  # written before the schema had a version: the fields it lacked, empty
        meta = {"stage": None, "objective": None, "config": {}, "tokenizer": None, "data_dir": None, "chat_format": None,
                "labels": meta.get("labels"), "adapters": None, "heads": [], "parent": None, "lineage": [], **meta,
                "format_version": FORMAT_VERSION}
    return meta


def read_meta(path: str | Path) -> dict:
    file = resolve(path) / "meta.json"
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: the checkpoint is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc}); the checkpoint is corrupt") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file} must hold a JSON object")
    return upgrade_meta(meta, file)


# ------------------------------------------------------------------ finding checkpoints

def step_of(path: Path) -> int:
    try:
        return int(path.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints (renamed into place, with model.pt and meta.json), oldest first."""
    found = [p for p in Path(run_dir).glob("ckpt_*") if (p / "model.pt").is_file() and (p / "meta.json").is_file()]
    return sorted(found, key=step_of)


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint or run directory (its `latest`, or else its newest
    complete checkpoint)."""
    path = Path(path)
    if (path / "model.pt").is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        named = path / latest.read_text().strip()
        if (named / "model.pt").is_file():
            return named
    found = complete_checkpoints(path)
    if found:  # `latest` was not written yet (killed right after the rename) or names a deleted checkpoint
        return found[-1]
    if path.is_file():
        raise CheckpointError(f"{path} is a file; give a checkpoint directory (with model.pt) or a run directory")
    raise CheckpointError(f"no checkpoint at {path} (expected model.pt, or a run directory with ckpt_* checkpoints)")


def newest_run(root: str | Path = "out") -> Path:
    """The run directory under `root` whose newest complete checkpoint was written last: what a
    command given no checkpoint means (the stage the user ran most recently)."""
    runs = [((resolve(run) / "meta.json").stat().st_mtime_ns, run)
            for run in sorted(Path(root).glob("*/")) if complete_checkpoints(run)]
    if not runs:
        raise CheckpointError(f"no checkpoint under {root}/: train one first (python train_pretrain.py), "
                              f"or name one with --ckpt")
    return max(runs)[1]


# ------------------------------------------------------------------ saving

def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module | dict, meta: dict, state: dict | None = None,
                    tokenizer_path: str | Path | None = None, keep: int = 3) -> Path:
    """Write a checkpoint of `model` (a module, or its full state dict, e.g. gathered from FSDP)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".tmp-*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    final = run_dir / f"ckpt_{step:07d}"
    tmp = run_dir / f".tmp-{final.name}"
    try:
        tmp.mkdir()
        torch.save(model if isinstance(model, dict) else model.state_dict(), tmp / "model.pt")
        meta = {"format_version": FORMAT_VERSION, **meta, "step": step, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        if state is not None:
            torch.save(state, tmp / "state.pt")
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, RuntimeError) and "write" not in str(exc):
            raise  # not an I/O failure: a bug, keep its traceback
        raise CheckpointError(f"{disk_error(tmp, exc)}; the checkpoint of step {step} was not saved") from exc
    if final.exists():  # re-saving the same step (a resumed run ending where it began)
        shutil.rmtree(final)
    tmp.rename(final)
    atomic_write_text(run_dir / "latest", final.name)
    if keep > 0:
        for old in [p for p in complete_checkpoints(run_dir) if p != final][:-(keep - 1) or None]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# ------------------------------------------------------------------ loading

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


def _torch_load(file: Path, what: str) -> dict:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint is incomplete")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds (pickle, zip, runtime) for one cause: a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{file} cannot be read as {what} ({first[:200]}); the file is corrupt, truncated, or "
                              f"not written by nanofm: use another checkpoint") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, dict]:
    """The model of a checkpoint and its meta.json. An adapter checkpoint (meta.json's `adapters`)
    is loaded onto its base checkpoint, checked to be the base it was trained on, and merged."""
    ckpt = resolve(path)
    meta = read_meta(ckpt)
    try:
        model = Transformer(ModelConfig(**meta["model"]))
    except TypeError as exc:
        raise CheckpointError(f"{ckpt}/meta.json has a model section this nanofm cannot build ({exc})") from None
    state = _torch_load(ckpt / "model.pt", "model weights")
    if meta.get("quantization"):  # an int8 export (nanofm.quantize): int8 modules take the weights
        from nanofm import quantize
        quantize.prepare_for_loading(model)
    if meta.get("adapters"):
        _load_adapters(model, state, meta["adapters"], ckpt)
    else:
        load_weights(model, state, ckpt)
    return model.to(device), meta


def _load_adapters(model: Transformer, trained: dict, adapters: dict, ckpt: Path) -> None:
    """Base weights from the base checkpoint, then the adapters and any trained head, then merge."""
    from nanofm import lora

    base_path = Path(adapters["base"])
    if not base_path.exists():
        raise CheckpointError(f"{ckpt} holds LoRA adapters for the base checkpoint {base_path}, which is missing; "
                              f"restore it, or use a merged checkpoint (train_sft.py --lora_merge)")
    base = _torch_load(resolve(base_path) / "model.pt", "model weights")
    if lora.fingerprint(base) != adapters["base_fingerprint"]:
        raise CheckpointError(f"{ckpt} holds adapters trained on another base than {base_path} (its weights differ); "
                              f"load them onto the checkpoint they were trained on")
    missing = [k for k in model.state_dict() if k not in base and k not in trained]
    if missing:
        raise CheckpointError(f"{ckpt} and its base {base_path} lack {missing[:3]} for this model")
    model.load_state_dict({k: v for k, v in base.items() if k in model.state_dict()}, strict=False)
    lora.apply(model, lora.LoRAConfig(**adapters["config"]))
    load_weights(model, {**model.state_dict(), **trained}, ckpt)
    lora.merge(model)
    for p in model.parameters():
        p.requires_grad_(True)


def load_state(path: str | Path) -> dict:
    ckpt = resolve(path)
    if not (ckpt / "state.pt").is_file():
        raise CheckpointError(f"{ckpt} has no state.pt (optimizer and data position), so it cannot be resumed; "
                              f"start a new run from it with --init_from={ckpt}")
    return _torch_load(ckpt / "state.pt", "a training state")


def load_for_inference(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, meta, tokenizer) of a checkpoint: what eval and serving need (the
    tokenizer is None for an image classifier, which reads no text)."""
    from nanofm.tokenizer import Tokenizer

    model, meta = load_model(path, device)
    ckpt = resolve(path)
    if model.cfg.vision is not None and model.cfg.n_classes and not (ckpt / "tokenizer.json").exists():
        model.eval()  # an image classifier reads no text: it has no tokenizer
        return model, meta, None
    if not (ckpt / "tokenizer.json").exists():
        raise CheckpointError(f"{ckpt} has no tokenizer.json, so its ids cannot be turned into text")
    model.eval()
    return model, meta, Tokenizer.load(ckpt)


def load_for_training(source: str | Path, tokenizer) -> tuple[Transformer, dict, Path]:
    """(model, meta, source path) to keep training: a nanofm checkpoint or run directory, or a
    Hugging Face GPT-2 / Llama / BERT directory. The data's tokenizer must be the checkpoint's."""
    from nanofm.tokenizer import Tokenizer, TokenizerError

    source = Path(source)
    if (source / "config.json").is_file() and not (source / "model.pt").is_file():
        from nanofm.convert import from_hf, load_hf
        model = from_hf(load_hf(source))
        if model.cfg.vocab_size < tokenizer.vocab_size:  # GPT-2's 50257 rows + our special tokens
            from nanofm.model import padded_vocab
            model = model.resized_vocab(padded_vocab(tokenizer.vocab_size))
        meta = {"stage": "imported", "lineage": []}
    else:
        source = resolve(source)
        meta = read_meta(source)
        model, _ = load_model(source)
    if model.cfg.vocab_size < tokenizer.vocab_size:
        raise TokenizerError(f"{source} has a vocabulary of {model.cfg.vocab_size} but the data uses "
                             f"{tokenizer.vocab_size} tokens; prepare the data with the checkpoint's tokenizer: "
                             f"python data/prepare.py --tokenizer {source}/tokenizer.json ...")
    if (source / "tokenizer.json").exists() and not Tokenizer.load(source).same_as(tokenizer):
        raise TokenizerError(f"the data was tokenized with another tokenizer than the checkpoint {source}; "
                             f"prepare it again with: python data/prepare.py --tokenizer {source}/tokenizer.json "
                             f"--out DIR --force ...")
    return model, meta, source
