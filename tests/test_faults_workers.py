"""Faults inside training: a killed worker, non-finite data and diverging members, and the parent loop that
watches the workers. Each ends with its documented exit code and one clear line, and a rerun resumes to
the weights of an uninterrupted run (docs/reliability.md names the test here that proves each row)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sae_ensemble import devices, pipeline, tracking
from sae_ensemble.activations.stream import Position
from sae_ensemble.checkpoint import load_member, resume, save_checkpoint
from sae_ensemble.config import Grid, Training
from sae_ensemble.dispatch import EXIT_FAILED, EXIT_OK, EXIT_REQUEUE
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.grid import members
from sae_ensemble.metrics import FiringCounter
from sae_ensemble.rundir import EnsembleDir
from sae_ensemble.train import ensemble_options
from tests.fault_sweep import (  # noqa: F401 (the shared fixtures, used by name)
    D_IN,
    REPO,
    assert_checkpoints_readable,
    assert_same_weights,
    checkpointed,
    checkpointed_ensemble,
    error_lines,
    finish,
    launch,
    members_of,
    reference,
    script,
    store_path,
    wait_for,
    worker_pids,
    write_nan_rows,
)

# -- a worker dies -----------------------------------------------------------------------------------


def test_kill_9_of_one_worker_exits_1_naming_it_and_a_rerun_resumes_to_the_same_weights(
    script, store_path, reference, tmp_path
):
    run_dir = tmp_path / "run"
    sweep = launch(script, store_path, run_dir, "slow_steps", devices="cpu:2")
    wait_for(lambda: checkpointed(run_dir, workers=2), what="the first checkpoints")
    os.kill(worker_pids(sweep.pid)[0], signal.SIGKILL)
    code, output = finish(sweep)
    assert code == EXIT_FAILED, output
    (died,) = [line for line in error_lines(output) if "died" in line]
    assert (
        "worker on cpu:" in died and "died with signal SIGKILL" in died and ("relu-d32" in died or "tied-d32" in died)
    ), died
    assert_checkpoints_readable(run_dir)
    code, output = finish(launch(script, store_path, run_dir, devices="cpu:2"))
    assert code == EXIT_OK, output
    assert_same_weights(reference, run_dir)


def test_cpu_worker_threads_come_from_the_cpu_allocation_not_the_machine_at_most_omp_num_threads(monkeypatch):
    monkeypatch.setattr(devices.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {2, 3, 4, 5}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert devices.cpu_threads(2) == 2 and devices.cpu_threads(8) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as torch takes it: `make test` runs one thread per process
    assert devices.cpu_threads(1) == 1


@pytest.mark.timing
def test_opening_many_wandb_runs_does_not_block_the_loop_that_watches_the_workers(tmp_path, monkeypatch):
    """The parent forwards every member's metrics with `Tracker.log` between its liveness checks: log must return
    at once while wandb runs open in the background."""

    class Run:
        def __init__(self):
            self.logged, self.summary, self.finished = [], {}, False

        def log(self, values, step=None):
            self.logged.append(step)

        def finish(self):
            self.finished = True

    opened = []

    def slow_init(self, **args):
        time.sleep(0.05)  # wandb.init takes about this or much more per run
        opened.append(Run())
        return opened[-1]

    monkeypatch.setattr(tracking.Tracker, "_init", slow_init)
    grid_members = members(Grid(variants=["relu"], dict_sizes=[8], l1=[1e-3 * (i + 1) for i in range(40)]), 4)
    tracker = tracking.Tracker("p", "g", mode="offline", directory=tmp_path)
    tracker.register(grid_members)
    started = time.monotonic()
    for member in grid_members:
        tracker.log(member.member_id, 5, {"mse": 1.0})
    # A log() that waited for its run to open would take 40 x 50 ms = 2 s; one that does not takes microseconds,
    # so 0.5 s holds however long a loaded box deschedules this thread.
    assert time.monotonic() - started < 0.5, "log() waited for runs to open (40 x 50 ms)"
    tracker.close()
    assert len(opened) == 40 and all(r.logged == [5] and r.finished for r in opened)


# -- non-finite data reaching training ---------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_store(store_path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("nan") / "store"
    shutil.copytree(store_path, path)
    write_nan_rows(path, {"chunk_00001.safetensors": [7, 400], "chunk_00003.safetensors": [500]})
    return path


def test_nan_rows_unverified_are_skipped_by_training_and_a_resumed_run_matches(script, nan_store, tmp_path):
    """With data.verify=size a NaN row reaches the worker: its batch is skipped, no member freezes."""
    uninterrupted = tmp_path / "uninterrupted"
    code, output = finish(launch(script, nan_store, uninterrupted))
    assert code == EXIT_OK, output
    assert (
        "skipped a batch holding non-finite values" in output
        and "batch(es) holding non-finite values this run" in output
    ), output
    for member_id, params in members_of(uninterrupted).items():
        assert load_member(uninterrupted / "members" / member_id)[3]["alive"], member_id
        assert all(torch.isfinite(v).all() for v in params.values()), member_id

    run_dir = tmp_path / "run"
    sweep = launch(script, nan_store, run_dir, "slow_steps")
    wait_for(lambda: checkpointed(run_dir), what="the first checkpoints")
    os.killpg(sweep.pid, signal.SIGTERM)
    assert finish(sweep)[0] == EXIT_REQUEUE
    code, output = finish(launch(script, nan_store, run_dir))
    assert code == EXIT_OK, output
    assert_same_weights(uninterrupted, run_dir)


# -- non-finite steps: skip, then freeze after K in a row (Ensemble.step) ----------------------------


def _tiny_ensemble(freeze_after: int) -> Ensemble:
    return Ensemble(
        members(Grid(variants=["relu"], dict_sizes=[8], l1=[1e-3, 1e-2]), 4), 100, freeze_after=freeze_after
    )


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
            assert torch.equal(ensemble.params[name], params[name]) and torch.equal(
                ensemble.opt_state.mu[name], moments[name]
            ), name
    ensemble.step(good)  # a finite step resets the streak and trains again
    assert ensemble.alive.all() and ensemble.nonfinite_streak.tolist() == [0, 0]
    assert not torch.equal(ensemble.params["W_enc"], params["W_enc"]) and all(
        torch.isfinite(v).all() for v in ensemble.params.values()
    )
    params = {k: v.clone() for k, v in ensemble.params.items()}
    for _ in range(3):
        ensemble.step(bad)
    assert not ensemble.alive.any(), "three non-finite steps in a row freeze a member with freeze_after=3"
    ensemble.step(good)
    assert not ensemble.alive.any() and all(torch.equal(ensemble.params[k], params[k]) for k in params), (
        "a frozen member stays frozen"
    )


def test_freeze_after_one_freezes_at_the_first_non_finite_step():
    ensemble = _tiny_ensemble(freeze_after=1)
    ensemble.step(torch.full((16, 4), float("nan")))
    assert not ensemble.alive.any()


def test_the_non_finite_streak_survives_a_checkpoint(tmp_path):
    ensemble, counter, _ = checkpointed_ensemble(tmp_path)
    ensemble.step(torch.full((16, 4), float("nan")))
    ensemble.step(torch.full((16, 4), float("nan")))
    save_checkpoint(EnsembleDir(tmp_path), ensemble, Position(0, 0, 3), counter)
    training = Training(steps=10, freeze_after=5)
    restored = resume(
        EnsembleDir(tmp_path),
        ensemble.members,
        training.steps,
        "cpu",
        FiringCounter(3, 8, 100),
        **ensemble_options(training, "cpu", micro_batches=1),
    )[0]
    assert restored.nonfinite_streak.tolist() == [2, 2, 2] and restored.freeze_after == 5 and restored.alive.all()


def test_frozen_members_are_reported_loudly_and_exit_3_unless_allowed(store_path, tmp_path, capsys):
    args = [
        sys.executable,
        str(REPO / "sweep.py"),
        f"data.store={store_path}",
        f"data.d_in={D_IN}",
        "devices=cpu",
        "grid.variants=[relu]",
        "grid.dict_sizes=[32]",
        "grid.dict_ratios=[]",
        "grid.l1=[0.001]",
        "grid.lr=[0.001,1e30]",
        "training.steps=20",
        "training.freeze_after=3",
        "training.batch_size=64",
        "training.eval_rows=256",
        "progress=false",
        "wandb=disabled",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == pipeline.EXIT_FROZEN, result.stdout + result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "FROZE" in line]
    assert line.startswith("error: 1 of 2 members FROZE after training.freeze_after=3") and "lr1e+30" in line, line
    rows = (tmp_path / "run" / "summary.csv").read_text().splitlines()
    alive = rows[0].split(",").index("alive")
    assert sorted(r.split(",")[alive] for r in rows[1:]) == ["False", "True"]

    rows = [{"member_id": "a", "alive": True}, {"member_id": "b", "alive": False}]
    assert pipeline.report_frozen(rows, Training(allow_frozen=True)) == EXIT_OK
    assert "warning: 1 of 2 members FROZE" in capsys.readouterr().err
    assert pipeline.report_frozen(rows[:1], Training()) == EXIT_OK
