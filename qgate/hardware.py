"""Device and precision rules: where a stage runs and in which dtype.

One place decides, so scoring, warmup, finetune and Serve agree:

- ``device: auto`` is CUDA when a GPU is visible, else CPU;
- ``dtype: auto`` is bf16 on CUDA (when the GPU supports it) and on CPUs with native bf16
  instructions (AMX or AVX512-BF16, read from the CPU flags, not guessed), fp32 elsewhere;
- a config may force ``float32`` or ``bfloat16``.
"""

from __future__ import annotations

import functools
import os

import torch

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")
_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def valid_device(device: str) -> bool:
    """True for ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (what configs accept)."""
    return device in DEVICES or (device.startswith("cuda:") and device[5:].isdigit())


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device for a config value; ``auto`` is CUDA when available, else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


@functools.lru_cache(maxsize=1)
def cpu_native_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AMX-BF16 or AVX512-BF16).

    Read from /proc/cpuinfo flags (Linux). Without them bf16 is emulated and slower than
    fp32, so ``auto`` must not pick it. ``QGATE_CPU_BF16=0/1`` overrides (for tests).
    """
    forced = os.environ.get("QGATE_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return any(flag in flags for flag in _BF16_FLAGS)
    except OSError:
        pass
    return False


def resolve_dtype(dtype: str, device: str | torch.device) -> torch.dtype:
    """The torch dtype for a config value on ``device`` (see the module docstring)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype != "auto":
        return getattr(torch, dtype)
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_native_bf16() else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``'bfloat16'`` (how manifests and references record it)."""
    return str(dtype).removeprefix("torch.")


def set_cpu_threads(device: torch.device, threads: int | None) -> None:
    """Use ``threads`` torch threads on CPU, at least 1 and at most the cores this process
    may run on (Ray's logical CPUs can outnumber them; more threads than cores is slower).
    No-op on GPU or when None."""
    if device.type == "cpu" and threads:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        torch.set_num_threads(max(1, min(int(threads), cores or int(threads))))
