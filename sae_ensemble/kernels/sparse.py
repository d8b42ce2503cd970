"""The gradient of an all-topk ensemble touching only active latents: the sparse path.

Only the encoder GEMM is dense (every pre-activation is needed to pick the top k). The
rest costs O(B·k·d) per member instead of O(B·n·d):
- the codes are one block-diagonal CSR matrix [M·b, M·n] for the whole ensemble
  (member m's latents at column offset m·n), so every member is one sparse product;
- decoder forward: the CSR product on CUDA, `embedding_bag` over the k active rows of each
  member's dictionary on CPU (each measured faster on its device);
- dL/dcodes at the active entries only: `sampled_addmm` (dL/dx_hat @ D^T at the pattern);
- decoder and encoder weight gradients: the transposed pattern (built once per chunk
  by a stable sort of the column indices) times dL/dx_hat and x.
Equal to the dense kernel and to the reference (kernels/dense.py, sae.loss): see tests.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from sae_ensemble.kernels.dense import Sums, augmented_encoder, augmented_rows, augmented_width, decoder_rows, finish
from sae_ensemble.sae import Hparams, Layout, Params

# torch warns that sparse CSR support is "beta" on every construction; these products are
# tested against the dense kernel, so the warning says nothing to our users.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def grads(params: Params, hp: Hparams, x: torch.Tensor, layout: Layout, row_chunk: int | None = None) -> tuple[Params, dict[str, torch.Tensor]]:
    """(gradients, aux) of every (topk) member's loss on x [B, d], equal to the dense kernel."""
    if not layout.all_topk:
        raise ValueError("the sparse kernel needs every member to be topk")
    W_enc, b_dec = params["W_enc"], params["b_dec"]
    M, n, d = W_enc.shape
    B, k = x.shape[0], layout.k_max
    mask = hp["feature_mask"]
    centre = b_dec * hp["use_b_dec"].view(-1, 1)  # [M, d]
    d_aug = augmented_width(d)
    W_aug = augmented_encoder(params, mask, d_aug)  # the bias rides in the encoder GEMM
    rows = decoder_rows(params, hp, layout)
    norms = rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    D = rows / norms  # [M, n, d]
    D_flat = D.reshape(M * n, d)
    rank_kept = torch.arange(k, device=x.device) < hp["k"].view(-1, 1, 1)  # [M, 1, k]
    offsets = (torch.arange(M, device=x.device) * n).view(-1, 1, 1)

    g_D = torch.zeros(M * n, d, dtype=x.dtype, device=x.device)
    g_W_enc = torch.zeros_like(g_D)
    g_pre_sum = x.new_zeros(M * n)
    fired = x.new_zeros(M * n)
    g_xhat_sum = x.new_zeros(M, d)
    squared_error = x.new_zeros(M)
    code_sum = x.new_zeros(M)
    mse_scale = 2.0 / (B * d)

    for rows_x in x.split(row_chunk or B):
        b = rows_x.shape[0]
        xc_aug = augmented_rows(rows_x, centre, d_aug)
        values, indices = torch.topk(torch.bmm(xc_aug, W_aug.transpose(1, 2)), k, dim=-1)  # [M, b, k]
        codes = values.relu_() * rank_kept  # [M, b, k]: ranks past a member's own k hold 0
        columns = (indices + offsets).view(M * b, k)
        pattern = _csr(columns, codes.view(-1), M * n)
        if x.is_cuda:  # cuSPARSE's CSR product beat embedding_bag 3.6x on an H100
            x_hat = torch.sparse.mm(pattern, D_flat).view(M, b, d)
        else:  # and embedding_bag beat MKL's CSR product 1.8x on CPU
            x_hat = F.embedding_bag(columns, D_flat, per_sample_weights=codes.view(M * b, k), mode="sum").view(M, b, d)
        err = x_hat + centre.unsqueeze(1) - rows_x
        squared_error += err.pow(2).sum((1, 2))
        code_sum += codes.sum((1, 2))
        g_xhat = (err * mse_scale).view(M * b, d)
        g_xhat_sum += g_xhat.view(M, b, d).sum(1)

        g_codes = torch.sparse.sampled_addmm(pattern, g_xhat, D_flat.T, beta=0.0).values()  # [M*b*k]
        g_pre = g_codes * (codes.view(-1) > 0)  # ReLU and top-k mask
        flat_columns = columns.view(-1)
        fired.index_add_(0, flat_columns, (codes.view(-1) > 0).to(x.dtype))
        g_pre_sum.index_add_(0, flat_columns, g_pre)
        transposed = _transposed(columns, M * n)
        g_D += torch.sparse.mm(transposed(codes.view(-1)), g_xhat)
        g_W_enc += torch.sparse.mm(transposed(g_pre), xc_aug[..., :d].reshape(M * b, d))

    sums = Sums(g_D.view(M, n, d), g_W_enc.view(M, n, d), g_pre_sum.view(M, n), g_xhat_sum, squared_error, code_sum, fired.view(M, n))
    return finish(params, hp, layout, D, norms, sums, B)


def _csr(columns: torch.Tensor, values: torch.Tensor, n_columns: int) -> torch.Tensor:
    """CSR [rows, n_columns] with `columns.shape[1]` entries per row at `columns` [rows, k]."""
    rows, k = columns.shape
    crow = torch.arange(0, rows * k + 1, k, device=columns.device)
    return torch.sparse_csr_tensor(crow, columns.reshape(-1), values, size=(rows, n_columns), check_invariants=False)


def _transposed(columns: torch.Tensor, n_columns: int):
    """A function from entry values (in `columns`' flat order) to the transposed CSR [n_columns, rows].

    A stable sort by column lists the transpose's entries row by row; values follow
    through the same permutation.
    """
    rows, k = columns.shape
    sorted_columns, order = torch.sort(columns.reshape(-1), stable=True)
    crow = torch.zeros(n_columns + 1, dtype=torch.long, device=columns.device)
    crow[1:] = torch.cumsum(torch.bincount(sorted_columns, minlength=n_columns), 0)
    row_of_entry = torch.div(order, k, rounding_mode="floor")
    return lambda values: torch.sparse_csr_tensor(crow, row_of_entry, values[order], size=(n_columns, rows), check_invariants=False)
