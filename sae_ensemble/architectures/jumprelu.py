"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead") as pure functions of (params, hparams, batch).

Params of one member (n features, padded in an ensemble; d = d_in):
    W_enc [n, d], b_enc [n], W_dec [n, d] (unit-norm rows), b_dec [d]   as in sae.py
    log_threshold [n]   log of each feature's threshold theta (the paper trains log theta, so theta > 0)

    pre   = W_enc (x - b_dec) + b_enc
    c     = JumpReLU_theta(pre) = pre * H(pre - theta)
    x_hat = c @ normalize_rows(W_dec) + b_dec
    loss  = mean((x_hat - x)^2) + l0_coefficient * mean_rows(sum_i H(pre_i - theta_i)) + bias_decay * ||b_enc||

H has no useful derivative, so both JumpReLU and the step in the L0 term get straight-through
estimators for theta with a rectangle kernel K(u) = 1[|u| < 1/2] of width `bandwidth` (eps):
    d JumpReLU / d theta = -(theta / eps) K((pre - theta) / eps)
    d H / d theta        = -(1 / eps)     K((pre - theta) / eps)
and JumpReLU passes d/d pre = H(pre - theta) (no estimator towards pre), as the paper's eq. 11-12
and SAELens' `JumpReLU` / `Step` (sae_lens/saes/jumprelu_sae.py) define them. Unlike SAELens' sum
over the model dimension, our MSE is a mean over elements (as sae.py's), so our l0_coefficient is
SAELens' divided by d_in. SAELens now trains theta directly (its issue #494); we keep the paper's
log theta, which needs an init threshold near the scale of the pre-activations.

Transcoders (d_out > 0; Layout.target_at = d_in), as sae.py's: a batch is [x | y], pre = W_enc x + b_enc (no
input centring), y_hat = c @ D + b_dec (+ x @ W_skip.T for skip transcoders), the error against y. W_dec
[n, d_out], b_dec [d_out] (PARAMS axis "o").

Both functions are torch.autograd.Functions with `setup_context` and `generate_vmap_rule=True`,
so torch.func.grad and vmap (the ensemble's reference step) run them per member.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from sae_ensemble import sae

VARIANTS = ("jumprelu",)
PARAMS = {
    "W_enc": ("n", "d"),
    "b_enc": ("n",),
    "W_dec": ("n", "o"),
    "b_dec": ("o",),
    "W_skip": ("o", "d"),
    "log_threshold": ("n",),
}
HYPERPARAMETERS = ("l0_coefficient", "bandwidth", "bias_decay", "use_b_dec")
INIT_HYPERPARAMETERS = ("threshold", "d_out", "skip_connection")
PAD_BIAS = 1e30  # padded features get this much negative bias: they never fire and pass no gradient

Params = dict[str, torch.Tensor]
Hparams = dict[str, torch.Tensor]


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLU(torch.autograd.Function):
    """pre * H(pre - theta); gradient to theta by the rectangle-kernel estimator."""

    generate_vmap_rule = True

    @staticmethod
    def forward(pre: torch.Tensor, theta: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pre, theta, bandwidth = inputs
        ctx.save_for_backward(pre, theta, bandwidth)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        pre, theta, bandwidth = ctx.saved_tensors
        grad_pre = (pre > theta).to(pre.dtype) * grad_out
        grad_theta = (-(theta / bandwidth) * _rectangle((pre - theta) / bandwidth) * grad_out).sum_to_size(theta.shape)
        return grad_pre, grad_theta, None


class Step(torch.autograd.Function):
    """H(pre - theta); no gradient to pre, the rectangle-kernel estimator to theta."""

    generate_vmap_rule = True

    @staticmethod
    def forward(pre: torch.Tensor, theta: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pre, theta, bandwidth = inputs
        ctx.save_for_backward(pre, theta, bandwidth)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        pre, theta, bandwidth = ctx.saved_tensors
        grad_theta = (-(1.0 / bandwidth) * _rectangle((pre - theta) / bandwidth) * grad_out).sum_to_size(theta.shape)
        return None, grad_theta, None


def init_params(
    variant: str,
    d_in: int,
    dict_size: int,
    seed: int,
    n_padded: int | None = None,
    threshold: float = 0.01,
    d_out: int = 0,
    skip_connection: bool = False,
) -> Params:
    """sae.py's init (random unit decoder rows; an SAE's encoder their transpose, a transcoder's other random unit
    rows) plus log(threshold) per feature."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not a jumprelu variant")
    if threshold <= 0:
        raise ValueError(f"threshold={threshold} must be positive (its log is trained)")
    params = sae.init_params("relu", d_in, dict_size, seed, n_padded, d_out, skip_connection)
    log_threshold = torch.zeros_like(params["b_enc"])
    log_threshold[:dict_size] = math.log(threshold)
    return {**params, "log_threshold": log_threshold}


def make_hparams(
    variant: str,
    dict_size: int,
    l0_coefficient: float = 0.0,
    bandwidth: float = 0.05,
    bias_decay: float = 0.0,
    use_b_dec: bool = True,
    n_padded: int | None = None,
    layout: Layout | None = None,
) -> Hparams:
    n_padded = dict_size if n_padded is None else n_padded
    mask = torch.zeros(n_padded)
    mask[:dict_size] = 1.0
    return {
        "l0_coefficient": torch.tensor(float(l0_coefficient)),
        "bandwidth": torch.tensor(float(bandwidth)),
        "bias_decay": torch.tensor(float(bias_decay)),
        "use_b_dec": torch.tensor(float(use_b_dec)),
        "feature_mask": mask,
    }


class Layout(NamedTuple):
    """Static facts of the members sharing one vmapped call: only whether they are transcoders."""

    target_at: int = 0
    """Transcoders: the column of a batch where the target starts (= d_in); 0: SAEs (sae.Layout's)."""
    skip: bool = False
    """Skip transcoders: add the linear path x @ W_skip.T to the output."""


def layout(members) -> Layout:
    return Layout(*sae.transcoding(members))


def decoder(params: Params, hp: Hparams, layout: Layout = Layout()) -> torch.Tensor:
    """The unit-norm dictionary [n, d]."""
    return F.normalize(params["W_dec"], dim=-1)


def pre_activations(params: Params, hp: Hparams, x: torch.Tensor, layout: Layout = Layout()) -> torch.Tensor:
    """pre [B, n] of x [B, d] (transcoders: W_enc x + b_enc); padded features sit at -1e30."""
    bias = params["b_enc"] - (1.0 - hp["feature_mask"]) * PAD_BIAS
    if layout.target_at:
        return torch.addmm(bias, x, params["W_enc"].T)
    return torch.addmm(bias, x - params["b_dec"] * hp["use_b_dec"], params["W_enc"].T)


def encode(params: Params, hp: Hparams, x: torch.Tensor, layout: Layout = Layout()) -> torch.Tensor:
    """Feature activations c [B, n] of x [B, d]."""
    return JumpReLU.apply(pre_activations(params, hp, x, layout), params["log_threshold"].exp(), hp["bandwidth"])


def decode(
    params: Params, hp: Hparams, codes: torch.Tensor, layout: Layout = Layout(), x: torch.Tensor | None = None
) -> torch.Tensor:
    """Reconstruction [B, d] (transcoders: the target's prediction [B, d_out]; skip transcoders also need x)."""
    out = torch.addmm(params["b_dec"] * hp["use_b_dec"], codes, decoder(params, hp, layout))
    return out + x @ params["W_skip"].T if layout.skip else out


def loss(
    params: Params, hp: Hparams, x: torch.Tensor, layout: Layout = Layout()
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training loss of one member on x [B, d] (transcoders: [x | y]), with its parts as aux outputs."""
    x, target = sae.split(x, layout)
    pre = pre_activations(params, hp, x, layout)
    theta = params["log_threshold"].exp()
    codes = JumpReLU.apply(pre, theta, hp["bandwidth"])
    x_hat = decode(params, hp, codes, layout, x)
    mse = (x_hat - target).pow(2).mean()
    l0_estimate = Step.apply(pre, theta, hp["bandwidth"]).sum() / x.shape[0]  # equals the L0; only its gradient differs
    bias_norm = (params["b_enc"] * hp["feature_mask"]).norm()
    total = mse + hp["l0_coefficient"] * l0_estimate + hp["bias_decay"] * bias_norm
    fired = torch.sign(codes).sum(
        0, dtype=torch.float32
    )  # [n] rows in which each feature fired (codes >= 0: theta > 0)
    aux = {
        "loss": total,
        "mse": mse,
        "l1_norm": codes.sum() / x.shape[0],
        "l0": fired.sum() / x.shape[0],
        "fired": fired,
    }
    return total, aux
