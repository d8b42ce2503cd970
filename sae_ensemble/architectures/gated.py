"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs") as pure functions.

Params of one member (n features, padded in an ensemble; d = d_in), named as SAELens' GatedSAE:
    W_enc [n, d]   shared encoder rows of both paths
    b_gate [n]     gate-path bias
    r_mag [n]      magnitude-path rescaling: W_mag = exp(r_mag) * W_enc (row-wise)
    b_mag [n]      magnitude-path bias
    W_dec [n, d] (unit-norm rows), b_dec [d]   as in sae.py

    pi_gate = W_enc (x - b_dec) + b_gate           pi_mag = exp(r_mag) * (W_enc (x - b_dec)) + b_mag
    c       = H(pi_gate) * ReLU(pi_mag)            x_hat  = c @ normalize_rows(W_dec) + b_dec
    loss    = mean((x_hat - x)^2)                                     reconstruction
            + l1 * mean_rows(sum ReLU(pi_gate))                       sparsity, on the gate path only
            + mean((ReLU(pi_gate) @ sg(D) + sg(b_dec) - x)^2)        auxiliary, through a frozen decoder
            + bias_decay * ||b_gate||
H passes no gradient, so the gate path learns from the sparsity and auxiliary terms alone (paper eq. 8;
SAELens' GatedTrainingSAE.calculate_aux_loss; dictionary_learning's trainers/gdm.py). sg = stop-gradient.
As in sae.py our MSEs are means over elements (SAELens: sum over d), and decoder rows are unit norm,
so the paper's ||W_dec|| weights in the sparsity term are 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from sae_ensemble import sae

VARIANTS = ("gated",)
PARAMS = {"W_enc": ("n", "d"), "b_gate": ("n",), "r_mag": ("n",), "b_mag": ("n",), "W_dec": ("n", "d"), "b_dec": ("d",)}
HYPERPARAMETERS = ("l1", "bias_decay", "use_b_dec")
PAD_BIAS = 1e30

Params = dict[str, torch.Tensor]
Hparams = dict[str, torch.Tensor]


def init_params(variant: str, d_in: int, dict_size: int, seed: int, n_padded: int | None = None) -> Params:
    """sae.py's init for W_enc and W_dec; b_gate, r_mag and b_mag zero (as SAELens)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not a gated variant")
    base = sae.init_params("relu", d_in, dict_size, seed, n_padded)
    zeros = base.pop("b_enc")
    return {
        "W_enc": base["W_enc"],
        "b_gate": zeros,
        "r_mag": zeros.clone(),
        "b_mag": zeros.clone(),
        "W_dec": base["W_dec"],
        "b_dec": base["b_dec"],
    }


def make_hparams(
    variant: str,
    dict_size: int,
    l1: float = 0.0,
    bias_decay: float = 0.0,
    use_b_dec: bool = True,
    n_padded: int | None = None,
    layout: Layout | None = None,
) -> Hparams:
    n_padded = dict_size if n_padded is None else n_padded
    mask = torch.zeros(n_padded)
    mask[:dict_size] = 1.0
    return {
        "l1": torch.tensor(float(l1)),
        "bias_decay": torch.tensor(float(bias_decay)),
        "use_b_dec": torch.tensor(float(use_b_dec)),
        "feature_mask": mask,
    }


class Layout(NamedTuple):
    """Gated members need no static choices; the type keeps the interface uniform."""


def layout(members) -> Layout:
    return Layout()


def decoder(params: Params, hp: Hparams, layout: Layout = Layout()) -> torch.Tensor:
    return F.normalize(params["W_dec"], dim=-1)


def gate_and_magnitude(params: Params, hp: Hparams, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pi_gate, pi_mag) [B, n] of x [B, d]; padded features' gates sit at -1e30 (never open)."""
    projected = (x - params["b_dec"] * hp["use_b_dec"]) @ params["W_enc"].T  # one GEMM serves both paths
    pi_gate = projected + params["b_gate"] - (1.0 - hp["feature_mask"]) * PAD_BIAS
    pi_mag = projected * params["r_mag"].exp() + params["b_mag"]
    return pi_gate, pi_mag


def encode(params: Params, hp: Hparams, x: torch.Tensor, layout: Layout = Layout()) -> torch.Tensor:
    pi_gate, pi_mag = gate_and_magnitude(params, hp, x)
    return (pi_gate > 0).to(x.dtype) * F.relu(pi_mag)


def decode(params: Params, hp: Hparams, codes: torch.Tensor, layout: Layout = Layout()) -> torch.Tensor:
    return torch.addmm(params["b_dec"] * hp["use_b_dec"], codes, decoder(params, hp, layout))


def loss(
    params: Params, hp: Hparams, x: torch.Tensor, layout: Layout = Layout()
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training loss of one member on x [B, d], with its parts as aux outputs."""
    pi_gate, pi_mag = gate_and_magnitude(params, hp, x)
    gate_acts = F.relu(pi_gate)
    codes = (pi_gate > 0).to(x.dtype) * F.relu(pi_mag)
    dictionary = decoder(params, hp, layout)
    b_dec = params["b_dec"] * hp["use_b_dec"]
    mse = (torch.addmm(b_dec, codes, dictionary) - x).pow(2).mean()
    gate_l1 = gate_acts.sum() / x.shape[0]
    via_gate = torch.addmm(b_dec.detach(), gate_acts, dictionary.detach())
    aux_mse = (via_gate - x).pow(2).mean()
    bias_norm = (params["b_gate"] * hp["feature_mask"]).norm()
    total = mse + hp["l1"] * gate_l1 + aux_mse + hp["bias_decay"] * bias_norm
    fired = torch.sign(codes).sum(0, dtype=torch.float32)
    aux = {
        "loss": total,
        "mse": mse,
        "l1_norm": codes.sum() / x.shape[0],
        "l0": fired.sum() / x.shape[0],
        "fired": fired,
        "aux_mse": aux_mse,
    }
    return total, aux
