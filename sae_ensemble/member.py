"""The hyperparameters of one SAE in a sweep: plain data, one member of the inner grid."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sae_ensemble.sae import VARIANTS


@dataclass(frozen=True)
class Member:
    """One SAE to train. Every field is a hyperparameter; `member_id` is derived from them."""

    variant: str
    """SAE variant: relu (untied), tied, or topk."""
    d_in: int
    """Width of the activations it reconstructs."""
    dict_size: int
    """Number of dictionary features."""
    l1: float = 1e-3
    """L1 coefficient on feature activations (ignored by topk)."""
    bias_decay: float = 0.0
    """Coefficient of the L2 norm of the encoder bias in the loss."""
    lr: float = 1e-3
    """Peak Adam learning rate."""
    seed: int = 0
    """Seed of the weight initialisation."""
    k: int = 0
    """Active features per row (topk only)."""
    use_b_dec: bool = True
    """Learn a decoder bias (pre-encoder centring); False holds it at zero."""
    lr_warmup_steps: int = 0
    """Steps of linear learning-rate warmup from 0."""
    lr_decay_steps: int = 0
    """Final steps over which the learning rate decays linearly to 0 (0 = no decay)."""
    l1_warmup_steps: int = 0
    """Steps of linear L1-coefficient warmup from 0."""
    target_l0: float = 0.0
    """Target L0 (active features per row); 0 = none. relu and tied members steer their sparsity
    coefficient toward it every step, starting from `l1` (steering.py); topk members have k = round(target_l0)."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r} is unknown; allowed: {', '.join(VARIANTS)}")
        if self.d_in < 1 or self.dict_size < 1:
            raise ValueError(f"d_in={self.d_in} and dict_size={self.dict_size} must both be at least 1")
        if self.variant == "topk" and not 1 <= self.k <= self.dict_size:
            raise ValueError(f"k={self.k} must be between 1 and dict_size={self.dict_size} for a topk member")
        if self.variant != "topk" and self.l1 < 0:
            raise ValueError(f"l1={self.l1} must be non-negative")
        if self.bias_decay < 0:
            raise ValueError(f"bias_decay={self.bias_decay} must be non-negative")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be positive")
        if self.target_l0 < 0:
            raise ValueError(f"target_l0={self.target_l0} must be non-negative (0 = a fixed l1)")
        if self.variant == "topk" and self.target_l0 > 0 and self.k != round(self.target_l0):
            raise ValueError(f"k={self.k} of a topk member with target_l0={self.target_l0:g} must be round(target_l0)={round(self.target_l0)}")
        if self.variant != "topk" and self.target_l0 > 0 and self.l1 <= 0:
            raise ValueError(f"l1={self.l1} is the starting coefficient of a target-L0 member and must be positive")
        for name in ("lr_warmup_steps", "lr_decay_steps", "l1_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be non-negative")

    @property
    def member_id(self) -> str:
        """Stable, human-readable id, e.g. `relu-d512-l1_0.001-bd0.05-lr0.001-s0`, or `relu-d512-L0_8-bd0-lr0.003-s0`
        for a member steered to L0 8 (its starting l1 is in cfg.json)."""
        if self.target_l0 > 0:
            sparsity = f"L0_{self.target_l0:g}"
        else:
            sparsity = f"k{self.k}" if self.variant == "topk" else f"l1_{self.l1:g}"
        parts = [self.variant, f"d{self.dict_size}", sparsity, f"bd{self.bias_decay:g}", f"lr{self.lr:g}", f"s{self.seed}"]
        if not self.use_b_dec:
            parts.append("nobdec")
        return "-".join(parts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Member":
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown member fields {unknown}; allowed: {sorted(names)}")
        return cls(**values)
