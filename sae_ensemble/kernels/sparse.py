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
- on CPU where the C kernels run, those last two in one pass over the entries (native.sparse_backward);
- transcoders (common.py): the input is centred by zero and the error taken against the target
  columns; a skip transcoder's x @ W_skip^T and its gradient are dense batched GEMMs at d columns;
- AuxK (sae.auxk_loss; kernels/auxk.py): selected from the pre-activations before any ReLU, then densely
  over the dead latents' columns (CPU) or as a second sparse pattern through the same products (CUDA).
Equal to the dense kernel and to the reference (kernels/dense.py, sae.loss): see tests.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from sae_ensemble.kernels import native
from sae_ensemble.kernels.augmented import augmented_encoder, augmented_rows, augmented_width
from sae_ensemble.kernels.auxk import for_step as auxk_for_step
from sae_ensemble.kernels.common import Sums, accumulate, centres, decoder_rows, finish, native_path
from sae_ensemble.kernels.patterns import active_nonzero, active_topk, transposed
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

    g_D: torch.Tensor | None = None  # [M·n, o]: the first chunk's product is the sum (no zero-fill pass)
    g_W_enc: torch.Tensor | None = None  # [M·n, d]
    g_W_skip: torch.Tensor | None = None
    g_pre_sum = x.new_zeros(M * n)
    fired = x.new_zeros(M * n)
    g_xhat_sum = x.new_zeros(M, o)
    squared_error = x.new_zeros(M)
    code_sum = x.new_zeros(M)
    mse_scale = 2.0 / (B * o)
    l1_per_row = hp["l1"] / B  # [M]: dL/dcode from the L1 term

    auxk = auxk_for_step(hp, layout, B, o, x.device)

    for rows_x in x.split(row_chunk or B):
        b = rows_x.shape[0]
        inputs, target = split(rows_x, layout)
        xc_aug = augmented_rows(inputs, centre_in, d_aug)
        centred = xc_aug[..., :d]  # [M, b, d]
        pre = torch.bmm(xc_aug, W_aug.transpose(1, 2))  # [M, b, n]
        dead = auxk.select(pre, xc_aug, W_aug) if auxk else None  # before the codes rectify pre in place
        codes = active_topk(pre, hp, layout) if layout.all_topk else active_nonzero(pre, hp, layout)
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

        if native_path(x.device.type) and native.fits(D_flat, g_xhat):  # dL/dcodes and both weight gradients in C
            totals = None if g_D is None else (g_D, g_W_enc)
            g_D, g_W_enc = native.sparse_backward(
                codes.crow, codes.columns, codes.values, g_xhat, D_flat, centred, l1_per_row, g_pre_sum, fired, totals
            )
        else:
            g_codes = torch.sparse.sampled_addmm(pattern, g_xhat, D_flat.T, beta=0.0).values()
            active = codes.values > 0
            g_pre = (g_codes + l1_per_row[codes.members]) * active  # ReLU and top-k mask
            fired.index_add_(0, codes.columns, active.to(x.dtype))
            g_pre_sum.index_add_(0, codes.columns, g_pre)
            by_column = transposed(codes.rows, codes.columns, M * b, M * n)
            g_D = _added(g_D, torch.sparse.mm(by_column(codes.values), g_xhat))
            g_W_enc = _added(g_W_enc, torch.sparse.mm(by_column(g_pre), centred.reshape(M * b, d)))
        if dead is not None:
            auxk.backward(dead, err, D_flat, g_D, g_W_enc, g_pre_sum, centred)

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


def _added(total: torch.Tensor | None, product: torch.Tensor) -> torch.Tensor:
    """total + product in place, or the product itself for the first chunk."""
    return product if total is None else total.add_(product)
