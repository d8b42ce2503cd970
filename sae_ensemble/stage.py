"""Stepping a stage's ensembles on one batch: one after another, or on CUDA side by side.

The ensembles of a worker's stage step on the same batch (train.py). On CUDA each replays its step as a
CUDA graph (ensemble.py). Replayed one after another, every ensemble's memory-bound passes, Adam and
small kernels leave the GPU's tensor cores idle. Replayed on streams of their own, one ensemble's GEMMs
can run meanwhile. Whether that is faster depends on the shapes and the GPU, so a `Stage` times both ways
on its first steady steps, alternating, and keeps the faster (`choice`). Those are training steps like any
other: the results are the same either way, since each graph reads only its own ensemble's state and the
batch, and has its own memory pool and cuBLAS workspace (ensemble.stream).

Ordering, with `main` the stream the batch arrives on: each ensemble's stream waits for `main` as it was
before the stage's replays (the batch is ready, and whatever read the previous step's stats has run), and
`main` waits for every ensemble's stream after them. Work queued on `main` later (the stats' consumers,
checkpoints, the next batch, which may reuse this batch's memory) therefore runs after the replays.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from sae_ensemble.ensemble import Ensemble

WAYS = ("serial", "overlapped")
TUNE_STEPS = 4  # timed steady steps of each way before the choice


class Stage:
    """Steps ensembles on shared batches; on CUDA, decides by timing whether their graphs replay side by side."""

    def __init__(self, overlap: bool | None = None) -> None:
        """`overlap`: None times both ways and keeps the faster; True or False fixes the way (tests)."""
        self.choice: str | None = None if overlap is None else WAYS[int(overlap)]
        self.timings: dict[str, list[float]] = {way: [] for way in WAYS}  # seconds per stage step, while undecided

    def step(self, ensembles: Sequence[Ensemble], batch: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Each ensemble's `step(batch)` stats, in order."""
        if len(ensembles) < 2 or not all(e.replays(batch) for e in ensembles):
            return _serial(ensembles, batch)  # CPU, a lone ensemble, or host work (tuning, capture) this step
        if self.choice is not None:
            return _STEP_WAYS[self.choice](ensembles, batch)
        way = min(WAYS, key=lambda w: len(self.timings[w]))  # alternate until decided
        torch.cuda.synchronize(batch.device)
        start = time.perf_counter()
        stats = _STEP_WAYS[way](ensembles, batch)
        torch.cuda.synchronize(batch.device)
        self.timings[way].append(time.perf_counter() - start)
        if all(len(seconds) >= TUNE_STEPS for seconds in self.timings.values()):
            self.choice = min(WAYS, key=lambda w: statistics.median(self.timings[w]))
        return stats

    def report(self) -> dict[str, float]:
        """{way: median ms per stage step} as timed before the choice (empty if it never timed)."""
        return {way: round(statistics.median(s) * 1e3, 3) for way, s in self.timings.items() if s}


def _serial(ensembles: Sequence[Ensemble], batch: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    return [ensemble.step(batch) for ensemble in ensembles]


def _overlapped(ensembles: Sequence[Ensemble], batch: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    main = torch.cuda.current_stream(batch.device)
    stats = []
    for ensemble in ensembles:
        ensemble.stream.wait_stream(main)  # main holds nothing of this stage's yet: the streams run side by side
        with torch.cuda.stream(ensemble.stream):
            stats.append(ensemble.step(batch))
    for ensemble in ensembles:
        main.wait_stream(ensemble.stream)
    return stats


_STEP_WAYS = {"serial": _serial, "overlapped": _overlapped}  # WAYS' functions
