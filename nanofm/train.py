"""The one training loop that every train_*.py uses, and the pieces an RL loop reuses outside it.

    ctx = setup(cfg)                                         # device, DDP process group, seeds, dtype
    models = wrap_model(Transformer(mcfg), cfg, ctx)         # (train: compiled/DDP/FSDP, raw: plain)
    run = Run(out_dir, meta=make_meta(...), tokenizer_path=..., resume_from=None)
    result = train(cfg, ctx, models, objective, train_loader, run)       # optimizer=... to pass your own

An objective is any object with
    loss(model, batch, step) -> (loss, n_targets, metrics)   # mean loss, real target tokens, {name: value}
    evaluate(model) -> {name: value}                          # e.g. val_loss, val_bpb; or reward accuracy, KL
    sample(model) -> str | None                               # optional: text shown at each evaluation
and a loader is anything with next_batch(), state_dict() and load_state_dict().

PPO and GRPO use this loop as it is: their loader rolls out and hands out minibatches
(train_rlhf.Rollouts). The pieces, for a loop that must own its outer structure:
    step = OptimizerStep(cfg, ctx, models, optimizer)   # lr schedule, accumulation, DDP no-sync, clipping
    checkpointer = Checkpointer(run, cfg, ctx, models.raw, optimizer)   # atomic saves, keep K, exact resume
    logger = Logger(run.out_dir, cfg, ctx, run.meta)    # metrics.jsonl, wandb, tqdm, loss plot

What the loop does, step by step (read `train` top to bottom):
- every eval_interval steps (and after the last): a NaN check, then the objective's evaluation
  and a sample, logged like the loss;
- grad_accum micro-steps, gradients synchronised only on the last; clipping; the schedule
  (warmup + cosine, or warmup-stable-decay) scales every parameter group's peak lr alike;
- a log line every log_interval steps: train loss, the objective's metrics, tokens/s and MFU
  counted on real target tokens (padding and ignored positions are not trained tokens);
- checkpoints every checkpoint_interval steps and at the end, with everything an exact resume
  needs, training time included (time-to-loss survives a resume).

Design decisions:
- The loop knows nothing about objectives, models or data: causal LM, masked LM, SFT, reward
  models and DPO differ only in the objective they hand in.
- The loss is checked for NaN/inf on the device and read back only at log, eval and save
  points, so the GPU is not stalled every step; a bad loss stops the run before it is saved or
  sampled, so the last good checkpoint stays the newest one.
- A run directory belongs to one run: a new run into a directory that holds another run's
  checkpoints is refused (unless --overwrite), two runs cannot write to one directory at once
  (a lock file), and a resumed run's metrics.jsonl is cut back to the resumed step, so no row
  is repeated.
- One process with grad_accum = 2A and two processes with A each see the same rows in the same
  order (nanofm/data.py), so their parameters agree after any number of steps (tested).
- Doubt: with unequal target counts per micro-step (SFT), the step averages the micro-steps'
  mean losses, which weighs a short micro-batch's tokens more; objectives that care can return
  a loss already normalised by a fixed token count.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from nanofm import kernels
from nanofm.checkpoint import complete_checkpoints, load_state, save_checkpoint
from nanofm.common import ConfigError, NanofmError, autocast, disk_error, gpu_peak_flops, pick_device, resolve_dtype


@dataclass
class TrainConfig:
    # optimisation
    max_iters: int = 600  # optimizer steps
    batch_size: int = 8  # sequences per micro-step per process
    grad_accum: int = 1  # micro-steps per optimizer step per process
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    warmup_iters: int = 30  # linear warmup steps
    schedule: str = "cosine"  # cosine | wsd (warmup, stable, then linear decay over decay_ratio)
    decay_ratio: float = 0.2  # wsd: share of the steps spent decaying
    weight_decay: float = 0.1  # AdamW weight decay (matrices only)
    embedding_lr_mult: float = 15.0  # lr multiplier for untied input embeddings (each row is updated rarely)
    tied_embedding_lr_mult: float = 1.0  # lr multiplier for tied embeddings (input and output head in one matrix)
    optimizer: str = "adamw"  # adamw | muon (Muon for the blocks' weight matrices, AdamW for the rest)
    muon_lr: float = 0.02  # Muon's peak learning rate
    muon_momentum: float = 0.95  # Muon's momentum
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the gradient norm; 0 disables
    # evaluation, samples, logs
    eval_interval: int = 100  # evaluate every N steps (and at the end)
    eval_iters: int = 10  # validation batches per evaluation
    log_interval: int = 10  # log every N steps
    sample_tokens: int = 64  # tokens per text sample at each evaluation (causal models); 0 disables
    wandb_project: str = ""  # log to wandb under this project (offline without an API key)
    # checkpoints
    checkpoint_interval: int = 200  # save every N steps (and at the end)
    keep_checkpoints: int = 3  # keep the last K checkpoints
    stop_step: int = -1  # stop after this step, with a checkpoint (split a run); -1 = run to max_iters
    overwrite: bool = False  # allow a new run into an out_dir that holds another run (its checkpoints are deleted)
    # system
    device: str = "auto"  # auto | cuda | mps | cpu
    dtype: str = "auto"  # auto (bf16 on CUDA and on CPUs with AMX or AVX-512 BF16, fp32 elsewhere) | bfloat16 | float32
    compile: str = "auto"  # auto (on for CUDA) | true | false
    kernels: bool = True  # Triton fused kernels on CUDA (linear + cross-entropy, RMSNorm)
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    seed: int = 1337  # random seed

    def __post_init__(self):
        if self.fsdp and self.optimizer == "muon":
            raise ConfigError("--optimizer=muon needs whole weight matrices; it does not combine with --fsdp")
        for name, allowed in (("optimizer", ("adamw", "muon")), ("schedule", ("cosine", "wsd")),
                              ("compile", ("auto", "true", "false")), ("dtype", ("auto", "bfloat16", "float32"))):
            if getattr(self, name) not in allowed:
                hint = " (float16 needs a gradient scaler; use bfloat16)" if getattr(self, name) == "float16" else ""
                raise ConfigError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}{hint}")
        for name in ("max_iters", "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval",
                     "checkpoint_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "muon_lr", "embedding_lr_mult",
                     "tied_embedding_lr_mult", "decay_ratio"):
            if not getattr(self, name) >= 0 or math.isinf(getattr(self, name)):  # also refuses nan
                raise ConfigError(f"--{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.warmup_iters < 0 or self.sample_tokens < 0 or self.keep_checkpoints < 0:
            raise ConfigError("--warmup_iters, --sample_tokens and --keep_checkpoints must be >= 0")


class TrainingError(NanofmError):
    pass


# ------------------------------------------------------------------ device and processes

@dataclass
class Context:
    device: str
    device_type: str
    rank: int
    local_rank: int
    world_size: int
    ddp: bool
    dtype: torch.dtype
    fsdp: bool = False

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return autocast(self.device_type, self.dtype)


def setup(cfg: TrainConfig) -> Context:
    """Pick the device, join the process group under torchrun, seed every RNG."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    device = pick_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.fsdp and not ddp:
        raise ConfigError("--fsdp shards the model across processes: start it with torchrun --nproc_per_node=N")
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
    device_type = "cuda" if device.startswith("cuda") else device
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.seed)  # the same on every rank, so every rank builds the same initial model
    kernels.set_enabled(cfg.kernels)
    return Context(device, device_type, rank, local_rank, world_size, ddp, dtype, fsdp=cfg.fsdp)


def teardown(ctx: Context) -> None:
    """Under torchrun: wait for every rank, then end the process here, without freeing anything.
    Why not destroy_process_group and return: when the script's locals are freed, DDP's reducer
    drops the last reference to the gloo process group, whose destructor joins gloo's worker
    thread while holding the GIL, and that thread may still be freeing a finished collective's
    Python tensors, which needs the GIL: a deadlock (seen about 1 run in 40 on 2 CPU cores, in
    CI). Under torchrun, main's return value is not used by anyone."""
    if ctx.ddp and dist.is_initialized():
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG's state, in types that torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Models(NamedTuple):
    train: torch.nn.Module  # compiled and/or DDP/FSDP-wrapped: the training forward goes through this one
    raw: torch.nn.Module  # the plain model: saved, sampled, and handed to evaluations outside the loop


def wrap_model(model: torch.nn.Module, cfg: TrainConfig, ctx: Context) -> Models:
    """Move to the device; FSDP2 (each Transformer block a unit, the rest - heads, adapters - with
    the root), or DDP; torch.compile when asked (auto = on CUDA)."""
    from nanofm.model import Block
    from nanofm.quantize import is_quantized

    if is_quantized(model):
        raise ConfigError("this checkpoint is an int8 export (nanofm.quantize), made for serving: its weights cannot "
                          "train; start from the full checkpoint it was made from (its meta.json's parent)")
    raw_model = model.to(ctx.device)
    use_compile = cfg.compile == "true" or (cfg.compile == "auto" and ctx.device_type == "cuda")
    if ctx.fsdp:  # each block is gathered for its forward/backward, then freed
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=ctx.dtype, reduce_dtype=torch.float32)
        for module in raw_model.modules():
            if isinstance(module, Block):
                fully_shard(module, mp_policy=policy)
        fully_shard(raw_model, mp_policy=policy)
        return Models(torch.compile(raw_model) if use_compile else raw_model, raw_model)
    model = torch.compile(raw_model) if use_compile else raw_model
    if ctx.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # a model that reads images may get a batch of text alone (chat SFT mixes the two, and groups
        # rows by length): its image encoder then has no gradient, which DDP must be told to expect
        reads_images = getattr(getattr(raw_model, "cfg", None), "vision", None) is not None
        model = DDP(model, device_ids=[ctx.local_rank] if ctx.device_type == "cuda" else None,
                    find_unused_parameters=reads_images)
    return Models(model, raw_model)


# ------------------------------------------------------------------ optimizer and schedule

def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, ctx: Context):
    """AdamW groups: matrices (weight decay), vectors such as biases and norm gains (no decay),
    and the input embeddings (no decay, lr x embedding_lr_mult when untied, x tied_embedding_lr_mult
    when they are also the output head: a token's row only gets a gradient when the token occurs,
    so it needs larger steps to keep up). With --optimizer=muon
    the Transformer blocks' weight matrices go to Muon instead (nanofm/optim.py). Frozen
    parameters (requires_grad False) are left out. Every group carries base_lr, its peak
    learning rate, which the schedule scales."""
    embedding = getattr(getattr(model, "transformer", None), "wte", None)
    head = getattr(model, "lm_head", None)
    trained = embedding is not None and embedding.weight.requires_grad
    untied = trained and (head is None or head.weight is not embedding.weight)
    mult = cfg.embedding_lr_mult if untied else cfg.tied_embedding_lr_mult
    own_group = trained and mult != 1.0
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = [p for n, p in named if cfg.optimizer == "muon" and p.dim() == 2 and ".h." in f".{n}"]
    taken = {id(p) for p in muon} | ({id(embedding.weight)} if own_group else set())
    params = [p for _, p in named if id(p) not in taken]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "base_lr": cfg.lr},
    ]
    if own_group:
        groups.append({"params": [embedding.weight], "weight_decay": 0.0, "base_lr": cfg.lr * mult})
    adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                              fused=ctx.device_type == "cuda")
    if not muon:
        return adamw
    from nanofm.optim import CombinedOptimizer, Muon
    muon_opt = Muon([{"params": muon, "base_lr": cfg.muon_lr}], lr=cfg.muon_lr, momentum=cfg.muon_momentum)
    return CombinedOptimizer([adamw, muon_opt])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warmup, then cosine to lr * min_lr_ratio, or warmup-stable-decay (linear in the last part)."""
    min_lr = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    if cfg.schedule == "wsd":
        decay_start = int(cfg.max_iters * (1 - cfg.decay_ratio))
        if step < decay_start:
            return cfg.lr
        progress = (step - decay_start) / max(1, cfg.max_iters - decay_start)
        return cfg.lr - (cfg.lr - min_lr) * min(1.0, progress)
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


class OptimizerStep:
    """One optimizer step made of micro-steps: the schedule, gradient accumulation with DDP/FSDP
    gradient sync on the last micro-step only, clipping, the update.

        lr = stepper.start(step)
        for micro in range(cfg.grad_accum):
            with stepper.micro(micro):            # no-sync (except the last) + autocast
                loss = ...
            stepper.backward(loss)                # scaled by 1 / grad_accum
        stepper.finish()                          # clip, step, zero_grad
    """

    def __init__(self, cfg: TrainConfig, ctx: Context, models: Models, optimizer):
        self.cfg, self.ctx, self.models, self.optimizer = cfg, ctx, models, optimizer
        for group in optimizer.param_groups:  # a passed-in optimizer's groups keep their own lr as peak
            group.setdefault("base_lr", group["lr"])

    def start(self, step: int) -> float:
        lr = lr_at(step, self.cfg)
        for group in self.optimizer.param_groups:  # the schedule scales every group's peak lr alike
            group["lr"] = group["base_lr"] * (lr / self.cfg.lr if self.cfg.lr else 1.0)
        return lr

    @contextlib.contextmanager
    def micro(self, index: int):
        sync = not self.ctx.ddp or index == self.cfg.grad_accum - 1
        if self.ctx.fsdp:
            self.models.raw.set_requires_gradient_sync(sync)
        no_sync = contextlib.nullcontext() if sync or self.ctx.fsdp else self.models.train.no_sync()
        with no_sync, self.ctx.autocast():
            yield

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.grad_accum).backward()

    def finish(self) -> None:
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.models.raw.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------ the run directory and checkpoints

@dataclass
class Run:
    """What a training run writes, and where."""
    out_dir: Path
    meta: dict  # the meta.json of every checkpoint (nanofm.checkpoint.make_meta)
    tokenizer_path: Path | None = None  # copied into every checkpoint
    resume_from: Path | None = None  # a checkpoint to continue exactly (optimizer, data position, RNG)
    keep_weights: Callable[[dict], dict] | None = None  # what of the state dict a checkpoint keeps (LoRA: adapters)

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)


@dataclass
class Progress:
    step: int = 0  # the next step to run
    tokens_seen: int = 0  # real target tokens trained on so far
    train_seconds: float = 0.0  # training time so far, evaluations excluded (time-to-loss)


RUN_FILES = ("latest", "metrics.jsonl", "loss.png")


def claim_run_dir(run: Run, cfg: TrainConfig, ctx: Context):
    """Check that out_dir may receive this run, and lock it for the run's duration (rank 0).
    Returns the open lock file (closing it releases the lock)."""
    out = run.out_dir
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out_dir {out} is a file; give a directory for the run's checkpoints")
    if not ctx.master:
        return None
    out.mkdir(parents=True, exist_ok=True)
    import fcntl
    lock = open(out / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "another process"
        lock.close()
        raise TrainingError(f"another run ({owner}) is writing to {out}; wait for it to finish or choose another --out_dir")
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}")
    lock.flush()
    existing = complete_checkpoints(out) + [out / f for f in RUN_FILES if (out / f).exists()]
    if run.resume_from is None and existing:
        if not cfg.overwrite:
            lock.close()
            resumable = "continue it with --init_from=resume, " if complete_checkpoints(out) else ""
            raise TrainingError(f"{out} already holds a run ({', '.join(p.name for p in existing[:3])}); {resumable}"
                                f"choose another --out_dir, or add --overwrite to replace it")
        for path in list(out.glob("ckpt_*")) + [out / f for f in RUN_FILES]:  # asked for: the old run goes
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return lock


class Checkpointer:
    """Saves (atomic, the last K kept) and restores everything an exact resume needs."""

    def __init__(self, run: Run, cfg: TrainConfig, ctx: Context, raw_model: torch.nn.Module, optimizer):
        self.run, self.cfg, self.ctx, self.raw_model, self.optimizer = run, cfg, ctx, raw_model, optimizer
        self.latest: Path | None = run.resume_from

    def save(self, step: int, loader, progress: Progress, metrics: dict) -> Path | None:
        """A collective: every rank calls it (they hand in their RNG state); rank 0 writes."""
        ctx = self.ctx
        states = [rng_state()]
        if ctx.ddp:  # every rank's RNG, so that a resumed DDP run continues exactly
            gathered = [None] * ctx.world_size if ctx.master else None
            dist.gather_object(states[0], gathered, dst=0)
            states = gathered
        if ctx.fsdp:  # gather the full model and optimizer state (a collective: every rank takes part)
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(self.raw_model, options=options)
            optimizer_state = get_optimizer_state_dict(self.raw_model, self.optimizer, options=options)
        else:
            model_state, optimizer_state = self.raw_model.state_dict(), self.optimizer.state_dict()
        if not ctx.master:
            return None
        if self.run.keep_weights is not None:
            model_state = self.run.keep_weights(model_state)
        state = {"optimizer": optimizer_state, "loader": loader.state_dict(), "rng": states, "step": step,
                 "tokens_seen": progress.tokens_seen, "train_seconds": progress.train_seconds}
        meta = {**self.run.meta, "tokens_seen": progress.tokens_seen, "metrics": metrics}
        self.latest = save_checkpoint(self.run.out_dir, step, model_state, meta, state, self.run.tokenizer_path,
                                      self.cfg.keep_checkpoints)
        return self.latest

    def restore(self, loader) -> Progress:
        state = load_state(self.run.resume_from)
        if self.ctx.fsdp:  # every rank reads the full state and keeps its own shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(self.raw_model, self.optimizer, optim_state_dict=state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        rngs = state["rng"]
        if isinstance(rngs, list) and len(rngs) != self.ctx.world_size:
            raise TrainingError(f"{self.run.resume_from} was saved by {len(rngs)} processes; resume it with "
                                f"--nproc_per_node={len(rngs)} for an exact continuation")
        set_rng_state(rngs[self.ctx.rank] if isinstance(rngs, list) else rngs)
        return Progress(state["step"] + 1, state["tokens_seen"], state.get("train_seconds", 0.0))


# ------------------------------------------------------------------ logging

def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a line that is not JSON (cut short by a crash or a full
    disk) is skipped with a warning naming the file and line."""
    records = []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"warning: {path} line {number} is not complete JSON (cut short?); skipped", file=sys.stderr)
    return records


class Logger:
    """metrics.jsonl in the run directory, wandb when asked for (offline without a key), a tqdm
    bar, and the loss plot. Only rank 0 writes."""

    def __init__(self, out_dir: Path, cfg: TrainConfig, ctx: Context, meta: dict, resumed_at: int | None = None):
        self.path, self.enabled, self.wandb = Path(out_dir) / "metrics.jsonl", ctx.master, None
        self.title = meta.get("stage", "")
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resumed_at is not None and self.path.exists():  # rows after the checkpoint were not part of this history
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resumed_at]
            from nanofm.common import atomic_write_text
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if cfg.wandb_project:
            try:
                import wandb
                mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
                self.wandb = wandb.init(project=cfg.wandb_project, config=meta.get("config", {}), mode=mode,
                                        dir=str(out_dir), name=Path(out_dir).name)
            except ImportError:
                print("wandb is not installed (pip install wandb); logging to metrics.jsonl only")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        line = (json.dumps(record) + "\n").encode()
        with open(self.path, "ab", buffering=0) as handle:  # unbuffered: the write either lands or fails here
            start = handle.tell()
            try:
                if handle.write(line) != len(line):
                    raise OSError(errno.ENOSPC, "short write")
            except OSError as exc:  # a full disk: leave no partial line behind
                with contextlib.suppress(OSError):
                    handle.truncate(start)
                raise TrainingError(str(disk_error(self.path, exc))) from exc
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def bar(self, start: int, stop: int):
        return tqdm(range(start, stop), initial=start, total=stop, desc="train", disable=not self.enabled,
                    dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)  # a log file: a line per 30 s

    def close(self) -> None:
        if self.enabled and self.path.exists():
            plot_losses(self.path, self.path.parent / "loss.png", title=self.title)
        if self.wandb is not None:
            self.wandb.finish()


def plot_losses(metrics_path: Path, out_path: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(8, 5))
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)


def plot_metrics(runs: dict[str, Path], keys: list[str], out_path: Path, title: str = "") -> None:
    """One panel per metric (e.g. reward, kl, response_length), one line per run's metrics.jsonl:
    RL curves, or several runs side by side. Metrics a run never logged are left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = {label: read_metrics(path) for label, path in runs.items()}
    keys = [k for k in keys if any(k in r for rows in records.values() for r in rows)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, rows in records.items():
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), "o-" if len(points) < 20 else "-", label=label, alpha=0.85, markersize=3)
        ax.set(xlabel="step", title=key)
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------ evaluation helpers for objectives

def token_byte_lengths(tokenizer, device) -> torch.Tensor:
    """Bytes of every token id (special tokens count 0), for bits per byte."""
    specials = set(tokenizer.special_tokens.values())
    return torch.tensor([0 if i in specials else len(tokenizer.id_to_bytes(i)) for i in range(tokenizer.vocab_size)],
                        device=device)


@torch.no_grad()
def evaluate_nll(model, nll_sum, make_loader, iters: int, ctx: Context, token_bytes: torch.Tensor | None = None) -> dict:
    """{"loss": mean NLL per target, "bpb": bits per byte or None} over `iters` batches of a fresh
    loader (the same batches every time), summed over every rank.
    nll_sum(model, batch, index) -> (sum of NLL, number of targets, target ids with -100 ignored)."""
    model.eval()
    loader = make_loader()
    nll, count, n_bytes = torch.zeros((), device=ctx.device), 0, torch.zeros((), device=ctx.device)
    for i in range(iters):
        with ctx.autocast():
            batch_nll, batch_count, targets = nll_sum(model, loader.next_batch(), -1 - i)
        nll += batch_nll.float()
        count += batch_count
        if token_bytes is not None:
            n_bytes += token_bytes[targets.clamp(min=0)].masked_fill(targets < 0, 0).sum()
    totals = torch.stack([nll, torch.tensor(float(count), device=ctx.device), n_bytes.float()])
    if ctx.ddp:
        dist.all_reduce(totals)
    model.train()
    loss = (totals[0] / totals[1]).item()
    bpb = (totals[0] / (math.log(2) * totals[2])).item() if token_bytes is not None and totals[2] > 0 else None
    return {"loss": loss, "bpb": bpb}


# ------------------------------------------------------------------ the loop

def model_flops_per_token(model: torch.nn.Module) -> float:
    """Training FLOPs per token of the Transformer inside `model` (itself, or a wrapper that adds
    heads or adapters around one); the extra heads' FLOPs are negligible and left out."""
    from nanofm.model import Transformer

    return next((m.flops_per_token() for m in model.modules() if isinstance(m, Transformer)), 0.0)


class Tally:
    """What the loop accumulates between two log lines: on the device (no host sync per step) the
    loss, the NaN flag, the target-token count and the objective's metrics; on the host the log
    window's steps, targets and clock (evaluation time is paused out of it)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.bad_loss = torch.zeros((), dtype=torch.bool, device=ctx.device)
        self.loss_sum = torch.zeros((), device=ctx.device)
        self.targets = torch.zeros((), dtype=torch.float64, device=ctx.device)
        self.extras: dict = {}
        self.steps, self.window_targets, self.window_start = 0, 0.0, time.perf_counter()

    def add(self, loss: torch.Tensor, n_targets, extras: dict, grad_accum: int) -> None:
        self.bad_loss |= ~torch.isfinite(loss.detach())
        self.loss_sum += loss.detach() / grad_accum
        self.targets += n_targets
        for key, value in extras.items():
            self.extras[key] = self.extras.get(key, 0.0) + (value.detach() if torch.is_tensor(value) else value)

    def check_finite(self, step: int, last_good) -> None:
        if bool(self.bad_loss):
            raise TrainingError(f"the training loss became NaN or inf by step {step}; stopping before it is saved or "
                                f"sampled. The last good checkpoint is {last_good or 'none (none was written yet)'}. "
                                f"Try a lower --lr, a longer --warmup_iters or --grad_clip=1.")

    def take_targets(self) -> int:
        """Target tokens since the last call, over all ranks (a collective: every rank calls it at
        the same steps), also counted in the current log window."""
        if self.ctx.ddp:
            dist.all_reduce(self.targets)
        n = float(self.targets)
        self.targets.zero_()
        self.window_targets += n
        return int(n)

    def close_window(self, grad_accum: int) -> dict:
        """The log window's train loss, objective metrics, seconds and tokens/s; starts the next."""
        if self.ctx.ddp:  # (gloo has no AVG)
            dist.all_reduce(self.loss_sum)
        elapsed = time.perf_counter() - self.window_start
        window = {"train_loss": (self.loss_sum / self.steps / self.ctx.world_size).item(),
                  "extras": {k: float(v) / (self.steps * grad_accum) for k, v in self.extras.items()},
                  "seconds": elapsed, "tokens_per_second": self.window_targets / max(elapsed, 1e-9)}
        self.loss_sum.zero_()
        self.extras.clear()
        self.steps, self.window_targets, self.window_start = 0, 0.0, time.perf_counter()
        return window

    def elapsed(self) -> float:
        return time.perf_counter() - self.window_start

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluations) does not count as training time."""
        start = time.perf_counter()
        yield
        self.window_start += time.perf_counter() - start


def evaluate_and_log(step: int, objective, models: Models, cfg: TrainConfig, ctx: Context, logger: Logger,
                     progress: Progress, metrics: dict) -> None:
    """The objective's evaluation (and sample) at `step`, printed and logged. The RNGs are put
    back afterwards: whatever an evaluation draws, training's dropout masks stay the same, so the
    updates do not depend on eval_interval, and a run resumed after an evaluation continues exactly."""
    saved = rng_state()
    results = objective.evaluate(models.train)
    metrics.update(results)
    record = {"step": step, **results, "tokens_seen": progress.tokens_seen, "train_seconds": round(progress.train_seconds, 3)}
    message = f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float))
    sample = getattr(objective, "sample", None)
    if sample is not None and cfg.sample_tokens > 0 and (ctx.master or ctx.fsdp):
        record["sample"] = sample(models.raw)  # FSDP: every rank runs the forwards
        if record["sample"] is not None:
            message += f"\n--- sample ---\n{record['sample']}\n--------------"
    set_rng_state(saved)
    if ctx.master:
        tqdm.write(message)
    logger.log(record)


def train(cfg: TrainConfig, ctx: Context, models: Models, objective, train_loader, run: Run, optimizer=None) -> dict:
    """Run the loop; returns the final metrics, tokens seen and the last checkpoint."""
    lock = claim_run_dir(run, cfg, ctx)
    try:
        return _loop(cfg, ctx, models, objective, train_loader, run, optimizer)
    finally:
        if lock is not None:
            lock.close()


def _loop(cfg, ctx, models, objective, train_loader, run, optimizer) -> dict:
    optimizer = optimizer if optimizer is not None else make_optimizer(models.raw, cfg, ctx)
    stepper = OptimizerStep(cfg, ctx, models, optimizer)
    checkpointer = Checkpointer(run, cfg, ctx, models.raw, optimizer)
    seed_everything(cfg.seed + ctx.rank)  # from here on each rank draws its own dropout masks
    progress = checkpointer.restore(train_loader) if run.resume_from is not None else Progress()
    logger = Logger(run.out_dir, cfg, ctx, run.meta, resumed_at=progress.step - 1 if run.resume_from else None)
    flops_per_token, peak = model_flops_per_token(models.raw), gpu_peak_flops(ctx.device)
    last_step = cfg.max_iters - 1 if cfg.stop_step < 0 else min(cfg.stop_step, cfg.max_iters - 1)
    metrics: dict = {}
    tally = Tally(ctx)
    start_step = progress.step

    bar = logger.bar(start_step, last_step + 1)
    for step in bar:
        lr = stepper.start(step)
        is_last = step == last_step
        if step % cfg.eval_interval == 0:
            tally.check_finite(step, checkpointer.latest)  # never evaluate or sample a NaN model
            with tally.paused():
                progress.tokens_seen += tally.take_targets()
                evaluate_and_log(step, objective, models, cfg, ctx, logger,
                                 replace(progress, train_seconds=progress.train_seconds + tally.elapsed()), metrics)

        # one optimizer step: grad_accum micro-steps, gradients synced on the last one only
        for micro in range(cfg.grad_accum):
            batch = train_loader.next_batch()
            with stepper.micro(micro):
                loss, n_targets, extras = objective.loss(models.train, batch, step * cfg.grad_accum + micro)
            stepper.backward(loss)
            tally.add(loss, n_targets, extras, cfg.grad_accum)
        stepper.finish()
        tally.steps += 1

        if step % cfg.log_interval == 0 or is_last:
            tally.check_finite(step, checkpointer.latest)
            progress.tokens_seen += tally.take_targets()
            window = tally.close_window(cfg.grad_accum)
            progress.train_seconds += window["seconds"]
            tok_s = window["tokens_per_second"]
            mfu = flops_per_token * tok_s / (peak * ctx.world_size) if peak and flops_per_token else None
            metrics.update(train_loss=window["train_loss"], tokens_per_second=tok_s, mfu=mfu, **window["extras"])
            bar.set_postfix(loss=f"{window['train_loss']:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}", refresh=False,
                            **({"mfu": f"{100 * mfu:.1f}%"} if mfu else {}))
            logger.log({"step": step, "train_loss": window["train_loss"], **window["extras"], "lr": lr,
                        "tokens_seen": progress.tokens_seen, "train_seconds": round(progress.train_seconds, 3),
                        "tokens_per_second": tok_s, **({"mfu": mfu} if mfu else {})})

        if is_last:  # the final model's numbers, measured after its last update
            tally.check_finite(step, checkpointer.latest)
            with tally.paused():
                evaluate_and_log(step + 1, objective, models, cfg, ctx, logger, progress, metrics)
        if (step > start_step and step % cfg.checkpoint_interval == 0) or is_last:
            tally.check_finite(step, checkpointer.latest)
            progress.tokens_seen += tally.take_targets()
            checkpointer.save(step, train_loader, progress, metrics)
    bar.close()
    logger.close()
    latest = checkpointer.latest
    return {**metrics, "tokens_seen": progress.tokens_seen, "checkpoint": str(latest) if latest else None}
