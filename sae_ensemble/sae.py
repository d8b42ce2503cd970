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
    topk  ReLU, then keep the k largest pre-activations per row (exactly k: ties broken by index); no L1 term
loss = mean((x_hat - x)^2) + l1 * mean_rows(sum |c|) + bias_decay * ||b_enc||_2
     + auxk_coefficient * AuxK   (topk members with auxk_dead_tokens > 0; see `auxk_loss`)

Transcoders (relu, topk members with d_out > 0; Layout.target_at = d_in): a batch is [x | y], the input x
[B, d_in] and the target y [B, d_out]. c = ReLU(W_enc x + b_enc) (no input centring: b_dec [d_out] is the
output's bias, as SAELens' transcoders), y_hat = c @ W_dec + b_dec (+ x @ W_skip.T for skip transcoders,
W_skip [d_out, d_in] starting at zero), and the loss's error term is mean((y_hat - y)^2).

AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", sec. A.2): the k_aux largest
pre-activations of dead features (hparam `dead` [n], set each step by the ensemble from the rows
since each feature last fired) reconstruct the main reconstruction's residual; the term is scaled
by min(n_dead / k_aux, 1) as SAELens' TopKTrainingSAE.calculate_topk_aux_loss does.

Decoder rows are unit norm by construction: `decoder()` divides each row by its
norm in the forward pass (so the loss cannot shrink the dictionary to cheat the
L1 term), and the ensemble rescales stored rows to unit norm after every step,
so a saved W_dec is exactly the dictionary the SAE used. A learned-norm topk member
(hparam `learned_norm`, SAELens' TopK training) keeps its rows' norms as a per-feature
scale of its encoder (`effective`); it is saved folded, with unit rows (`folded`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

VARIANTS = ("relu", "tied", "topk")
# Axes: n features, d = d_in, o = the output's width (d_in; a transcoder's d_out). W_skip: skip transcoders only.
PARAMS = {"W_enc": ("n", "d"), "b_enc": ("n",), "W_dec": ("n", "o"), "b_dec": ("o",), "W_skip": ("o", "d")}
INIT_HYPERPARAMETERS = ("d_out", "skip_connection")  # the member fields init_params reads beyond the common ones
HYPERPARAMETERS = (
    "l1",
    "bias_decay",
    "k",
    "use_b_dec",
    "auxk_coefficient",
    "k_aux",
    "auxk_dead_tokens",
    "d_in",
    "learned_decoder_norm",
)  # the member fields make_hparams reads

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
    """Initial params of one member, generated on CPU from `seed` alone.

    Features beyond `dict_size` (up to `n_padded`) are zero, so they never fire
    and, with zero gradient, never move.  Decoder rows start as random unit
    vectors and the encoder starts as their transpose, the usual SAE init. A transcoder's
    encoder rows are random unit vectors of the input's width, drawn after its decoder's.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown SAE variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    n_padded = dict_size if n_padded is None else n_padded
    if n_padded < dict_size:
        raise ValueError(f"n_padded={n_padded} is smaller than dict_size={dict_size}")
    generator = torch.Generator().manual_seed(seed)
    d_o = d_out or d_in
    rows = F.normalize(torch.randn(dict_size, d_o, generator=generator), dim=-1)
    W_dec = torch.zeros(n_padded, d_o)
    W_dec[:dict_size] = rows
    W_enc = W_dec.clone()
    if d_out:
        W_enc = torch.zeros(n_padded, d_in)
        W_enc[:dict_size] = F.normalize(torch.randn(dict_size, d_in, generator=generator), dim=-1)
    params = {"W_enc": W_enc, "b_enc": torch.zeros(n_padded), "W_dec": W_dec, "b_dec": torch.zeros(d_o)}
    if skip_connection:
        params["W_skip"] = torch.zeros(d_o, d_in)
    return params


def make_hparams(
    variant: str,
    dict_size: int,
    l1: float = 0.0,
    bias_decay: float = 0.0,
    k: int = 0,
    use_b_dec: bool = True,
    n_padded: int | None = None,
    layout: Layout | None = None,
    auxk_coefficient: float = 0.0,
    k_aux: int = 0,
    auxk_dead_tokens: int = 0,
    d_in: int = 0,
    learned_decoder_norm: bool = False,
) -> Hparams:
    """Hyperparameter tensors of one member (see the module docstring); `layout` is unused here (other
    architectures size some hparams by their ensemble's layout)."""
    n_padded = dict_size if n_padded is None else n_padded
    mask = torch.zeros(n_padded)
    mask[:dict_size] = 1.0
    auxk_on = variant == "topk" and auxk_dead_tokens > 0
    return {
        **auxk_hparams(auxk_on, auxk_coefficient, auxk_size(k_aux, d_in, dict_size), n_padded),
        "l1": torch.tensor(0.0 if variant == "topk" else float(l1)),
        "bias_decay": torch.tensor(float(bias_decay)),
        "k": torch.tensor(float(k if variant == "topk" else 0)),
        "tied": torch.tensor(float(variant == "tied")),
        "topk": torch.tensor(float(variant == "topk")),
        "use_b_dec": torch.tensor(float(use_b_dec)),
        "learned_norm": torch.tensor(float(learned_decoder_norm)),
        "feature_mask": mask,
    }


class Layout(NamedTuple):
    """Static facts about the members sharing one (vmapped) call, fixed per ensemble.

    They choose code paths, never values: per-member numbers stay in hparams.
    """

    k_max: int = 0
    """Largest k of any topk member (0: no topk members, skip the top-k selection)."""
    any_tied: bool = False
    """Some member is tied, so the decoder must be chosen per member."""
    all_tied: bool = False
    """Every member is tied: the decoder is always the normalised encoder."""
    all_topk: bool = False
    """Every member is topk: codes are sparse by construction (fast paths may exploit it)."""
    k_aux: int = 0
    """Largest k_aux of any member with AuxK on (0: none, skip AuxK; the kernels implement none)."""
    target_at: int = 0
    """Transcoders: the column of a batch where the target starts (= d_in); 0: SAEs, whose target is the input."""
    skip: bool = False
    """Skip transcoders: add the linear path x @ W_skip.T to the output."""
    learned_norm: bool = False
    """Some member's decoder rows keep a learned norm that scales its encoder (`effective`)."""

    @classmethod
    def of(
        cls,
        variants: list[str],
        ks: list[int],
        k_aux: int = 0,
        target_at: int = 0,
        skip: bool = False,
        learned_norm: bool = False,
    ) -> Layout:
        k_max = max((k for v, k in zip(variants, ks) if v == "topk"), default=0)
        tied = [v == "tied" for v in variants]
        return cls(
            k_max=k_max,
            any_tied=any(tied),
            all_tied=all(tied),
            all_topk=all(v == "topk" for v in variants),
            k_aux=k_aux,
            target_at=target_at,
            skip=skip,
            learned_norm=learned_norm,
        )


def layout(members) -> Layout:
    """The Layout of these members (anything with Member's fields)."""
    k_aux = max(
        (auxk_size(m.k_aux, m.d_in, m.dict_size) for m in members if m.variant == "topk" and m.auxk_dead_tokens > 0),
        default=0,
    )
    learned = any(getattr(m, "learned_decoder_norm", False) for m in members)
    return Layout.of([m.variant for m in members], [m.k for m in members], k_aux, *transcoding(members), learned)


def transcoding(members) -> tuple[int, bool]:
    """(target_at, skip) of members sharing one call, for every architecture's Layout: (d_in, skip_connection) of
    transcoders, (0, False) of SAEs; ValueError if they mix."""
    kinds = {(getattr(m, "d_out", 0), getattr(m, "skip_connection", False)) for m in members}
    if len(kinds) > 1:
        raise ValueError(
            f"members of one ensemble must all be SAEs or all transcoders of one d_out and skip_connection; got {kinds}"
        )
    ((d_out, skip),) = kinds
    return (members[0].d_in if d_out else 0), skip


def split(batch: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) of a batch: the batch twice for SAEs; [x | y] cut at layout.target_at for transcoders."""
    if not layout.target_at:
        return batch, batch
    return batch[:, : layout.target_at], batch[:, layout.target_at :]


# -- AuxK, shared with architectures/batchtopk.py ------------------------------------------------------


def auxk_size(k_aux: int, d_in: int, dict_size: int) -> int:
    """A member's k_aux: its own, or d_in // 2 (SAELens' choice; Gao et al. used 512 for d_model 12k), at most
    dict_size."""
    return max(1, min(k_aux or d_in // 2, dict_size))


def auxk_hparams(on: bool, coefficient: float, k_aux: int, n_padded: int) -> Hparams:
    """auxk_coefficient (0 when off), k_aux, and `dead` [n] (zeros here; the ensemble sets it each step)."""
    return {
        "auxk_coefficient": torch.tensor(float(coefficient) if on else 0.0),
        "k_aux": torch.tensor(float(k_aux)),
        "dead": torch.zeros(n_padded),
    }


def auxk_loss(
    pre: torch.Tensor, residual: torch.Tensor, dictionary: torch.Tensor, hp: Hparams, k_aux_max: int
) -> torch.Tensor:
    """AuxK: mean((topk_aux(pre over dead features) @ D - sg(residual))^2) * min(n_dead / k_aux, 1).

    pre [B, n] pre-activations, residual [B, d] = x - x_hat, dictionary [n, d]. The kept pre-activations
    enter unrectified, as SAELens' calculate_topk_aux_acts: a dead feature's pre-activations are mostly
    negative, and a ReLU would pass them no gradient. Runs at the static size k_aux_max; each member keeps
    its first min(k_aux, n_dead) ranks (fewer dead features than k_aux leave -inf candidates, excluded).
    """
    dead = hp["dead"]
    values, indices = torch.topk(torch.where(dead > 0, pre, -torch.inf), k_aux_max, dim=-1)  # [B, k_aux_max]
    n_dead = dead.sum()
    kept = torch.arange(k_aux_max, device=pre.device) < torch.minimum(hp["k_aux"], n_dead)
    acts = torch.where(kept, values, 0.0)  # never -inf * 0
    recon = torch.zeros_like(pre).scatter(-1, indices, acts) @ dictionary
    return torch.clamp(n_dead / hp["k_aux"], max=1.0) * (recon - residual.detach()).pow(2).mean()


def _learned(hp: Hparams) -> torch.Tensor:
    """[..., n] bool: the real features of learned-norm members."""
    return hp["learned_norm"].unsqueeze(-1) * hp["feature_mask"] > 0


def decoder_scales(params: Params, hp: Hparams) -> torch.Tensor:
    """[..., n]: each feature's decoder-row norm where its member learns it (real features), else 1.0."""
    return torch.where(_learned(hp), params["W_dec"].norm(dim=-1), 1.0)


def effective(params: Params, hp: Hparams, layout: Layout = Layout(), scales: torch.Tensor | None = None) -> Params:
    """The unit-row SAE a learned-norm member is (Member.learned_decoder_norm): its encoder rows and bias
    scaled by its decoder rows' norms s (`scales`, computed when not given). Pre-activations s (W_enc x + b_enc)
    choose the top k, and the codes decode through the rows' directions W_dec / s, as SAELens'
    rescale_acts_by_decoder_norm; every loss and kernel is written for unit rows, so they run on these params.
    Works on one member or a stack [M, ...]."""
    if not layout.learned_norm:
        return params
    scales = decoder_scales(params, hp) if scales is None else scales
    return {**params, "W_enc": params["W_enc"] * scales.unsqueeze(-1), "b_enc": params["b_enc"] * scales}


def effective_backward(params: Params, hp: Hparams, grads: Params, scales: torch.Tensor) -> Params:
    """dL/dparams from dL/d`effective`(params) (the kernels' gradients; updated in place): the encoder's scaled
    by s, and W_dec's gains the path through s = ||W_dec row||, dL/ds W_dec / s. Equal to autograd through
    `effective` (tests/test_sae.py), in fewer passes over [M, n, d]."""
    g_scale = torch.linalg.vecdot(grads["W_enc"], params["W_enc"]) + grads["b_enc"] * params["b_enc"]
    along = torch.where(_learned(hp), g_scale / scales, 0.0).unsqueeze(-1)
    return {
        **grads,
        "W_enc": grads["W_enc"].mul_(scales.unsqueeze(-1)),
        "b_enc": grads["b_enc"].mul_(scales),
        "W_dec": torch.addcmul(grads["W_dec"], along, params["W_dec"]),
    }


def folded(params: Params, hp: Hparams, layout: Layout = Layout()) -> Params:
    """`effective` with unit decoder rows: the same SAE as plain params, which `effective` leaves alone (the
    norms are 1). A learned-norm member is saved so."""
    if not layout.learned_norm:
        return params
    scales = decoder_scales(params, hp)
    return {**effective(params, hp, layout, scales), "W_dec": params["W_dec"] / scales.unsqueeze(-1)}


def decoder(params: Params, hp: Hparams, layout: Layout = Layout()) -> torch.Tensor:
    """The unit-norm dictionary [n, d]: W_enc's rows for tied members, W_dec's otherwise."""
    if layout.all_tied:
        rows = params["W_enc"]
    elif layout.any_tied:
        rows = torch.where(hp["tied"] > 0, params["W_enc"], params["W_dec"])
    else:
        rows = params["W_dec"]
    return F.normalize(rows, dim=-1)


def encode(params: Params, hp: Hparams, x: torch.Tensor, layout: Layout = Layout()) -> torch.Tensor:
    """Feature activations c [B, n] of x [B, d].

    Padded features get a bias of -1e30, so ReLU zeroes them and passes them zero
    gradient, and top-k never picks them: the mask costs an [n] op, not a [B, n] one.
    Top-k runs with the static size `layout.k_max`; each member then keeps only
    pre-activations at or above its own k-th largest value.
    """
    params = effective(params, hp, layout)
    return codes_of(pre_activations(params, hp, x, layout), hp, layout)


def pre_activations(params: Params, hp: Hparams, x: torch.Tensor, layout: Layout = Layout()) -> torch.Tensor:
    """W_enc (x - b_dec) + b_enc [B, n] (transcoders: W_enc x + b_enc); padded features at -1e30."""
    bias = params["b_enc"] - (1.0 - hp["feature_mask"]) * 1e30
    if layout.target_at:
        return torch.addmm(bias, x, params["W_enc"].T)
    b_dec = params["b_dec"] * hp["use_b_dec"]
    return torch.addmm(bias, x - b_dec, params["W_enc"].T)  # [B, n]


def codes_of(pre: torch.Tensor, hp: Hparams, layout: Layout) -> torch.Tensor:
    """ReLU, then each topk member's k largest."""
    codes = F.relu(pre)
    if layout.k_max > 0:
        codes = codes * topk_keep(pre, hp, layout.k_max)
    return codes


def topk_keep(pre: torch.Tensor, hp: Hparams, k_max: int) -> torch.Tensor:
    """1.0 where a topk member keeps a pre-activation (exactly its k largest per row), else 0.0.

    Keeping by index, not by `pre >= k-th value`, keeps exactly k even when values tie
    (bf16 rounds many pre-activations to equal values). Non-topk members keep everything.
    """
    indices = torch.topk(pre, k_max, dim=-1).indices  # [B, k_max], largest first
    rank_kept = (torch.arange(k_max, device=pre.device) < hp["k"]).to(pre.dtype)  # [k_max]: the first k ranks
    keep = torch.zeros_like(pre).scatter(-1, indices, rank_kept.expand_as(indices))
    return torch.where(hp["topk"] > 0, keep, 1.0)


def decode(
    params: Params, hp: Hparams, codes: torch.Tensor, layout: Layout = Layout(), x: torch.Tensor | None = None
) -> torch.Tensor:
    """Reconstruction x_hat [B, d] from activations [B, n] (skip transcoders also need their input x)."""
    out = torch.addmm(params["b_dec"] * hp["use_b_dec"], codes, decoder(params, hp, layout))
    return out + x @ params["W_skip"].T if layout.skip else out


def loss(
    params: Params, hp: Hparams, x: torch.Tensor, layout: Layout = Layout()
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training loss of one member on a batch [B, d] (transcoders: [x | y]), with its parts as aux outputs."""
    params = effective(params, hp, layout)
    x, target = split(x, layout)
    pre = pre_activations(params, hp, x, layout)
    codes = codes_of(pre, hp, layout)
    x_hat = decode(params, hp, codes, layout, x)
    mse = (x_hat - target).pow(2).mean()
    l1_norm = codes.sum() / x.shape[0]  # codes >= 0 after ReLU, so |c| = c
    bias_norm = (params["b_enc"] * hp["feature_mask"]).norm()
    total = mse + hp["l1"] * l1_norm + hp["bias_decay"] * bias_norm
    if layout.k_aux > 0:
        total = total + hp["auxk_coefficient"] * auxk_loss(
            pre, target - x_hat, decoder(params, hp, layout), hp, layout.k_aux
        )
    # [n] rows in which each feature fired (codes >= 0, so their sign; float32: bf16 counts round above 256)
    fired = torch.sign(codes).sum(0, dtype=torch.float32)
    aux = {"loss": total, "mse": mse, "l1_norm": l1_norm, "l0": fired.sum() / x.shape[0], "fired": fired}
    return total, aux
