"""Memory: a worker's budget (what a plan may fill), what it allocated, its peak, and keeping freed memory for reuse.

Workers measure their peak (train.py writes it to done.json) so `benchmarks.scale` and the tests can
hold the plan's memory model (plan.py) against what training really used.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from sae_ensemble.config import parse_size

CPU_WORKER_OVERHEAD = 2**29  # the auto budget leaves this per CPU worker for the interpreter and torch
AUTO_FRACTION = 0.9  # of free memory, leaving room for the allocator and the runtime


def format_size(n_bytes: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= size:
            return f"{n_bytes / size:.2f}{unit}"
    return f"{int(n_bytes)}B"


def available_bytes(device: str, n_cpu_workers: int = 1) -> int:
    """Auto budget of one worker: 90% of the GPU's free memory, or of available RAM shared by the CPU workers."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(AUTO_FRACTION * free)
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    available = int(fields["MemAvailable"].split()[0]) * 1024
    return int(AUTO_FRACTION * available / max(1, n_cpu_workers)) - CPU_WORKER_OVERHEAD


def resolve_budget(spec: str | int, devices: Sequence[str]) -> int:
    """Bytes one worker may use: the given size, or the smallest auto budget over `devices`."""
    size = parse_size(spec)
    if size is not None:
        return size
    n_cpu = sum(d.startswith("cpu") for d in devices)
    return min(available_bytes(d, n_cpu) for d in devices)


def reuse_freed_memory() -> None:
    """Make glibc keep freed memory for reuse instead of returning it to the OS.

    A training step allocates and frees the same large [members, batch, features]
    tensors every step; glibc serves blocks over 32 MiB with fresh mmaps, so each step
    page-faults every page again (docs/benchmarks.md). Heap-only
    allocation with no trimming reuses the pages. CPU only; a no-op without glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # from malloc.h
    # mallopt takes a C int: a value past its range becomes 0 on the way in, which trims the heap at
    # every free, so every large tensor would fault all its pages in again.
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # the largest: trim only when 2 GiB at the heap's top are free
    # One arena: with one per thread, blocks freed by one thread's arena are not reused by another's,
    # and an untrimmed heap would hold both.
    libc.mallopt(M_ARENA_MAX, 1)


def _memory_status() -> dict[str, int]:
    """This process's /proc/self/status memory fields (VmHWM, RssAnon, RssFile, RssShmem, ...) in bytes."""
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if v.strip().endswith("kB")}


def resident_bytes() -> int:
    """Anonymous resident bytes now: the memory this process allocated (library code pages excluded)."""
    return _memory_status()["RssAnon"]


def peak_bytes(device: torch.device, baseline: int) -> int:
    """This worker's peak memory for training: CUDA allocated bytes, or on CPU the peak anonymous RSS over
    `baseline` (resident_bytes() at its start).

    The kernel records only the total peak (VmHWM), which counts mapped library pages too; those can be
    paged out while idle (this machine's DAMON reclaims cold pages) and back in later, which once added
    ~150 MiB to a 330 MiB measurement. So the file-backed part is taken off at its current size.
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    status = _memory_status()
    return status["VmHWM"] - status["RssFile"] - status.get("RssShmem", 0) - baseline
