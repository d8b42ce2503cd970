"""A synthetic store's ground truth (ground_truth.safetensors) beyond the directions: what the metrics need.

    features               float32 [n_features, d_in]  the true directions (every synthetic store)
    parents                int64 [n_features]          each feature's parent in the hierarchy, -1 for roots and
                                                       free features (the toy: all -1)
    probabilities          float32 [n_features]        each feature's firing probability on its own, before its
                                                       parent's gate
    heldout_rows           int64 [R]                   the held-out rows (ActivationStore.heldout_indices), ascending
    heldout_codes_index    int32 [R, A]                the features active in each, ascending, padded with -1
    heldout_codes_value    float32 [R, A]              their magnitudes (0 in padding); A = the most active in a row

Rows = codes @ features (+ noise): the held-out codes decode to the held-out rows. Stores written before these
were kept lack the last five; write_synthetic adds them when it reuses such a store (same key, same rows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .format import GROUND_TRUTH, StoreError, heldout_per_chunk

CODES = ("heldout_rows", "heldout_codes_index", "heldout_codes_value")


def heldout_tails(chunk_rows: list[int], heldout_rows: int) -> np.ndarray:
    """Held-out rows at the end of each chunk [n_chunks], as the store will split them."""
    return heldout_per_chunk(np.asarray(chunk_rows, dtype=np.int64), heldout_rows)


def pack_codes(rows: torch.Tensor, feats: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sparse codes (global row, feature, value), sorted by row then feature, padded per row: the CODES tensors.
    Every row to keep must appear in `rows` or be passed in `rows` with no features (see heldout_codes)."""
    unique, counts = torch.unique_consecutive(rows, return_counts=True)
    width = int(counts.max()) if len(counts) else 0
    slot = torch.arange(len(rows)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    line = torch.repeat_interleave(torch.arange(len(unique)), counts)
    index = torch.full((len(unique), width), -1, dtype=torch.int32)
    value = torch.zeros(len(unique), width)
    index[line, slot] = feats.int()
    value[line, slot] = values.float()
    return {"heldout_rows": unique.long(), "heldout_codes_index": index, "heldout_codes_value": value}


def heldout_codes(row_ids: torch.Tensor, rows: torch.Tensor, feats: torch.Tensor, values: torch.Tensor) -> dict:
    """pack_codes for exactly the held-out rows `row_ids` (ascending), rows with no active feature included."""
    packed = pack_codes(rows, feats, values)
    at = torch.searchsorted(packed["heldout_rows"], row_ids).clamp(max=max(len(packed["heldout_rows"]) - 1, 0))
    found = (
        packed["heldout_rows"][at] == row_ids if len(packed["heldout_rows"]) else torch.zeros(len(row_ids), dtype=bool)
    )
    width = packed["heldout_codes_index"].shape[1]
    index = torch.full((len(row_ids), width), -1, dtype=torch.int32)
    value = torch.zeros(len(row_ids), width)
    index[found] = packed["heldout_codes_index"][at[found]]
    value[found] = packed["heldout_codes_value"][at[found]]
    return {"heldout_rows": row_ids.long(), "heldout_codes_index": index, "heldout_codes_value": value}


def save_truth(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ground_truth.safetensors atomically."""
    from safetensors.torch import save_file

    tmp = path / (GROUND_TRUTH + ".tmp")
    save_file({name: value.contiguous() for name, value in tensors.items()}, str(tmp))
    tmp.replace(path / GROUND_TRUTH)


def load_truth(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = path / GROUND_TRUTH
    return load_file(file) if file.exists() else {}


def true_codes(truth: dict[str, torch.Tensor], path: Path, rows: np.ndarray, dense: bool = False) -> torch.Tensor:
    """The true codes of held-out `rows` (global indices) [len(rows), n_features], sparse COO or dense, from the
    store at `path`'s loaded `truth`."""
    if not all(name in truth for name in CODES):
        raise StoreError(
            f"Store {path} keeps no true codes of its held-out rows (not synthetic, or written before they were "
            "kept: running the sweep with its data=synthetic settings adds them, same key and rows)."
        )
    stored = truth["heldout_rows"].numpy()
    rows = np.asarray(rows, dtype=np.int64)
    at = np.searchsorted(stored, rows).clip(max=len(stored) - 1)
    if not (stored[at] == rows).all():
        missing = rows[stored[at] != rows][:3].tolist()
        raise StoreError(
            f"Rows {missing} of store {path} are not held out; true codes are kept for held-out rows only."
        )
    index = truth["heldout_codes_index"][torch.from_numpy(at)].long()
    value = truth["heldout_codes_value"][torch.from_numpy(at)]
    line = torch.arange(len(rows))[:, None].expand_as(index)
    live = index >= 0
    codes = torch.sparse_coo_tensor(
        torch.stack([line[live], index[live]]), value[live], (len(rows), len(truth["features"])), check_invariants=True
    ).coalesce()
    return codes.to_dense() if dense else codes
