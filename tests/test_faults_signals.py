"""SIGTERM and SIGINT (scancel, Ctrl-C, a SLURM time limit) at every stage of a sweep: it checkpoints, exits 75
with one line saying to rerun, leaves no worker behind, and the rerun resumes to the weights (or the store) of
an uninterrupted run (docs/reliability.md names the test here that proves each row)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from sae_ensemble.activations.reader import ActivationStore
from sae_ensemble.activations.synthetic import write_synthetic
from sae_ensemble.dispatch import EXIT_OK, EXIT_REQUEUE
from tests.fault_sweep import (  # noqa: F401 (the shared fixtures, used by name)
    REPO,
    assert_checkpoints_readable,
    assert_same_weights,
    checkpointed,
    error_lines,
    finish,
    group_is_gone,
    launch,
    reference,
    script,
    store_path,
    wait_for,
)


def test_sigterm_during_a_checkpoint_write_exits_75_and_a_rerun_resumes_to_the_same_weights(
    script, store_path, reference, tmp_path
):
    run_dir, marker = tmp_path / "run", tmp_path / "writing"
    sweep = launch(script, store_path, run_dir, "slow_checkpoint", marker=str(marker))
    wait_for(lambda: checkpointed(run_dir), what="the first checkpoints")
    Path(f"{marker}.armed").touch()
    wait_for(marker.exists, what="a worker inside a checkpoint write")
    os.killpg(sweep.pid, signal.SIGTERM)  # parent and workers, as scancel or Ctrl-C would
    code, output = finish(sweep)
    assert code == EXIT_REQUEUE, output
    assert not error_lines(output) and f"rerun into {run_dir}" in output, output
    assert_checkpoints_readable(run_dir)
    for record in run_dir.glob("checkpoints/ensemble_*/step_*/resume.json"):  # nothing looks complete but is not
        listed = json.loads(record.read_text())["members"]
        assert all((record.parent / "members" / m / "cfg.json").exists() for m in listed), record.parent
    code, output = finish(launch(script, store_path, run_dir))
    assert code == EXIT_OK, output
    assert_same_weights(reference, run_dir)


def test_sigterm_before_the_workers_start_exits_75_leaves_no_worker_and_a_rerun_completes(
    script, store_path, reference, tmp_path
):
    run_dir = tmp_path / "run"
    sweep = launch(script, store_path, run_dir, "sigterm_at_spawn")
    code, output = finish(sweep, timeout=60)
    assert code == EXIT_REQUEUE, output  # without handlers in place the parent dies of the signal (-15)
    assert not error_lines(output) and f"rerun into {run_dir}" in output, output
    wait_for(lambda: group_is_gone(sweep.pid), timeout=10, what="every worker to exit with the sweep")
    assert assert_checkpoints_readable(run_dir) == [0]
    code, output = finish(launch(script, store_path, run_dir))
    assert code == EXIT_OK, output
    assert_same_weights(reference, run_dir)


def test_sigterm_while_the_store_is_built_exits_75_and_a_rerun_finishes_the_same_store(tmp_path):
    data = dict(d_in=64, n_features=128, n_rows=100_000, rows_per_chunk=5_000, heldout_rows=1000)
    args = [
        sys.executable,
        str(REPO / "sweep.py"),
        *(f"data.{k}={v}" for k, v in data.items()),
        f"data.store_root={tmp_path / 'stores'}",
        "plan_only=true",
        "progress=false",
        "wandb=disabled",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    sweep = subprocess.Popen(
        args, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(lambda: list((tmp_path / "stores").glob("*/progress.json")), what="the store build to start")
    os.killpg(sweep.pid, signal.SIGTERM)
    out, err = sweep.communicate(timeout=60)
    assert sweep.returncode == EXIT_REQUEUE, out + err
    assert "interrupted by SIGTERM outside training; rerun into" in err and "Traceback" not in err, err
    (store_dir,) = [p for p in (tmp_path / "stores").iterdir() if p.is_dir()]
    assert not (store_dir / "manifest.json").exists()
    rerun = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == EXIT_OK, rerun.stderr
    uninterrupted = write_synthetic(tmp_path / "uninterrupted", **data)  # n_active, seed, ... at the config's defaults
    assert ActivationStore.open(store_dir, verify="checksum").fingerprint == uninterrupted.fingerprint


def test_a_worker_signal_arriving_while_the_stop_event_lock_is_held_does_not_deadlock():
    """The handler runs inside whatever the main thread was doing, e.g. `stop.is_set()` holding the event's lock."""
    code = """
import multiprocessing as mp, signal
from sae_ensemble.dispatch import StopFlag
stop = mp.get_context("spawn").Event()
flag = StopFlag(stop).install()
with stop._cond:  # what is_set() holds while it runs
    signal.raise_signal(signal.SIGTERM)
print(flag.is_set(), stop.is_set())
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0 and result.stdout.split() == ["True", "True"], result.stderr
