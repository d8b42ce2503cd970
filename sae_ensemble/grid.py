"""The inner grid: expand hyperparameter axes into members (plan.py packs them onto devices)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from sae_ensemble.member import Member


@dataclass
class Grid:
    """The inner-grid axes; every combination becomes one member."""

    variants: list[str] = field(default_factory=lambda: ["relu"])
    """SAE variants (relu, tied, topk)."""
    dict_sizes: list[int] = field(default_factory=list)
    """Absolute dictionary sizes; combined with dict_ratios (sizes = these + ratio * d_in)."""
    dict_ratios: list[float] = field(default_factory=list)
    """Dictionary sizes as multiples of d_in."""
    l1: list[float] = field(default_factory=lambda: [1e-3])
    """L1 coefficients (relu and tied members); unused when target_l0 is set."""
    target_l0: list[float] = field(default_factory=list)
    """Target L0s (active features per row): when set, this axis replaces l1 and k. relu and tied
    members steer their coefficient toward each target (starting from l1_start; steering.py); topk
    members take k = round(target). Ids read `relu-d512-L0_8-...`."""
    l1_start: float = 1e-3
    """Starting sparsity coefficient of target-L0 members (the controller moves it from there)."""
    k: list[int] = field(default_factory=lambda: [32])
    """Active features per row (topk members)."""
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
    """Linear L1 warmup steps."""

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
                sparsity = [{"k": round(t), "target_l0": t} if variant == "topk" else {"l1": self.l1_start, "target_l0": t} for t in self.target_l0]
            else:
                sparsity = [{"k": k} for k in self.k] if variant == "topk" else [{"l1": l1} for l1 in self.l1]
            if not sparsity:
                raise ValueError(f"the grid axis {'k' if variant == 'topk' else 'l1'} is empty but variant {variant} needs it")
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

