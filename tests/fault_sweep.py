"""The sweep the fault tests (tests/test_faults_*.py) interrupt, and what they check a run dir with.

CPU workers stand in for GPUs; the store is tiny and runs are short so the suite stays fast. Faults
that must happen inside a worker (a slow checkpoint to signal into, a slow step to kill) are injected
by SWEEP_SCRIPT: spawned workers re-import it as their main module, so its top-level patches apply in
them too. The script, the store and the uninterrupted reference run are built once per test session
and shared by the fault test files (the fixtures `script`, `store_path` and `reference` below, which
each file imports): with pytest-xdist, files run in other worker processes, which wait for the first
to build them.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_ensemble.activations.format import read_chunk_header, sha256_file
from sae_ensemble.activations.reader import ActivationStore
from sae_ensemble.activations.stream import Position
from sae_ensemble.activations.synthetic import write_synthetic
from sae_ensemble.checkpoint import load_member, save_checkpoint
from sae_ensemble.config import Grid
from sae_ensemble.dispatch import EXIT_OK
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.grid import members
from sae_ensemble.metrics import FiringCounter
from sae_ensemble.rundir import EnsembleDir

REPO = Path(__file__).resolve().parents[1]
D_IN = 16
GRID = dict(variants=["relu", "tied"], dict_sizes=[32], l1=[1e-3, 1e-2])
TRAINING = dict(
    steps=60, batch_size=64, checkpoint_every=5, log_every=5, eval_rows=256, dead_window_tokens=2000, execution="fused"
)  # pinned: runs compared to 1e-6 must take the same path (auto times the candidates)
N_MEMBERS = len(members(Grid(**GRID), D_IN))

# One CPU worker (fewer processes to start) unless a test needs two; settings come from the FAULT_SWEEP
# environment variable, which the workers inherit: their top-level code reads the fault to inject there.
# A member trains the same in any packing, so every run compares with one reference.
SWEEP_SCRIPT = """
import json, os, signal, sys, time
from pathlib import Path

settings = json.loads(os.environ["FAULT_SWEEP"])
fault = settings.get("fault")

if fault in ("slow_steps", "slow_checkpoint"):  # runs in each worker
    import sae_ensemble.checkpoint as checkpoint
    from sae_ensemble.ensemble import Ensemble

    real_step = Ensemble.step

    def slow_step(self, batch):
        time.sleep(0.02)  # room to signal or kill a worker mid-run
        return real_step(self, batch)

    Ensemble.step = slow_step
    if fault == "slow_checkpoint":
        real_save = checkpoint.save_member

        def slow_save(directory, *args, **kwargs):
            # a checkpoint (written into a temporary step dir), once the test is ready for it
            if ".tmp" in str(directory) and Path(settings["marker"] + ".armed").exists():
                Path(settings["marker"]).write_text(str(directory))
                time.sleep(0.3)
            return real_save(directory, *args, **kwargs)

        checkpoint.save_member = slow_save  # what checkpoint.save_checkpoint calls

if __name__ == "__main__":
    from sae_ensemble import dispatch, segments
    from sae_ensemble.config import Grid, Training
    from sae_ensemble.devices import resolve_devices
    from sae_ensemble.grid import members
    from sae_ensemble.plan import make_plan

    training = Training(**settings["training"])
    grid = members(Grid(**settings["grid"]), settings["d_in"])
    plan = make_plan(grid, resolve_devices(settings["devices"]), training.batch_size, 2**34)
    if fault == "sigterm_at_spawn":  # SIGTERM lands after the first worker started, before the second
        import multiprocessing.context

        real_start = multiprocessing.context.SpawnProcess.start

        def start_then_sigterm(self):
            real_start(self)
            if self.name.endswith("cpu:0"):
                os.kill(os.getpid(), signal.SIGTERM)

        multiprocessing.context.SpawnProcess.start = start_then_sigterm
    if fault == "disk_full":  # every file written from here on (workers inherit it) stops at 2 KiB: EFBIG
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # CPython ignores it already; say so
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
    segment = segments.first(plan, training)
    sys.exit(dispatch.train(segment, settings["store"], settings["run_dir"], training, progress=False))
"""


# -- the script, the store and the uninterrupted run, shared by a test session's fault tests ----------


def shared_script(tmp_path_factory) -> Path:
    def build(directory: Path) -> None:
        (directory / "fault_sweep.py").write_text(SWEEP_SCRIPT)

    return _built_once(tmp_path_factory, "script", build) / "fault_sweep.py"


def shared_store(tmp_path_factory) -> Path:
    """The store every fault sweep trains on (6 chunks of 1000 rows), verified once when built: its manifest
    never changes after (tests copy it before damaging it), so readers in other processes see one file."""

    def build(directory: Path) -> None:
        write_synthetic(directory, d_in=D_IN, n_features=24, n_active=3, n_rows=6000, rows_per_chunk=1000, seed=0)
        ActivationStore.open(directory, verify="once")

    return _built_once(tmp_path_factory, "store", build)


def shared_reference(tmp_path_factory) -> Path:
    """The uninterrupted run every resumed one must equal."""
    script, store = shared_script(tmp_path_factory), shared_store(tmp_path_factory)
    return _built_once(tmp_path_factory, "reference", lambda directory: run_reference(script, store, directory))


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    return shared_script(tmp_path_factory)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    return shared_store(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return shared_reference(tmp_path_factory)


def _built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(directory)` the first time any test file of this session asks for `name`; after, its directory."""
    root = tmp_path_factory.getbasetemp() / "fault_sweep"
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # the same in every xdist worker of one test run
    if run:  # each worker has a base temp dir of its own, all in one parent
        root = tmp_path_factory.getbasetemp().parent / f"fault_sweep-{run}"
    root.mkdir(exist_ok=True)
    directory, done = root / name, root / f"{name}.done"
    # Not `<name>.lock`: write_synthetic takes that one (activations/lock.py), and flock would wait on itself.
    with open(root / f"{name}.building", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held while another worker builds it
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)  # a build that failed half-way
            directory.mkdir()
            build(directory)
            done.touch()
    return directory


def launch(script: Path, store: Path, run_dir: Path, fault: str | None = None, **settings) -> subprocess.Popen:
    """Start the sweep in its own session (so a test can signal its whole process group)."""
    config = {
        "fault": fault,
        "store": str(store),
        "run_dir": str(run_dir),
        "d_in": D_IN,
        "grid": GRID,
        "devices": "cpu:1",
        "training": {**TRAINING, **settings.pop("training", {})},
        **settings,
    }
    env = {**os.environ, "FAULT_SWEEP": json.dumps(config), "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, str(script)],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(sweep: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    output, _ = sweep.communicate(timeout=timeout)
    return sweep.returncode, output


def run_reference(script: Path, store: Path, run_dir: Path) -> Path:
    """Run the sweep without a fault into `run_dir`."""
    code, output = finish(launch(script, store, run_dir))
    assert code == EXIT_OK, output
    return run_dir


# -- checks on a run dir ----------------------------------------------------------------------------


def members_of(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_member(p)[1] for p in sorted((run_dir / "members").iterdir())}


def assert_same_weights(reference: Path, run_dir: Path) -> None:
    left, right = members_of(reference), members_of(run_dir)
    assert sorted(left) == sorted(right) and len(left) == N_MEMBERS
    for member_id, params in left.items():
        for name, value in params.items():
            torch.testing.assert_close(right[member_id][name], value, atol=1e-6, rtol=0, msg=f"{member_id} {name}")


def ensemble_dir(run_dir: Path, index: int) -> EnsembleDir:
    """Ensemble `index` of the sweep's one segment (no halving)."""
    return EnsembleDir(run_dir / "checkpoints" / f"ensemble_{index}")


def assert_checkpoints_readable(run_dir: Path) -> list[int]:
    """Every ensemble's newest complete checkpoint loads, optimizer moments included; return their steps."""
    steps = []
    for i in range(len(list((run_dir / "checkpoints").glob("ensemble_*")))):
        step_dir = ensemble_dir(run_dir, i).latest()
        assert step_dir is not None, f"ensemble {i} has no complete checkpoint"
        assert all(load_member(p, with_moments=True) for p in (step_dir / "members").iterdir())
        steps.append(json.loads((step_dir / "resume.json").read_text())["steps"])
    return steps


def checkpointed(run_dir: Path, workers: int = 1) -> bool:
    return all(ensemble_dir(run_dir, i).latest() for i in range(workers))


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


# -- processes --------------------------------------------------------------------------------------


def wait_for(condition, timeout: float = 60, what: str = "condition") -> None:
    """Poll until `condition()`; a hang guard (what it waits for takes seconds), not a bound on speed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def worker_pids(parent: int) -> list[int]:
    """The training workers of a sweep process (spawn also starts a resource tracker: workers run spawn_main)."""
    pids = []
    for pid in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split():
        try:
            if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text():
                pids.append(int(pid))
        except FileNotFoundError:  # it exited in between
            pass
    return pids


def group_is_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


# -- damaged stores ---------------------------------------------------------------------------------


def flip_data_bytes(chunk: Path) -> None:
    start, _ = read_chunk_header(chunk)
    with open(chunk, "r+b") as f:
        f.seek(start + 100)
        data = f.read(16)
        f.seek(start + 100)
        f.write(bytes(b ^ 0xFF for b in data))


def truncate(chunk: Path) -> None:
    os.truncate(chunk, chunk.stat().st_size - 100)


def write_nan_rows(store: Path, rows: dict[str, list[int]]) -> None:
    """Put NaN rows into chunks and update the manifest's checksums, as a store written elsewhere would hold them."""
    manifest = json.loads((store / "manifest.json").read_text())
    for entry in manifest["chunks"]:
        if entry["file"] in rows:
            chunk = store / entry["file"]
            start, _ = read_chunk_header(chunk)
            data = np.memmap(chunk, dtype="<f4", mode="r+", offset=start, shape=(entry["rows"], manifest["d_in"]))
            data[rows[entry["file"]]] = np.nan
            data.flush()
            del data
            entry["sha256"] = sha256_file(chunk)
    manifest.pop("verified", None)
    (store / "manifest.json").write_text(json.dumps(manifest))


# -- one checkpointed ensemble, in-process ----------------------------------------------------------


def checkpointed_ensemble(directory: Path) -> tuple[Ensemble, FiringCounter, Path]:
    """Three relu members after one step, checkpointed into `directory`: (ensemble, counter, step dir)."""
    ensemble = Ensemble(members(Grid(variants=["relu"], dict_sizes=[8], l1=[1e-3, 1e-2, 3e-2]), 4), 10, freeze_after=5)
    counter = FiringCounter(3, 8, 100)
    ensemble.step(torch.randn(16, 4))
    return ensemble, counter, save_checkpoint(EnsembleDir(directory), ensemble, Position(0, 0, 1), counter)
