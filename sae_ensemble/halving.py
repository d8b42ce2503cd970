"""Successive halving's policy: how many members survive a rung, and how they are ranked.

`training.halving.rungs` cuts a run into segments (segments.py runs them). At each rung every member
still training is ranked together, across every worker: the grid's best member must win whichever
device its dict size was packed onto (ranking within one worker would keep each worker's best
instead, and the packing puts each dict size on its own worker). The best ceil(n / eta) go on.
"""

from __future__ import annotations

import math

from sae_ensemble.config import Halving, HalvingMetric


class HalvingError(ValueError):
    """The run dir's halving record cannot be continued, or the ranking metric does not apply (the message says
    which)."""


# -- rungs and ranking ---------------------------------------------------------------------------


def survivors_count(n: int, eta: int) -> int:
    return max(1, math.ceil(n / eta))


def pareto_ranks(points: dict[str, tuple[float, float]]) -> dict[str, int]:
    """Non-dominated sorting, both coordinates lower is better: 0 = the front, 1 = the front without it, ..."""
    ranks, left, rank = {}, dict(points), 0
    while left:
        front = [
            k
            for k, (a, b) in left.items()
            if not any(x <= a and y <= b and (x < a or y < b) for j, (x, y) in left.items() if j != k)
        ]
        for k in front:
            ranks[k] = rank
            del left[k]
        rank += 1
    return ranks


def rank(metrics: dict[str, dict[str, float]], metric: str) -> list[str]:
    """Member ids best first by `metric` (pareto, mmcs_truth, fvu); every tie is broken by member id.

    A frozen or non-finite member ranks last (its values are not comparable)."""

    def finite(member_id: str, *names: str) -> bool:
        return all(math.isfinite(metrics[member_id].get(n, math.nan)) for n in names)

    if metric == "pareto":
        usable = [m for m in metrics if finite(m, "l0", "fvu")]
        ranks = pareto_ranks({m: (metrics[m]["l0"], metrics[m]["fvu"]) for m in usable})
        key = {m: (ranks[m], metrics[m]["fvu"]) for m in usable}
    elif metric == "mmcs_truth":
        usable = [m for m in metrics if finite(m, "mmcs_truth")]
        key = {m: (-metrics[m]["mmcs_truth"],) for m in usable}
    elif metric == "fvu":
        usable = [m for m in metrics if finite(m, "fvu")]
        key = {m: (metrics[m]["fvu"],) for m in usable}
    else:
        raise ValueError(f"training.halving.metric={metric!r} is unknown here; allowed: pareto, mmcs_truth, fvu")
    ordered = sorted(usable, key=lambda m: (*key[m], m))
    return ordered + sorted(m for m in metrics if m not in key)


def resolve_metric(halving: Halving, has_ground_truth: bool) -> str:
    if halving.metric == HalvingMetric.auto:
        return "mmcs_truth" if has_ground_truth else "pareto"
    if halving.metric == HalvingMetric.mmcs_truth and not has_ground_truth:
        raise HalvingError(
            "training.halving.metric=mmcs_truth needs a store with ground truth (a synthetic store); use pareto or fvu"
        )
    return str(halving.metric)


# -- the summary ---------------------------------------------------------------------------------


def member_steps(rows: list[dict], steps: int) -> dict:
    """Member-steps trained against the full grid's (every member to `steps`), and the best mmcs_truth."""
    done = sum(int(r["steps"]) for r in rows)
    scored = [r for r in rows if isinstance(r.get("mmcs_truth"), float) and math.isfinite(r["mmcs_truth"])]
    best = max(scored, key=lambda r: (r["mmcs_truth"], r["member_id"]), default=None)
    return {
        "member_steps": done,
        "full_grid_member_steps": len(rows) * steps,
        "fraction": done / max(1, len(rows) * steps),
        "stopped_early": sum(bool(r.get("stopped_early")) for r in rows),
        "best_mmcs_truth": best["mmcs_truth"] if best else None,
        "best_member": best["member_id"] if best else None,
    }


def format_summary(summary: dict) -> str:
    line = (
        f"halving: {summary['member_steps']} member-steps of the full grid's {summary['full_grid_member_steps']} "
        f"({summary['fraction']:.1%}); {summary['stopped_early']} members stopped early"
    )
    if summary["best_mmcs_truth"] is not None:
        line += f"; best mmcs_truth {summary['best_mmcs_truth']:.4f} ({summary['best_member']})"
    return line
