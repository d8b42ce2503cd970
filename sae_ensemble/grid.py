"""The inner grid: expand hyperparameter axes into members (plan.py packs them onto devices)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from sae_ensemble.member import K_VARIANTS, Member


@dataclass
class Grid:
    """The inner-grid axes; every combination becomes one member."""

    variants: list[str] = field(default_factory=lambda: ["relu"])
    """SAE variants: relu, tied, topk, batchtopk, matryoshka, jumprelu, gated (docs/architectures.md)."""
    dict_sizes: list[int] = field(default_factory=list)
    """Absolute dictionary sizes; combined with dict_ratios (sizes = these + ratio * d_in)."""
    dict_ratios: list[float] = field(default_factory=list)
    """Dictionary sizes as multiples of d_in."""
    l1: list[float] = field(default_factory=lambda: [1e-3])
    """L1 coefficients (relu, tied and gated members); unused when target_l0 is set."""
    target_l0: list[float] = field(default_factory=list)
    """Target L0s (active features per row): when set, this axis replaces l1 and k. relu and tied
    members steer their coefficient toward each target (starting from l1_start; steering.py); topk
    members take k = round(target). Ids read `relu-d512-L0_8-...`."""
    l1_start: float = 1e-3
    """Starting sparsity coefficient of target-L0 members (the controller moves it from there)."""
    k: list[int] = field(default_factory=lambda: [32])
    """Active features per row (topk members; batchtopk and matryoshka: on average over a batch)."""
    l0_coefficient: list[float] = field(default_factory=lambda: [1e-4])
    """L0-penalty coefficients (jumprelu members; our MSE is a mean over d_in, so SAELens' value / d_in)."""
    bias_decay: list[float] = field(default_factory=lambda: [0.0])
    """Encoder-bias decay coefficients."""
    lr: list[float] = field(default_factory=lambda: [1e-3])
    """Peak learning rates."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Initialisation seeds."""
    use_b_dec: bool = True
    """Learn a decoder bias (pre-encoder centring)."""
    lr_warmup_steps: int = 0
    """Linear learning-rate warmup steps."""
    lr_decay_steps: int = 0
    """Final steps of linear learning-rate decay to 0."""
    l1_warmup_steps: int = 0
    """Linear warmup steps of the sparsity coefficient (l1; jumprelu: l0_coefficient)."""
    threshold: float = 0.01
    """jumprelu: initial threshold of every feature."""
    bandwidth: float = 0.05
    """jumprelu: width of the rectangle kernel of the threshold's straight-through estimators."""
    topk_threshold_lr: float = 0.01
    """batchtopk, matryoshka: rate of the running estimate of the inference threshold."""
    matryoshka_fractions: list[float] = field(default_factory=lambda: [0.0625, 0.25])
    """matryoshka: nested prefix sizes as fractions of each dict size (rounded; the whole dict is the last level)."""
    auxk_dead_tokens: int = 0
    """topk, batchtopk, matryoshka: AuxK (Gao et al. 2024) on features that fired in none of this many most recent
    training rows (Gao et al.: 10M tokens); 0 = no AuxK. AuxK members train on the reference execution."""
    auxk_coefficient: float = 1 / 32
    """Coefficient of the AuxK loss (Gao et al.'s 1/32)."""
    k_aux: int = 0
    """Dead features AuxK reconstructs the residual with; 0 = d_in // 2 (SAELens; Gao et al. used 512)."""
    resample_every: int = 0
    """relu, tied: resample dead features every this many steps (dictionary_learning's resample_steps); 0 = never."""

    def sizes(self, d_in: int) -> list[int]:
        sizes = list(self.dict_sizes) + [int(round(r * d_in)) for r in self.dict_ratios]
        return sorted(set(sizes))

    def members(self, d_in: int) -> list[Member]:
        """Every member of the grid, in a stable order; raises ValueError on an empty or invalid grid."""
        sizes = self.sizes(d_in)
        axes = {"variants": self.variants, "dict sizes (dict_sizes or dict_ratios)": sizes, "bias_decay": self.bias_decay, "lr": self.lr, "seeds": self.seeds}
        for name, values in axes.items():
            if not values:
                raise ValueError(f"the grid axis {name} is empty; give at least one value")
        members = []
        for variant, size, bias_decay, lr, seed in itertools.product(self.variants, sizes, self.bias_decay, self.lr, self.seeds):
            if self.target_l0:
                axis = "target_l0"
                steered = [{"k": round(t), "target_l0": t} if variant == "topk" else {"l1": self.l1_start, "target_l0": t} for t in self.target_l0]
                sparsity = [{**values, **self._architecture_settings(variant, size)} for values in steered]
            else:
                axis = "k" if variant in K_VARIANTS else "l0_coefficient" if variant == "jumprelu" else "l1"
                sparsity = [{axis: value, **self._architecture_settings(variant, size)} for value in getattr(self, axis)]
            if not sparsity:
                raise ValueError(f"the grid axis {axis} is empty but variant {variant} needs it")
            for extra in sparsity:
                members.append(
                    Member(
                        variant=variant, d_in=d_in, dict_size=size, bias_decay=bias_decay, lr=lr, seed=seed,
                        use_b_dec=self.use_b_dec, lr_warmup_steps=self.lr_warmup_steps,
                        lr_decay_steps=self.lr_decay_steps, l1_warmup_steps=self.l1_warmup_steps, **extra,
                    )
                )
        ids = [m.member_id for m in members]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"the grid repeats members {duplicates[:3]}; remove repeated values from its axes")
        return members

    def _architecture_settings(self, variant: str, size: int) -> dict:
        """The settings (not axes) a variant's members take from the grid; other members keep the defaults."""
        if variant == "jumprelu":
            return {"threshold": self.threshold, "bandwidth": self.bandwidth}
        if variant in ("relu", "tied"):
            return {"resample_every": self.resample_every}
        settings: dict = {}
        if variant in K_VARIANTS and self.auxk_dead_tokens:
            settings.update(auxk_dead_tokens=self.auxk_dead_tokens, auxk_coefficient=self.auxk_coefficient, k_aux=self.k_aux)
        if variant in ("batchtopk", "matryoshka"):
            settings["topk_threshold_lr"] = self.topk_threshold_lr
        if variant == "matryoshka":
            settings["matryoshka_widths"] = tuple(sorted({w for f in self.matryoshka_fractions if 0 < (w := int(round(f * size))) < size}))
        return settings
