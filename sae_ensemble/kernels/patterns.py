"""The sparse kernel's code patterns: the active entries of the block-diagonal code matrix [M·b, M·n] of a
chunk (M members, b rows, n padded features each) in CSR order, and their transpose (kernels/sparse.py, auxk.py)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from sae_ensemble.kernels.common import row_topk, topk_codes
from sae_ensemble.sae import Hparams, Layout


class Active(NamedTuple):
    """The entries of the block-diagonal code matrix [M·b, M·n], in row-major (CSR) order."""

    crow: torch.Tensor  # [M*b + 1] CSR row pointers
    rows: torch.Tensor  # [nnz] row m*b + r of each entry
    columns: torch.Tensor  # [nnz] column m*n + j of each entry
    members: torch.Tensor  # [nnz] member m of each entry
    values: torch.Tensor  # [nnz] the code (0 for a kept rank beyond a member's own k)
    k_per_row: int  # entries per row when fixed (top-k), else 0
    kept: torch.Tensor | None = None  # [nnz] AuxK's: 1.0 for the ranks a member keeps (their gradient passes)


def active_topk(pre: torch.Tensor, hp: Hparams, layout: Layout) -> Active:
    """k_max entries per row: each topk member's largest pre-activations (ReLU'd; ranks past its k hold 0)."""
    k = layout.k_max
    values, indices = row_topk(pre, k)  # [M, b, k]
    codes = values.relu_() * (torch.arange(k, device=pre.device) < hp["k"].view(-1, 1, 1))
    return fixed_k(codes, indices, None, pre.shape[-1])


def fixed_k(values: torch.Tensor, indices: torch.Tensor, kept: torch.Tensor | None, n: int) -> Active:
    """The Active entries of k values [M, b, k] per row at feature `indices` [M, b, k] (of n per member)."""
    M, b, k = values.shape
    entry_rows = torch.arange(M * b, device=values.device).repeat_interleave(k)
    columns = (indices + (torch.arange(M, device=values.device) * n).view(-1, 1, 1)).reshape(-1)
    crow = torch.arange(0, M * b * k + 1, k, device=values.device)
    members = torch.div(entry_rows, b, rounding_mode="floor")
    kept = None if kept is None else kept.expand(M, b, k).reshape(-1).to(values.dtype)
    return Active(crow, entry_rows, columns, members, values.reshape(-1), k, kept)


def active_nonzero(pre: torch.Tensor, hp: Hparams, layout: Layout) -> Active:
    """The nonzero codes of any variant, found after the dense ReLU (and top-k mask).

    How many there are is data: on CUDA, sizing them waits for the GPU once per chunk, so the
    autotuner picks this only where the saving outweighs that.
    """
    M, b, n = pre.shape
    codes = topk_codes(pre, hp, layout) if layout.k_max > 0 else pre.relu_()
    member, row, feature = codes.nonzero(as_tuple=True)  # row-major: sorted by (member, row)
    entry_rows = member * b + row
    crow = torch.zeros(M * b + 1, dtype=torch.long, device=pre.device)
    crow[1:] = torch.cumsum(torch.bincount(entry_rows, minlength=M * b), 0)
    return Active(crow, entry_rows, member * n + feature, member, codes[member, row, feature], 0)


def transposed(entry_rows: torch.Tensor, columns: torch.Tensor, n_rows: int, n_columns: int):
    """A function from entry values (in CSR order) to the transposed CSR [n_columns, n_rows].

    A stable sort by column lists the transpose's entries row by row; values follow
    through the same permutation. (The C path needs no transpose: native.sparse_backward.)
    """
    sorted_columns, order = torch.sort(columns, stable=True)
    crow = torch.zeros(n_columns + 1, dtype=torch.long, device=columns.device)
    crow[1:] = torch.cumsum(torch.bincount(sorted_columns, minlength=n_columns), 0)
    rows_t = entry_rows[order]
    return lambda values: torch.sparse_csr_tensor(
        crow, rows_t, values[order], size=(n_columns, n_rows), check_invariants=False
    )
