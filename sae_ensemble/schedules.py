"""Each member's learning rate and sparsity coefficient at a step: [M] tensors on the ensemble's device.

Linear warmups of both, an optional linear learning-rate decay to 0 over the last steps, and for
target-L0 members (steering.py) a coefficient the controller sets instead of the configured one. The
step reads the schedule at a device tensor, so a replayed CUDA graph gets the new step each time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sae_ensemble import steering
from sae_ensemble.config import STEERABLE
from sae_ensemble.member import Member


def per_member(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)


class Schedules:
    """The members' schedules; `coefficient` [M] is the architecture's configured sparsity coefficient (zeros
    for architectures with none, which take no sparsity penalty)."""

    def __init__(self, members: Sequence[Member], total_steps: int, coefficient: torch.Tensor) -> None:
        device = coefficient.device
        self.total_steps = int(total_steps)
        self.coefficient = coefficient
        self.lr = per_member([m.lr for m in members], device)
        self.lr_warmup = per_member([m.lr_warmup_steps for m in members], device)
        self.lr_decay = per_member([m.lr_decay_steps for m in members], device)
        self.l1_warmup = per_member([m.l1_warmup_steps for m in members], device)
        self.target_l0 = per_member([m.target_l0 if m.variant in STEERABLE else 0.0 for m in members], device)
        self.steered = self.target_l0 > 0  # [M] members whose coefficient the controller sets
        self.any_steered = bool(self.steered.any())  # none: the step runs none of the controller's ops
        self.controller = steering.init_state(coefficient)  # [M] tensors, updated in place by the step

    def at(self, step: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lr [M], sparsity coefficient [M]) at `step` (0-based; an int or a 0-d tensor on the device)."""
        s = torch.as_tensor(step, dtype=torch.float32, device=self.lr.device)
        lr_factor = torch.clamp((s + 1) / self.lr_warmup.clamp(min=1), max=1.0)
        decay = torch.clamp((self.total_steps - s) / self.lr_decay.clamp(min=1), max=1.0)
        decay_factor = torch.where(self.lr_decay > 0, decay, 1.0)
        l1_factor = torch.clamp((s + 1) / self.l1_warmup.clamp(min=1), max=1.0)
        coefficient = self.coefficient
        if self.any_steered:
            coefficient = torch.where(self.steered, steering.coefficients(self.controller, self.target_l0), coefficient)
        return self.lr * lr_factor * decay_factor, coefficient * l1_factor

    def learn(self, l0: torch.Tensor, taken: torch.Tensor, step: torch.Tensor) -> None:
        """After step `step` (0-based, on the device): steered members that took it fold its L0 [M] in, if they
        stepped at the full coefficient (after any l1 warmup)."""
        if not self.any_steered:
            return
        steering.update_(self.controller, l0, self.target_l0, self.steered & taken & (step + 1 >= self.l1_warmup))

    def controller_state(self, index: int) -> dict[str, float]:
        """One member's controller state as plain floats (float32 values: exact through JSON)."""
        return {name: float(self.controller[name][index]) for name in steering.STATE}

    def load_controller_state(self, index: int, state: dict[str, float]) -> None:
        for name in steering.STATE:
            self.controller[name][index] = state[name]
