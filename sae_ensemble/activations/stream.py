"""The shuffled training stream over a store: train_batches, and the Position that resumes it.

Per epoch the training chunks are shuffled, grouped into windows of `window` chunks, and each
window's rows shuffled; docs/store.md, "Shuffling and positions", gives the scheme and why a
restart at any yielded Position reproduces the rest of the stream exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from sae_ensemble.activations.format import DEFAULT_WINDOW_CHUNKS, DTYPES, StoreError
from sae_ensemble.activations.reader import ActivationStore


@dataclass(frozen=True)
class Position:
    """Where a train_batches stream stands: the next batch to yield.

    epoch: epoch number; batch: batch index within the epoch; chunk: slot, in this epoch's
    shuffled chunk order, of the first chunk of the window that batch starts in (a consistency
    check: it changes when batch_size, window or store differ from the run that made it).
    """

    epoch: int = 0
    chunk: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Position:
        return cls(epoch=int(d["epoch"]), chunk=int(d["chunk"]), batch=int(d["batch"]))


def _rng(*keys: int) -> np.random.Generator:
    # SeedSequence mixes the whole key, so (seed, epoch) and (seed, epoch, window) never collide
    return np.random.default_rng([int(k) for k in keys])


def _epoch_windows(store: ActivationStore, seed: int, epoch: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """This epoch's chunk order (indices into the training chunks) and each window's first row."""
    chunk_order = _rng(seed, epoch).permutation(len(store.train_chunks))
    sizes = [int(store.train_chunk_rows[chunk_order[w : w + window]].sum()) for w in range(0, len(chunk_order), window)]
    return chunk_order, np.concatenate([[0], np.cumsum(sizes)])


def _window_rows(
    store: ActivationStore, seed: int, epoch: int, w: int, chunk_order: np.ndarray, window: int
) -> np.ndarray:
    """Global row indices of window w, shuffled within the window."""
    slots = chunk_order[w * window : (w + 1) * window]
    rows = np.concatenate(
        [
            np.arange(store.chunk_starts[c], store.chunk_starts[c] + n)
            for c, n in zip(store.train_chunks[slots], store.train_chunk_rows[slots])
        ]
    )
    return rows[_rng(seed, epoch, w).permutation(len(rows))]


def train_batches(
    store: ActivationStore,
    batch_size: int,
    *,
    seed: int,
    position: Position | dict | None = None,
    device: str | torch.device = "cpu",
    normalize: str = "none",
    window: int = DEFAULT_WINDOW_CHUNKS,
    skip_nonfinite: bool = False,
) -> Iterator[tuple[torch.Tensor | None, Position]]:
    """Yield (batch float32 [batch_size, d_in] on device, next Position) forever.

    Per epoch: chunks are shuffled by (seed, epoch); consecutive groups of `window` chunks are
    concatenated and their rows shuffled by (seed, epoch, window index); the epoch is the
    concatenation of these windows, cut into batches (a batch may span windows, never epochs).
    drop_last: the final n_train_rows % batch_size rows of each epoch's order are skipped.
    skip_nonfinite: a batch holding nan or inf is yielded as (None, next Position) instead, checked
    on the CPU before the copy to the device, so a GPU consumer never waits for the check.
    """
    if batch_size <= 0 or window <= 0:
        raise StoreError(f"batch_size ({batch_size}) and window ({window}) must be positive.")
    if batch_size > store.n_train_rows:
        raise StoreError(
            f"batch_size={batch_size} exceeds the {store.n_train_rows} training rows of store {store.path}."
        )
    norm = store.normalizer(normalize, device)
    pin = torch.device(device).type == "cuda"
    position = Position.from_dict(position) if isinstance(position, dict) else (position or Position())
    n_batches = store.batches_per_epoch(batch_size)
    epoch, batch = position.epoch, position.batch
    if not 0 <= batch < n_batches:
        raise StoreError(f"Position batch={batch} is outside [0, {n_batches}) for batch_size={batch_size}.")
    buffer = np.empty((batch_size, store.d_in), dtype=DTYPES[store.dtype][1])  # gather space, reused
    first = True
    while True:
        chunk_order, window_starts = _epoch_windows(store, seed, epoch, window)
        cache: dict[int, np.ndarray] = {}
        while batch < n_batches:
            lo, hi = batch * batch_size, (batch + 1) * batch_size
            w_lo = int(np.searchsorted(window_starts, lo, side="right")) - 1
            if first and position.chunk != w_lo * window:
                raise StoreError(
                    f"Position {position.to_dict()} does not fit this stream (expected chunk={w_lo * window}); "
                    f"it was made with another batch_size, window or store."
                )
            first = False
            w_hi = int(np.searchsorted(window_starts, hi, side="left")) - 1
            parts = []
            for w in range(w_lo, w_hi + 1):
                if w not in cache:
                    cache = {k: v for k, v in cache.items() if k >= w_lo}  # windows behind us are done
                    cache[w] = _window_rows(store, seed, epoch, w, chunk_order, window)
                a, b = max(lo, window_starts[w]) - window_starts[w], min(hi, window_starts[w + 1]) - window_starts[w]
                parts.append(cache[w][a:b])
            x = store.rows(np.concatenate(parts), buffer)  # [batch_size, d_in] float32
            if skip_nonfinite and not bool(torch.isfinite(x).all()):
                x = None
            else:
                if pin:
                    x = x.pin_memory()
                x = norm(x.to(device, non_blocking=pin))
            batch += 1
            if batch < n_batches:
                w_next = int(np.searchsorted(window_starts, batch * batch_size, side="right") - 1)
                nxt = Position(epoch, w_next * window, batch)
            else:
                nxt = Position(epoch + 1, 0, 0)
            yield x, nxt
        epoch, batch = epoch + 1, 0
