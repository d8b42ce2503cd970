"""Target-L0 members: the controller converges, steers real SAEs, equals itself across executions, resumes exactly."""

from __future__ import annotations

import re

import pytest
import torch

from sae_ensemble import pipeline, steering
from sae_ensemble.activations.reader import ActivationStore
from sae_ensemble.activations.stream import train_batches
from sae_ensemble.activations.synthetic import write_synthetic
from sae_ensemble.checkpoint import load_checkpoint, save_checkpoint
from sae_ensemble.config import ConfigError, Grid, Training
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.grid import members as grid_members
from sae_ensemble.member import Member
from sae_ensemble.metrics import FiringCounter
from sae_ensemble.rundir import EnsembleDir
from sae_ensemble.train import ensemble_options
from tests.sweeps import compose_config

D_IN = 16


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStore:
    path = tmp_path_factory.mktemp("store") / "synthetic"
    write_synthetic(
        path, d_in=D_IN, n_features=48, n_active=4, n_rows=8000, rows_per_chunk=2000, heldout_rows=1000, seed=0
    )
    return ActivationStore.open(path)


def test_the_controller_converges_on_a_fixed_synthetic_plant():
    """A plant with the SAE's shape: L0 falls as a power of the coefficient and answers a change only
    after a lag (a first-order response with a 100-step time constant), plus batch noise. From a start
    off by 30x either way, every target is reached within 2% and held without oscillation."""
    generator = torch.Generator().manual_seed(0)
    targets = torch.tensor([2.0, 8.0, 30.0, 120.0])
    scale = torch.tensor([1e-3, 1e-2, 1e-4, 1e-5])  # L0 = scale^0.7 x coefficient^-0.7: each plant has its own
    start = torch.tensor([3e-2, 1e-4, 1e-6, 1e-3])
    state = steering.init_state(start)
    response = (scale / start) ** 0.7  # the plant's current L0 (lagging its steady value)
    history = []
    for _ in range(6000):
        coefficient = steering.coefficients(state, targets)
        steady = (scale / coefficient) ** 0.7
        response = response + (steady - response) / 100
        measured = response * (1 + 0.1 * torch.randn(4, generator=generator))
        steering.update_(state, measured, targets, torch.ones(4, dtype=torch.bool))
        history.append(response.clone())
    late = torch.stack(history[-1000:])
    assert ((late / targets - 1).abs() < 0.02).all(), late[-1]
    settled = (scale / targets ** (1 / 0.7)).log()  # log of the coefficient that gives each target
    assert torch.allclose(state["log_coefficient"], settled, atol=0.05)


def test_inactive_members_keep_their_controller_state_exactly():
    state = steering.init_state(torch.tensor([1e-3, 2e-3]))
    steering.update_(state, torch.tensor([5.0, 5.0]), torch.tensor([4.0, 4.0]), torch.tensor([True, True]))
    before = {k: v.clone() for k, v in state.items()}
    steering.update_(state, torch.tensor([float("nan"), 9.0]), torch.tensor([4.0, 4.0]), torch.tensor([True, False]))
    for name in steering.STATE:
        assert torch.equal(state[name], before[name]), name


def heldout_l0(ensemble: Ensemble, store: ActivationStore) -> torch.Tensor:
    codes, _ = ensemble.forward(store.heldout())
    return (codes > 0).float().sum(-1).mean(-1)


def train(ensemble: Ensemble, store: ActivationStore, steps: int, position=None):
    batches = train_batches(store, 64, seed=0, position=position)
    for _ in range(steps):
        batch, position = next(batches)
        ensemble.step(batch)
    return position


def test_target_l0_members_reach_their_targets_on_held_out_rows(store):
    members = [Member("relu", D_IN, 64, l1=1e-2, lr=3e-3, target_l0=t) for t in (3.0, 6.0)] + [
        Member("tied", D_IN, 64, l1=1e-4, lr=3e-3, target_l0=4.0)
    ]
    ensemble = Ensemble(members, 2000, execution="fused")
    train(ensemble, store, 2000)
    l0 = heldout_l0(ensemble, store)
    targets = torch.tensor([3.0, 6.0, 4.0])
    assert ((l0 / targets - 1).abs() < 0.1).all(), l0
    assert not torch.allclose(ensemble.schedules(2000)[1], torch.tensor([1e-2, 1e-2, 1e-4]))  # the coefficients moved


def test_a_fixed_l1_member_beside_steered_ones_trains_as_alone(store):
    fixed = Member("relu", D_IN, 32, l1=3e-3, lr=3e-3)
    mixed = Ensemble([fixed, Member("relu", D_IN, 32, l1=3e-3, lr=3e-3, target_l0=2.0)], 100, execution="fused")
    alone = Ensemble([fixed], 100, execution="fused")
    train(mixed, store, 100)
    train(alone, store, 100)
    for name, value in alone.params.items():
        torch.testing.assert_close(mixed.params[name][0], value[0], atol=1e-6, rtol=0)
    assert float(mixed.schedules(100)[1][0]) == pytest.approx(3e-3)


@pytest.mark.parametrize("execution", ["fused", "sparse"])
def test_every_execution_steers_as_the_reference(store, execution):
    members = [Member("relu", D_IN, 32, l1=1e-2, lr=3e-3, target_l0=t) for t in (2.0, 5.0)]
    reference, other = Ensemble(members, 60, execution="reference"), Ensemble(members, 60, execution=execution)
    train(reference, store, 60)
    train(other, store, 60)
    for name in steering.STATE:
        torch.testing.assert_close(
            other.schedule.controller[name], reference.schedule.controller[name], atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(other.params["W_enc"], reference.params["W_enc"], atol=1e-5, rtol=0)


def test_a_resumed_steered_ensemble_equals_an_uninterrupted_one(store, tmp_path):
    members = [Member("relu", D_IN, 32, l1=1e-2, lr=3e-3, target_l0=t) for t in (2.0, 5.0)]
    straight = Ensemble(members, 80, execution="fused")
    train(straight, store, 80)
    first = Ensemble(members, 80, execution="fused")
    counter = FiringCounter(2, 32, 2000)
    position = train(first, store, 40)
    step_dir = save_checkpoint(EnsembleDir(tmp_path), first, position, counter)
    training = Training(steps=80, execution="fused")
    resumed, position = load_checkpoint(
        step_dir,
        members,
        training.steps,
        "cpu",
        FiringCounter(2, 32, 2000),
        training.autocast_bf16,
        **ensemble_options(training, "cpu", micro_batches=1),
    )
    for name in steering.STATE:
        assert torch.equal(resumed.schedule.controller[name], first.schedule.controller[name]), name
    train(resumed, store, 40, position)
    for name in steering.STATE:
        assert torch.equal(resumed.schedule.controller[name], straight.schedule.controller[name]), name
    for name, value in straight.params.items():
        assert torch.equal(resumed.params[name], value), name


def test_target_l0_is_a_grid_axis_with_readable_ids_and_topk_takes_k_from_it():
    members = grid_members(Grid(variants=["relu", "topk"], dict_sizes=[64], target_l0=[4, 8.4], l1_start=2e-3), D_IN)
    ids = [m.member_id for m in members]
    assert ids == [
        "relu-d64-L0_4-bd0-lr0.001-s0",
        "relu-d64-L0_8.4-bd0-lr0.001-s0",
        "topk-d64-L0_4-bd0-lr0.001-s0",
        "topk-d64-L0_8.4-bd0-lr0.001-s0",
    ]
    assert [m.l1 for m in members[:2]] == [2e-3, 2e-3] and [m.k for m in members[2:]] == [4, 8]
    with pytest.raises(ValueError, match="round"):
        Member("topk", D_IN, 64, k=5, target_l0=8)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["grid.target_l0=[4,-1]"], "grid.target_l0=[4.0, -1.0] must hold positive L0 targets"),
        (["grid.target_l0=[4,0]"], "grid.target_l0=[4.0, 0.0] must hold positive L0 targets"),
        (
            ["grid.target_l0=[0.2]", "grid.variants=[topk]"],
            "grid.target_l0=[0.2] gives topk members k = round(target) < 1",
        ),
        (["grid.target_l0=[4]", "grid.l1_start=0.0"], "grid.l1_start=0.0 must be positive"),
    ],
    ids=["negative", "zero", "topk-k-below-1", "l1-start"],
)
def test_bad_target_l0_settings_are_one_sentence_config_errors(overrides, message):
    cfg = compose_config("grid.dict_sizes=[32]", "grid.dict_ratios=[]", "devices=cpu", *overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        pipeline.validate(cfg)
