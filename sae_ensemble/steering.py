"""Target-L0 members: steer each member's sparsity coefficient toward the L0 it should reach.

A member with `target_l0 > 0` (and a steerable variant) does not keep its l1 fixed: every step
a controller on the log of its coefficient moves it toward the value that gives the target L0.
The state is three [M] device tensors updated in place inside the step (no host read, so the
step can still be replayed as a CUDA graph):

    l0_ema          EMA of the training batches' L0 (a single batch's L0 is noisy)
    ema_weight      1 - beta^t: divides the EMA to remove its bias toward its zero start
    log_coefficient the integral state: log of the coefficient used for the next step

Control law, per member, after each step with measured L0 `l0`:

    error = clip(log(ema_l0 / target), -ERROR_CLIP, ERROR_CLIP)      # > 0: too many features fire
    log_coefficient += INTEGRAL_GAIN * error                           # integral part (the memory)
    coefficient = exp(log_coefficient + PROPORTIONAL_GAIN * error)     # what the loss uses

Working on log(coefficient) and log(L0) makes the loop scale-free: L0 falls roughly as a power
of the coefficient, so a fixed gain moves every target equally fast, whatever the data's scale.
The clip bounds the coefficient's rate of change (a factor exp(INTEGRAL_GAIN * ERROR_CLIP) per
step), so the first steps, when L0 is far from any target, cannot wind the integral up. The
EMA's time constant is about as long as the SAE takes to respond to a change of coefficient,
and the gains keep the loop's time constant several times longer: it settles without
oscillating (tests/test_steering.py, docs/steering.md).

Which variants steer: config.STEERABLE. The controller writes the coefficient the loss reads as
`hparams["l1"]`; an architecture whose sparsity penalty has another coefficient (jumprelu's
L0 penalty, gated's sparsity term) plugs in by reading its coefficient from that same hparam
and being listed in config.STEERABLE. topk members take k = round(target_l0) instead (grid.py).
"""

from __future__ import annotations

import torch

EMA_BETA = 0.99  # ~100-step average: about the time an SAE at lr ~3e-3 takes to answer a coefficient change
INTEGRAL_GAIN = 1e-2  # per step, on a log-error: a full-clip error moves the coefficient by e every 100 steps
PROPORTIONAL_GAIN = (
    0.5  # damps the integral's overshoot: the coefficient answers the error at once, the integral remembers it
)
ERROR_CLIP = 1.0  # |log(L0 / target)| beyond this counts as this much
STATE = ("log_coefficient", "l0_ema", "ema_weight")


def init_state(coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
    """Controller state [M] each, starting at `coefficients` [M] (positive; members not steered keep theirs unused)."""
    return {
        "log_coefficient": coefficients.clamp(min=1e-30).log(),
        "l0_ema": torch.zeros_like(coefficients),
        "ema_weight": torch.zeros_like(coefficients),
    }


def _error(state: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """clip(log(ema_l0 / target)) [M]; 0 before any measurement (and for members without a target)."""
    measured = state["l0_ema"] / state["ema_weight"].clamp(min=1e-12)
    error = torch.log(measured.clamp(min=1e-6) / targets.clamp(min=1e-6)).clamp(-ERROR_CLIP, ERROR_CLIP)
    return torch.where((state["ema_weight"] > 0) & (targets > 0), error, 0.0)


def coefficients(state: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """The sparsity coefficient [M] a steered member uses in its next step."""
    return torch.exp(state["log_coefficient"] + PROPORTIONAL_GAIN * _error(state, targets))


@torch.no_grad()
def update_(state: dict[str, torch.Tensor], l0: torch.Tensor, targets: torch.Tensor, active: torch.Tensor) -> None:
    """One controller step in place: members in `active` [M] bool fold their measured `l0` [M] in.

    Inactive members (not steered, frozen, a non-finite step, an l1 warmup still running) keep
    their state exactly, so a skipped step changes nothing, as it changes nothing else.
    """
    active = active & torch.isfinite(l0)
    l0 = torch.nan_to_num(l0, nan=0.0, posinf=0.0, neginf=0.0)
    ema = torch.where(active, EMA_BETA * state["l0_ema"] + (1 - EMA_BETA) * l0, state["l0_ema"])
    weight = torch.where(active, EMA_BETA * state["ema_weight"] + (1 - EMA_BETA), state["ema_weight"])
    state["l0_ema"].copy_(ema)
    state["ema_weight"].copy_(weight)
    moved = state["log_coefficient"] + INTEGRAL_GAIN * _error(state, targets)
    state["log_coefficient"].copy_(torch.where(active, moved, state["log_coefficient"]))
