"""Hardening: bad data, faults and signals. Each fault has a documented exit code, one clear line,
loses no checkpoint, and a rerun resumes to the weights of an uninterrupted run (docs/reliability.md).

CPU workers stand in for GPUs; stores are tiny and runs short so the suite stays fast.
"""

from __future__ import annotations

import torch

from sae_ensemble.ensemble import Ensemble
from sae_ensemble.grid import Grid

# ---- non-finite steps: skip, then freeze after K in a row -------------------------------------------


def _tiny_ensemble(freeze_after: int) -> Ensemble:
    return Ensemble(Grid(variants=["relu"], dict_sizes=[8], l1=[1e-3, 1e-2]).members(4), 100, freeze_after=freeze_after)


def test_a_member_skips_non_finite_steps_and_freezes_only_after_k_in_a_row():
    ensemble = _tiny_ensemble(freeze_after=3)
    good, bad = torch.randn(16, 4), torch.full((16, 4), float("inf"))
    ensemble.step(good)
    params = {k: v.clone() for k, v in ensemble.params.items()}
    moments = {k: v.clone() for k, v in ensemble.opt_state.mu.items()}
    for expected_streak in (1, 2):
        stats = ensemble.step(bad)
        assert stats["alive"].all() and ensemble.nonfinite_streak.tolist() == [expected_streak] * 2
        for name in params:  # a skipped step changes neither the weights nor the moments
            assert torch.equal(ensemble.params[name], params[name]) and torch.equal(ensemble.opt_state.mu[name], moments[name]), name
    ensemble.step(good)  # a finite step resets the streak and trains again
    assert ensemble.alive.all() and ensemble.nonfinite_streak.tolist() == [0, 0]
    assert not torch.equal(ensemble.params["W_enc"], params["W_enc"]) and all(torch.isfinite(v).all() for v in ensemble.params.values())
    params = {k: v.clone() for k, v in ensemble.params.items()}
    for _ in range(3):
        ensemble.step(bad)
    assert not ensemble.alive.any(), "three non-finite steps in a row freeze a member with freeze_after=3"
    ensemble.step(good)
    assert not ensemble.alive.any() and all(torch.equal(ensemble.params[k], params[k]) for k in params), "a frozen member stays frozen"


def test_freeze_after_one_freezes_at_the_first_non_finite_step():
    ensemble = _tiny_ensemble(freeze_after=1)
    ensemble.step(torch.full((16, 4), float("nan")))
    assert not ensemble.alive.any()
