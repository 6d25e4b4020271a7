"""The one training loop that every train_*.py uses.

    ctx = setup(cfg)                                  # device, DDP process group, seeds, dtype
    model, raw_model = wrap_model(Transformer(mcfg), cfg, ctx)
    result = train(cfg, ctx, model, raw_model, loss_fn, train_loader, val_loader, meta, ...)

What it does, step by step (read `train` top to bottom):
- device: CUDA, else MPS, else CPU; under torchrun a process group (NCCL on CUDA, gloo on CPU)
  and DDP; gradients are synchronised only on the last micro-step of accumulation;
- bf16 autocast on CUDA; torch.compile (on by default on CUDA); AdamW, fused on CUDA, weight
  decay on matrices only; warmup + cosine, or warmup-stable-decay; gradient clipping;
- periodic evaluation on the validation data (loss and bits per byte) and text samples;
- checkpoints every N steps and at the end (the last K kept), with everything an exact resume
  needs: model, optimizer, step, RNG states and the data loader's position;
- a NaN or inf loss stops the run with a clear message before anything is saved, so the last
  good checkpoint stays the newest one;
- logs: a tqdm bar (loss, tokens/s, MFU, lr), metrics.jsonl, optional wandb, a loss-curve PNG.

Design decisions:
- The loop knows nothing about objectives: a `loss_fn(model, batch, step) -> loss` comes from the
  script (causal LM, masked LM, SFT, reward model, DPO...), and a loader is anything with
  `next_batch()`, `state_dict()` and `load_state_dict()`.
- The loss is checked for NaN/inf on the device and read back only at log and save points, so
  the GPU is not stalled every step.
- One process with grad_accum = 2A and two processes with A each see the same rows in the same
  order (nanofm/data.py), so their parameters agree after any number of steps (tested).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from nanofm import kernels
from nanofm.checkpoint import load_state, save_checkpoint
from nanofm.model import gpu_peak_flops


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
    # system
    device: str = "auto"  # auto | cuda | mps | cpu
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere) | bfloat16 | float32
    compile: str = "auto"  # auto (on for CUDA) | true | false
    kernels: bool = True  # Triton fused kernels on CUDA (linear + cross-entropy, RMSNorm)
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    seed: int = 1337  # random seed

    def __post_init__(self):
        if self.fsdp and self.optimizer == "muon":
            raise ValueError("--optimizer=muon needs whole weight matrices; it does not combine with --fsdp")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"--optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"--schedule must be cosine or wsd, got {self.schedule!r}")
        for name in ("max_iters", "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval",
                     "checkpoint_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")


class TrainingError(RuntimeError):
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
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def pick_device(name: str = "auto") -> str:
    """CUDA, else Apple MPS, else CPU for "auto"; any other name as given."""
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def setup(cfg: TrainConfig) -> Context:
    """Pick the device, join the process group under torchrun, seed every RNG."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    device = pick_device(cfg.device)
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
    device_type = "cuda" if device.startswith("cuda") else device
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    else:
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.seed)  # the same on every rank, so every rank builds the same initial model
    kernels.set_enabled(cfg.kernels)
    if cfg.fsdp and not ddp:
        raise ValueError("--fsdp shards the model across processes: start it with torchrun --nproc_per_node=N")
    return Context(device, device_type, rank, local_rank, world_size, ddp, dtype, fsdp=cfg.fsdp)


def teardown(ctx: Context) -> None:
    if ctx.ddp and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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


def wrap_model(model: torch.nn.Module, cfg: TrainConfig, ctx: Context):
    """(the model to train: compiled and/or DDP-wrapped, the plain model to save and sample)"""
    raw_model = model.to(ctx.device)
    use_compile = cfg.compile == "true" or (cfg.compile == "auto" and ctx.device_type == "cuda")
    if ctx.fsdp:  # each block is a unit that is gathered for its forward/backward, then freed
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=ctx.dtype, reduce_dtype=torch.float32)
        for block in raw_model.transformer.h:
            fully_shard(block, mp_policy=policy)
        fully_shard(raw_model, mp_policy=policy)
        return (torch.compile(raw_model) if use_compile else raw_model), raw_model
    model = torch.compile(raw_model) if use_compile else raw_model
    if ctx.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[ctx.local_rank] if ctx.device_type == "cuda" else None)
    return model, raw_model


# ------------------------------------------------------------------ optimizer and schedule

def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, ctx: Context):
    """AdamW groups: matrices (weight decay), vectors such as biases and norm gains (no decay),
    and untied input embeddings (no decay, lr x embedding_lr_mult: a token's row only gets a
    gradient when the token occurs, so it needs larger steps to keep up). With --optimizer=muon
    the Transformer blocks' weight matrices go to Muon instead (nanofm/optim.py).
    Every group carries base_lr, its peak learning rate, which the schedule scales."""
    embedding = getattr(getattr(model, "transformer", None), "wte", None)
    head = getattr(model, "lm_head", None)
    untied = embedding is not None and (head is None or head.weight is not embedding.weight)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = [p for n, p in named if cfg.optimizer == "muon" and p.dim() == 2 and ".h." in f".{n}"]
    taken = {id(p) for p in muon} | ({id(embedding.weight)} if untied else set())
    params = [p for _, p in named if id(p) not in taken]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "base_lr": cfg.lr},
    ]
    if untied:
        groups.append({"params": [embedding.weight], "weight_decay": 0.0, "base_lr": cfg.lr * cfg.embedding_lr_mult})
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


# ------------------------------------------------------------------ logging

class Logger:
    """metrics.jsonl in the run directory, and wandb when asked for (offline without a key)."""

    def __init__(self, out_dir: Path, cfg: TrainConfig, config: dict, enabled: bool, resume: bool):
        self.path, self.enabled, self.wandb = out_dir / "metrics.jsonl", enabled, None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume and self.path.exists():
            self.path.unlink()
        if cfg.wandb_project:
            try:
                import wandb
                mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
                self.wandb = wandb.init(project=cfg.wandb_project, config=config, mode=mode, dir=str(out_dir))
            except ImportError:
                print("wandb is not installed (pip install wandb); logging to metrics.jsonl only")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def plot_losses(metrics_path: Path, out_path: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
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


# ------------------------------------------------------------------ the loop

@torch.no_grad()
def evaluate(model, loss_fn, make_val_loader, eval_iters: int, ctx: Context, token_bytes: torch.Tensor | None):
    """Mean validation loss over eval_iters batches (the same batches every time), and bits per byte.

    loss_fn(model, batch, step, reduction="sum") must return (sum of NLL, number of targets, target ids)."""
    model.eval()
    loader = make_val_loader()
    nll, count, n_bytes = torch.zeros((), device=ctx.device), 0, torch.zeros((), device=ctx.device)
    for i in range(eval_iters):
        with ctx.autocast():
            batch_nll, batch_count, targets = loss_fn(model, loader.next_batch(), -1 - i, reduction="sum")
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
    return loss, bpb


def train(cfg: TrainConfig, ctx: Context, model, raw_model, loss_fn: Callable, train_loader, make_val_loader: Callable,
          out_dir: str | Path, meta: dict, tokens_per_step: int, tokenizer=None, tokenizer_path=None,
          resume_from: str | Path | None = None, sample_fn: Callable | None = None,
          extra_evals: dict[str, Callable] | None = None) -> dict:
    """Run the loop. `meta` goes into every checkpoint's meta.json (model config, stage, config, ...).
    Returns the final metrics."""
    out_dir = Path(out_dir)
    optimizer = make_optimizer(raw_model, cfg, ctx)
    start_step, tokens_seen = 0, 0
    seed_everything(cfg.seed + ctx.rank)  # from here on each rank draws its own dropout masks
    if resume_from is not None:
        state = load_state(resume_from)
        if ctx.fsdp:  # every rank reads the full state and keeps its own shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(raw_model, optimizer, optim_state_dict=state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        train_loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"][ctx.rank] if isinstance(state["rng"], list) else state["rng"])
        start_step, tokens_seen = state["step"] + 1, state["tokens_seen"]
    logger = Logger(out_dir, cfg, meta.get("config", {}), enabled=ctx.master, resume=resume_from is not None)
    token_bytes = None
    if tokenizer is not None:  # bytes of every token id, for bits per byte (specials count 0)
        token_bytes = torch.tensor([len(tokenizer.id_to_bytes(i)) if i not in tokenizer.special_tokens.values() else 0
                                    for i in range(tokenizer.vocab_size)], device=ctx.device)
    flops_per_token = raw_model.flops_per_token()
    peak = gpu_peak_flops(ctx.device)
    last_step = cfg.max_iters - 1 if cfg.stop_step < 0 else min(cfg.stop_step, cfg.max_iters - 1)
    metrics: dict = {}
    bad_loss = torch.zeros((), dtype=torch.bool, device=ctx.device)
    loss_sum, loss_steps = torch.zeros((), device=ctx.device), 0
    last_good_ckpt = resume_from

    def save(step: int) -> Path | None:
        """Called on every rank (they all hand in their RNG state); rank 0 writes."""
        states = [rng_state()]
        if ctx.ddp:  # every rank's RNG, so that a resumed DDP run continues exactly
            gathered = [None] * ctx.world_size if ctx.master else None
            dist.gather_object(states[0], gathered, dst=0)
            states = gathered
        if ctx.fsdp:  # gather the full model and optimizer state (a collective: every rank takes part)
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(raw_model, options=options)
            optimizer_state = get_optimizer_state_dict(raw_model, optimizer, options=options)
        else:
            model_state, optimizer_state = raw_model.state_dict(), optimizer.state_dict()
        if not ctx.master:
            return None
        state = {"optimizer": optimizer_state, "loader": train_loader.state_dict(), "rng": states,
                 "step": step, "tokens_seen": tokens_seen}
        return save_checkpoint(out_dir, step, model_state, {**meta, "tokens_seen": tokens_seen, "metrics": metrics},
                               state, tokenizer_path, cfg.keep_checkpoints)

    def check_loss(step: int) -> None:
        if bool(bad_loss):
            raise TrainingError(f"the training loss became NaN or inf by step {step}; stopping before it is saved. "
                                f"The last good checkpoint is {last_good_ckpt or 'none (no checkpoint was written yet)'}. "
                                f"Try a lower --lr, a longer --warmup_iters or --grad_clip=1.")

    paused = {"seconds": 0.0}  # evaluation time, kept out of tokens/s
    clock = {"train_seconds": 0.0}  # training time so far without evaluations (for time-to-loss)

    def run_eval(step: int) -> None:
        start = time.perf_counter()
        val_loss, bpb = evaluate(model, loss_fn, make_val_loader, cfg.eval_iters, ctx, token_bytes)
        metrics.update(val_loss=val_loss, val_bpb=bpb)
        record = {"step": step, "val_loss": val_loss, "val_bpb": bpb, "tokens_seen": tokens_seen,
                  "train_seconds": round(clock["train_seconds"] + start - t_last - paused["seconds"], 3)}
        message = f"step {step}: val loss {val_loss:.4f}" + (f", {bpb:.4f} bits/byte" if bpb else "")
        for name, make_loader in (extra_evals or {}).items():  # other domains' validation data (forgetting)
            extra_loss, extra_bpb = evaluate(model, loss_fn, make_loader, cfg.eval_iters, ctx, token_bytes)
            record[f"val_loss_{name}"], record[f"val_bpb_{name}"] = extra_loss, extra_bpb
            metrics[f"val_loss_{name}"] = extra_loss
            message += f"; {name}: {extra_loss:.4f}"
        if sample_fn is not None and (ctx.master or ctx.fsdp) and cfg.sample_tokens > 0:
            record["sample"] = sample_fn(raw_model, cfg.sample_tokens)  # FSDP: every rank runs the forwards
            message += f"\n--- sample ---\n{record['sample']}\n--------------"
        if ctx.master:
            tqdm.write(message)
        logger.log(record)
        paused["seconds"] += time.perf_counter() - start

    bar = tqdm(range(start_step, last_step + 1), initial=start_step, total=last_step + 1, desc="train",
               disable=not ctx.master, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s, not every step
    t_last, tokens_last = time.perf_counter(), tokens_seen
    for step in bar:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:  # the schedule scales every group's peak lr alike
            group["lr"] = group["base_lr"] * lr / cfg.lr
        is_last = step == last_step

        if step % cfg.eval_interval == 0:
            run_eval(step)

        # one optimizer step: grad_accum micro-steps, gradients synced only on the last one
        for micro in range(cfg.grad_accum):
            batch = train_loader.next_batch()
            sync = not ctx.ddp or micro == cfg.grad_accum - 1
            if ctx.fsdp:
                raw_model.set_requires_gradient_sync(sync)
            with (contextlib.nullcontext() if sync or ctx.fsdp else model.no_sync()), ctx.autocast():
                loss = loss_fn(model, batch, step * cfg.grad_accum + micro) / cfg.grad_accum
            loss.backward()
            bad_loss |= ~torch.isfinite(loss.detach())
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += tokens_per_step
        loss_steps += 1

        if step % cfg.log_interval == 0 or is_last:
            check_loss(step)
            if ctx.ddp:  # (gloo has no AVG)
                dist.all_reduce(loss_sum)
            train_loss = (loss_sum / loss_steps / ctx.world_size).item()
            loss_sum.zero_()
            loss_steps = 0
            elapsed = time.perf_counter() - t_last - paused["seconds"]
            clock["train_seconds"] += elapsed
            tok_s = (tokens_seen - tokens_last) / max(elapsed, 1e-9)
            t_last, tokens_last, paused["seconds"] = time.perf_counter(), tokens_seen, 0.0
            mfu = flops_per_token * tok_s / (peak * ctx.world_size) if peak else None
            metrics.update(train_loss=train_loss, tokens_per_second=tok_s, mfu=mfu)
            bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}", refresh=False,
                            **({"mfu": f"{100 * mfu:.1f}%"} if mfu else {}))
            logger.log({"step": step, "train_loss": train_loss, "lr": lr, "tokens_seen": tokens_seen,
                        "train_seconds": round(clock["train_seconds"], 3),
                        "tokens_per_second": tok_s, **({"mfu": mfu} if mfu else {})})

        if is_last:  # the final model's numbers, measured after its last update
            run_eval(step + 1)
        if (step > start_step and step % cfg.checkpoint_interval == 0) or is_last:
            check_loss(step)
            saved = save(step)
            if saved is not None:
                last_good_ckpt = saved
    bar.close()
    if ctx.master and logger.path.exists():
        plot_losses(logger.path, out_dir / "loss.png", title=meta.get("stage", ""))
    logger.close()
    return {**metrics, "tokens_seen": tokens_seen, "checkpoint": str(last_good_ckpt) if last_good_ckpt else None}
