"""Bad stores and concurrent store builders: a corrupt, truncated or non-finite store stops the sweep with exit 2
and one line naming the chunk before anything trains; verification is recorded and redone after any write; two
builders of one store, with or without flock, both get one intact store (docs/reliability.md names the test
here that proves each row)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from sae_ensemble import pipeline
from sae_ensemble.activations import lock as lock_module
from sae_ensemble.activations import reader as reader_module
from sae_ensemble.activations.format import StoreError
from sae_ensemble.activations.lock import store_lock
from sae_ensemble.activations.reader import ActivationStore
from sae_ensemble.activations.writer import ChunkWriter
from tests.fault_sweep import D_IN, REPO, flip_data_bytes, shared_store, truncate, write_nan_rows
from tests.sweeps import compose_config


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    return shared_store(tmp_path_factory)


# -- bad stores: verification stops the sweep before anything trains -----------------------------------

BAD_STORES = {
    "corrupted": (
        lambda s: flip_data_bytes(s / "chunk_00002.safetensors"),
        r"chunk_00002.safetensors has sha256 \w+… but the manifest says",
    ),
    "truncated": (
        lambda s: truncate(s / "chunk_00003.safetensors"),
        r"chunk_00003.safetensors has 63988 bytes but the manifest says 64088",
    ),
    "nan_rows": (
        lambda s: write_nan_rows(s, {"chunk_00001.safetensors": [7]}),
        r"Row 7 of chunk \S+chunk_00001.safetensors \(row 1007 of the store\) holds a non-finite",
    ),
}


@pytest.fixture(scope="module")
def bad_stores(store_path, tmp_path_factory) -> dict[str, Path]:
    """A broken copy of a verified store per fault (shared_store records its verification: copies inherit it)."""
    root = tmp_path_factory.mktemp("bad_stores")
    copies = {}
    for name, (damage, _) in BAD_STORES.items():
        copies[name] = root / name
        shutil.copytree(store_path, copies[name])  # copy2 keeps mtimes: the recorded verification still matches
        damage(copies[name])
    return copies


def sweep_overrides(store: Path) -> list[str]:
    return [
        f"data.store={store}",
        f"data.d_in={D_IN}",
        "devices=cpu:2",
        "training.steps=20",
        "training.batch_size=64",
        "training.eval_rows=256",
        "progress=false",
        "wandb=disabled",
    ]


def assert_nothing_trained(run_dir: Path) -> None:
    assert (
        not (run_dir / "checkpoints").exists()
        and not (run_dir / "members").exists()
        and not (run_dir / "plan.json").exists()
    )


@pytest.mark.parametrize("fault", list(BAD_STORES))
def test_a_bad_store_exits_2_with_one_line_naming_the_chunk_and_trains_nothing(bad_stores, fault, tmp_path, capsys):
    """The sweep in-process (pipeline.run, what sweep.py runs); the next test checks the command line's own output."""
    run_dir = tmp_path / "run"
    assert pipeline.run(compose_config(*sweep_overrides(bad_stores[fault])), run_dir) == pipeline.EXIT_BAD_INPUT
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and re.search(BAD_STORES[fault][1], line), line
    assert_nothing_trained(run_dir)


def test_sweep_py_on_a_bad_store_exits_2_with_that_one_line_and_no_traceback(bad_stores, tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(REPO / "sweep.py"), *sweep_overrides(bad_stores["corrupted"]), f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == pipeline.EXIT_BAD_INPUT, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and re.search(BAD_STORES["corrupted"][1], line), line
    assert "Traceback" not in result.stdout + result.stderr
    assert_nothing_trained(run_dir)


def test_verify_once_records_a_pass_in_the_manifest_and_checks_again_after_any_write(store_path, tmp_path, monkeypatch):
    path = tmp_path / "copy"
    shutil.copytree(store_path, path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.pop(
        "verified", None
    )  # another test may have verified the original (a copy keeping mtimes keeps the record)
    (path / "manifest.json").write_text(json.dumps(manifest))
    hashed = []
    real = reader_module.sha256_file
    monkeypatch.setattr(reader_module, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    store = ActivationStore.open(path, verify="once")
    assert len(hashed) == store.manifest["n_chunks"]
    assert json.loads((path / "manifest.json").read_text())["verified"]["chunks"] == store._chunk_stats()
    hashed.clear()
    ActivationStore.open(path, verify="once")
    assert hashed == [], "an unchanged verified store was hashed again"
    ActivationStore.open(path, verify="checksum")
    assert len(hashed) == store.manifest["n_chunks"]
    flip_data_bytes(path / "chunk_00004.safetensors")
    with pytest.raises(StoreError, match="chunk_00004.safetensors has sha256"):
        ActivationStore.open(path, verify="once")
    ActivationStore.open(path, verify="size")  # sizes and headers still fine


def test_the_chunk_writer_rejects_non_finite_rows_naming_chunk_and_row(tmp_path):
    writer = ChunkWriter(tmp_path / "s", 4, "float32", 64, source={"kind": "test"})
    rows = torch.randn(200, 4)
    rows[130, 2] = float("inf")
    with pytest.raises(
        StoreError, match=r"Row 2 of chunk chunk_00002.safetensors \(row 130 of store .*\) holds a non-finite value"
    ):
        writer.write(rows)
    # float16 overflows to inf past 65504: caught at write time, not in training
    writer = ChunkWriter(tmp_path / "h", 4, "float16", 64, source={"kind": "test"})
    with pytest.raises(StoreError, match="row 0 of store .* non-finite .* use dtype=bfloat16 or float32"):
        writer.write(torch.full((64, 4), 1e6))


# -- concurrent store builders, with and without flock ----------------------------------------------

BUILD_SCRIPT = """
import errno, fcntl, sys
if sys.argv[2] == "no_flock":  # a file system without flock (Lustre without -o flock)
    def flock(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")
    fcntl.flock = flock
from sae_ensemble.activations.synthetic import write_synthetic
store = write_synthetic(sys.argv[1], d_in=16, n_features=24, n_active=3, n_rows=40000, rows_per_chunk=1000, seed=1)
print(store.n_rows)
"""


@pytest.mark.parametrize("locking", ["flock", "no_flock"])
def test_two_sweeps_building_the_same_store_at_once_both_get_one_intact_store(tmp_path, locking):
    path = tmp_path / "stores" / "synthetic-x"
    builders = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD_SCRIPT, str(path), locking],
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        for _ in range(2)
    ]
    results = [(b.wait(timeout=120), *b.communicate()) for b in builders]
    for code, out, err in results:
        assert code == 0 and out.strip() == "40000", err
    store = ActivationStore.open(path, verify="checksum")
    assert sorted(p.name for p in path.glob("chunk_*")) == [c["file"] for c in store.manifest["chunks"]]
    assert not (tmp_path / "stores" / "synthetic-x.lock.owner").exists(), "the O_EXCL lock file outlived its holder"


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
        time.sleep(0.5)  # however slowly the waiter runs, a working lock keeps it out: this cannot fail spuriously
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
