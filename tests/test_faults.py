"""Hardening: bad data, faults and signals. Each fault has a documented exit code and one clear
line, loses no checkpoint, and a rerun resumes to the weights of an uninterrupted run. The table
in docs/reliability.md names the test here that proves each row.

CPU workers stand in for GPUs; stores are tiny and runs short so the suite stays fast. Faults
that must happen inside a worker (a slow checkpoint to signal into, a slow step to kill) are
injected by the sweep script below: spawned workers re-import it as their main module, so its
top-level patches apply in them too.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_ensemble.activations import store as store_module
from sae_ensemble.activations import lock as lock_module
from sae_ensemble.activations.lock import store_lock
from sae_ensemble.activations.store import ActivationStore, ChunkWriter, Position, StoreError
from sae_ensemble.activations.synthetic import write_synthetic
from sae_ensemble.checkpoint import load_member
from sae_ensemble.dispatch import EXIT_FAILED, EXIT_FROZEN, EXIT_OK, EXIT_REQUEUE, Training
from sae_ensemble.train import latest_checkpoint
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.grid import Grid

REPO = Path(__file__).resolve().parents[1]
D_IN = 16
GRID = dict(variants=["relu", "tied"], dict_sizes=[32], l1=[1e-3, 1e-2])
TRAINING = dict(steps=60, batch_size=64, checkpoint_every=5, log_every=5, eval_rows=256, dead_window_tokens=2000,
                execution="fused")  # pinned: runs compared to 1e-6 must take the same path (auto times the candidates)
N_MEMBERS = len(Grid(**GRID).members(D_IN))

# The sweep every fault test interrupts: CPU workers (one, to start fewer processes, unless a test
# needs two), settings from the FAULT_SWEEP environment variable (inherited by the workers, whose
# top-level code reads the fault to inject). A member trains the same in any packing, so every
# run compares with one reference.
SWEEP_SCRIPT = '''
import json, os, signal, sys, time
from pathlib import Path

settings = json.loads(os.environ["FAULT_SWEEP"])
fault = settings.get("fault")

if fault in ("slow_steps", "slow_checkpoint"):  # runs in each worker
    import sae_ensemble.train as train
    from sae_ensemble.ensemble import Ensemble

    real_step = Ensemble.step

    def slow_step(self, batch):
        time.sleep(0.02)  # room to signal or kill a worker mid-run
        return real_step(self, batch)

    Ensemble.step = slow_step
    if fault == "slow_checkpoint":
        real_save = train.save_member

        def slow_save(directory, *args, **kwargs):
            if ".tmp" in str(directory) and Path(settings["marker"] + ".armed").exists():  # a checkpoint, once the test is ready
                Path(settings["marker"]).write_text(str(directory))
                time.sleep(0.3)
            return real_save(directory, *args, **kwargs)

        train.save_member = slow_save

if __name__ == "__main__":
    from sae_ensemble.dispatch import Training, resolve_devices, run
    from sae_ensemble.grid import Grid
    from sae_ensemble.plan import make_plan

    training = Training(**settings["training"])
    plan = make_plan(Grid(**settings["grid"]).members(settings["d_in"]), resolve_devices(settings["devices"]), training.batch_size, 2**34)
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
    sys.exit(run(plan, settings["store"], settings["run_dir"], training, progress=False))
'''


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("script") / "fault_sweep.py"
    path.write_text(SWEEP_SCRIPT)
    return path


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "synthetic"
    write_synthetic(path, d_in=D_IN, n_features=24, n_active=3, n_rows=6000, rows_per_chunk=1000, seed=0)
    return path


def launch(script: Path, store: Path, run_dir: Path, fault: str | None = None, **settings) -> subprocess.Popen:
    """Start the sweep in its own session (so a test can signal its whole process group)."""
    config = {"fault": fault, "store": str(store), "run_dir": str(run_dir), "d_in": D_IN, "grid": GRID, "devices": "cpu:1",
              "training": {**TRAINING, **settings.pop("training", {})}, **settings}
    env = {**os.environ, "FAULT_SWEEP": json.dumps(config), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(sweep: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    output, _ = sweep.communicate(timeout=timeout)
    return sweep.returncode, output


def members_of(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_member(p)[1] for p in sorted((run_dir / "members").iterdir())}


def assert_same_weights(reference: Path, run_dir: Path) -> None:
    left, right = members_of(reference), members_of(run_dir)
    assert sorted(left) == sorted(right) and len(left) == N_MEMBERS
    for member_id, params in left.items():
        for name, value in params.items():
            torch.testing.assert_close(right[member_id][name], value, atol=1e-6, rtol=0, msg=f"{member_id} {name}")


def assert_checkpoints_readable(run_dir: Path) -> list[int]:
    """Every ensemble's newest complete checkpoint loads, optimizer moments included; return their steps."""
    steps = []
    for i in range(len(list((run_dir / "checkpoints").glob("ensemble_*")))):
        step_dir = latest_checkpoint(run_dir / "checkpoints" / f"ensemble_{i}")
        assert step_dir is not None, f"ensemble {i} has no complete checkpoint"
        assert all(load_member(p, with_moments=True) for p in (step_dir / "members").iterdir())
        steps.append(json.loads((step_dir / "resume.json").read_text())["steps"])
    return steps


def wait_for(condition, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def checkpointed(run_dir: Path, workers: int = 1) -> bool:
    return all(latest_checkpoint(run_dir / "checkpoints" / f"ensemble_{i}") for i in range(workers))


def group_is_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def reference(script, store_path, tmp_path_factory) -> Path:
    """The uninterrupted run every resumed one must equal."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    code, output = finish(launch(script, store_path, run_dir))
    assert code == EXIT_OK, output
    return run_dir


# ==== the fault-injection suite: one test per fault ====================================================


def worker_pids(parent: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    # the spawn start method also runs a resource tracker; workers are the ones running spawn_main
    return [int(p) for p in out if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]


def test_kill_9_of_one_worker_exits_1_naming_it_and_a_rerun_resumes_to_the_same_weights(script, store_path, reference, tmp_path):
    run_dir = tmp_path / "run"
    sweep = launch(script, store_path, run_dir, "slow_steps", devices="cpu:2")
    wait_for(lambda: checkpointed(run_dir, workers=2), what="the first checkpoints")
    os.kill(worker_pids(sweep.pid)[0], signal.SIGKILL)
    code, output = finish(sweep)
    assert code == EXIT_FAILED, output
    (died,) = [line for line in error_lines(output) if "died" in line]
    assert "worker on cpu:" in died and "died with signal SIGKILL" in died and ("relu-d32" in died or "tied-d32" in died), died
    assert_checkpoints_readable(run_dir)
    code, output = finish(launch(script, store_path, run_dir, devices="cpu:2"))
    assert code == EXIT_OK, output
    assert_same_weights(reference, run_dir)


def test_sigterm_during_a_checkpoint_write_exits_75_and_a_rerun_resumes_to_the_same_weights(script, store_path, reference, tmp_path):
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


def test_sigterm_before_the_workers_start_exits_75_leaves_no_worker_and_a_rerun_completes(script, store_path, reference, tmp_path):
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


def test_disk_full_during_a_checkpoint_exits_1_keeps_the_older_checkpoint_and_a_rerun_completes(script, store_path, reference, tmp_path):
    run_dir = tmp_path / "run"
    _checkpoint_at_step_0(run_dir)
    before = {p: p.read_bytes() for p in (run_dir / "checkpoints").rglob("*") if p.is_file()}
    code, output = finish(launch(script, store_path, run_dir, "disk_full"))
    assert code == EXIT_FAILED, output
    failed = [line for line in error_lines(output) if "raised" in line]
    # EFBIG is what RLIMIT_FSIZE gives; a full disk gives ENOSPC through the same code
    assert len(failed) == 1 and "worker on cpu:0" in failed[0] and "File too large" in failed[0], output
    assert assert_checkpoints_readable(run_dir) == [0]
    assert before == {p: p.read_bytes() for p in before}, "a failed checkpoint write touched an older checkpoint"
    code, output = finish(launch(script, store_path, run_dir))
    assert code == EXIT_OK, output
    assert not list(run_dir.glob("checkpoints/*/.step_*")), "the failed write's temp dir was not cleaned up"
    assert_same_weights(reference, run_dir)


def _checkpoint_at_step_0(run_dir: Path) -> None:
    """What a one-worker sweep stopped before its first step leaves: a complete checkpoint at step 0."""
    from sae_ensemble.plan import make_plan, plan_members
    from sae_ensemble.train import ensemble_dir, save_checkpoint
    from sae_ensemble.metrics import FiringCounter

    training = Training(**TRAINING)
    plan = make_plan(Grid(**GRID).members(D_IN), ["cpu:0"], training.batch_size, 2**34)
    members = plan_members(plan, 0)
    counter = FiringCounter(len(members), max(m.dict_size for m in members), training.dead_window_tokens)
    save_checkpoint(ensemble_dir(run_dir, 0), Ensemble(members, training.steps, freeze_after=training.freeze_after), Position(), counter)


def test_sigterm_while_the_store_is_built_exits_75_and_a_rerun_finishes_the_same_store(tmp_path):
    data = dict(d_in=64, n_features=128, n_rows=100_000, rows_per_chunk=5_000, heldout_rows=1000)
    args = [sys.executable, str(REPO / "sweep.py"), *(f"data.{k}={v}" for k, v in data.items()), f"data.store_root={tmp_path / 'stores'}",
            "plan_only=true", "progress=false", "wandb=disabled", f"hydra.run.dir={tmp_path / 'run'}"]
    sweep = subprocess.Popen(args, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


# -- bad stores through the CLI: verification stops the sweep before anything trains -----------------


def _flip_data_bytes(chunk: Path) -> None:
    start, _ = store_module.read_chunk_header(chunk)
    with open(chunk, "r+b") as f:
        f.seek(start + 100)
        data = f.read(16)
        f.seek(start + 100)
        f.write(bytes(b ^ 0xFF for b in data))


def _truncate(chunk: Path) -> None:
    os.truncate(chunk, chunk.stat().st_size - 100)


def _write_nan_rows(store: Path, rows: dict[str, list[int]]) -> None:
    """Put NaN rows into chunks and update the manifest's checksums, as a store written by another tool would hold them."""
    manifest = json.loads((store / "manifest.json").read_text())
    for entry in manifest["chunks"]:
        if entry["file"] in rows:
            chunk = store / entry["file"]
            start, _ = store_module.read_chunk_header(chunk)
            data = np.memmap(chunk, dtype="<f4", mode="r+", offset=start, shape=(entry["rows"], manifest["d_in"]))
            data[rows[entry["file"]]] = np.nan
            data.flush()
            del data
            entry["sha256"] = store_module._sha256_file(chunk)
    manifest.pop("verified", None)
    (store / "manifest.json").write_text(json.dumps(manifest))


BAD_STORES = {
    "corrupted": (lambda s: _flip_data_bytes(s / "chunk_00002.safetensors"), r"chunk_00002.safetensors has sha256 \w+… but the manifest says"),
    "truncated": (lambda s: _truncate(s / "chunk_00003.safetensors"), r"chunk_00003.safetensors has 63988 bytes but the manifest says 64088"),
    "nan_rows": (lambda s: _write_nan_rows(s, {"chunk_00001.safetensors": [7]}), r"Row 7 of chunk \S+chunk_00001.safetensors \(row 1007 of the store\) holds a non-finite"),
}


@pytest.fixture(scope="module")
def bad_store_sweeps(store_path, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """`python sweep.py data.store=COPY` on a broken copy of a verified store, one per fault, run side by side."""
    ActivationStore.open(store_path, verify="once")  # the original passes and records it: copies inherit the record
    root = tmp_path_factory.mktemp("bad_stores")
    sweeps = {}
    for name, (damage, _) in BAD_STORES.items():
        copy = root / name
        shutil.copytree(store_path, copy)  # copy2 keeps mtimes: the recorded verification still matches
        damage(copy)
        args = [sys.executable, str(REPO / "sweep.py"), f"data.store={copy}", f"data.d_in={D_IN}", "devices=cpu:2",
                "training.steps=20", "training.batch_size=64", "training.eval_rows=256", "progress=false", "wandb=disabled",
                f"hydra.run.dir={root / (name + '_run')}"]
        sweeps[name] = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return {name: (subprocess.CompletedProcess(p.args, p.wait(timeout=120), *p.communicate()), root / (name + "_run"))
            for name, p in sweeps.items()}


@pytest.mark.parametrize("fault", list(BAD_STORES))
def test_a_bad_store_exits_2_with_one_line_naming_the_chunk_and_trains_nothing(bad_store_sweeps, fault):
    import re

    result, run_dir = bad_store_sweeps[fault]
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and re.search(BAD_STORES[fault][1], line), line
    assert "Traceback" not in result.stdout + result.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "members").exists() and not (run_dir / "plan.json").exists()


@pytest.fixture(scope="module")
def nan_store(store_path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("nan") / "store"
    shutil.copytree(store_path, path)
    _write_nan_rows(path, {"chunk_00001.safetensors": [7, 400], "chunk_00003.safetensors": [500]})
    return path


def test_nan_rows_unverified_are_skipped_by_training_and_a_resumed_run_matches(script, nan_store, tmp_path):
    """With data.verify=size a NaN row reaches the worker: its batch is skipped, no member freezes."""
    uninterrupted = tmp_path / "uninterrupted"
    code, output = finish(launch(script, nan_store, uninterrupted))
    assert code == EXIT_OK, output
    assert "skipped a batch holding non-finite values" in output and "batch(es) holding non-finite values this run" in output, output
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


# -- concurrent store builders, with and without flock ----------------------------------------------------

BUILD_SCRIPT = '''
import errno, fcntl, sys
if sys.argv[2] == "no_flock":  # a file system without flock (Lustre without -o flock)
    def flock(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")
    fcntl.flock = flock
from sae_ensemble.activations.synthetic import write_synthetic
store = write_synthetic(sys.argv[1], d_in=16, n_features=24, n_active=3, n_rows=40000, rows_per_chunk=1000, seed=1)
print(store.n_rows)
'''


@pytest.mark.parametrize("locking", ["flock", "no_flock"])
def test_two_sweeps_building_the_same_store_at_once_both_get_one_intact_store(tmp_path, locking):
    path = tmp_path / "stores" / "synthetic-x"
    builders = [subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(path), locking], cwd=REPO, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
                for _ in range(2)]
    results = [(b.wait(timeout=120), *b.communicate()) for b in builders]
    for code, out, err in results:
        assert code == 0 and out.strip() == "40000", err
    store = ActivationStore.open(path, verify="checksum")
    assert sorted(p.name for p in path.glob("chunk_*")) == [c["file"] for c in store.manifest["chunks"]]
    assert not (tmp_path / "stores" / "synthetic-x.lock.owner").exists(), "the O_EXCL lock file outlived its holder"


# ==== the fixes, each with a test that fails without it ===================================================


def _no_flock(monkeypatch, error: int = errno.ENOSYS) -> None:
    def flock(*args):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(lock_module.fcntl, "flock", flock)


def test_a_store_lock_without_flock_falls_back_to_an_exclusive_lock_file(tmp_path, monkeypatch, capsys):
    _no_flock(monkeypatch)
    owner = tmp_path / "s.lock.owner"
    with store_lock(tmp_path / "s"):
        holder = json.loads(owner.read_text())
        assert holder["pid"] == os.getpid() and holder["host"]
        # a second locker waits for the holder
        entered = threading.Event()

        def second() -> None:
            with store_lock(tmp_path / "s"):
                entered.set()

        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.5)
        assert not entered.is_set(), "the lock file did not exclude a second locker"
    waiter.join(timeout=10)
    assert entered.is_set() and not owner.exists()
    assert "waiting for its holder" in capsys.readouterr().err


def test_a_lock_file_left_by_a_dead_process_is_taken_over(tmp_path, monkeypatch, capsys):
    _no_flock(monkeypatch, errno.EOPNOTSUPP)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = tmp_path / "s.lock.owner"
    owner.write_text(json.dumps({"pid": dead.pid, "host": lock_module.socket.gethostname()}))
    with store_lock(tmp_path / "s"):
        assert json.loads(owner.read_text())["pid"] == os.getpid()
    assert f"its holder pid {dead.pid}" in capsys.readouterr().err
    # a holder on another host is trusted until its file goes stale (no heartbeat for LOCK_STALE_SECONDS)
    owner.write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    os.utime(owner, (time.time() - lock_module.LOCK_STALE_SECONDS - 5,) * 2)
    with store_lock(tmp_path / "s"):
        pass
    assert "stale after" in capsys.readouterr().err


def test_other_flock_errors_still_raise(tmp_path, monkeypatch):
    _no_flock(monkeypatch, errno.EBADF)
    with pytest.raises(OSError, match="Bad file descriptor"):
        with store_lock(tmp_path / "s"):
            pass


def test_the_chunk_writer_rejects_non_finite_rows_naming_chunk_and_row(tmp_path):
    writer = ChunkWriter(tmp_path / "s", 4, "float32", 64, source={"kind": "test"})
    rows = torch.randn(200, 4)
    rows[130, 2] = float("inf")
    with pytest.raises(StoreError, match=r"Row 2 of chunk chunk_00002.safetensors \(row 130 of store .*\) holds a non-finite value"):
        writer.write(rows)
    # float16 overflows to inf past 65504: caught at write time, not in training
    writer = ChunkWriter(tmp_path / "h", 4, "float16", 64, source={"kind": "test"})
    with pytest.raises(StoreError, match="row 0 of store .* non-finite .* use dtype=bfloat16 or float32"):
        writer.write(torch.full((64, 4), 1e6))


def test_verify_once_records_a_pass_in_the_manifest_and_checks_again_after_any_write(store_path, tmp_path, monkeypatch):
    path = tmp_path / "copy"
    shutil.copytree(store_path, path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.pop("verified", None)  # another test may have verified the original (a copy keeping mtimes keeps the record)
    (path / "manifest.json").write_text(json.dumps(manifest))
    hashed = []
    real = store_module._sha256_file
    monkeypatch.setattr(store_module, "_sha256_file", lambda p: hashed.append(p.name) or real(p))
    store = ActivationStore.open(path, verify="once")
    assert len(hashed) == store.manifest["n_chunks"]
    assert json.loads((path / "manifest.json").read_text())["verified"]["chunks"] == store._chunk_stats()
    hashed.clear()
    ActivationStore.open(path, verify="once")
    assert hashed == [], "an unchanged verified store was hashed again"
    ActivationStore.open(path, verify="checksum")
    assert len(hashed) == store.manifest["n_chunks"]
    _flip_data_bytes(path / "chunk_00004.safetensors")
    with pytest.raises(StoreError, match="chunk_00004.safetensors has sha256"):
        ActivationStore.open(path, verify="once")
    ActivationStore.open(path, verify="size")  # sizes and headers still fine


def test_atomic_writes_fsync_the_directory_after_the_rename(tmp_path, monkeypatch):
    import stat

    from sae_ensemble import atomic

    synced = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real(fd))
    atomic.write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert synced == [False, True], "the file, then its directory"


def test_cpu_worker_threads_come_from_the_cpu_allocation_not_the_machine(monkeypatch):
    from sae_ensemble import dispatch

    monkeypatch.setattr(dispatch.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(dispatch.os, "sched_getaffinity", lambda pid: {2, 3, 4, 5}, raising=False)
    assert dispatch.cpu_threads(2) == 2 and dispatch.cpu_threads(8) == 1


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
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0 and result.stdout.split() == ["True", "True"], result.stderr


def _checkpointed_ensemble(tmp_path):
    from sae_ensemble.metrics import FiringCounter
    from sae_ensemble.train import save_checkpoint

    members = Grid(variants=["relu"], dict_sizes=[8], l1=[1e-3, 1e-2, 3e-2]).members(4)
    ensemble, counter = Ensemble(members, 10, freeze_after=5), FiringCounter(3, 8, 100)
    ensemble.step(torch.randn(16, 4))
    return ensemble, counter, save_checkpoint(tmp_path, ensemble, Position(0, 0, 1), counter)


def test_a_step_dir_rewritten_after_a_fallback_never_looks_complete_with_mixed_files(tmp_path, monkeypatch):
    from sae_ensemble import train

    ensemble, counter, step_dir = _checkpointed_ensemble(tmp_path)
    before = {p.relative_to(step_dir): p.read_bytes() for p in step_dir.rglob("*") if p.is_file()}
    # Training from an older checkpoint reaches the same step with other weights; the save dies half-way.
    ensemble.params = {k: v + 1 for k, v in ensemble.params.items()}
    real, calls = train.save_member, []

    def dies_at_the_second_member(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "save_member", dies_at_the_second_member)
    with pytest.raises(OSError):
        train.save_checkpoint(tmp_path, ensemble, Position(0, 0, 1), counter)
    if (step_dir / "resume.json").exists():  # still complete: then it is entirely the old save
        assert {p.relative_to(step_dir): p.read_bytes() for p in step_dir.rglob("*") if p.is_file()} == before
    monkeypatch.setattr(train, "save_member", real)
    assert train.save_checkpoint(tmp_path, ensemble, Position(0, 0, 1), counter) == step_dir
    saved = load_member(step_dir / "members" / ensemble.members[1].member_id)[1]
    torch.testing.assert_close(saved["b_enc"], ensemble.member_state(1)[0]["b_enc"])
    assert not list(tmp_path.glob(".step_*")), "temp step dirs are cleaned up"


def test_the_non_finite_streak_survives_a_checkpoint(tmp_path):
    from sae_ensemble.train import resume
    from sae_ensemble.metrics import FiringCounter

    ensemble, counter, _ = _checkpointed_ensemble(tmp_path)
    ensemble.step(torch.full((16, 4), float("nan")))
    ensemble.step(torch.full((16, 4), float("nan")))
    from sae_ensemble.train import save_checkpoint

    save_checkpoint(tmp_path, ensemble, Position(0, 0, 3), counter)
    restored = resume(tmp_path, ensemble.members, Training(steps=10, freeze_after=5), "cpu", FiringCounter(3, 8, 100))[0]
    assert restored.nonfinite_streak.tolist() == [2, 2, 2] and restored.freeze_after == 5 and restored.alive.all()


def test_the_shuffle_window_is_a_training_setting(tmp_path):
    from sae_ensemble.config import ConfigError, SweepConfig, validate

    writer = ChunkWriter(tmp_path / "s", 2, "float32", 100, source={"kind": "test"}, heldout_rows=100)
    writer.write(torch.arange(1100, dtype=torch.float32)[:, None].repeat(1, 2))  # row r holds r: its chunk is r // 100
    store = writer.close()

    def chunks_per_batch(window: int) -> float:
        stream = store.train_batches(50, seed=0, window=window)
        return float(np.mean([len(set((next(stream)[0][:, 0] // 100).long().tolist())) for _ in range(20)]))

    # one chunk at a time (a batch spans at most the two chunks at a window's edge) vs mixing eight
    assert chunks_per_batch(1) <= 2 and chunks_per_batch(8) > 5
    cfg = SweepConfig()
    cfg.grid.dict_sizes = [64]
    cfg.training.shuffle_window_chunks = 0
    with pytest.raises(ConfigError, match="training.shuffle_window_chunks=0 must be at least 1"):
        validate(cfg)


def test_final_metrics_run_in_pieces_at_least_a_training_batch(tmp_path, monkeypatch):
    from sae_ensemble import train
    from sae_ensemble.metrics import FiringCounter

    store = write_synthetic(tmp_path / "s", d_in=4, n_features=8, n_active=2, n_rows=3000, rows_per_chunk=1000, heldout_rows=1024)
    members = Grid(variants=["relu"], dict_sizes=[4096], l1=[1e-3, 1e-2]).members(4)
    ensemble = Ensemble(members, 10)
    pieces = []
    real = ensemble.forward
    monkeypatch.setattr(ensemble, "forward", lambda rows: pieces.append(len(rows)) or real(rows))
    training = Training(batch_size=1024, eval_rows=1024)
    result = train._final_metrics(ensemble, store, FiringCounter(2, 4096, 100), training, torch.device("cpu"))
    assert pieces == [1024], f"pieces of {pieces} rows: 2**22 elements would give 512"
    assert torch.isfinite(result["mse"]).all()


def test_opening_many_wandb_runs_does_not_block_the_caller(tmp_path, monkeypatch):
    from sae_ensemble import tracking

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
    members = Grid(variants=["relu"], dict_sizes=[8], l1=[1e-3 * (i + 1) for i in range(40)]).members(4)
    tracker = tracking.Tracker("p", "g", mode="offline", directory=tmp_path)
    tracker.register(members)
    started = time.monotonic()
    for member in members:
        tracker.log(member.member_id, 5, {"mse": 1.0})
    assert time.monotonic() - started < 0.5, "log() waited for runs to open (40 x 50 ms)"
    tracker.close()
    assert len(opened) == 40 and all(r.logged == [5] and r.finished for r in opened)


def test_frozen_members_are_reported_loudly_and_exit_3_unless_allowed(store_path, tmp_path, capsys):
    args = [sys.executable, str(REPO / "sweep.py"), f"data.store={store_path}", f"data.d_in={D_IN}", "devices=cpu",
            "grid.variants=[relu]", "grid.dict_sizes=[32]", "grid.dict_ratios=[]", "grid.l1=[0.001]", "grid.lr=[0.001,1e30]",
            "training.steps=20", "training.freeze_after=3", "training.batch_size=64", "training.eval_rows=256",
            "progress=false", "wandb=disabled", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == EXIT_FROZEN, result.stdout + result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "FROZE" in line]
    assert line.startswith("error: 1 of 2 members FROZE after training.freeze_after=3") and "lr1e+30" in line, line
    rows = (tmp_path / "run" / "summary.csv").read_text().splitlines()
    alive = rows[0].split(",").index("alive")
    assert sorted(r.split(",")[alive] for r in rows[1:]) == ["False", "True"]

    import sweep

    rows = [{"member_id": "a", "alive": True}, {"member_id": "b", "alive": False}]
    assert sweep.report_frozen(rows, Training(allow_frozen=True)) == EXIT_OK
    assert "warning: 1 of 2 members FROZE" in capsys.readouterr().err
    assert sweep.report_frozen(rows[:1], Training()) == EXIT_OK


# ---- non-finite steps: skip, then freeze after K in a row (Ensemble.step) ----------------------------


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
