"""Choosing how an ensemble computes its gradients: time the executions that apply, return the fastest.

An `auto` ensemble (ensemble.py) tunes on its first batch and again every RETUNE_EVERY steps, and
steps with the `Execution` this returns. Only the gradient computation is timed. It is pure, so
tuning changes no training state. Each candidate is timed twice, the rounds in opposite orders, and
keeps its faster time: on a shared machine a burst of load then slows one timing, not the choice.

The candidates, each of which has won a measurement on some device (docs/benchmarks.md, "Which
candidate won where"):
- the reference, vmap(grad(loss)), only where no kernel candidate could be timed (each ran out of memory), or
  where the sparse kernel's density test needs the members' L0 and no fused candidate measured it: against
  a kernel that implements the members it never won, and its first call alone (vmap's tracing) took most
  of a short run's tuning;
- the fused kernel (kernels/dense.py) over the whole micro-batch and, on CPU, over row chunks whose
  [M, chunk, n] tiles fit in cache; when compiled, also its passes on feature-major tiles (`transposed`);
- the sparse kernel (kernels/sparse.py) over the whole micro-batch (its row tiles, timed until #36, never
  won) for all-topk ensembles, and for others once the measured L0 is at most SPARSE_DENSITY of the
  features (the density decides whether sparse products can win); with AuxK it alone implements top-k
  members, so the fused kernel is not timed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sae_ensemble.execution import REFERENCE, Execution
from sae_ensemble.kernels import dense

SPARSE_DENSITY = 0.05  # L0 / dict size at or below which the sparse kernel is a candidate for non-topk members
RETUNE_EVERY = 1000  # steps between autotunes of an `auto` ensemble: L0 changes as members learn
CACHE_TILE_BYTES = 2**24  # on CPU, row chunks whose [M, chunk, n] float32 tile fits this are candidates too


@dataclass(frozen=True)
class Shape:
    """What decides an ensemble's candidates."""

    device: torch.device
    members: int
    n_padded: int
    micro_rows: int
    kernel_dtype: torch.dtype
    compiled: bool
    all_topk: bool
    kernels: tuple[str, ...] = ("fused", "sparse")  # those that implement the members (execution.kernels_for)


def tune(
    grads: Callable[[Execution], dict[str, torch.Tensor]], shape: Shape, features: torch.Tensor
) -> tuple[Execution, dict[str, float]]:
    """(the fastest candidate, {candidate: ms per gradient}). `grads(execution)` computes the gradients on the
    tuning batch and returns their aux stats; `features` [M] counts each member's real features."""
    chunks = [shape.micro_rows]
    if shape.device.type == "cpu":
        row_bytes = shape.members * shape.n_padded * 4
        chunks += [
            c for c in (2**i for i in range(5, 12)) if c < shape.micro_rows and c * row_bytes <= CACHE_TILE_BYTES
        ][-2:]
    timings: dict[Execution, float] = {}

    def measure(execution: Execution, warmup: int = 1) -> dict[str, torch.Tensor]:
        aux: dict[str, torch.Tensor] = {}
        try:
            seconds = timed(lambda: aux.update(grads(execution)), 2, shape.device, warmup)
            timings[execution] = min(seconds, timings.get(execution, seconds))
        except torch.OutOfMemoryError:
            pass
        return aux

    aux: dict[str, torch.Tensor] = {}
    # Eagerly `default_passes` knows the fastest; compiled, the tile layouts fuse alike and only timing can say.
    others = (
        ["transposed"]
        if shape.compiled and "transposed" in dense.applicable_passes(shape.device, shape.kernel_dtype)
        else []
    )
    for chunk in chunks if "fused" in shape.kernels else []:
        aux = measure(Execution("fused", chunk)) or aux
        for passes in others:
            measure(Execution("fused", chunk, passes))
    if "sparse" in shape.kernels and shape.kernel_dtype == torch.float32:  # the sparse kernel runs in float32
        if not (shape.all_topk or aux):
            aux = measure(REFERENCE)  # the density test needs the members' L0, and no fused candidate measured it
        density = float((aux["l0"] / features).max()) if aux else 1.0
        if shape.all_topk or density <= SPARSE_DENSITY:
            measure(Execution("sparse", shape.micro_rows))  # its row tiles never won (docs/benchmarks.md)
    if not timings:  # every kernel candidate ran out of memory: the reference is what is left
        measure(REFERENCE)
    for execution in reversed(list(timings)):  # the second round, in reverse order
        measure(execution, warmup=0)
    best = min(timings, key=timings.__getitem__)
    return best, {execution.describe(): round(seconds * 1e3, 3) for execution, seconds in timings.items()}


def timed(fn, repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Mean seconds per call of `fn` after `warmup` calls (waiting for the GPU on CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats
