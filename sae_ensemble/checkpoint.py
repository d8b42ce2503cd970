"""Every checkpoint and member file a run writes or reads, in one place (paths: rundir.py).

A member directory: sae.safetensors, optim.safetensors (checkpoints only), cfg.json (written last).
sae.safetensors (float32; n = dict_size, d = d_in) holds the params of the member's architecture
(architectures/<module>.PARAMS), for sae.py's relu, tied and topk:
    W_enc [n, d]   encoder rows
    b_enc [n]      encoder bias
    W_dec [n, d]   unit-norm decoder rows (the dictionary; for tied SAEs, the normalised encoder)
    b_dec [d]      decoder bias, subtracted before encoding and added after decoding (zeros if unused)
batchtopk and matryoshka add threshold [] (the inference threshold); jumprelu adds log_threshold [n];
gated has W_enc, b_gate, r_mag, b_mag [n], W_dec, b_dec.
optim.safetensors: Adam moments `mu.<name>` and `nu.<name>` of the same shapes, and `state.tokens_since_fired` [n]
(rows since each feature last fired: the AuxK dead mask), for resuming exactly.
cfg.json: every Member field plus member_id, steps, tokens and what the caller adds (store fingerprint,
final metrics); a finished member's directory also has feature_freq.safetensors (`frequency` [n]) and,
after the evaluation stage, eval.json ({"metrics": {mmcs_next, mmcs_seed, CE scores}, "ce_loss": bool}).

An ensemble's checkpoint is a step dir: its members (with moments), firing.safetensors (the dead-feature
window's counts) and resume.json (a CheckpointRecord), assembled in a temporary dir and renamed into
place. Halving's transitions (segments.py) assemble new ensembles' first checkpoints here too, from
their members' saved states. Every write goes to a temporary file in the same directory and is renamed
into place, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_ensemble import architectures
from sae_ensemble.activations.stream import Position
from sae_ensemble.atomic import atomic_write, fsync_dir, write_json_atomic
from sae_ensemble.config import Training
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.member import Member
from sae_ensemble.metrics import FiringCounter
from sae_ensemble.rundir import CheckpointError, CheckpointRecord, EnsembleDir, EnsembleEnd, MemberDir, read_json

KEEP_CHECKPOINTS = 2  # the newest and one before it, in case the newest is ever unreadable


# -- one member ------------------------------------------------------------------------------------


def save_member(
    directory: str | Path,
    member: Member,
    params: dict[str, torch.Tensor],
    moments: dict[str, torch.Tensor] | None = None,
    info: dict[str, Any] | None = None,
    frequency: torch.Tensor | None = None,
) -> Path:
    """Write one member; `info` (steps, tokens, metrics, ...) goes into cfg.json, which is written last."""
    files = MemberDir(directory)
    _check_shapes(files.sae, member, params)
    atomic_write(files.sae, lambda tmp: save_file({k: v.contiguous() for k, v in params.items()}, tmp))
    if moments is not None:
        atomic_write(files.optim, lambda tmp: save_file({k: v.contiguous() for k, v in moments.items()}, tmp))
    if frequency is not None:
        atomic_write(files.frequency, lambda tmp: save_file({"frequency": frequency.contiguous()}, tmp))
    write_json_atomic(files.cfg, {**member.to_dict(), "member_id": member.member_id, **(info or {})})
    return files.path


def member_of(cfg: dict) -> Member:
    """The Member a cfg.json describes (it holds more: steps, metrics, ...)."""
    return Member.from_dict({k: v for k, v in cfg.items() if k in Member.__dataclass_fields__})


def load_member(
    directory: str | Path, with_moments: bool = False
) -> tuple[Member, dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """(member, params, moments or None, cfg) of a saved member, checked against its cfg.json."""
    files = MemberDir(directory)
    cfg = read_json(files.cfg)
    member = member_of(cfg)
    params = _load_tensors(files.sae)
    _check_shapes(files.sae, member, params)
    moments = None
    if with_moments:
        moments = _load_tensors(files.optim)
        for prefix in ("mu", "nu"):
            part = {k.split(".", 1)[1]: v for k, v in moments.items() if k.startswith(prefix + ".")}
            _check_shapes(files.optim, member, part, prefix=prefix + ".")
    return member, params, moments, cfg


def result_info(store_fingerprint: str, training: Training) -> dict[str, Any]:
    """What a finished member's cfg.json says about how it was trained, beyond its hyperparameters."""
    return {
        "store_fingerprint": store_fingerprint,
        "normalize": str(training.normalize),
        "data_seed": training.data_seed,
    }


def write_evaluation(directory: str | Path, metrics: dict[str, float], ce_loss: bool) -> None:
    """A member's eval.json: the evaluation stage's results; `ce_loss` says whether they include CE scores."""
    write_json_atomic(MemberDir(directory).eval, {"metrics": metrics, "ce_loss": ce_loss})


def read_evaluation(directory: str | Path) -> dict[str, Any] | None:
    """A member's eval.json ({"metrics", "ce_loss"}), or None before its evaluation."""
    path = MemberDir(directory).eval
    return read_json(path) if path.exists() else None


# -- ensembles -------------------------------------------------------------------------------------


def load_ensemble(
    directories: list[str | Path],
    total_steps: int,
    device: str | torch.device = "cpu",
    autocast_bf16: bool = False,
    **options,
) -> Ensemble:
    """An ensemble restored from saved members, optimizer moments and step included (to resume).
    `options` are Ensemble's keyword options (execution, micro_batches, ...).

    The stacked state is allocated empty on the device and filled one member at a time,
    so the host holds one member's tensors at most (no random init to throw away).
    """
    cfgs = [read_json(MemberDir(d).cfg) for d in directories]
    steps = {cfg.get("steps") for cfg in cfgs}
    if len(steps) != 1:
        raise CheckpointError(
            f"members in {[str(d) for d in directories]} were saved at different steps {sorted(steps, key=str)}"
        )
    ensemble = Ensemble([member_of(cfg) for cfg in cfgs], total_steps, device, autocast_bf16, init=False, **options)
    for index, directory in enumerate(directories):
        _, params, moments, cfg = load_member(directory, with_moments=True)
        ensemble.load_member_state(index, params, moments)
        ensemble.alive[index] = bool(cfg.get("alive", True))
        ensemble.nonfinite_streak[index] = int(cfg.get("nonfinite_streak", 0))
        if "controller" in cfg:  # target-L0 members' controller (steering.py); older checkpoints have none
            ensemble.schedule.load_controller_state(index, cfg["controller"])
        del params, moments
    ensemble.set_step(cfgs[0]["steps"], cfgs[0]["tokens"])
    return ensemble


def save_checkpoint(directory: EnsembleDir, ensemble: Ensemble, position: Position, counter: FiringCounter) -> Path:
    """Write every member and the resume record into a fresh temp dir, rename it to step_<N>, prune old steps.

    A step dir is never written in place: after a fallback from an unreadable checkpoint the
    next save at that step would otherwise land beside the old resume.json, and a kill in
    between would leave a dir that looks complete but mixes two saves. A kill at any point
    leaves every older checkpoint as it was; pruning happens only after the rename.
    """
    step_dir = directory.step_dir(ensemble.step_count)
    for stale in directory.stale_temporary_dirs():  # left by a save that was killed or failed (disk full)
        shutil.rmtree(stale, ignore_errors=True)
    tmp_dir = directory.temporary_step_dir(ensemble.step_count, os.getpid())
    info = {"steps": ensemble.step_count, "tokens": ensemble.rows_seen}
    for index, member in enumerate(ensemble.members):
        params, moments = ensemble.member_state(index)
        save_member(
            EnsembleDir.saved_member(tmp_dir, member.member_id),
            member,
            params,
            moments,
            {
                **info,
                "alive": bool(ensemble.alive[index]),
                "nonfinite_streak": int(ensemble.nonfinite_streak[index]),
                "controller": ensemble.schedule.controller_state(index),
            },
        )
    atomic_write(tmp_dir / EnsembleDir.FIRING, lambda tmp: save_file(counter.state_dict(), tmp))
    record = CheckpointRecord(
        ensemble.step_count, ensemble.rows_seen, position, [m.member_id for m in ensemble.members]
    )
    _commit_step_dir(directory, tmp_dir, step_dir, record)
    for old in directory.checkpoints()[KEEP_CHECKPOINTS:]:
        shutil.rmtree(old)
    return step_dir


def _commit_step_dir(directory: EnsembleDir, tmp_dir: Path, step_dir: Path, record: CheckpointRecord) -> None:
    """resume.json last into the assembled dir, then the rename that makes it the step's checkpoint."""
    write_json_atomic(tmp_dir / EnsembleDir.RESUME, record.to_json())
    if step_dir.exists():
        # Mark the old dir incomplete before anything of it goes: a kill from here on leaves no
        # complete-looking step_<N>, and resume falls back to an older checkpoint.
        (step_dir / EnsembleDir.RESUME).unlink(missing_ok=True)
        fsync_dir(step_dir)
        shutil.rmtree(step_dir)
    os.rename(tmp_dir, step_dir)
    fsync_dir(directory.path)


def load_checkpoint(
    step_dir: Path,
    members: list[Member],
    total_steps: int,
    device,
    counter: FiringCounter,
    autocast_bf16: bool = False,
    **options,
) -> tuple[Ensemble, Position]:
    """The ensemble, firing counts and store position saved in one step dir."""
    record = CheckpointRecord.from_json(read_json(step_dir / EnsembleDir.RESUME))
    ensemble = load_ensemble(
        [EnsembleDir.saved_member(step_dir, m.member_id) for m in members],
        total_steps,
        device,
        autocast_bf16,
        **options,
    )
    counter.load_state_dict(load_file(step_dir / EnsembleDir.FIRING))
    return ensemble, record.position


def resume(
    directory: EnsembleDir,
    members: list[Member],
    total_steps: int,
    device,
    counter: FiringCounter,
    autocast_bf16: bool = False,
    **options,
) -> tuple[Ensemble, Position, Path | None, list[str]]:
    """(ensemble, position, step dir or None, skipped) from the newest readable checkpoint, else a fresh start.

    An unreadable checkpoint falls back to the one before it (its name and error are in
    `skipped`); if checkpoints exist but none is readable, that is an error, never a restart.
    """
    unreadable = []
    for step_dir in directory.checkpoints():
        try:
            ensemble, position = load_checkpoint(
                step_dir, members, total_steps, device, counter, autocast_bf16, **options
            )
            return ensemble, position, step_dir, unreadable
        except (CheckpointError, SafetensorError, KeyError, ValueError) as error:
            unreadable.append(f"{step_dir.name} ({error})")
    if unreadable:
        raise CheckpointError(f"no checkpoint in {directory.path} could be read: {'; '.join(unreadable)}")
    return Ensemble(members, total_steps, device, autocast_bf16, **options), Position(), None, []


def write_done(directory: EnsembleDir, end: EnsembleEnd) -> None:
    """done.json: the ensemble reached its segment's end (its members' results there included)."""
    write_json_atomic(directory.done, end.to_json())


# -- halving's transitions (segments.py) ----------------------------------------------------------


def saved_member_firing(step_dir: Path, row: int, dict_size: int) -> dict[str, torch.Tensor]:
    """One member's part [1, dict_size] of the firing counts an ensemble saved in `step_dir`, as a FiringCounter
    state."""
    state = load_file(step_dir / EnsembleDir.FIRING)
    return {
        "blocks": state["blocks"][:, row : row + 1, :dict_size],
        "current": state["current"][row : row + 1, :dict_size],
        "block_token_counts": state["block_token_counts"],
        "scalars": state["scalars"],
    }


def write_stopped_member(directory: MemberDir, saved: Path, step_dir: Path, row: int, end: dict[str, Any]) -> None:
    """A member halving stopped: its final directory from its checkpoint in `step_dir` (weights there, its firing
    frequency over the window) and `end` (cfg.json's results: metrics, alive, l1_final, ...)."""
    member, params, _, cfg = load_member(saved)
    firing = saved_member_firing(step_dir, row, member.dict_size)
    counter = FiringCounter(1, member.dict_size, int(firing["scalars"][2]))
    counter.load_state_dict(firing)
    save_member(
        directory.path,
        member,
        params,
        None,
        {"steps": cfg["steps"], "tokens": cfg["tokens"], **end},
        frequency=counter.frequencies()[0],
    )


def seed_checkpoint(
    directory: EnsembleDir, members: list[Member], sources: dict[str, tuple[Path, int]], record: CheckpointRecord
) -> None:
    """A new ensemble's first checkpoint at `record.steps`: its members' saved states from `sources`
    ({member_id: (step dir, row in that ensemble)}), their firing counts re-stacked in the new order."""
    step_dir = directory.step_dir(record.steps)
    tmp_dir = directory.temporary_step_dir(record.steps, os.getpid())
    shutil.rmtree(tmp_dir, ignore_errors=True)
    n = max(m.dict_size for m in members)
    parts = []
    for member in members:
        source_dir, row = sources[member.member_id]
        shutil.copytree(
            EnsembleDir.saved_member(source_dir, member.member_id), EnsembleDir.saved_member(tmp_dir, member.member_id)
        )
        parts.append(saved_member_firing(source_dir, row, member.dict_size))
    pad = lambda t: torch.nn.functional.pad(t, (0, n - t.shape[-1]))  # noqa: E731 - zero counts for padded features
    firing = {
        "blocks": torch.cat([pad(p["blocks"]) for p in parts], 1),
        "current": torch.cat([pad(p["current"]) for p in parts], 0),
        "block_token_counts": parts[0]["block_token_counts"],
        "scalars": parts[0]["scalars"],
    }
    atomic_write(tmp_dir / EnsembleDir.FIRING, lambda tmp: save_file(firing, tmp))
    directory.path.mkdir(parents=True, exist_ok=True)
    _commit_step_dir(
        directory,
        tmp_dir,
        step_dir,
        CheckpointRecord(record.steps, record.tokens, record.position, [m.member_id for m in members]),
    )


# -- checks ----------------------------------------------------------------------------------------


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return load_file(path)
    except SafetensorError as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from None


def _check_shapes(path: Path, member: Member, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Every param of the member's architecture present with its shape."""
    n, d = member.dict_size, member.d_in
    module = architectures.module_of(member.variant)
    shapes = architectures.param_shapes(module, d, n, member.d_out, member.skip_connection)
    expected = tuple(shapes)
    missing = [prefix + name for name in expected if name not in tensors]
    if missing:
        raise CheckpointError(
            f"{path} lacks tensors {missing}; a {member.variant} SAE needs {[prefix + e for e in expected]}"
        )
    for name in expected:
        if tuple(tensors[name].shape) != shapes[name]:
            raise CheckpointError(
                f"{path}: tensor {prefix}{name} has shape {list(tensors[name].shape)}, "
                f"expected {list(shapes[name])} for d_in={d}, dict_size={n}"
            )
