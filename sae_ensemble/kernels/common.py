"""What every hand-written gradient (dense.py, augmented.py, sparse.py) shares: the decoder rows, top-k codes,
the sums a row loop accumulates, and the gradients and aux stats `finish` makes of them.

Transcoders (sae.py; layout.target_at > 0): a batch row is [x | y]. The encoder reads x uncentred and b_dec is
the output's bias alone, so `centres` gives a zero input centre; the error is y_hat - y at o = d_out columns, and
skip transcoders add x @ W_skip^T to y_hat (their gradient, g_xhat^T x, is Sums.g_W_skip).

Shapes: M members, B rows, d = d_in, o = the output's width (d; a transcoder's d_out), n = padded dict size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sae_ensemble.kernels import native
from sae_ensemble.sae import Hparams, Layout, Params

PAD_BIAS = 1e30  # as sae.encode: padded features never fire


def decoder_rows(params: Params, hp: Hparams, layout: Layout) -> torch.Tensor:
    """[M, n, d] rows that normalise into each member's dictionary (W_enc's for tied members)."""
    if layout.all_tied:
        return params["W_enc"]
    if layout.any_tied:
        return torch.where(hp["tied"].view(-1, 1, 1) > 0, params["W_enc"], params["W_dec"])
    return params["W_dec"]


def centres(params: Params, hp: Hparams, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(the encoder input's centre [M, d], the output's bias [M, o]): b_dec * use_b_dec twice for SAEs; zeros and
    b_dec * use_b_dec for transcoders, whose input is not centred (x - 0 is x exactly, so the loops need no branch)."""
    out_bias = params["b_dec"] * hp["use_b_dec"].view(-1, 1)
    if not layout.target_at:
        return out_bias, out_bias
    W_enc = params["W_enc"]
    return W_enc.new_zeros(W_enc.shape[0], W_enc.shape[-1]), out_bias


def row_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k) along the last dimension: kernels/native.py's C where it runs and k is small against the
    width (3.5x faster on 2 cores at k=16 of 1024; docs/benchmarks.md). Its choice among tied values may differ
    from torch's, which is unspecified."""
    if 8 * k <= x.shape[-1] and native_path(x.device.type, x.dtype) and native.fits(x):
        return native.topk_rows(x, k)
    return torch.topk(x, k, dim=-1)


def topk_codes(pre: torch.Tensor, hp: Hparams, layout: Layout) -> torch.Tensor:
    """Codes [M, B, n]: each topk member keeps exactly its k largest ReLU'd pre-activations per row."""
    values, indices = row_topk(pre, layout.k_max)  # [M, B, k_max], largest first
    rank_kept = torch.arange(layout.k_max, device=pre.device) < hp["k"].view(-1, 1, 1)  # [M, 1, k_max]
    kept = torch.zeros_like(pre).scatter_(-1, indices, values.relu_() * rank_kept)
    if layout.all_topk:
        return kept
    return torch.where(hp["topk"].view(-1, 1, 1) > 0, kept, pre.relu_())


def native_path(device_type: str, dtype: torch.dtype = torch.float32) -> bool:
    """Whether `grads`'s passes are kernels/native.py's C by default (and the plan models their memory):
    eagerly, on CPU, in float32, where the C kernels built."""
    return not torch.compiler.is_compiling() and device_type == "cpu" and dtype == torch.float32 and native.available()


class Sums(NamedTuple):
    """What the per-chunk loop accumulates over the batch's rows (every kernel fills the same)."""

    g_D: torch.Tensor  # [M, n, o] dL/d(unit-norm decoder rows)
    g_W_enc: torch.Tensor  # [M, n, d] dL/dW_enc through the encoder GEMM
    g_pre_sum: torch.Tensor  # [M, n] dL/dpre summed over rows (= the encoder-bias gradient)
    g_xhat_sum: torch.Tensor  # [M, o] dL/dx_hat summed over rows
    squared_error: torch.Tensor  # [M]
    code_sum: torch.Tensor  # [M] sum of all codes (the L1 norm times B)
    fired: torch.Tensor  # [M, n] rows in which each feature fired
    g_W_skip: torch.Tensor | None = None  # [M, o, d] dL/dW_skip (skip transcoders only)
    auxk_loss: torch.Tensor | None = None  # [M] AuxK's term of the loss, coefficient included (kernels/sparse.py)


def finish(
    params: Params, hp: Hparams, layout: Layout, D: torch.Tensor, norms: torch.Tensor, sums: Sums, B: int
) -> tuple[Params, dict[str, torch.Tensor]]:
    """The per-parameter gradients and aux stats from the accumulated sums."""
    W_enc, b_enc = params["W_enc"], params["b_enc"]
    o = params["b_dec"].shape[-1]
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
    g_norm = (
        torch.where(bias_norm.unsqueeze(-1) > 0, masked_b_enc / bias_norm.clamp(min=1e-30).unsqueeze(-1), 0.0) * mask
    )
    g_b_enc = sums.g_pre_sum + hp["bias_decay"].view(-1, 1) * g_norm
    g_b_dec = sums.g_xhat_sum
    if not layout.target_at:  # an SAE's b_dec also centres the encoder's input
        through_encoder = torch.bmm(sums.g_pre_sum.unsqueeze(1), W_enc).squeeze(1)  # [M, d]: d(x - b_dec) part
        g_b_dec = g_b_dec - through_encoder
    g_b_dec = g_b_dec * hp["use_b_dec"].view(-1, 1)

    mse = sums.squared_error / (B * o)
    l1_norm = sums.code_sum / B
    loss = mse + hp["l1"] * l1_norm + hp["bias_decay"] * bias_norm
    if sums.auxk_loss is not None:
        loss = loss + sums.auxk_loss
    aux = {"loss": loss, "mse": mse, "l1_norm": l1_norm, "l0": sums.fired.sum(-1) / B, "fired": sums.fired}
    grads = {"W_enc": g_W_enc, "b_enc": g_b_enc, "W_dec": g_W_dec, "b_dec": g_b_dec}
    if layout.skip:
        grads["W_skip"] = sums.g_W_skip
    return grads, aux


def accumulate(total: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """total + a @ b, batched, in float32; the first chunk's product is the total (no zero-fill pass)."""
    if total is None:
        return torch.bmm(a, b).float()
    return total.baddbmm_(a, b) if a.dtype == total.dtype else total.add_(torch.bmm(a, b))
