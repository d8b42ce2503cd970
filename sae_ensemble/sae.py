"""One sparse autoencoder as pure functions of (params, hparams, batch).

No module state: `params` and `hparams` are dicts of tensors, so the same
functions run one SAE alone or N of them under `torch.func.vmap` (ensemble.py).
Every hyperparameter that may differ between members is a tensor in `hparams`,
never a Python value closed over, so one vmapped function serves the whole grid.

Params of one member (n = features, padded in an ensemble; d = d_in):
    W_enc [n, d]  encoder rows
    b_enc [n]     encoder bias
    W_dec [n, d]  decoder rows, unit norm (unused by tied members)
    b_dec [d]     decoder bias = pre-encoder centring (multiplied by `use_b_dec`)

Hparams of one member (0-d tensors unless noted):
    l1, bias_decay     loss coefficients (l1 is 0 for topk members)
    k                  active features per row for topk members (float-valued count)
    tied, topk         variant flags (1.0 / 0.0)
    use_b_dec          1.0 to learn a decoder bias, 0.0 to hold it at zero
    feature_mask [n]   1.0 for real features, 0.0 for padding up to the ensemble's size

Variants (the seeds' formulation):
    relu  c = ReLU(W_enc (x - b_dec) + b_enc),  x_hat = c @ W_dec + b_dec
    tied  the same with W_dec = normalize_rows(W_enc)
    topk  ReLU, then keep the k largest pre-activations per row; no L1 term
loss = mean((x_hat - x)^2) + l1 * mean_rows(sum |c|) + bias_decay * ||b_enc||_2

Decoder rows are unit norm by construction: `decoder()` divides each row by its
norm in the forward pass (so the loss cannot shrink the dictionary to cheat the
L1 term), and the ensemble rescales stored rows to unit norm after every step,
so a saved W_dec is exactly the dictionary the SAE used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

VARIANTS = ("relu", "tied", "topk")

Params = dict[str, torch.Tensor]
Hparams = dict[str, torch.Tensor]


def init_params(variant: str, d_in: int, dict_size: int, seed: int, n_padded: int | None = None) -> Params:
    """Initial params of one member, generated on CPU from `seed` alone.

    Features beyond `dict_size` (up to `n_padded`) are zero, so they never fire
    and, with zero gradient, never move.  Decoder rows start as random unit
    vectors and the encoder starts as their transpose, the usual SAE init.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown SAE variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    n_padded = dict_size if n_padded is None else n_padded
    if n_padded < dict_size:
        raise ValueError(f"n_padded={n_padded} is smaller than dict_size={dict_size}")
    generator = torch.Generator().manual_seed(seed)
    rows = F.normalize(torch.randn(dict_size, d_in, generator=generator), dim=-1)
    W_dec = torch.zeros(n_padded, d_in)
    W_dec[:dict_size] = rows
    return {
        "W_enc": W_dec.clone(),
        "b_enc": torch.zeros(n_padded),
        "W_dec": W_dec,
        "b_dec": torch.zeros(d_in),
    }


def make_hparams(
    variant: str,
    dict_size: int,
    l1: float = 0.0,
    bias_decay: float = 0.0,
    k: int = 0,
    use_b_dec: bool = True,
    n_padded: int | None = None,
) -> Hparams:
    """Hyperparameter tensors of one member (see the module docstring)."""
    n_padded = dict_size if n_padded is None else n_padded
    mask = torch.zeros(n_padded)
    mask[:dict_size] = 1.0
    return {
        "l1": torch.tensor(0.0 if variant == "topk" else float(l1)),
        "bias_decay": torch.tensor(float(bias_decay)),
        "k": torch.tensor(float(k if variant == "topk" else 0)),
        "tied": torch.tensor(float(variant == "tied")),
        "topk": torch.tensor(float(variant == "topk")),
        "use_b_dec": torch.tensor(float(use_b_dec)),
        "feature_mask": mask,
    }


def decoder(params: Params, hp: Hparams) -> torch.Tensor:
    """The unit-norm dictionary [n, d]: W_enc's rows for tied members, W_dec's otherwise."""
    rows = torch.where(hp["tied"] > 0, params["W_enc"], params["W_dec"])
    return F.normalize(rows, dim=-1)


def encode(params: Params, hp: Hparams, x: torch.Tensor, k_max: int = 0) -> torch.Tensor:
    """Feature activations c [B, n] of x [B, d].

    `k_max` is the largest k among topk members in the ensemble (0 if none): a
    static size, so topk runs with one shape for all members; each member then
    keeps only pre-activations at or above its own k-th largest value.
    """
    b_dec = params["b_dec"] * hp["use_b_dec"]
    pre = (x - b_dec) @ params["W_enc"].T + params["b_enc"]  # [B, n]
    mask = hp["feature_mask"]
    codes = F.relu(pre) * mask
    if k_max > 0:
        masked_pre = torch.where(mask > 0, pre, torch.finfo(pre.dtype).min)
        top_values = torch.topk(masked_pre, k_max, dim=-1).values  # [B, k_max]
        kth = top_values.gather(-1, (hp["k"].clamp(min=1) - 1).long().expand(pre.shape[0], 1))  # [B, 1]
        keep = torch.where(hp["topk"] > 0, (masked_pre >= kth).to(pre.dtype), 1.0)
        codes = codes * keep
    return codes


def decode(params: Params, hp: Hparams, codes: torch.Tensor) -> torch.Tensor:
    """Reconstruction x_hat [B, d] from activations [B, n]."""
    return codes @ decoder(params, hp) + params["b_dec"] * hp["use_b_dec"]


def loss(params: Params, hp: Hparams, x: torch.Tensor, k_max: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training loss of one member on x [B, d], with its parts as aux outputs."""
    codes = encode(params, hp, x, k_max)
    x_hat = decode(params, hp, codes)
    mse = (x_hat - x).pow(2).mean()
    l1_norm = codes.abs().sum(-1).mean()
    bias_norm = (params["b_enc"] * hp["feature_mask"]).norm()
    total = mse + hp["l1"] * l1_norm + hp["bias_decay"] * bias_norm
    l0 = (codes > 0).to(x.dtype).sum(-1).mean()
    return total, {"loss": total, "mse": mse, "l1_norm": l1_norm, "l0": l0}
