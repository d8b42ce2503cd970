"""The inner grid: expand config.Grid's axes into members (plan.py packs them onto devices).

Every member's own rules are Member's (member.py): expanding the grid applies them, so a bad axis value
is refused here with Member's sentence, before any store is built or model run.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping

from sae_ensemble.config import K_VARIANTS, ConfigError, Grid, Variant
from sae_ensemble.member import Member


def members(grid: Grid, d_in: int, d_out: int = 0) -> list[Member]:
    """Every member of the grid, in a stable order (transcoders of width d_out when d_out > 0, with the
    skip_connection axis); raises ValueError on an empty or invalid grid."""
    sizes = grid.sizes(d_in)
    axes = {
        "variants": grid.variants,
        "dict sizes (dict_sizes or dict_ratios)": sizes,
        "bias_decay": grid.bias_decay,
        "lr": grid.lr,
        "seeds": grid.seeds,
    }
    for name, values in axes.items():
        if not values:
            raise ValueError(f"the grid axis {name} is empty; give at least one value")
    result = []
    skips = list(dict.fromkeys(grid.skip_connection)) if d_out else [False]
    for variant, size, bias_decay, lr, seed, skip in itertools.product(
        grid.variants, sizes, grid.bias_decay, grid.lr, grid.seeds, skips
    ):
        if grid.target_l0:
            axis = "target_l0"
            steered = [
                {"k": round(t), "target_l0": t} if variant == Variant.topk else {"l1": grid.l1_start, "target_l0": t}
                for t in grid.target_l0
            ]
            sparsity = [{**values, **_architecture_settings(grid, variant, size)} for values in steered]
        else:
            axis = "k" if variant in K_VARIANTS else "l0_coefficient" if variant == Variant.jumprelu else "l1"
            sparsity = [{axis: value, **_architecture_settings(grid, variant, size)} for value in getattr(grid, axis)]
        if not sparsity:
            raise ValueError(f"the grid axis {axis} is empty but variant {variant} needs it")
        for extra in sparsity:
            result.append(
                Member(
                    variant=variant,
                    d_in=d_in,
                    dict_size=size,
                    bias_decay=bias_decay,
                    lr=lr,
                    seed=seed,
                    use_b_dec=grid.use_b_dec,
                    encoder_init_norm=grid.encoder_init_norm,
                    learned_decoder_norm=grid.learned_decoder_norm and variant in K_VARIANTS and not d_out,
                    max_grad_norm=grid.max_grad_norm,
                    d_out=d_out,
                    skip_connection=skip,
                    lr_warmup_steps=grid.lr_warmup_steps,
                    lr_decay_steps=grid.lr_decay_steps,
                    l1_warmup_steps=grid.l1_warmup_steps,
                    **extra,
                )
            )
    ids = [m.member_id for m in result]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"the grid repeats members {duplicates[:3]}; remove repeated values from its axes")
    return result


def checked_members(grid: Grid, widths: Mapping[str | None, tuple[int, int]]) -> list[Member]:
    """The run's members: the grid on every hook of `widths` (hook -> its store's (d_in, d_out); d_out > 0 makes
    transcoders), hook by hook.

    With several hooks each member carries its hook (and its id starts with it); with one store the hook
    is the run's, and members and ids are those of the grid alone. A bad axis value is a ConfigError naming
    the grid (exit 2 in a sweep)."""
    try:
        if len(widths) == 1:
            return members(grid, *next(iter(widths.values())))
        return [dataclasses.replace(m, hook=hook) for hook, width in widths.items() for m in members(grid, *width)]
    except ValueError as error:
        raise ConfigError(f"grid: {error}") from None


def _architecture_settings(grid: Grid, variant: str, size: int) -> dict:
    """The settings (not axes) a variant's members take from the grid; other members keep the defaults."""
    if variant == Variant.jumprelu:
        return {"threshold": grid.threshold, "bandwidth": grid.bandwidth}
    if variant in (Variant.relu, Variant.tied):
        return {"resample_every": grid.resample_every}
    settings: dict = {}
    if variant in K_VARIANTS and grid.auxk_dead_tokens:
        settings.update(
            auxk_dead_tokens=grid.auxk_dead_tokens, auxk_coefficient=grid.auxk_coefficient, k_aux=grid.k_aux
        )
    if variant in (Variant.batchtopk, Variant.matryoshka):
        settings["topk_threshold_lr"] = grid.topk_threshold_lr
    if variant == Variant.matryoshka:
        settings["matryoshka_widths"] = tuple(
            sorted({w for f in grid.matryoshka_fractions if 0 < (w := int(round(f * size))) < size})
        )
    return settings
