"""The ensemble's gradient touching only active latents: the sparse path.

Only the encoder GEMM is dense (every pre-activation is needed to find the active latents).
The rest costs O(B·L0·d) per member instead of O(B·n·d):
- the codes are one block-diagonal CSR matrix [M·b, M·n] for the whole ensemble
  (member m's latents at column offset m·n), so every member is one sparse product;
  all-topk ensembles take exactly k_max entries per row straight from `topk` (no pass
  over dense codes, no host sync); other variants take the nonzeros of the dense codes;
- decoder forward: the CSR product on CUDA, `embedding_bag` over the k active rows of each
  member's dictionary on CPU (each measured faster on its device);
- dL/dcodes at the active entries only: `sampled_addmm` (dL/dx_hat @ D^T at the pattern);
- decoder and encoder weight gradients: the transposed pattern (built once per chunk
  by a stable sort of the column indices) times dL/dx_hat and x;
- transcoders (common.py): the input is centred by zero and the error taken against the target
  columns; a skip transcoder's x @ W_skip^T and its gradient are dense batched GEMMs at d columns;
- AuxK (sae.auxk_loss): the k_aux largest pre-activations among each member's dead latents are a
  second pattern of k_aux entries per row, taken from the pre-activations before any ReLU, and run
  through the same four sparse products against the detached residual.
Equal to the dense kernel and to the reference (kernels/dense.py, sae.loss): see tests.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from sae_ensemble.kernels.augmented import augmented_encoder, augmented_rows, augmented_width
from sae_ensemble.kernels.common import Sums, accumulate, centres, decoder_rows, finish, topk_codes
from sae_ensemble.sae import Hparams, Layout, Params, split

# torch warns that sparse CSR support is "beta" on every construction; these products are
# tested against the dense kernel, so the warning says nothing to our users.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def grads(
    params: Params, hp: Hparams, x: torch.Tensor, layout: Layout, row_chunk: int | None = None
) -> tuple[Params, dict[str, torch.Tensor]]:
    """(gradients, aux) of every member's loss on x [B, d] (transcoders: [x | y]), equal to the dense kernel."""
    W_enc, b_dec = params["W_enc"], params["b_dec"]
    M, n, d = W_enc.shape
    B, o = x.shape[0], b_dec.shape[-1]
    mask = hp["feature_mask"]
    centre_in, out_bias = centres(params, hp, layout)  # [M, d], [M, o]
    d_aug = augmented_width(d)
    W_aug = augmented_encoder(params, mask, d_aug)  # the bias rides in the encoder GEMM
    rows = decoder_rows(params, hp, layout)
    norms = rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    D = rows / norms  # [M, n, o]
    D_flat = D.reshape(M * n, o)
    W_skip_t = params["W_skip"].mT if layout.skip else None  # [M, d, o]

    g_D = torch.zeros(M * n, o, dtype=x.dtype, device=x.device)
    g_W_enc = torch.zeros(M * n, d, dtype=x.dtype, device=x.device)
    g_W_skip: torch.Tensor | None = None
    g_pre_sum = x.new_zeros(M * n)
    fired = x.new_zeros(M * n)
    g_xhat_sum = x.new_zeros(M, o)
    squared_error = x.new_zeros(M)
    code_sum = x.new_zeros(M)
    mse_scale = 2.0 / (B * o)
    l1_per_row = hp["l1"] / B  # [M]: dL/dcode from the L1 term

    auxk = _AuxK(hp, layout, B, o) if layout.k_aux else None

    for rows_x in x.split(row_chunk or B):
        b = rows_x.shape[0]
        inputs, target = split(rows_x, layout)
        xc_aug = augmented_rows(inputs, centre_in, d_aug)
        centred = xc_aug[..., :d]  # [M, b, d]
        pre = torch.bmm(xc_aug, W_aug.transpose(1, 2))  # [M, b, n]
        dead = auxk.select(pre) if auxk else None  # before the codes: the nonzero path rectifies pre in place
        codes = _active_topk(pre, hp, layout) if layout.all_topk else _active_nonzero(pre, hp, layout)
        pattern = torch.sparse_csr_tensor(
            codes.crow, codes.columns, codes.values, size=(M * b, M * n), check_invariants=False
        )
        if codes.k_per_row and not x.is_cuda:  # embedding_bag beats MKL's CSR product on CPU (docs/kernels.md)
            k = codes.k_per_row
            x_hat = F.embedding_bag(
                codes.columns.view(M * b, k), D_flat, per_sample_weights=codes.values.view(M * b, k), mode="sum"
            )
        else:  # and cuSPARSE's CSR product beats embedding_bag on CUDA
            x_hat = torch.sparse.mm(pattern, D_flat)
        out = x_hat.view(M, b, o) + out_bias.unsqueeze(1)
        if W_skip_t is not None:
            out = out.baddbmm_(centred, W_skip_t)
        err = out - target
        squared_error += err.pow(2).sum((1, 2))
        code_sum.index_add_(0, codes.members, codes.values)
        g_xhat = (err * mse_scale).view(M * b, o)
        g_xhat_sum += g_xhat.view(M, b, o).sum(1)
        if W_skip_t is not None:
            g_W_skip = accumulate(g_W_skip, g_xhat.view(M, b, o).transpose(1, 2), centred)

        g_codes = torch.sparse.sampled_addmm(pattern, g_xhat, D_flat.T, beta=0.0).values() + l1_per_row[codes.members]
        active = codes.values > 0
        g_pre = g_codes * active  # ReLU and top-k mask
        fired.index_add_(0, codes.columns, active.to(x.dtype))
        g_pre_sum.index_add_(0, codes.columns, g_pre)
        transposed = _transposed(codes.rows, codes.columns, M * b, M * n)
        g_D += torch.sparse.mm(transposed(codes.values), g_xhat)
        g_W_enc += torch.sparse.mm(transposed(g_pre), centred.reshape(M * b, d))
        if dead is not None:
            g_pre = auxk.backward(dead, err, D_flat, g_D, g_W_enc, centred)
            g_pre_sum.index_add_(0, dead.columns, g_pre)

    sums = Sums(
        g_D.view(M, n, o),
        g_W_enc.view(M, n, d),
        g_pre_sum.view(M, n),
        g_xhat_sum,
        squared_error,
        code_sum,
        fired.view(M, n),
        g_W_skip,
        auxk.loss if auxk else None,
    )
    return finish(params, hp, layout, D, norms, sums, B)


class _AuxK:
    """AuxK's part of the gradient, chunk by chunk: sae.auxk_loss's selection, loss and backward on sparse entries."""

    def __init__(self, hp: Hparams, layout: Layout, B: int, o: int) -> None:
        self.hp, self.k = hp, layout.k_aux
        n_dead = hp["dead"].sum(-1)  # [M]
        self.kept_ranks = torch.minimum(hp["k_aux"], n_dead)  # [M]
        # d(loss)/d(recon - residual) per unit: coefficient * min(n_dead / k_aux, 1) * 2 / (B o)
        self.scale = hp["auxk_coefficient"] * torch.clamp(n_dead / hp["k_aux"], max=1.0)  # [M]
        self.loss = torch.zeros_like(n_dead)
        self.mean_of = 1.0 / (B * o)

    def select(self, pre: torch.Tensor) -> Active:
        """The k_aux largest pre-activations of each member's dead latents per row (unrectified; ranks past
        min(k_aux, n_dead) hold 0)."""
        M, b, n = pre.shape
        candidates = torch.where(self.hp["dead"].unsqueeze(1) > 0, pre, -torch.inf)
        values, indices = torch.topk(candidates, self.k, dim=-1)  # [M, b, k_aux]
        kept = torch.arange(self.k, device=pre.device) < self.kept_ranks.view(-1, 1, 1)
        values = torch.where(kept, values, 0.0)  # never -inf * 0
        return _fixed_k(values, indices, kept, n)

    def backward(self, dead: Active, err: torch.Tensor, D_flat: torch.Tensor, g_D, g_W_enc, centred) -> torch.Tensor:
        """Add this chunk's AuxK loss and its gradients to g_D and g_W_enc; return dL/dpre at the entries.

        `err` [M, b, o] = output - target, so the detached residual is -err and recon - residual = recon + err."""
        M, b, o = err.shape
        k = self.k
        recon = F.embedding_bag(
            dead.columns.view(M * b, k), D_flat, per_sample_weights=dead.values.view(M * b, k), mode="sum"
        )
        diff = recon.view(M, b, o) + err
        self.loss += self.scale * self.mean_of * diff.pow(2).sum((1, 2))
        g_recon = (diff * (2.0 * self.mean_of * self.scale).view(-1, 1, 1)).view(M * b, o)
        pattern = torch.sparse_csr_tensor(
            dead.crow, dead.columns, dead.values, size=(M * b, g_D.shape[0]), check_invariants=False
        )
        g_pre = torch.sparse.sampled_addmm(pattern, g_recon, D_flat.T, beta=0.0).values() * dead.kept
        transposed = _transposed(dead.rows, dead.columns, M * b, g_D.shape[0])
        g_D += torch.sparse.mm(transposed(dead.values), g_recon)
        g_W_enc += torch.sparse.mm(transposed(g_pre), centred.reshape(M * b, -1))
        return g_pre


class Active(NamedTuple):
    """The entries of the block-diagonal code matrix [M·b, M·n], in row-major (CSR) order."""

    crow: torch.Tensor  # [M*b + 1] CSR row pointers
    rows: torch.Tensor  # [nnz] row m*b + r of each entry
    columns: torch.Tensor  # [nnz] column m*n + j of each entry
    members: torch.Tensor  # [nnz] member m of each entry
    values: torch.Tensor  # [nnz] the code (0 for a kept rank beyond a member's own k)
    k_per_row: int  # entries per row when fixed (top-k), else 0
    kept: torch.Tensor | None = None  # [nnz] AuxK's: 1.0 for the ranks a member keeps (their gradient passes)


def _active_topk(pre: torch.Tensor, hp: Hparams, layout: Layout) -> Active:
    """k_max entries per row: each topk member's largest pre-activations (ReLU'd; ranks past its k hold 0)."""
    k = layout.k_max
    values, indices = torch.topk(pre, k, dim=-1)  # [M, b, k]
    codes = values.relu_() * (torch.arange(k, device=pre.device) < hp["k"].view(-1, 1, 1))
    return _fixed_k(codes, indices, None, pre.shape[-1])


def _fixed_k(values: torch.Tensor, indices: torch.Tensor, kept: torch.Tensor | None, n: int) -> Active:
    """The Active entries of k values [M, b, k] per row at feature `indices` [M, b, k] (of n per member)."""
    M, b, k = values.shape
    entry_rows = torch.arange(M * b, device=values.device).repeat_interleave(k)
    columns = (indices + (torch.arange(M, device=values.device) * n).view(-1, 1, 1)).reshape(-1)
    crow = torch.arange(0, M * b * k + 1, k, device=values.device)
    members = torch.div(entry_rows, b, rounding_mode="floor")
    kept = None if kept is None else kept.expand(M, b, k).reshape(-1).to(values.dtype)
    return Active(crow, entry_rows, columns, members, values.reshape(-1), k, kept)


def _active_nonzero(pre: torch.Tensor, hp: Hparams, layout: Layout) -> Active:
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


def _transposed(entry_rows: torch.Tensor, columns: torch.Tensor, n_rows: int, n_columns: int):
    """A function from entry values (in CSR order) to the transposed CSR [n_columns, n_rows].

    A stable sort by column lists the transpose's entries row by row; values follow
    through the same permutation.
    """
    sorted_columns, order = torch.sort(columns, stable=True)
    crow = torch.zeros(n_columns + 1, dtype=torch.long, device=columns.device)
    crow[1:] = torch.cumsum(torch.bincount(sorted_columns, minlength=n_columns), 0)
    rows_t = entry_rows[order]
    return lambda values: torch.sparse_csr_tensor(
        crow, rows_t, values[order], size=(n_columns, n_rows), check_invariants=False
    )
