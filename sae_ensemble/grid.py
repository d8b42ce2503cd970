"""The inner grid: expand hyperparameter axes into members, pack members into one ensemble per device.

A plan is plain data (`plan.json` in the run dir): which members train together on
which device, with the padded cost, FLOPs per step and memory of each ensemble.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
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
    """L1 coefficients (relu and tied members)."""
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


def padded_cost(members: Sequence[Member]) -> int:
    """Work of one ensemble step per row of batch, up to a constant: members x largest dict x d_in."""
    return len(members) * max(m.dict_size for m in members) * members[0].d_in if members else 0


def pack(members: Sequence[Member], n_devices: int) -> list[list[Member]]:
    """Split members into at most `n_devices` ensembles with balanced padded cost.

    Members sorted by dict size (largest first) are cut into contiguous groups, so
    each group mixes as few sizes as possible (little padding); the cut points come
    from the smallest per-ensemble capacity for which greedy filling needs no more
    than `n_devices` groups (binary search; greedy is optimal for contiguous cuts
    because the padded cost only grows as a group gets longer).
    """
    if n_devices < 1:
        raise ValueError(f"n_devices={n_devices} must be at least 1")
    ordered = sorted(members, key=lambda m: (-m.dict_size, m.member_id))
    if not ordered:
        return []

    def greedy(capacity: int) -> list[list[Member]]:
        groups: list[list[Member]] = [[]]
        for member in ordered:
            if groups[-1] and padded_cost(groups[-1] + [member]) > capacity:
                groups.append([])
            groups[-1].append(member)
        return groups

    low = max(padded_cost([m]) for m in ordered)
    high = padded_cost(ordered)
    while low < high:
        middle = (low + high) // 2
        if len(greedy(middle)) <= n_devices:
            high = middle
        else:
            low = middle + 1
    return greedy(low)


def ensemble_estimates(members: Sequence[Member], batch_size: int) -> dict:
    """FLOPs per step (12*B*d*n per member, padded) and a memory estimate in bytes, float32."""
    n = max(m.dict_size for m in members)
    d = members[0].d_in
    m = len(members)
    weights = 2 * n * d + n + d
    # params + two Adam moments + gradient + new params, and ~6 [B, n] activations per member.
    memory = 4 * m * (5 * weights + 6 * batch_size * n)
    return {"n_padded": n, "flops_per_step": 12 * batch_size * d * n * m, "memory_bytes": memory}


def make_plan(members: Sequence[Member], devices: Sequence[str], batch_size: int) -> dict:
    """The plan as plain data: one ensemble per device, with cost estimates."""
    groups = pack(members, len(devices))
    ensembles = []
    for index, group in enumerate(groups):
        real = sum(m.dict_size for m in group) * group[0].d_in
        ensembles.append(
            {
                "index": index,
                "device": devices[index],
                "members": [m.member_id for m in group],
                "dict_sizes": sorted({m.dict_size for m in group}),
                "padded_cost": padded_cost(group),
                "padding_waste": round(1 - real / padded_cost(group), 4),
                **ensemble_estimates(group, batch_size),
            }
        )
    return {
        "batch_size": batch_size,
        "members": {m.member_id: m.to_dict() for m in members},
        "ensembles": ensembles,
    }


def plan_members(plan: dict, index: int) -> list[Member]:
    """The members of ensemble `index` of a plan."""
    return [Member.from_dict(plan["members"][member_id]) for member_id in plan["ensembles"][index]["members"]]


def format_plan(plan: dict) -> str:
    """The plan as a table: device, members, dict sizes, GFLOP per step, memory."""
    lines = [f"{len(plan['members'])} members in {len(plan['ensembles'])} ensembles (batch {plan['batch_size']})"]
    lines.append(f"{'device':<10} {'members':>7} {'dict sizes':<24} {'GFLOP/step':>10} {'memory':>9} {'padding':>7}")
    for e in plan["ensembles"]:
        sizes = ",".join(map(str, e["dict_sizes"]))
        lines.append(
            f"{e['device']:<10} {len(e['members']):>7} {sizes:<24} {e['flops_per_step'] / 1e9:>10.2f} "
            f"{e['memory_bytes'] / 2**20:>7.0f}Mi {e['padding_waste']:>7.0%}"
        )
    return "\n".join(lines)
