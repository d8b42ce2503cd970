"""Successive halving: ranking, re-packing, and runs that equal the full grid's members and resume exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from sae_ensemble import checkpoint, dispatch, halving, segments
from sae_ensemble.activations.reader import ActivationStore
from sae_ensemble.activations.synthetic import write_synthetic
from sae_ensemble.checkpoint import load_member
from sae_ensemble.config import Grid, Halving, Training
from sae_ensemble.dispatch import EXIT_OK
from sae_ensemble.grid import members
from sae_ensemble.plan import ensemble_memory, make_plan, stage_bytes
from sae_ensemble.report import load_rows
from sae_ensemble.rundir import Plan, RunDir
from tests.sweeps import compose_config

D_IN = 16
GRID = Grid(variants=["relu"], dict_sizes=[32, 48], l1=[3e-4, 1e-3, 3e-3, 1e-2])  # 8 members, 2 dict sizes
TRAINING = dict(
    steps=40, batch_size=64, checkpoint_every=10, log_every=5, eval_rows=256, dead_window_tokens=2000, execution="fused"
)  # pinned: runs compared to 1e-6 must take the same path
HALVING = Halving(rungs=[0.25, 0.5], eta=2, metric="mmcs_truth")  # rungs at steps 10 and 20: 8 -> 4 -> 2 members
BUDGET = 2**34
DEVICES = ["cpu:0"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStore:
    path = tmp_path_factory.mktemp("store") / "synthetic"
    write_synthetic(path, d_in=D_IN, n_features=24, n_active=3, n_rows=6000, rows_per_chunk=1000, seed=0)
    return ActivationStore.open(path)


def plan_for(training: Training) -> Plan:
    return make_plan(members(GRID, D_IN), DEVICES, training.batch_size, BUDGET)


def halving_run(store: ActivationStore, run_dir: Path) -> int:
    """The run's segments as the pipeline trains them: one per stretch between rungs."""
    training = Training(**TRAINING, halving=HALVING)
    return segments.run(
        plan_for(training),
        {None: store},
        RunDir(run_dir),
        training,
        DEVICES,
        BUDGET,
        lambda segment: dispatch.train(segment, store.path, run_dir, training, progress=False),
    )


def members_of(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_member(p)[1] for p in sorted((run_dir / "members").iterdir())}


def assert_same_members(left: dict, right: dict, atol: float = 1e-6) -> None:
    assert sorted(left) == sorted(right)
    for member_id in left:
        for name in left[member_id]:
            torch.testing.assert_close(
                left[member_id][name], right[member_id][name], atol=atol, rtol=0, msg=f"{member_id} {name}"
            )


@pytest.fixture(scope="module")
def full_run(store, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("full")
    training = Training(**TRAINING)
    assert (
        dispatch.train(segments.first(plan_for(training), training), store.path, run_dir, training, progress=False)
        == EXIT_OK
    )
    return run_dir


@pytest.fixture(scope="module")
def halved_run(store, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("halved")
    assert halving_run(store, run_dir) == EXIT_OK
    return run_dir


# -- ranking and re-packing ----------------------------------------------------------------------


def test_pareto_ranks_peel_fronts_and_ties_break_by_member_id():
    points = {"a": (1.0, 0.5), "b": (2.0, 0.2), "c": (2.0, 0.6), "d": (3.0, 0.7), "e": (1.0, 0.5)}
    assert halving.pareto_ranks(points) == {"a": 0, "e": 0, "b": 0, "c": 1, "d": 2}
    metrics = {k: {"l0": x, "fvu": y} for k, (x, y) in points.items()}
    assert halving.rank(metrics, "pareto") == ["b", "a", "e", "c", "d"]  # within a front: lower fvu first


def test_a_frozen_or_non_finite_member_ranks_last_under_every_metric():
    metrics = {
        "bad": {"l0": float("nan"), "fvu": float("nan"), "mmcs_truth": float("nan")},
        "x": {"l0": 3.0, "fvu": 0.3, "mmcs_truth": 0.5},
        "y": {"l0": 4.0, "fvu": 0.1, "mmcs_truth": 0.9},
    }
    for metric in ("pareto", "mmcs_truth", "fvu"):
        assert halving.rank(metrics, metric)[-1] == "bad"
    assert halving.rank(metrics, "mmcs_truth") == ["y", "x", "bad"]


def test_halving_settings_are_checked_with_one_sentence():
    assert Halving(rungs=[0.25, 0.5]).problem(100) is None
    assert "strictly between 0 and 1" in Halving(rungs=[0.5, 1.0]).problem(100)
    assert "increasing" in Halving(rungs=[0.5, 0.25]).problem(100)
    assert "increasing" in Halving(rungs=[0.1, 0.11]).problem(10)  # both round to step 1
    assert "eta=1" in Halving(rungs=[0.5], eta=1).problem(100)
    with pytest.raises(ConfigCompositionException) as error:  # a closed choice: Hydra checks it
        compose_config("training.halving.metric=loss")
    assert "Invalid value 'loss', expected one of [auto, pareto, mmcs_truth, fvu]" in str(error.value.__cause__)


def test_a_repack_never_drops_a_member_that_should_survive(store, tmp_path):
    """Over random metrics and packings (dict sizes, device counts, budgets that split ensembles), the
    survivors are exactly the best ceil(n / eta), and the new plan holds each of them exactly once."""
    generator = random.Random(0)
    for trial in range(30):
        sizes = generator.sample([16, 24, 32, 48, 64], generator.randint(1, 3))
        grid_members = members(Grid(variants=["relu", "tied"], dict_sizes=sizes, l1=[1e-3, 3e-3, 1e-2]), D_IN)
        metrics = {
            m.member_id: {
                "l0": generator.uniform(1, 9),
                "fvu": generator.uniform(0, 1),
                "mmcs_truth": generator.random(),
            }
            for m in grid_members
        }
        metric, eta = generator.choice(["pareto", "mmcs_truth", "fvu"]), generator.randint(2, 4)
        order = halving.rank(metrics, metric)
        keep = set(order[: halving.survivors_count(len(order), eta)])
        assert len(keep) == -(-len(grid_members) // eta) and len(order) == len(grid_members)
        best = (
            max(metrics, key=lambda m: metrics[m]["mmcs_truth"])
            if metric == "mmcs_truth"
            else min(metrics, key=lambda m: metrics[m]["fvu"])
        )
        assert best in keep
        if metric != "pareto":  # everything kept is at least as good as everything dropped (lower is better)
            score = {m: -v["mmcs_truth"] if metric == "mmcs_truth" else v["fvu"] for m, v in metrics.items()}
            assert max(score[m] for m in keep) <= min((score[m] for m in set(order) - keep), default=float("inf"))
        devices = [f"cuda:{i}" for i in range(generator.randint(1, 3))]  # names only: planning needs no GPU
        one = stage_bytes([ensemble_memory([max(grid_members, key=lambda m: m.dict_size)], 64)], 64, D_IN, "cuda:0")
        budget = generator.choice([BUDGET, 2 * one])  # a budget for about two members splits the ensembles
        survivors = [m for m in grid_members if m.member_id in keep]
        plan = make_plan(survivors, devices, 64, budget)
        planned = [m for e in plan.ensembles for m in e.members]
        assert sorted(planned) == sorted(keep), f"trial {trial}"


# -- runs ------------------------------------------------------------------------------------------


def test_halving_stops_the_worst_and_its_survivors_equal_the_full_grids_members(full_run, halved_run):
    rows = {r["member_id"]: r for r in load_rows(halved_run)}
    assert len(rows) == 8
    first = json.loads((halved_run / "halving" / "rung_1" / "ranking.json").read_text())
    second = json.loads((halved_run / "halving" / "rung_2" / "ranking.json").read_text())
    assert (
        first["step"] == 10 and len(first["survivors"]) == 4 and second["step"] == 20 and len(second["survivors"]) == 2
    )
    assert set(second["survivors"]) <= set(first["survivors"])
    assert first["order"][:4] == sorted(
        first["survivors"], key=first["order"].index
    )  # the best by the rung's mmcs_truth
    for member_id, row in rows.items():
        expected = 40 if member_id in second["survivors"] else 20 if member_id in first["survivors"] else 10
        assert row["steps"] == expected and row["stopped_early"] == (expected < 40), member_id
    # Each survivor, re-packed twice, trained exactly as in the full grid; each dropped member kept its rung's weights.
    full, halved = members_of(full_run), members_of(halved_run)
    assert_same_members({m: full[m] for m in second["survivors"]}, {m: halved[m] for m in second["survivors"]})
    summary = halving.member_steps(list(rows.values()), 40)
    assert summary["member_steps"] == 8 * 10 + 4 * 10 + 2 * 20 and summary["full_grid_member_steps"] == 320
    # The re-packed segments have fewer ensembles (one per surviving dict size) with fewer members.
    plans = [json.loads((halved_run / "halving" / f"rung_{k}" / "plan.json").read_text()) for k in (1, 2)]
    assert [sum(len(e["members"]) for e in p["ensembles"]) for p in plans] == [4, 2]


def test_a_dropped_member_keeps_its_rung_weights_and_metrics(halved_run):
    ranking = json.loads((halved_run / "halving" / "rung_1" / "ranking.json").read_text())
    dropped = [m for m in ranking["order"] if m not in ranking["survivors"]]
    for member_id in dropped:
        saved = next((halved_run / "checkpoints").glob(f"ensemble_*/step_{10:09d}/members/{member_id}"))
        _, final, _, cfg = load_member(halved_run / "members" / member_id)
        _, at_rung, _, _ = load_member(saved)
        assert_same_members({member_id: final}, {member_id: at_rung}, atol=0)
        assert cfg["stopped_early"] is True and cfg["steps"] == 10 and cfg["metrics"] == ranking["metrics"][member_id]
        assert (halved_run / "members" / member_id / "feature_freq.safetensors").is_file()


@pytest.mark.parametrize("stop_after", ["write_stopped_member", "seed_checkpoint"])
def test_a_halving_run_interrupted_during_the_repack_resumes_to_the_uninterrupted_result(
    store, halved_run, tmp_path, monkeypatch, stop_after
):
    """A SIGTERM in the parent mid-transition raises there (the pipeline's handler); the rerun redoes the
    uncommitted transition and ends with the same members and rankings."""
    real = getattr(checkpoint, stop_after)
    calls = []

    def interrupted_after_first_call(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt("SIGTERM during the re-pack")

    monkeypatch.setattr(checkpoint, stop_after, interrupted_after_first_call)
    with pytest.raises(KeyboardInterrupt):
        halving_run(store, tmp_path)
    assert not (tmp_path / "halving" / "rung_1").exists()  # nothing committed
    monkeypatch.setattr(checkpoint, stop_after, real)
    assert halving_run(store, tmp_path) == EXIT_OK
    assert not list((tmp_path / "halving").glob(".*.tmp"))
    assert_same_members(members_of(halved_run), members_of(tmp_path))
    for k in (1, 2):
        rankings = [
            json.loads((run_dir / "halving" / f"rung_{k}" / "ranking.json").read_text())
            for run_dir in (tmp_path, halved_run)
        ]
        assert rankings[0] == rankings[1], f"rung {k}"
