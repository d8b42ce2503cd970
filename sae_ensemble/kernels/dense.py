"""The ensemble's gradient written by hand on the stacked tensors: the fused dense path.

`grads(params, hp, x, layout, row_chunk)` returns exactly what
`vmap(grad(sae.loss, has_aux=True))` returns (gradients and aux stats, every tensor with a
leading member axis), computed without autograd:

- batched GEMMs over the member axis, and an [M, B, n] tensor is touched by the GEMMs and
  two elementwise passes only: one after the encoder GEMM (bias, ReLU in place, firing
  counts, code sums) and one after the GEMM giving dL/dcodes (the ReLU/top-k mask, in
  place, with the L1 term and the encoder-bias gradient);
- where that work happens is `passes` (PASSES). The GEMMs run at d columns (`_direct_sums`)
  and the two passes add the bias and the L1 term: kernels/native.py's C on CPU in float32,
  torch ops under torch.compile (which fuses each pass into one kernel), or the epilogues of
  the GEMMs that produce the tiles (kernels/epilogue.py, Triton on CUDA). Eagerly off the C
  path (CUDA without compile, no C compiler) the torch ops would make a pass per step, so
  there the bias and the L1 term ride in augmented GEMMs instead (`_augmented_sums`): the
  encoder gets a bias column and the decoder a column of ones (`D_aug = [D, 1]`), so the GEMM
  that reconstructs x also sums each row's codes (the L1 norm) and the one giving dL/dcodes
  also adds the L1 coefficient. The autotuner times the choices that apply (ensemble.py);
- a chunk holds two [M, b, n] tensors at a time, the codes and dL/dcodes (plus top-k's own
  when k > 0);
- the b_dec gradient through the encoder is a GEMV, (sum_rows dL/dpre) @ W_enc, not
  the [B, d] GEMM that autograd runs for d(x - b_dec);
- rows are processed in chunks of `row_chunk` with gradients accumulated, so on CPU an
  [M, chunk, n] tile stays in cache (and the same loop gives micro-batching for free).

Shapes: M members, B rows, d = d_in, n = padded dict size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from sae_ensemble.kernels import epilogue, native
from sae_ensemble.sae import Hparams, Layout, Params

PAD_BIAS = 1e30  # as sae.encode: padded features never fire


def decoder_rows(params: Params, hp: Hparams, layout: Layout) -> torch.Tensor:
    """[M, n, d] rows that normalise into each member's dictionary (W_enc's for tied members)."""
    if layout.all_tied:
        return params["W_enc"]
    if layout.any_tied:
        return torch.where(hp["tied"].view(-1, 1, 1) > 0, params["W_enc"], params["W_dec"])
    return params["W_dec"]


def augmented_width(d: int) -> int:
    """Columns of the augmented operands: d + 1, padded to a multiple of 8, where BLAS runs as
    fast as at d (measured: d + 1 columns cost 10-20% GEMM speed on CPU). Zero columns carry nothing."""
    return (d + 1 + 7) // 8 * 8


def augmented_encoder(params: Params, mask: torch.Tensor, d_aug: int) -> torch.Tensor:
    """[W_enc, bias, 0...] [M, n, d_aug], to multiply [x - b_dec, 1, 0...]: the encoder bias rides in
    the GEMM and the weight-gradient GEMM's column d is the bias gradient (no pass over [M, B, n])."""
    W_enc = params["W_enc"]
    M, n, d = W_enc.shape
    W_aug = W_enc.new_zeros(M, n, d_aug)
    W_aug[..., :d] = W_enc
    W_aug[..., d] = params["b_enc"] - (1.0 - mask) * PAD_BIAS
    return W_aug


def augmented_rows(x: torch.Tensor, centre: torch.Tensor, d_aug: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[x - b_dec, 1, 0...] [M, b, d_aug] of rows x [b, d] for every member's centre [M, d]."""
    M, d = centre.shape
    if torch.compiler.is_compiling():  # dynamo cannot trace `out=` into a view; inductor fuses this into one pass
        centred = x.unsqueeze(0) - centre.unsqueeze(1)
        return F.pad(torch.cat([centred, torch.ones_like(centred[..., :1])], -1), (0, d_aug - d - 1)).to(dtype or x.dtype)
    rows = x.new_zeros(M, x.shape[0], d_aug, dtype=dtype)
    torch.sub(x.unsqueeze(0), centre.unsqueeze(1), out=rows[..., :d])
    rows[..., d] = 1.0
    return rows


def topk_codes(pre: torch.Tensor, hp: Hparams, layout: Layout) -> torch.Tensor:
    """Codes [M, B, n]: each topk member keeps exactly its k largest ReLU'd pre-activations per row."""
    values, indices = torch.topk(pre, layout.k_max, dim=-1)  # [M, B, k_max], largest first
    rank_kept = torch.arange(layout.k_max, device=pre.device) < hp["k"].view(-1, 1, 1)  # [M, 1, k_max]
    kept = torch.zeros_like(pre).scatter_(-1, indices, values.relu_() * rank_kept)
    if layout.all_topk:
        return kept
    return torch.where(hp["topk"].view(-1, 1, 1) > 0, kept, pre.relu_())


PASSES = ("c", "torch", "transposed", "dual", "augmented", "epilogue")
"""Where `grads` does the work between its GEMMs (docs/kernels.md): `c`, kernels/native.py's two passes
(CPU, float32, eager); `torch`, the same two passes as torch ops (which torch.compile fuses into a
kernel each); `transposed`, `torch`'s passes on feature-major [M, n, b] tiles, so four of the five
GEMMs read K-major operands; `dual`, those tiles plus a row-major copy of the codes for the fifth;
`augmented`, the bias and the L1 term in augmented GEMMs and fewer torch ops (eagerly elsewhere);
`epilogue`, inside the GEMMs that produce the tiles (kernels/epilogue.py, Triton)."""


def grads(params: Params, hp: Hparams, x: torch.Tensor, layout: Layout, row_chunk: int | None = None,
          dtype: torch.dtype = torch.float32, passes: str | None = None) -> tuple[Params, dict[str, torch.Tensor]]:
    """(gradients, aux) of every member's loss on x [B, d], equal to the vmapped autograd reference.

    `dtype`: of the GEMM operands and the [M, b, n] tensors. bfloat16 (CUDA) is what autocast
    gives the reference: half the bytes per pass and twice the GEMM rate; the gradients are
    accumulated, and the loss, the normalisation and Adam computed, in float32.
    `passes`: one of PASSES (`applicable_passes` says which apply); None takes `default_passes`'s.
    """
    passes = passes or default_passes(x.device.type, dtype)
    applicable = applicable_passes(x.device, dtype, layout)
    if passes not in applicable:
        raise ValueError(f"passes={passes!r} does not run here ({x.device.type}, {dtype}, top-k: {layout.k_max > 0}); "
                         f"allowed: {', '.join(applicable)}")
    rows = decoder_rows(params, hp, layout)
    norms = rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # F.normalize's eps
    if passes == "augmented":
        D, sums = _augmented_sums(params, hp, x, layout, row_chunk, dtype, rows, norms)
    else:
        D = rows / norms
        if passes in ("transposed", "dual"):
            sums = _transposed_sums(params, hp, x, layout, row_chunk, D, dtype, row_major_codes=passes == "dual")
        else:
            sums = _direct_sums(params, hp, x, layout, row_chunk, D, dtype, passes)
    return finish(params, hp, layout, D, norms, sums, x.shape[0])


def native_path(device_type: str, dtype: torch.dtype = torch.float32) -> bool:
    """Whether `grads`'s passes are kernels/native.py's C by default (and the plan models their memory):
    eagerly, on CPU, in float32, where the C kernels built."""
    return not torch.compiler.is_compiling() and device_type == "cpu" and dtype == torch.float32 and native.available()


def default_passes(device_type: str, dtype: torch.dtype = torch.float32) -> str:
    """`c` where it runs; `torch` under torch.compile, where inductor fuses the bias, the L1 term and the
    row sums into the two passes, so the GEMMs run at d columns; `augmented` eagerly elsewhere (CUDA
    without compile, a CPU without a compiler), where the torch ops would make a pass for each."""
    if native_path(device_type, dtype):
        return "c"
    return "torch" if torch.compiler.is_compiling() else "augmented"


def applicable_passes(device: torch.device, dtype: torch.dtype, layout: Layout) -> tuple[str, ...]:
    """The PASSES that run for this device, dtype and layout: the epilogues do not rank top-k."""
    return tuple(p for p in PASSES if (p != "c" or native_path(device.type, dtype))
                 and (p != "epilogue" or (epilogue.available(device) and layout.k_max == 0)))


def _direct_sums(params: Params, hp: Hparams, x: torch.Tensor, layout: Layout, row_chunk: int | None,
                 D: torch.Tensor, dtype: torch.dtype, passes: str) -> "Sums":
    """The chunk loop with the GEMMs at d columns and two passes over each [M, b, n] code tile.

    The first pass adds the encoder bias, applies ReLU (or top-k) and sums each feature's firings
    and codes; the second masks dL/dcodes, adds the L1 term and sums the encoder-bias gradient.
    `passes` says where they run (PASSES).
    """
    W_enc, b_dec = params["W_enc"], params["b_dec"]
    M, n, d = W_enc.shape
    B = x.shape[0]
    centre = (b_dec * hp["use_b_dec"].view(-1, 1)).unsqueeze(1)  # [M, 1, d]
    bias = (params["b_enc"] - (1.0 - hp["feature_mask"]) * PAD_BIAS).contiguous()  # [M, n]
    l1_grad = (hp["l1"] / B).float().contiguous()  # [M]: dL/dcode from the L1 term
    mse_scale = 2.0 / (B * d)
    W_operand, D_operand, centre_operand = W_enc.to(dtype), D.to(dtype), centre.to(dtype)  # no copies in float32
    g_D: torch.Tensor | None = None
    g_W_enc: torch.Tensor | None = None
    g_pre_sum, fired, code_total, g_xhat_sum, squared_error = _zero_sums(x, b_dec, n)
    for rows_x in x.split(row_chunk or B):
        centred = (rows_x.unsqueeze(0) - centre).to(dtype)  # [M, b, d]
        codes = _encode(centred, W_operand, bias, fired, code_total, hp, layout, passes)
        err = torch.baddbmm(centre_operand, codes, D_operand).float().sub_(rows_x)  # x_hat - x [M, b, d]
        squared_error += torch.linalg.vecdot(err.flatten(1), err.flatten(1))
        g_xhat = err.mul_(mse_scale)  # dL/dx_hat
        g_operand = g_xhat.to(dtype)
        g_pre = _backward(g_operand, D_operand, codes, l1_grad, g_pre_sum, passes)
        g_D = _accumulate(g_D, codes.transpose(1, 2), g_operand)
        g_W_enc = _accumulate(g_W_enc, g_pre.transpose(1, 2), centred)
        g_xhat_sum += g_xhat.sum(1)
    assert g_W_enc is not None and g_D is not None  # x has at least one row
    return Sums(g_D, g_W_enc, g_pre_sum, g_xhat_sum, squared_error, code_total.sum(-1), fired)


def _zero_sums(x: torch.Tensor, b_dec: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """The row loops' accumulators: g_pre_sum, fired, code_total [M, n], g_xhat_sum [M, d], squared_error [M]."""
    M = b_dec.shape[0]
    return x.new_zeros(M, n), x.new_zeros(M, n), x.new_zeros(M, n), torch.zeros_like(b_dec), x.new_zeros(M)


def _transposed_sums(params: Params, hp: Hparams, x: torch.Tensor, layout: Layout, row_chunk: int | None,
                     D: torch.Tensor, dtype: torch.dtype, row_major_codes: bool = False) -> "Sums":
    """`_direct_sums` with `torch`'s passes on feature-major tiles: codes and dL/dpre are [M, n, b].

    Hopper's TF32 tensor-core instructions read only K-major operands (the summed axis contiguous in
    memory). Row-major [M, b, n] tiles are M- or N-major in both weight-gradient GEMMs, which the
    sum over rows makes K = b: on an H200 cuBLAS ran them at 0.56-0.60 of the GEMM peak, and at 1.0
    from K-major copies (benchmarks.gemms). Feature-major tiles are K-major there, and the encoder
    and dL/dcodes GEMMs produce them from K-major operands as before. Only the decoder reads one
    N-major operand (the codes, summed over n). The [M, d, b] and [M, b, d] copies of x - b_dec and
    of g are small (d columns, not n). In float32, x enters as the decoder GEMM's addend: reading x
    transposed inside the two reductions over err cost 0.06 ms each at the large case (H200 profile).
    `row_major_codes` (passes `dual`): the first pass also writes the codes row-major, one more
    [M, b, n] write, for a decoder GEMM with both operands K-major and err row-major like x.
    """
    W_enc, b_dec = params["W_enc"], params["b_dec"]
    M, n, d = W_enc.shape
    B = x.shape[0]
    centre = (b_dec * hp["use_b_dec"].view(-1, 1)).unsqueeze(-1)  # [M, d, 1]
    bias = (params["b_enc"] - (1.0 - hp["feature_mask"]) * PAD_BIAS).unsqueeze(-1)  # [M, n, 1]
    l1_grad = (hp["l1"] / B).float().view(-1, 1, 1)  # [M, 1, 1]: dL/dcode from the L1 term
    mse_scale = 2.0 / (B * d)
    W_operand, D_operand, centre_operand = W_enc.to(dtype), D.to(dtype), centre.to(dtype)
    D_t = D_operand.mT.contiguous()  # [M, d, n]: the decoder's weights K-major
    g_D: torch.Tensor | None = None
    g_W_enc: torch.Tensor | None = None
    g_pre_sum, fired, code_total, g_xhat_sum, squared_error = _zero_sums(x, b_dec, n)
    for rows_x in x.split(row_chunk or B):
        centred = (rows_x.unsqueeze(0) - centre.mT).to(dtype)  # [M, b, d]
        centred_t = centred.mT.contiguous()  # [M, d, b]
        biased = torch.bmm(W_operand, centred.mT).float() + bias  # [M, n, b], float32 as in _encode
        # top-k ranks within each row (over n): on the [M, b, n] view; zeros_like keeps the layout.
        codes = (topk_codes(biased.mT, hp, layout).mT if layout.k_max > 0 else biased.relu())
        fired += (codes > 0).sum(-1, dtype=torch.float32)
        code_total += codes.sum(-1)
        codes = codes.to(dtype)
        if row_major_codes:  # the decoder reads a row-major copy of the codes: both its operands K-major
            err = torch.baddbmm(centre_operand.mT, codes.mT.contiguous(), D_t.mT).float().sub_(rows_x)  # x_hat - x [M, b, d]
        elif dtype == torch.float32:  # x rides in the GEMM's addend, so the passes below read err contiguously
            err = torch.baddbmm(centre - rows_x.T, D_t, codes)  # x_hat - x [M, d, b]
        else:  # a bf16 addend would round x: subtract it in float32
            err = torch.baddbmm(centre_operand, D_t, codes).float().sub_(rows_x.T)
        squared_error += torch.linalg.vecdot(err.flatten(1), err.flatten(1))
        g_xhat = err.mul_(mse_scale)  # dL/dx_hat, as err
        g_xhat_sum += g_xhat.sum(1 if row_major_codes else -1)
        g_operand = g_xhat.to(dtype)
        # g [M, b, d] and g^T [M, d, b]: K-major partners of the dL/dcodes and dL/dD GEMMs
        g_rows, g_cols = (g_operand, g_operand.mT.contiguous()) if row_major_codes else (g_operand.mT.contiguous(), g_operand)
        g_codes = torch.bmm(D_operand, g_rows.mT)  # [M, n, b]
        g_pre = torch.where(codes <= 0, 0.0, g_codes.float() + l1_grad)
        g_pre_sum += g_pre.sum(-1)
        g_pre = g_pre.to(dtype)
        g_D = _accumulate(g_D, codes, g_cols.mT)
        g_W_enc = _accumulate(g_W_enc, g_pre, centred_t.mT)
    assert g_W_enc is not None and g_D is not None  # x has at least one row
    return Sums(g_D, g_W_enc, g_pre_sum, g_xhat_sum, squared_error, code_total.sum(-1), fired)


def _encode(centred: torch.Tensor, W: torch.Tensor, bias: torch.Tensor, fired: torch.Tensor, total: torch.Tensor,
            hp: Hparams, layout: Layout, passes: str) -> torch.Tensor:
    """Codes [M, b, n] in centred's dtype from centred [M, b, d] @ W [M, n, d]^T: bias [M, n] added, ReLU (or
    each topk member's top k), and each feature's firing count and code sum over the rows added to
    fired, total [M, n]."""
    if passes == "epilogue":
        return epilogue.encode(centred, W, bias, fired, total)
    pre = torch.bmm(centred, W.transpose(1, 2))
    if passes == "c":  # in place on the GEMM's output
        if layout.k_max > 0:  # top-k ranks the biased pre-activations; the pass then only counts
            codes = topk_codes(pre.add_(bias.unsqueeze(1)), hp, layout)
            native.relu_count_(codes, fired, total=total)
            return codes
        native.relu_count_(pre, fired, bias, total)
        return pre
    biased = pre.float() + bias.unsqueeze(1)  # float32, as the reference adds b_enc to autocast's bf16 product
    codes = topk_codes(biased, hp, layout) if layout.k_max > 0 else biased.relu()
    fired += (codes > 0).sum(1, dtype=torch.float32)
    total += codes.sum(1)
    return codes.to(centred.dtype)


def _backward(g_xhat: torch.Tensor, D: torch.Tensor, codes: torch.Tensor, add: torch.Tensor, g_sum: torch.Tensor,
              passes: str) -> torch.Tensor:
    """dL/dpre [M, b, n] in g_xhat's dtype from dL/dcodes = g_xhat [M, b, d] @ D [M, n, d]^T: plus add [M] (the
    L1 term) where the code fired, 0 where it did not (threshold_backward's test: a NaN code passes);
    each feature's sum over the rows is added to g_sum [M, n] (the encoder-bias gradient)."""
    if passes == "epilogue":
        return epilogue.backward(g_xhat, D, codes, add, g_sum)
    g = torch.bmm(g_xhat, D.transpose(1, 2))
    if passes == "c":  # in place
        native.relu_backward_(g, codes, add, g_sum)
        return g
    g_pre = torch.where(codes <= 0, 0.0, g.float() + add.view(-1, 1, 1))
    g_sum += g_pre.sum(1)
    return g_pre.to(g_xhat.dtype)


def _augmented_sums(params: Params, hp: Hparams, x: torch.Tensor, layout: Layout, row_chunk: int | None,
                    dtype: torch.dtype, rows: torch.Tensor, norms: torch.Tensor) -> tuple[torch.Tensor, "Sums"]:
    """(unit decoder rows, the sums) with the bias and the L1 term in augmented GEMMs (passes `augmented`)."""
    # Under torch.compile (training.compile) tensors are built and masked with plain ops: dynamo cannot
    # trace `out=` into a view (it would run the whole loop eagerly), and inductor fuses ReLU, the firing
    # test and its sum into one kernel. Eagerly, `out=` and in-place ops save passes and memory.
    compiling = torch.compiler.is_compiling()
    W_enc, b_dec = params["W_enc"], params["b_dec"]
    M, n, d = W_enc.shape
    B = x.shape[0]
    mask = hp["feature_mask"]  # [M, n]
    centre = b_dec * hp["use_b_dec"].view(-1, 1)  # [M, d]
    d_aug = augmented_width(d)
    W_aug = augmented_encoder(params, mask, d_aug)
    # Decoder [D, 1]: the reconstruction GEMM also sums each row's codes (the L1 norm), and the
    # GEMM giving dL/dcodes also adds the L1 coefficient.
    if compiling:  # as augmented_rows
        D = rows / norms
        D_aug = F.pad(torch.cat([D, torch.ones_like(D[..., :1])], -1), (0, d_aug - d - 1))
    else:
        D_aug = rows.new_zeros(M, n, d_aug)
        torch.div(rows, norms, out=D_aug[..., :d])
        D_aug[..., d] = 1.0
        D = D_aug[..., :d]
    centre_aug = F.pad(centre, (0, d_aug - d)).unsqueeze(1).to(dtype)  # [M, 1, d_aug]: no bias on the L1 column
    W_aug, D_operand = W_aug.to(dtype), D_aug.to(dtype)

    g_W_aug: torch.Tensor | None = None
    g_D_aug: torch.Tensor | None = None
    g_xhat_sum = torch.zeros_like(b_dec)  # [M, d]
    squared_error = x.new_zeros(M)
    code_sum = x.new_zeros(M)
    fired = x.new_zeros(M, n)
    l1_column = (hp["l1"] / B).view(-1, 1)  # [M, 1]: dL/dcode from the L1 term
    mse_scale = 2.0 / (B * d)

    for rows_x in x.split(row_chunk or B):
        xc_aug = augmented_rows(rows_x, centre, d_aug, dtype)
        pre = torch.bmm(xc_aug, W_aug.transpose(1, 2))  # [M, b, n]
        if layout.k_max > 0:
            codes = topk_codes(pre, hp, layout)
        else:  # eagerly the ReLU runs in place
            codes = pre.relu() if compiling else pre.relu_()
        xhat_aug = torch.baddbmm(centre_aug, codes, D_operand).float()  # [M, b, d_aug]; column d: sum of codes
        err = xhat_aug[..., :d] - rows_x
        squared_error += err.pow(2).sum((1, 2))
        code_sum += xhat_aug[..., d].sum(1)

        g_aug = torch.zeros_like(xhat_aug)  # [dL/dx_hat, l1/B, 0...]
        if compiling:
            g_aug[..., :d] = err * mse_scale
        else:
            torch.mul(err, mse_scale, out=g_aug[..., :d])
        g_aug[..., d] = l1_column
        g_operand = g_aug.to(dtype)
        if compiling:
            fire = codes > 0
            fired += fire.sum(1, dtype=torch.float32)
            g_pre = torch.where(fire, torch.bmm(g_operand, D_operand.transpose(1, 2)), 0.0)
        else:
            # Firing counts through a 0/1 tile: summing a bool tensor widens it to int64 first
            # (a copy at 8 bytes per element: ~7x slower on CPU, ~2x on an H100); the tile's
            # memory then takes dL/dcodes.
            tile = torch.gt(codes, 0, out=torch.empty_like(codes))
            fired += tile.sum(1, dtype=torch.float32)
            g_pre = torch.bmm(g_operand, D_operand.transpose(1, 2), out=tile)
            torch.ops.aten.threshold_backward(g_pre, codes, 0.0, grad_input=g_pre)  # ReLU/top-k mask, in place
        g_D_aug = _accumulate(g_D_aug, codes.transpose(1, 2), g_operand)
        g_W_aug = _accumulate(g_W_aug, g_pre.transpose(1, 2), xc_aug)
        g_xhat_sum += g_aug[..., :d].sum(1)

    assert g_W_aug is not None and g_D_aug is not None  # x has at least one row
    return D, Sums(g_D_aug[..., :d], g_W_aug[..., :d], g_W_aug[..., d], g_xhat_sum, squared_error, code_sum, fired)


class Sums(NamedTuple):
    """What the per-chunk loop accumulates over the batch's rows (every kernel fills the same)."""

    g_D: torch.Tensor  # [M, n, d] dL/d(unit-norm decoder rows)
    g_W_enc: torch.Tensor  # [M, n, d] dL/dW_enc through the encoder GEMM
    g_pre_sum: torch.Tensor  # [M, n] dL/dpre summed over rows (= the encoder-bias gradient)
    g_xhat_sum: torch.Tensor  # [M, d] dL/dx_hat summed over rows
    squared_error: torch.Tensor  # [M]
    code_sum: torch.Tensor  # [M] sum of all codes (the L1 norm times B)
    fired: torch.Tensor  # [M, n] rows in which each feature fired


def finish(params: Params, hp: Hparams, layout: Layout, D: torch.Tensor, norms: torch.Tensor, sums: Sums, B: int) -> tuple[Params, dict[str, torch.Tensor]]:
    """The per-parameter gradients and aux stats from the accumulated sums."""
    W_enc, b_enc = params["W_enc"], params["b_enc"]
    d = W_enc.shape[-1]
    mask = hp["feature_mask"]
    # Through the row normalisation D = rows / |rows|: project out the radial part.
    if native_path(D.device.type) and native.fits(sums.g_D, D, norms):  # not the augmented paths' strided views
        g_rows = sums.g_D  # the accumulated sum is ours: one C pass, in place
        native.normalise_backward_(g_rows, D, norms)
    else:
        radial = torch.linalg.vecdot(sums.g_D, D).unsqueeze(-1)  # [M, n, 1]
        g_rows = torch.addcmul(sums.g_D, D, radial, value=-1).div_(norms)  # three passes over [M, n, d] instead of five
    g_W_enc = sums.g_W_enc.contiguous()  # a view into the augmented gradient: own it before adding
    if layout.all_tied:
        g_W_enc += g_rows
        g_W_dec = torch.zeros_like(params["W_dec"])
    elif layout.any_tied:
        tied = hp["tied"].view(-1, 1, 1) > 0
        g_W_enc += torch.where(tied, g_rows, 0.0)
        g_W_dec = torch.where(tied, 0.0, g_rows)
    else:
        g_W_dec = g_rows

    masked_b_enc = b_enc * mask
    bias_norm = masked_b_enc.norm(dim=-1)  # [M]
    # d|b|/db = b/|b|, and 0 at b = 0 (as autograd's norm backward).
    g_norm = torch.where(bias_norm.unsqueeze(-1) > 0, masked_b_enc / bias_norm.clamp(min=1e-30).unsqueeze(-1), 0.0) * mask
    g_b_enc = sums.g_pre_sum + hp["bias_decay"].view(-1, 1) * g_norm
    through_encoder = torch.bmm(sums.g_pre_sum.unsqueeze(1), W_enc).squeeze(1)  # [M, d]: d(x - b_dec) part
    g_b_dec = (sums.g_xhat_sum - through_encoder) * hp["use_b_dec"].view(-1, 1)

    mse = sums.squared_error / (B * d)
    l1_norm = sums.code_sum / B
    loss = mse + hp["l1"] * l1_norm + hp["bias_decay"] * bias_norm
    aux = {"loss": loss, "mse": mse, "l1_norm": l1_norm, "l0": sums.fired.sum(-1) / B, "fired": sums.fired}
    return {"W_enc": g_W_enc, "b_enc": g_b_enc, "W_dec": g_W_dec, "b_dec": g_b_dec}, aux


def _accumulate(total: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """total + a @ b, batched, in float32; the first chunk's product is the total (no zero-fill pass)."""
    if total is None:
        return torch.bmm(a, b).float()
    return total.baddbmm_(a, b) if a.dtype == total.dtype else total.add_(torch.bmm(a, b))
