"""Choosing how an ensemble computes its gradients: time the executions that apply, keep the fastest.

An `auto` ensemble (ensemble.py) calls `tune` on its first batch and again every RETUNE_EVERY steps.
Only the gradient computation is timed. It is pure, so tuning changes no training state. Each
candidate is timed twice, the rounds in opposite orders, and keeps its faster time: on a shared
machine a burst of load then slows one timing, not the choice (on a 2-core VM, two tunings in a
row chose differently before).

The candidates:
- the reference, vmap(grad(loss));
- the fused kernel (kernels/dense.py) over the whole micro-batch and, on CPU, over row chunks whose
  [M, chunk, n] tiles fit in cache;
- when compiled, its other `passes`: feature-major tiles, with or without row-major codes, and
  augmented GEMMs. On CUDA, also the Triton epilogues;
- the sparse kernel (kernels/sparse.py) for all-topk ensembles, and for others once the measured L0
  is at most SPARSE_DENSITY of the features (the density decides whether sparse products can win).
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING

import torch

from sae_ensemble import kernels

if TYPE_CHECKING:
    from sae_ensemble.ensemble import Ensemble

SPARSE_DENSITY = 0.05  # L0 / dict size at or below which the sparse kernel is a candidate for non-topk members
RETUNE_EVERY = 1000  # steps between autotunes of an `auto` ensemble: L0 changes as members learn
CACHE_TILE_BYTES = 2**24  # on CPU, row chunks whose [M, chunk, n] float32 tile fits this are candidates too


def tune(ensemble: Ensemble, batch: torch.Tensor) -> str:
    """Set `ensemble`'s execution, row_chunk and passes to the fastest candidate on `batch`; return its name.

    Also sets `ensemble.autotune_report` ({candidate: ms per gradient}) and `ensemble.choice`.
    """
    hparams = ensemble.with_sparsity(ensemble.schedules(ensemble.step_count)[1])
    micro_rows = -(-batch.shape[0] // ensemble.micro_batches)
    chunks = [micro_rows]
    if ensemble.device.type == "cpu":
        row_bytes = len(ensemble) * ensemble.n_padded * 4
        chunks += [c for c in (2**i for i in range(5, 12)) if c < micro_rows and c * row_bytes <= CACHE_TILE_BYTES][-2:]
    timings: dict[tuple[str, int | None, str | None], float] = {}

    def measure(kind: str, chunk: int | None, passes: str | None = None, warmup: int = 1) -> dict:
        key = (kind, chunk, passes)
        ensemble.execution, ensemble.row_chunk, ensemble.passes = key
        aux = {}
        try:
            seconds = timed(lambda: aux.update(ensemble.grads(batch, hparams)[1]), 2, ensemble.device, warmup)
            timings[key] = min(seconds, timings.get(key, seconds))
        except torch.OutOfMemoryError:
            pass
        except Exception as error:  # noqa: BLE001 - a candidate that cannot run here is not a candidate
            if kind == "reference" or passes is None:
                raise
            warnings.warn(f"autotune: fused(passes={passes}) failed and is left out: {type(error).__name__}: {error}")
        return aux

    aux = measure("reference", None)
    applicable = kernels.dense.applicable_passes(ensemble.device, ensemble.kernel_dtype, ensemble.layout)
    # Eagerly `default_passes` knows the fastest; compiled, the layouts fuse alike and only timing can say.
    # The epilogues are CUDA's (on CPU only Triton's interpreter runs them: a test, not a candidate).
    wanted = {"transposed": ensemble.compiled, "dual": ensemble.compiled, "augmented": ensemble.compiled,
              "epilogue": ensemble.device.type == "cuda"}
    others = [p for p, want in wanted.items() if want and p in applicable]
    for chunk in chunks:
        aux = measure("fused", chunk) or aux
        for passes in others:
            measure("fused", chunk, passes)
    if not ensemble.autocast_bf16:  # the sparse kernel runs in float32
        density = float((aux["l0"] / ensemble.hparams["feature_mask"].sum(-1)).max()) if aux else 1.0
        if ensemble.layout.all_topk or density <= SPARSE_DENSITY:
            for chunk in chunks:
                measure("sparse", chunk)
    for key in reversed(list(timings)):  # the second round, in reverse order
        measure(*key, warmup=0)
    (ensemble.execution, ensemble.row_chunk, ensemble.passes), _ = min(timings.items(), key=lambda item: item[1])
    ensemble.autotune_report = {describe(*key): round(seconds * 1e3, 3) for key, seconds in timings.items()}
    ensemble.choice = describe(ensemble.execution, ensemble.row_chunk, ensemble.passes)
    return ensemble.choice


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


def describe(kind: str, chunk: int | None, passes: str | None = None) -> str:
    """A candidate's name as logs and reports show it: `fused(rows=64, transposed)`."""
    options = ([f"rows={chunk}"] if chunk is not None else []) + ([passes] if passes else [])
    return f"{kind}({', '.join(options)})" if options else kind
