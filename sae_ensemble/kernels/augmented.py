"""The fused step with the encoder bias and the L1 term inside augmented GEMMs (dense.PASSES `augmented`).

The encoder gets a bias column and the decoder a column of ones (`D_aug = [D, 1]`), so the GEMM that
reconstructs x also sums each row's codes (the L1 norm) and the one giving dL/dcodes also adds the L1
coefficient: fewer torch ops over the [M, b, n] tiles, which is what an eager step off the C path needs
(CUDA without compile, a CPU without a C compiler). The sparse kernel builds its encoder the same way.
Transcoders (common.py): the encoder's operand is [x, 1, 0...] at d_in, the decoder's [D, 1, 0...] at d_out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sae_ensemble.kernels.common import PAD_BIAS, Sums, accumulate, centres, topk_codes
from sae_ensemble.sae import Hparams, Layout, Params, split


def augmented_width(d: int) -> int:
    """Columns of the augmented operands: d + 1, padded to a multiple of 8, where BLAS runs as
    fast as at d (d + 1 columns cost GEMM speed on CPU, docs/kernels.md). Zero columns carry nothing."""
    return (d + 1 + 7) // 8 * 8


def augmented_encoder(params: Params, mask: torch.Tensor, d_aug: int) -> torch.Tensor:
    """[W_enc, bias, 0...] [M, n, d_aug], to multiply [x - b_dec, 1, 0...]: the encoder bias rides in
    the GEMM and the weight-gradient GEMM's column d is the bias gradient (no pass over [M, B, n])."""
    W_enc = params["W_enc"]
    M, n, d = W_enc.shape
    bias = (params["b_enc"] - (1.0 - mask) * PAD_BIAS).unsqueeze(-1)
    return torch.cat([W_enc, bias, W_enc.new_zeros(M, n, d_aug - d - 1)], dim=-1)  # one pass (no zero-fill first)


def augmented_rows(x: torch.Tensor, centre: torch.Tensor, d_aug: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[x - b_dec, 1, 0...] [M, b, d_aug] of rows x [b, d] for every member's centre [M, d]."""
    M, d = centre.shape
    rows = x.new_empty(M, x.shape[0], d_aug, dtype=dtype)
    torch.sub(x.unsqueeze(0), centre.unsqueeze(1), out=rows[..., :d])
    rows[..., d] = 1.0
    rows[..., d + 1 :] = 0.0
    return rows


def sums(
    params: Params,
    hp: Hparams,
    x: torch.Tensor,
    layout: Layout,
    row_chunk: int | None,
    dtype: torch.dtype,
    rows: torch.Tensor,
    norms: torch.Tensor,
) -> tuple[torch.Tensor, Sums]:
    """(unit decoder rows, the sums) with the bias and the L1 term in augmented GEMMs (passes `augmented`)."""
    # Never compiled (under torch.compile the passes run at d columns, `torch`): `out=` and in-place ops
    # save passes and memory here.
    W_enc, b_dec = params["W_enc"], params["b_dec"]
    M, n, d = W_enc.shape
    B, o = x.shape[0], b_dec.shape[-1]
    mask = hp["feature_mask"]  # [M, n]
    centre_in, out_bias = centres(params, hp, layout)  # [M, d], [M, o]
    d_aug, o_aug = augmented_width(d), augmented_width(o)
    W_aug = augmented_encoder(params, mask, d_aug)
    # Decoder [D, 1]: the reconstruction GEMM also sums each row's codes (the L1 norm), and the
    # GEMM giving dL/dcodes also adds the L1 coefficient.
    D_aug = rows.new_zeros(M, n, o_aug)
    torch.div(rows, norms, out=D_aug[..., :o])
    D_aug[..., o] = 1.0
    D = D_aug[..., :o]
    bias_aug = F.pad(out_bias, (0, o_aug - o)).unsqueeze(1).to(dtype)  # [M, 1, o_aug]: no bias on the L1 column
    W_aug, D_operand = W_aug.to(dtype), D_aug.to(dtype)
    skip_operand = params["W_skip"].mT.to(dtype) if layout.skip else None  # [M, d, o]

    g_W_aug: torch.Tensor | None = None
    g_D_aug: torch.Tensor | None = None
    g_W_skip: torch.Tensor | None = None
    g_xhat_sum = torch.zeros_like(b_dec)  # [M, o]
    squared_error = x.new_zeros(M)
    code_sum = x.new_zeros(M)
    fired = x.new_zeros(M, n)
    l1_column = (hp["l1"] / B).view(-1, 1)  # [M, 1]: dL/dcode from the L1 term
    mse_scale = 2.0 / (B * o)

    for rows_x in x.split(row_chunk or B):
        inputs, target = split(rows_x, layout)
        xc_aug = augmented_rows(inputs, centre_in, d_aug, dtype)
        pre = torch.bmm(xc_aug, W_aug.transpose(1, 2))  # [M, b, n]
        if layout.k_max > 0:
            codes = topk_codes(pre, hp, layout)
        else:
            codes = pre.relu_()
        addend = bias_aug
        if skip_operand is not None:  # x @ W_skip^T in the output's columns, none in the L1 column
            addend = bias_aug + F.pad(torch.bmm(xc_aug[..., :d], skip_operand), (0, o_aug - o))
        xhat_aug = torch.baddbmm(addend, codes, D_operand).float()  # [M, b, o_aug]; column o: sum of codes
        err = xhat_aug[..., :o] - target
        squared_error += err.pow(2).sum((1, 2))
        code_sum += xhat_aug[..., o].sum(1)

        g_aug = torch.zeros_like(xhat_aug)  # [dL/dx_hat, l1/B, 0...]
        torch.mul(err, mse_scale, out=g_aug[..., :o])
        g_aug[..., o] = l1_column
        g_operand = g_aug.to(dtype)
        # Firing counts through a 0/1 tile: summing a bool tensor widens it to int64 first (a copy at 8
        # bytes per element, docs/kernels.md); the tile's memory then takes dL/dcodes.
        tile = torch.gt(codes, 0, out=torch.empty_like(codes))
        fired += tile.sum(1, dtype=torch.float32)
        g_pre = torch.bmm(g_operand, D_operand.transpose(1, 2), out=tile)
        torch.ops.aten.threshold_backward(g_pre, codes, 0.0, grad_input=g_pre)  # ReLU/top-k mask, in place
        g_D_aug = accumulate(g_D_aug, codes.transpose(1, 2), g_operand)
        g_W_aug = accumulate(g_W_aug, g_pre.transpose(1, 2), xc_aug)
        if skip_operand is not None:
            g_W_skip = accumulate(g_W_skip, g_operand[..., :o].transpose(1, 2), xc_aug[..., :d])
        g_xhat_sum += g_aug[..., :o].sum(1)

    assert g_W_aug is not None and g_D_aug is not None  # x has at least one row
    g_D, g_W_enc, g_b_enc = g_D_aug[..., :o], g_W_aug[..., :d], g_W_aug[..., d]
    return D, Sums(g_D, g_W_enc, g_b_enc, g_xhat_sum, squared_error, code_sum, fired, g_W_skip)
