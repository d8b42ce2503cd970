"""Worker devices: `devices=` specs to device names, torch devices, CPU threads per worker."""

from __future__ import annotations

import os

import torch


def resolve_devices(spec: str) -> list[str]:
    """`auto`, `cpu`, `cpu:N` (N CPU workers), `cuda`, `cuda:0,2,...` -> worker device names (ValueError naming the
    spec)."""
    spec = str(spec).strip()
    n_gpus = torch.cuda.device_count()
    if spec == "auto":
        return [f"cuda:{i}" for i in range(n_gpus)] if n_gpus else ["cpu:0"]
    if spec == "cpu":
        return ["cpu:0"]
    if spec.startswith("cpu:"):
        count = spec[4:]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"devices={spec!r}: cpu:N needs a worker count N >= 1, e.g. cpu:2")
        return [f"cpu:{i}" for i in range(int(count))]
    if spec == "cuda" or spec.startswith("cuda:"):
        indices = list(range(n_gpus)) if spec == "cuda" else spec[5:].split(",")
        if not all(str(i).strip().isdigit() for i in indices) or not indices:
            raise ValueError(f"devices={spec!r}: write cuda:0,1,... with GPU indices")
        indices = [int(i) for i in indices]
        bad = [i for i in indices if i >= n_gpus]
        if bad or not n_gpus:
            raise ValueError(
                f"devices={spec!r} asks for GPU(s) {bad or indices} but {n_gpus} are visible; "
                f"use auto, cpu:N, or cuda:0..{max(n_gpus - 1, 0)}"
            )
        if len(set(indices)) != len(indices):
            raise ValueError(f"devices={spec!r} names a GPU twice")
        return [f"cuda:{i}" for i in indices]
    raise ValueError(f"devices={spec!r} is unknown; allowed: auto, cpu, cpu:N, cuda, cuda:0,1,...")


def torch_device(device: str) -> torch.device:
    """A worker's device name (cpu:N stands for one CPU worker) as torch names it."""
    return torch.device("cpu") if device.startswith("cpu") else torch.device(device)


def cpu_threads(n_cpu_workers: int) -> int:
    """Threads per CPU worker: this process's CPU allocation (SLURM cgroups, taskset) split evenly, at most
    OMP_NUM_THREADS when that is set (as torch itself would take it).

    os.cpu_count() counts the whole machine and would oversubscribe a job given part of it.
    """
    try:
        allocated = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        allocated = os.cpu_count() or 1
    threads = max(1, allocated // max(1, n_cpu_workers))
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(cap)) if cap.isdigit() and int(cap) >= 1 else threads
