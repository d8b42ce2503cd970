"""The SAE architectures, one module each, all behind the same pure interface as sae.py.

    relu, tied, topk     sae.py              (the seeds' SAEs; the kernels in kernels/ implement these)
    batchtopk, matryoshka  batchtopk.py      (BatchTopK; Matryoshka = BatchTopK with nested prefix losses)
    jumprelu             jumprelu.py         (per-feature threshold, straight-through estimators, L0 penalty)
    gated                gated.py            (gate and magnitude paths, auxiliary loss through a frozen decoder)

Every architecture module provides:
    VARIANTS                       the variants it implements
    PARAMS                         {name: axes}: "n" = a feature axis (padded in an ensemble), "d" = d_in,
                                   "o" = the output's width (transcoders: d_out); W_skip only for skip transcoders
    HYPERPARAMETERS                the Member fields its make_hparams reads (besides variant, dict_size)
    init_params(variant, d_in, dict_size, seed, n_padded=None, **hyper) -> params  (hyper: INIT_HYPERPARAMETERS)
    make_hparams(variant, dict_size, n_padded=None, **hyper) -> hparams (tensors only, so vmap sees them)
    layout(members) -> Layout      static code-path choices for members sharing one vmapped call; where the
                                   variants can be transcoders (config.TRANSCODER_VARIANTS), its target_at and
                                   skip (sae.transcoding) and decode(..., x) for the skip path
    encode, decode, decoder, loss  pure functions of (params, hparams, x or codes, layout);
                                   loss returns (total, aux) with aux {loss, mse, l1_norm, l0, fired, ...}
    update_state (optional)        new values of params the loss does not train (a running threshold),
                                   from one step's aux; the ensemble applies it after the optimizer

The one rule for ensembles: members share an ensemble if and only if their variants live in the same
module (so one vmapped loss and one set of stacked tensors serves them all). plan.py groups by
`family`; Ensemble refuses a mix of families.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from sae_ensemble import sae
from sae_ensemble.architectures import batchtopk, gated, jumprelu

MODULES: dict[str, ModuleType] = {
    variant: module for module in (sae, batchtopk, jumprelu, gated) for variant in module.VARIANTS
}
VARIANTS = tuple(MODULES)


def module_of(variant: str) -> ModuleType:
    """The architecture module implementing `variant`."""
    try:
        return MODULES[variant]
    except KeyError:
        raise ValueError(f"unknown SAE variant {variant!r}; allowed: {', '.join(VARIANTS)}") from None


def family(variant: str) -> str:
    """Members share an ensemble iff their families are equal: the architecture module's name."""
    return module_of(variant).__name__.rsplit(".", 1)[-1]


def module_for(members) -> ModuleType:
    """The one module that implements every member's variant; ValueError naming the families otherwise."""
    families = sorted({family(m.variant) for m in members})
    if len(families) != 1:
        raise ValueError(
            f"variants {sorted({m.variant for m in members})} cannot share an ensemble: they have different "
            f"parameter sets ({', '.join(families)}); plan.py puts each family in its own ensembles"
        )
    return module_of(members[0].variant)


def _hyper(module: ModuleType, member) -> dict[str, Any]:
    return {name: getattr(member, name) for name in module.HYPERPARAMETERS}


def init_params(member, n_padded: int | None = None) -> dict[str, torch.Tensor]:
    """One member's initial params (features beyond its dict_size, up to n_padded, are zero); every architecture's
    encoder rows start at norm `member.encoder_init_norm`."""
    module = module_of(member.variant)
    extra = {name: getattr(member, name) for name in getattr(module, "INIT_HYPERPARAMETERS", ())}
    params = module.init_params(member.variant, member.d_in, member.dict_size, member.seed, n_padded, **extra)
    if member.encoder_init_norm != 1.0:  # multiplying by 1.0 is exact, but leaves the default's tensors as they were
        params["W_enc"] = params["W_enc"] * member.encoder_init_norm
    return params


def make_hparams(member, n_padded: int | None = None, layout=None) -> dict[str, torch.Tensor]:
    """One member's hyperparameter tensors, sized for an ensemble with this `layout` (default: its own)."""
    module = module_of(member.variant)
    layout = module.layout([member]) if layout is None else layout
    return module.make_hparams(
        member.variant, member.dict_size, n_padded=n_padded, layout=layout, **_hyper(module, member)
    )


def layout(members):
    """The static Layout of members sharing one vmapped call (all of one family)."""
    return module_for(members).layout(members)


def param_shapes(
    module: ModuleType, d_in: int, n: int, d_out: int = 0, skip: bool = False
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of one member's params for `n` features (axis o: the output's width, d_out or d_in; W_skip
    only for skip transcoders)."""
    sizes = {"n": n, "d": d_in, "o": d_out or d_in}
    return {
        name: tuple(sizes[axis] for axis in axes) for name, axes in module.PARAMS.items() if name != "W_skip" or skip
    }


def unpad(module: ModuleType, params: dict[str, torch.Tensor], dict_size: int) -> dict[str, torch.Tensor]:
    """One member's params (or moments) cut from the ensemble's padded size to its own dict_size."""
    return {
        name: (value[:dict_size] if module.PARAMS[name][:1] == ("n",) else value).contiguous()
        for name, value in params.items()
    }
