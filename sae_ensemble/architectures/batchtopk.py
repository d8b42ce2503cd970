"""BatchTopK SAE (Bussmann et al. 2024) and its Matryoshka form, as pure functions of (params, hparams, batch).

Params of one member (n features, padded in an ensemble; d = d_in):
    W_enc [n, d], b_enc [n], W_dec [n, d] (unit-norm rows), b_dec [d]   as in sae.py
    threshold []   running estimate of the smallest kept activation: not trained by the loss (its
                   gradient is zero, so Adam leaves it alone); `update_state` moves it after each step

Training, on a batch of B rows:
    acts  = ReLU(W_enc (x - b_dec) + b_enc)                   [B, n]
    c     = acts where among the k * B largest of the whole batch, else 0 (per member: its own k)
    x_hat = c @ normalize_rows(W_dec) + b_dec
Inference (encode, held-out metrics, export): c = acts * (acts > threshold), one row at a time.
The threshold follows SAELens' BatchTopKTrainingSAE (sae_lens/saes/batchtopk_sae.py):
    threshold <- (1 - topk_threshold_lr) * threshold + topk_threshold_lr * min(c > 0),  from 0;
dictionary_learning's BatchTopKSAE (trainers/batch_top_k.py) keeps the same estimate (with beta = 0.999).

Matryoshka (Bussmann et al. 2025; SAELens' MatryoshkaBatchTopKTrainingSAE): the same codes, and one
reconstruction loss per nested prefix of the dictionary, `matryoshka_widths` (w_1 < w_2 < ... < n):
    loss = sum_levels mean((c[:, :w] @ D[:w] + b_dec - x)^2) + bias_decay * ||b_enc||
Learned decoder norms (Member.learned_decoder_norm; SAELens' BatchTopK trains so by default): the loss and encode
run on sae.effective's unit-row SAE, as topk members'.
AuxK (Gao et al. 2024) as for topk members (sae.auxk_loss) when auxk_dead_tokens > 0, on the whole
dictionary's residual (SAELens' default for Matryoshka too: use_matryoshka_aux_loss=False).
A BatchTopK member is the one-level case, so both variants share this module and one ensemble: levels
are right-aligned in a static count (Layout.levels); a member's unused leading levels have weight 0.
With micro-batches (plan.py, under memory pressure) the top k * B is taken per micro-batch.

Transcoders (d_out > 0; Layout.target_at = d_in), as sae.py's: a batch is [x | y], acts = ReLU(W_enc x + b_enc)
(no input centring), y_hat = c @ D + b_dec (+ x @ W_skip.T for skip transcoders), every level's error and AuxK's
residual against y. W_dec [n, d_out], b_dec [d_out] (PARAMS axis "o"); a Matryoshka transcoder's prefixes
predict y, each with the bias and the skip path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from sae_ensemble import sae
from sae_ensemble.sae import auxk_hparams, auxk_loss, auxk_size

VARIANTS = ("batchtopk", "matryoshka")
PARAMS = {
    "W_enc": ("n", "d"),
    "b_enc": ("n",),
    "W_dec": ("n", "o"),
    "b_dec": ("o",),
    "W_skip": ("o", "d"),
    "threshold": (),
}
INIT_HYPERPARAMETERS = ("d_out", "skip_connection")
HYPERPARAMETERS = (
    "k",
    "bias_decay",
    "use_b_dec",
    "topk_threshold_lr",
    "matryoshka_widths",
    "auxk_coefficient",
    "k_aux",
    "auxk_dead_tokens",
    "d_in",
    "learned_decoder_norm",
)
PAD_BIAS = 1e30

Params = dict[str, torch.Tensor]
Hparams = dict[str, torch.Tensor]


def init_params(
    variant: str,
    d_in: int,
    dict_size: int,
    seed: int,
    n_padded: int | None = None,
    d_out: int = 0,
    skip_connection: bool = False,
) -> Params:
    """sae.py's init (transcoders' too), and a threshold of 0 (no inference threshold until training has estimated
    one)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not a batchtopk variant")
    params = sae.init_params("relu", d_in, dict_size, seed, n_padded, d_out, skip_connection)
    return {**params, "threshold": torch.zeros(())}


def levels_of(variant: str, widths, dict_size: int) -> list[int]:
    """A member's level ends: its matryoshka_widths (matryoshka only) and then its whole dictionary."""
    return [*(widths if variant == "matryoshka" else ()), dict_size]


def make_hparams(
    variant: str,
    dict_size: int,
    k: float = 0,
    bias_decay: float = 0.0,
    use_b_dec: bool = True,
    topk_threshold_lr: float = 0.01,
    matryoshka_widths=(),
    n_padded: int | None = None,
    layout: Layout | None = None,
    auxk_coefficient: float = 0.0,
    k_aux: int = 0,
    auxk_dead_tokens: int = 0,
    d_in: int = 0,
    learned_decoder_norm: bool = False,
) -> Hparams:
    """Hyperparameter tensors of one member; `layout.levels` pads its level list (on the left) to an ensemble's
    count."""
    n_padded = dict_size if n_padded is None else n_padded
    ends = levels_of(variant, matryoshka_widths, dict_size)
    ends[-1] = n_padded  # the last level is the whole (padded) dictionary: padded codes are zero
    levels = len(ends) if layout is None else layout.levels
    pad = levels - len(ends)
    mask = torch.zeros(n_padded)
    mask[:dict_size] = 1.0
    return {
        **auxk_hparams(auxk_dead_tokens > 0, auxk_coefficient, auxk_size(k_aux, d_in, dict_size), n_padded),
        "k": torch.tensor(float(k)),
        "bias_decay": torch.tensor(float(bias_decay)),
        "use_b_dec": torch.tensor(float(use_b_dec)),
        "topk_threshold_lr": torch.tensor(float(topk_threshold_lr)),
        "learned_norm": torch.tensor(float(learned_decoder_norm)),
        "feature_mask": mask,
        "level_ends": torch.tensor([0.0] * pad + [float(e) for e in ends]),
        "level_weights": torch.tensor([0.0] * pad + [1.0] * len(ends)),
    }


class Layout(NamedTuple):
    """Static facts of the members sharing one vmapped call."""

    k_max: float = 1
    """Largest k of any member: the batch top-k runs with k_max * B and each member keeps its own k * B."""
    levels: int = 1
    """Most nested levels of any member (1: plain BatchTopK)."""
    k_aux: int = 0
    """Largest k_aux of any member with AuxK on (0: none, skip AuxK)."""
    target_at: int = 0
    """Transcoders: the column of a batch where the target starts (= d_in); 0: SAEs (sae.Layout's)."""
    skip: bool = False
    """Skip transcoders: add the linear path x @ W_skip.T to the output."""
    learned_norm: bool = False
    """Some member's decoder rows keep a learned norm (sae.Layout's; sae.effective reads it)."""


def layout(members) -> Layout:
    target_at, skip = sae.transcoding(members)
    return Layout(
        k_max=max(m.k for m in members),
        levels=max(len(levels_of(m.variant, m.matryoshka_widths, m.dict_size)) for m in members),
        k_aux=max((auxk_size(m.k_aux, m.d_in, m.dict_size) for m in members if m.auxk_dead_tokens > 0), default=0),
        target_at=target_at,
        skip=skip,
        learned_norm=any(m.learned_decoder_norm for m in members),
    )


def decoder(params: Params, hp: Hparams, layout: Layout = Layout()) -> torch.Tensor:
    return F.normalize(params["W_dec"], dim=-1)


def pre_activations(params: Params, hp: Hparams, x: torch.Tensor, layout: Layout = Layout()) -> torch.Tensor:
    """W_enc (x - b_dec) + b_enc [B, n] (transcoders: W_enc x + b_enc); padded features at -1e30."""
    bias = params["b_enc"] - (1.0 - hp["feature_mask"]) * PAD_BIAS
    if layout.target_at:
        return torch.addmm(bias, x, params["W_enc"].T)
    return torch.addmm(bias, x - params["b_dec"] * hp["use_b_dec"], params["W_enc"].T)


def activations(params: Params, hp: Hparams, x: torch.Tensor, layout: Layout = Layout()) -> torch.Tensor:
    """ReLU(pre_activations) [B, n]; padded features are 0."""
    return F.relu(pre_activations(params, hp, x, layout))


def batch_topk(acts: torch.Tensor, hp: Hparams, k_max: float) -> torch.Tensor:
    """acts where among the member's k * B largest of the whole batch, else 0 (exactly that many: ties by index)."""
    B = acts.shape[0]
    flat = acts.flatten()
    count = min(int(k_max * B), flat.numel())
    indices = torch.topk(flat, count).indices  # largest first
    kept = (torch.arange(count, device=acts.device) < torch.floor(hp["k"] * B)).to(acts.dtype)
    return acts * torch.zeros_like(flat).scatter(0, indices, kept).view_as(acts)


def encode(params: Params, hp: Hparams, x: torch.Tensor, layout: Layout = Layout()) -> torch.Tensor:
    """Inference codes [B, n]: activations above the member's running threshold (independent of the batch)."""
    acts = activations(sae.effective(params, hp, layout), hp, x, layout)
    return acts * (acts > params["threshold"]).to(acts.dtype)


def decode(
    params: Params, hp: Hparams, codes: torch.Tensor, layout: Layout = Layout(), x: torch.Tensor | None = None
) -> torch.Tensor:
    """Reconstruction [B, d] (transcoders: the target's prediction [B, d_out]; skip transcoders also need x)."""
    return torch.addmm(output_bias(params, hp, layout, x), codes, decoder(params, hp, layout))


def output_bias(params: Params, hp: Hparams, layout: Layout, x: torch.Tensor | None) -> torch.Tensor:
    """What the output holds before any feature: b_dec [d] (skip transcoders: b_dec + x @ W_skip.T, [B, d_out])."""
    bias = params["b_dec"] * hp["use_b_dec"]
    return bias + x @ params["W_skip"].T if layout.skip else bias


def loss(
    params: Params, hp: Hparams, x: torch.Tensor, layout: Layout = Layout()
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training loss of one member on x [B, d] (transcoders: [x | y]; batch top-k codes; nested levels for
    matryoshka), with aux outputs."""
    params = sae.effective(params, hp, layout)
    x, target = sae.split(x, layout)
    pre = pre_activations(params, hp, x, layout)
    codes = batch_topk(F.relu(pre), hp, layout.k_max)
    dictionary = decoder(params, hp, layout)
    feature = torch.arange(codes.shape[-1], device=x.device)
    x_hat, start, recon = output_bias(params, hp, layout, x), 0.0, 0.0
    for level in range(layout.levels):  # x_hat grows by one level's features at a time
        end = hp["level_ends"][level]
        in_level = ((feature >= start) & (feature < end)).to(codes.dtype)
        x_hat = x_hat + (codes * in_level) @ dictionary
        mse = (x_hat - target).pow(2).mean()
        recon = recon + hp["level_weights"][level] * mse
        start = end
    bias_norm = (params["b_enc"] * hp["feature_mask"]).norm()
    total = recon + hp["bias_decay"] * bias_norm
    if layout.k_aux > 0:  # the whole dictionary's residual: x_hat after the last level
        total = total + hp["auxk_coefficient"] * auxk_loss(pre, target - x_hat, dictionary, hp, layout.k_aux)
    fired = torch.sign(codes).sum(0, dtype=torch.float32)
    smallest_kept = torch.where(codes > 0, codes, torch.inf).min().detach()  # inf when nothing fired
    aux = {
        "loss": total,
        "mse": mse,
        "l1_norm": codes.sum() / x.shape[0],
        "l0": fired.sum() / x.shape[0],
        "fired": fired,
        "min_kept": smallest_kept,
    }
    return total, aux


def update_state(params: Params, hp: Hparams, aux: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The threshold after a step (elementwise: one member's tensors or the stacked [M] ones)."""
    rate, old = hp["topk_threshold_lr"], params["threshold"]
    seen = torch.isfinite(aux["min_kept"])
    return {"threshold": torch.where(seen, (1 - rate) * old + rate * torch.where(seen, aux["min_kept"], 0.0), old)}
