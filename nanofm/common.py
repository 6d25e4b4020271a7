"""What every module shares: the error base class, atomic writes, device and dtype choice,
autocast, the GPUs' peak FLOP/s, and the wrapper every command-line script runs its main in.

    from nanofm.common import NanofmError, atomic_write_text, pick_device, resolve_dtype, autocast
    raise ConfigError("--seq_len must be at least 1, got -5")     # a user error: printed, exit 1
    atomic_write_text(path, text)                                 # readers see the old file or the new one
    device = pick_device("auto"); dtype = resolve_dtype("auto", device)
    with autocast(device, dtype): ...
    run_cli(main)                                                 # at the bottom of every script

Design decisions:
- One base class, NanofmError, for every error a user can cause (a bad flag, a missing or corrupt
  file, a checkpoint that does not fit). Scripts print those as `error: ...` and exit 1. Anything
  else is a bug in nanofm and keeps its traceback, so it gets reported rather than hidden.
  The subclasses (CheckpointError, ShardError, ...) also derive from ValueError, as they always
  did, so code that caught ValueError still works.
- Atomic writes: the text goes to a temporary file in the same directory and is renamed over the
  target (os.replace is atomic on POSIX), so a crash or a full disk never leaves half a file.
  A full disk is reported as such, naming the file and the free space.
- Device choice is strict: "cuda" without CUDA, or a typo such as "cpuu", is an error at start-up,
  not a traceback from deep inside torch minutes later.
- torch is imported inside the functions that need it, so the curation workers (which import
  the error classes) stay light.
- float16 is refused: without a gradient scaler it underflows gradients silently, and bf16 needs
  none. bf16 autocast is the default on CUDA and on CPUs with bf16 matrix units (AMX, AVX-512
  BF16), where it trains 1.3-1.5x faster; fp32 elsewhere (MPS included: its bf16 is not faster).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import sys
from pathlib import Path


class NanofmError(Exception):
    """A problem with the user's input or files; the message names it (and the file)."""


class ConfigError(NanofmError, ValueError):
    """A bad setting (flag, config file value, model shape)."""


# ------------------------------------------------------------------ files

def free_space(path: str | Path) -> str:
    try:
        return f"{shutil.disk_usage(Path(path).parent if not Path(path).is_dir() else path).free / 2**20:,.0f} MiB free"
    except OSError:
        return "free space unknown"


def disk_error(path: str | Path, exc: BaseException) -> NanofmError:
    """A clear message for a failed write: disk full, read-only, permission."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "write failed" in str(exc) or "No space" in str(exc):
        return NanofmError(f"the disk is full while writing {path} ({free_space(path)}); free some space and try again "
                           f"(nothing already saved was changed)")
    return NanofmError(f"could not write {path}: {exc}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise disk_error(path, exc) from exc


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ------------------------------------------------------------------ devices and precision

# dense bf16 peak FLOP/s per GPU, for MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("bfloat16", "float32")


def pick_device(name: str = "auto") -> str:
    """CUDA, else Apple MPS, else CPU for "auto"; a named device must exist here."""
    import torch

    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise ConfigError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)} (cuda:N for a given GPU)")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={name} but this machine has no CUDA GPU (or this torch is a CPU build); "
                          f"use --device=auto or --device=cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device={name} but Apple's MPS is not available here; use --device=auto or --device=cpu")
    return name


CPUINFO = Path("/proc/cpuinfo")


def cpu_has_bf16_units() -> bool:
    """Does this CPU multiply bf16 matrices in hardware (Intel AMX or AVX-512 BF16)? There oneDNN runs
    bf16 matmuls 2-4x faster than fp32: measured on a 2-core AMD EPYC with AVX-512 BF16, a training
    step of the tiny model 1.5x (bench.py train); the issue's Intel CPU with AMX, 1.3x-1.45x. Read
    from the kernel's CPU flags, so it is Linux-only; elsewhere (macOS, Windows) the answer is no."""
    try:
        flags = CPUINFO.read_text(errors="replace")
    except OSError:
        return False
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", flags))


def resolve_dtype(name: str, device: str):
    """auto = bf16 on CUDA and on a CPU with bf16 matrix units, fp32 elsewhere (MPS included);
    bfloat16 and float32 as asked; float16 refused. NANOFM_CPU_DTYPE=float32|bfloat16 sets what auto
    means on a CPU (the tests pin float32, so their exact comparisons hold on every CPU)."""
    import torch

    if name == "auto":
        kind = torch.device(device).type
        if kind != "cpu":
            return torch.bfloat16 if kind == "cuda" else torch.float32
        pinned = os.environ.get("NANOFM_CPU_DTYPE", "")
        if pinned and pinned not in DTYPES:
            raise ConfigError(f"NANOFM_CPU_DTYPE must be one of {', '.join(DTYPES)}, got {pinned!r}")
        return getattr(torch, pinned) if pinned else torch.bfloat16 if cpu_has_bf16_units() else torch.float32
    if name == "float16":
        raise ConfigError("--dtype=float16 is not supported: it needs a gradient scaler to train; use --dtype=bfloat16 "
                          "(same speed on GPUs that have it, no scaler needed)")
    if name not in DTYPES:
        raise ConfigError(f"unknown --dtype {name!r}; choose auto, bfloat16 or float32")
    return getattr(torch, name)


def autocast(device, dtype):
    """Mixed precision for the forward pass, or nothing at fp32."""
    import torch

    device_type = torch.device(device).type
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def gpu_peak_flops(device) -> float | None:
    import torch

    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


# ------------------------------------------------------------------ scripts

def run_cli(main, *args) -> None:
    """Run a script's main: a NanofmError is printed as `error: ...` with exit status 1; any other
    exception is a bug and keeps its traceback. Under torchrun, exit without waiting on the
    other ranks (and avoid gloo's abort at interpreter exit)."""
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    try:
        main(*args)
    except NanofmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1) if distributed else sys.exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    if distributed:
        os._exit(0)
