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
  or torch ops under torch.compile (which fuses each pass into one kernel). Eagerly off the C
  path (CUDA without compile, no C compiler) the torch ops would make a pass per step, so
  there the bias and the L1 term ride in augmented GEMMs instead (augmented.py). The
  autotuner times the choices that apply (autotune.py);
- a chunk holds two [M, b, n] tensors at a time, the codes and dL/dcodes (plus top-k's own
  when k > 0);
- the b_dec gradient through the encoder is a GEMV, (sum_rows dL/dpre) @ W_enc, not
  the [B, d] GEMM that autograd runs for d(x - b_dec);
- rows are processed in chunks of `row_chunk` with gradients accumulated, so on CPU an
  [M, chunk, n] tile stays in cache (and the same loop gives micro-batching for free);
- transcoders (common.py) run the same loop: the input is centred by zero, the error is taken
  against the target columns, and a skip transcoder's x @ W_skip^T rides in the decoder GEMM's
  addend, its gradient one more GEMM at d columns.

Shapes: M members, B rows, d = d_in, o = the output's width (d; a transcoder's d_out), n = padded dict size.
"""

from __future__ import annotations

import torch

from sae_ensemble.kernels import augmented, native
from sae_ensemble.kernels.common import (
    PAD_BIAS,
    Sums,
    accumulate,
    centres,
    decoder_rows,
    finish,
    native_path,
    topk_codes,
)
from sae_ensemble.sae import Hparams, Layout, Params, split

PASSES = ("c", "torch", "transposed", "augmented")
"""Where `grads` does the work between its GEMMs (docs/kernels.md): `c`, kernels/native.py's two passes
(CPU, float32, eager); `torch`, the same two passes as torch ops (which torch.compile fuses into a
kernel each); `transposed`, `torch`'s passes on feature-major [M, n, b] tiles, so four of the five
GEMMs read K-major operands; `augmented`, the bias and the L1 term in augmented GEMMs and fewer torch
ops (the eager default off the C path)."""


def grads(
    params: Params,
    hp: Hparams,
    x: torch.Tensor,
    layout: Layout,
    row_chunk: int | None = None,
    dtype: torch.dtype = torch.float32,
    passes: str | None = None,
) -> tuple[Params, dict[str, torch.Tensor]]:
    """(gradients, aux) of every member's loss on x [B, d] (transcoders: [x | y]), equal to the vmapped autograd
    reference.

    `dtype`: of the GEMM operands and the [M, b, n] tensors. bfloat16 (CUDA) is what autocast
    gives the reference: half the bytes per pass and twice the GEMM rate; the gradients are
    accumulated, and the loss, the normalisation and Adam computed, in float32.
    `passes`: one of PASSES (`applicable_passes` says which apply); None takes `default_passes`'s.
    """
    passes = passes or default_passes(x.device.type, dtype)
    applicable = applicable_passes(x.device, dtype)
    if passes not in applicable:
        raise ValueError(
            f"passes={passes!r} does not run here ({x.device.type}, {dtype}); allowed: {', '.join(applicable)}"
        )
    rows = decoder_rows(params, hp, layout)
    norms = rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # F.normalize's eps
    if passes == "augmented":
        D, sums = augmented.sums(params, hp, x, layout, row_chunk, dtype, rows, norms)
    else:
        D = rows / norms
        if passes == "transposed":
            sums = _transposed_sums(params, hp, x, layout, row_chunk, D, dtype)
        else:
            sums = _direct_sums(params, hp, x, layout, row_chunk, D, dtype, passes)
    return finish(params, hp, layout, D, norms, sums, x.shape[0])


def default_passes(device_type: str, dtype: torch.dtype = torch.float32) -> str:
    """`c` where it runs; `torch` under torch.compile, where inductor fuses the bias, the L1 term and the
    row sums into the two passes, so the GEMMs run at d columns; `augmented` eagerly elsewhere (CUDA
    without compile, a CPU without a compiler), where the torch ops would make a pass for each."""
    if native_path(device_type, dtype):
        return "c"
    return "torch" if torch.compiler.is_compiling() else "augmented"


def applicable_passes(device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    """The PASSES that run for this device and dtype: `c` only where kernels/native.py's C runs."""
    return tuple(p for p in PASSES if p != "c" or native_path(device.type, dtype))


def _direct_sums(
    params: Params,
    hp: Hparams,
    x: torch.Tensor,
    layout: Layout,
    row_chunk: int | None,
    D: torch.Tensor,
    dtype: torch.dtype,
    passes: str,
) -> Sums:
    """The chunk loop with the GEMMs at d columns and two passes over each [M, b, n] code tile.

    The first pass adds the encoder bias, applies ReLU (or top-k) and sums each feature's firings
    and codes; the second masks dL/dcodes, adds the L1 term and sums the encoder-bias gradient.
    `passes` says where they run (PASSES).
    """
    W_enc, b_dec = params["W_enc"], params["b_dec"]
    M, n, d = W_enc.shape
    B, o = x.shape[0], b_dec.shape[-1]
    centre_in, out_bias = (c.unsqueeze(1) for c in centres(params, hp, layout))  # [M, 1, d], [M, 1, o]
    bias = (params["b_enc"] - (1.0 - hp["feature_mask"]) * PAD_BIAS).contiguous()  # [M, n]
    l1_grad = (hp["l1"] / B).float().contiguous()  # [M]: dL/dcode from the L1 term
    mse_scale = 2.0 / (B * o)
    W_operand, D_operand, bias_operand = W_enc.to(dtype), D.to(dtype), out_bias.to(dtype)  # no copies in float32
    skip_operand = params["W_skip"].mT.to(dtype) if layout.skip else None  # [M, d, o]
    g_D: torch.Tensor | None = None
    g_W_enc: torch.Tensor | None = None
    g_W_skip: torch.Tensor | None = None
    g_pre_sum, fired, code_total, g_xhat_sum, squared_error = _zero_sums(x, b_dec, n)
    for rows_x in x.split(row_chunk or B):
        inputs, target = split(rows_x, layout)
        centred = (inputs.unsqueeze(0) - centre_in).to(dtype)  # [M, b, d]
        codes = _encode(centred, W_operand, bias, fired, code_total, hp, layout, passes)
        addend = bias_operand if skip_operand is None else torch.baddbmm(bias_operand, centred, skip_operand)
        x_hat = torch.baddbmm(addend, codes, D_operand).float()  # [M, b, o]
        g_xhat = _error(x_hat, target, mse_scale, squared_error, g_xhat_sum, passes)  # dL/dx_hat
        g_operand = g_xhat.to(dtype)
        g_pre = _backward(g_operand, D_operand, codes, l1_grad, g_pre_sum, passes)
        g_D = accumulate(g_D, codes.transpose(1, 2), g_operand)
        g_W_enc = accumulate(g_W_enc, g_pre.transpose(1, 2), centred)
        if skip_operand is not None:
            g_W_skip = accumulate(g_W_skip, g_operand.transpose(1, 2), centred)
    assert g_W_enc is not None and g_D is not None  # x has at least one row
    return Sums(g_D, g_W_enc, g_pre_sum, g_xhat_sum, squared_error, code_total.sum(-1), fired, g_W_skip)


def _zero_sums(x: torch.Tensor, b_dec: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """The row loops' accumulators: g_pre_sum, fired, code_total [M, n], g_xhat_sum [M, o], squared_error [M]."""
    M = b_dec.shape[0]
    return x.new_zeros(M, n), x.new_zeros(M, n), x.new_zeros(M, n), torch.zeros_like(b_dec), x.new_zeros(M)


def _transposed_sums(
    params: Params,
    hp: Hparams,
    x: torch.Tensor,
    layout: Layout,
    row_chunk: int | None,
    D: torch.Tensor,
    dtype: torch.dtype,
) -> Sums:
    """`_direct_sums` with `torch`'s passes on feature-major tiles: codes and dL/dpre are [M, n, b].

    Hopper's TF32 tensor-core instructions read only K-major operands (the summed axis contiguous in
    memory). Row-major [M, b, n] tiles are M- or N-major in both weight-gradient GEMMs, which the
    sum over rows makes K = b: cuBLAS runs them well below the GEMM peak, and at the peak from K-major
    copies (benchmarks.gemms, docs/benchmarks.md). Feature-major tiles are K-major there, and the encoder
    and dL/dcodes GEMMs produce them from K-major operands as before. Only the decoder reads one
    N-major operand (the codes, summed over n). The [M, d, b] and [M, b, d] copies of x - b_dec and
    of g are small (d columns, not n). In float32, the target enters as the decoder GEMM's addend: reading it
    transposed inside the two reductions over err would cost as much again as the GEMMs saved (docs/kernels.md).
    """
    W_enc, b_dec = params["W_enc"], params["b_dec"]
    M, n, d = W_enc.shape
    B, o = x.shape[0], b_dec.shape[-1]
    centre_in, out_bias = (c.unsqueeze(-1) for c in centres(params, hp, layout))  # [M, d, 1], [M, o, 1]
    bias = (params["b_enc"] - (1.0 - hp["feature_mask"]) * PAD_BIAS).unsqueeze(-1)  # [M, n, 1]
    l1_grad = (hp["l1"] / B).float().view(-1, 1, 1)  # [M, 1, 1]: dL/dcode from the L1 term
    mse_scale = 2.0 / (B * o)
    W_operand, D_operand, bias_operand = W_enc.to(dtype), D.to(dtype), out_bias.to(dtype)
    skip_operand = params["W_skip"].to(dtype) if layout.skip else None  # [M, o, d]
    D_t = D_operand.mT.contiguous()  # [M, o, n]: the decoder's weights K-major
    g_D: torch.Tensor | None = None
    g_W_enc: torch.Tensor | None = None
    g_W_skip: torch.Tensor | None = None
    g_pre_sum, fired, code_total, g_xhat_sum, squared_error = _zero_sums(x, b_dec, n)
    for rows_x in x.split(row_chunk or B):
        inputs, target = split(rows_x, layout)
        centred = (inputs.unsqueeze(0) - centre_in.mT).to(dtype)  # [M, b, d]
        centred_t = centred.mT.contiguous()  # [M, d, b]
        biased = torch.bmm(W_operand, centred.mT).float() + bias  # [M, n, b], float32 as in _encode
        # top-k ranks within each row (over n): on the [M, b, n] view; zeros_like keeps the layout.
        codes = topk_codes(biased.mT, hp, layout).mT if layout.k_max > 0 else biased.relu()
        fired += (codes > 0).sum(-1, dtype=torch.float32)
        code_total += codes.sum(-1)
        codes = codes.to(dtype)
        if dtype == torch.float32:  # the target rides in the GEMM's addend, so the passes below read err contiguously
            addend = out_bias - target.T
            if skip_operand is not None:
                addend = torch.baddbmm(addend, skip_operand, centred_t)
            err = torch.baddbmm(addend, D_t, codes)  # x_hat - target [M, o, b]
        else:  # a bf16 addend would round the target: subtract it in float32
            addend = bias_operand if skip_operand is None else torch.baddbmm(bias_operand, skip_operand, centred_t)
            err = torch.baddbmm(addend, D_t, codes).float().sub_(target.T)
        squared_error += torch.linalg.vecdot(err.flatten(1), err.flatten(1))
        g_xhat = err.mul_(mse_scale)  # dL/dx_hat, as err
        g_xhat_sum += g_xhat.sum(-1)
        g_operand = g_xhat.to(dtype)
        # g [M, b, d] and g^T [M, d, b]: K-major partners of the dL/dcodes and dL/dD GEMMs
        g_rows, g_cols = g_operand.mT.contiguous(), g_operand
        g_codes = torch.bmm(D_operand, g_rows.mT)  # [M, n, b]
        g_pre = torch.where(codes <= 0, 0.0, g_codes.float() + l1_grad)
        g_pre_sum += g_pre.sum(-1)
        g_pre = g_pre.to(dtype)
        g_D = accumulate(g_D, codes, g_cols.mT)
        g_W_enc = accumulate(g_W_enc, g_pre, centred_t.mT)
        if skip_operand is not None:
            g_W_skip = accumulate(g_W_skip, g_cols, centred_t.mT)
    assert g_W_enc is not None and g_D is not None  # x has at least one row
    return Sums(g_D, g_W_enc, g_pre_sum, g_xhat_sum, squared_error, code_total.sum(-1), fired, g_W_skip)


def _encode(
    centred: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor,
    fired: torch.Tensor,
    total: torch.Tensor,
    hp: Hparams,
    layout: Layout,
    passes: str,
) -> torch.Tensor:
    """Codes [M, b, n] in centred's dtype from centred [M, b, d] @ W [M, n, d]^T: bias [M, n] added, ReLU (or
    each topk member's top k), and each feature's firing count and code sum over the rows added to
    fired, total [M, n]."""
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


def _error(
    x_hat: torch.Tensor, target: torch.Tensor, scale: float, squared: torch.Tensor, g_sum: torch.Tensor, passes: str
) -> torch.Tensor:
    """dL/dx_hat = (x_hat - target) * scale [M, b, o] (in place on x_hat, float32); each member's squared error
    added to squared [M], and the result's sum over the rows to g_sum [M, o] (the decoder-bias gradient)."""
    if passes == "c":
        native.error_pass_(x_hat, target, scale, squared, g_sum)
        return x_hat
    err = x_hat.sub_(target)
    squared += torch.linalg.vecdot(err.flatten(1), err.flatten(1))
    g_xhat = err.mul_(scale)
    g_sum += g_xhat.sum(1)
    return g_xhat


def _backward(
    g_xhat: torch.Tensor, D: torch.Tensor, codes: torch.Tensor, add: torch.Tensor, g_sum: torch.Tensor, passes: str
) -> torch.Tensor:
    """dL/dpre [M, b, n] in g_xhat's dtype from dL/dcodes = g_xhat [M, b, d] @ D [M, n, d]^T: plus add [M] (the
    L1 term) where the code fired, 0 where it did not (threshold_backward's test: a NaN code passes);
    each feature's sum over the rows is added to g_sum [M, n] (the encoder-bias gradient)."""
    g = torch.bmm(g_xhat, D.transpose(1, 2))
    if passes == "c":  # in place
        native.relu_backward_(g, codes, add, g_sum)
        return g
    g_pre = torch.where(codes <= 0, 0.0, g.float() + add.view(-1, 1, 1))
    g_sum += g_pre.sum(1)
    return g_pre.to(g_xhat.dtype)
