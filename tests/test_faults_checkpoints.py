"""Checkpoints under faults: a full disk, an unreadable checkpoint, a save killed half-way, a power loss after a
rename. No fault loses a complete checkpoint or leaves one that looks complete but is not, and a rerun resumes
to the weights of an uninterrupted run (docs/reliability.md names the test here that proves each row)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

from sae_ensemble import atomic, checkpoint
from sae_ensemble.activations.stream import Position
from sae_ensemble.checkpoint import load_member, resume, save_checkpoint
from sae_ensemble.config import Grid, Training
from sae_ensemble.dispatch import EXIT_FAILED, EXIT_OK
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.grid import members
from sae_ensemble.metrics import FiringCounter
from sae_ensemble.plan import make_plan
from sae_ensemble.rundir import EnsembleDir
from tests.fault_sweep import (  # noqa: F401 (the shared fixtures, used by name)
    D_IN,
    GRID,
    TRAINING,
    assert_checkpoints_readable,
    assert_same_weights,
    checkpointed_ensemble,
    ensemble_dir,
    error_lines,
    finish,
    launch,
    reference,
    script,
    store_path,
)


def _checkpoint_at_step_0(run_dir: Path) -> None:
    """What a one-worker sweep stopped before its first step leaves: a complete checkpoint at step 0."""
    training = Training(**TRAINING)
    plan = make_plan(members(Grid(**GRID), D_IN), ["cpu:0"], training.batch_size, 2**34)
    ensemble_members = plan.ensemble_members(0)
    counter = FiringCounter(
        len(ensemble_members), max(m.dict_size for m in ensemble_members), training.dead_window_tokens
    )
    ensemble = Ensemble(ensemble_members, training.steps, freeze_after=training.freeze_after)
    save_checkpoint(ensemble_dir(run_dir, 0), ensemble, Position(), counter)


def test_disk_full_during_a_checkpoint_exits_1_keeps_the_older_checkpoint_and_a_rerun_completes(
    script, store_path, reference, tmp_path
):
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


def test_an_unreadable_checkpoint_falls_back_to_the_one_before(tmp_path):
    grid_members = members(Grid(variants=["relu"], dict_sizes=[8], l1=[1e-3, 1e-2]), 4)
    directory, steps = EnsembleDir(tmp_path), 10
    ensemble = Ensemble(grid_members, steps)
    counter = FiringCounter(2, 8, 100)
    batch = torch.randn(16, 4)
    ensemble.step(batch)
    save_checkpoint(directory, ensemble, Position(0, 0, 1), counter)
    first = {k: v.clone() for k, v in ensemble.params.items()}
    ensemble.step(batch)
    newest = save_checkpoint(directory, ensemble, Position(0, 0, 2), counter)

    restored, position, step_dir, skipped = resume(directory, grid_members, steps, "cpu", FiringCounter(2, 8, 100))
    assert step_dir == newest and position == Position(0, 0, 2) and skipped == [] and restored.step_count == 2

    (newest / "members" / grid_members[0].member_id / "sae.safetensors").write_bytes(b"torn")
    restored, position, step_dir, skipped = resume(directory, grid_members, steps, "cpu", FiringCounter(2, 8, 100))
    assert step_dir.name == "step_000000001" and position == Position(0, 0, 1) and restored.step_count == 1
    assert len(skipped) == 1 and "step_000000002" in skipped[0] and "not a readable safetensors file" in skipped[0]
    for name, value in first.items():
        assert torch.equal(restored.params[name], value), name

    (step_dir / "firing.safetensors").write_bytes(b"torn")
    with pytest.raises(ValueError, match="no checkpoint in .* could be read"):
        resume(directory, grid_members, steps, "cpu", FiringCounter(2, 8, 100))


def test_a_step_dir_rewritten_after_a_fallback_never_looks_complete_with_mixed_files(tmp_path, monkeypatch):
    ensemble, counter, step_dir = checkpointed_ensemble(tmp_path)
    before = {p.relative_to(step_dir): p.read_bytes() for p in step_dir.rglob("*") if p.is_file()}
    # Training from an older checkpoint reaches the same step with other weights; the save dies half-way.
    ensemble.params = {k: v + 1 for k, v in ensemble.params.items()}
    real, calls = checkpoint.save_member, []

    def dies_at_the_second_member(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_member", dies_at_the_second_member)
    with pytest.raises(OSError):
        save_checkpoint(EnsembleDir(tmp_path), ensemble, Position(0, 0, 1), counter)
    if (step_dir / "resume.json").exists():  # still complete: then it is entirely the old save
        assert {p.relative_to(step_dir): p.read_bytes() for p in step_dir.rglob("*") if p.is_file()} == before
    monkeypatch.setattr(checkpoint, "save_member", real)
    assert save_checkpoint(EnsembleDir(tmp_path), ensemble, Position(0, 0, 1), counter) == step_dir
    saved = load_member(step_dir / "members" / ensemble.members[1].member_id)[1]
    torch.testing.assert_close(saved["b_enc"], ensemble.member_state(1)[0]["b_enc"])
    assert not list(tmp_path.glob(".step_*")), "temp step dirs are cleaned up"


def test_atomic_writes_fsync_the_directory_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real(fd))
    atomic.write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert synced == [False, True], "the file, then its directory"
