"""The worker's training loop: its ensembles, stage by stage, on shared batches; checkpoints and resume.

A worker (dispatch.py) runs `train_worker` for its entry of the plan. The ensembles of a
stage are stepped on the same batch, one after another; stages follow each other over the
whole run. Each ensemble checkpoints on its own, so any of them resumes alone.

Run-dir layout written here:
    checkpoints/ensemble_<i>/step_<N>/members/<member_id>/   members with optimizer moments
    checkpoints/ensemble_<i>/step_<N>/resume.json            written last: marks the step complete
    checkpoints/ensemble_<i>/done.json                       the ensemble finished (and the worker's peak memory then)
    members/<member_id>/{sae.safetensors,cfg.json,feature_freq.safetensors}   final members
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_ensemble import metrics
from sae_ensemble.memory import peak_bytes, resident_bytes, reuse_freed_memory
from sae_ensemble.activations.store import ActivationStore, Position, StoreError
from sae_ensemble.atomic import atomic_write, fsync_dir, write_json_atomic
from sae_ensemble.checkpoint import CheckpointError, load_ensemble, read_json, save_member
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.plan import plan_members
from sae_ensemble.stage import Stage

PROGRESS_SECONDS = 1.0  # how often a worker reports its progress
KEEP_CHECKPOINTS = 2  # the newest and one before it, in case the newest is ever unreadable


HALVING_METRICS = ("auto", "pareto", "mmcs_truth", "fvu")


@dataclass
class Halving:
    """Successive halving (halving.py): at each rung the members are ranked and only the best go on."""

    rungs: list[float] = field(default_factory=list)
    """Fractions of training.steps at which members are ranked, increasing, each in (0, 1); [] = no halving."""
    eta: int = 3
    """Each rung keeps ceil(members / eta) of the members still training."""
    metric: str = "auto"
    """Ranking on held-out rows: pareto (Pareto rank on (L0, FVU), ties by FVU), mmcs_truth (highest first;
    synthetic stores), fvu (lowest first), or auto (mmcs_truth when the store has ground truth, else pareto)."""

    def steps_at(self, steps: int) -> list[int]:
        """The step of each rung: round(fraction x steps)."""
        return [round(f * steps) for f in self.rungs]

    def problem(self, steps: int) -> str | None:
        """One sentence on what is wrong with these settings for a run of `steps`, or None."""
        at = self.steps_at(steps)
        if any(not 0 < f < 1 for f in self.rungs):
            return f"training.halving.rungs={list(self.rungs)} must hold fractions of training.steps strictly between 0 and 1"
        if any(b <= a for a, b in zip(at, at[1:])) or (at and (at[0] < 1 or at[-1] >= steps)):
            return (f"training.halving.rungs={list(self.rungs)} fall on steps {at} of training.steps={steps}; "
                    "they must be increasing, distinct whole steps between 1 and steps - 1")
        if self.eta < 2:
            return f"training.halving.eta={self.eta} must be at least 2 (each rung keeps 1/eta of the members)"
        if self.metric not in HALVING_METRICS:
            return f"training.halving.metric={self.metric!r} is unknown; allowed: {', '.join(HALVING_METRICS)}"
        return None


@dataclass
class Training:
    """How every ensemble of a sweep trains (shared by all members)."""

    steps: int = 1000
    """Optimizer steps per member."""
    batch_size: int = 1024
    """Rows per step."""
    data_seed: int = 0
    """Seed of the store's shuffle: equal seeds give two sweeps the same batches."""
    normalize: str = "none"
    """Activation normalisation: none, center, or center_scale (centred, mean squared norm d_in)."""
    checkpoint_every: int = 500
    """Steps between checkpoints (and at the end, and on SIGTERM)."""
    log_every: int = 50
    """Steps between metric reports."""
    dead_window_tokens: int = 1_000_000
    """A feature is dead if it never fired in this many most recent training rows."""
    eval_rows: int = 8192
    """Held-out rows for the final metrics."""
    autocast_bf16: bool = False
    """bf16 autocast of the forward/backward pass (CUDA only)."""
    shuffle_window_chunks: int = 4
    """Chunks whose rows are shuffled together: a batch mixes rows of this many chunks (more mixes
    more contexts and costs no memory: the window is a list of row indices into the mapped store)."""
    freeze_after: int = 10
    """A member whose loss or gradient is non-finite skips that step; after this many such steps
    in a row it is frozen at its last finite weights for the rest of the run (1 = at the first)."""
    allow_frozen: bool = False
    """Exit 0 even when members froze (otherwise the sweep reports them and exits 3)."""
    execution: str = "auto"
    """How each ensemble computes its step (docs/kernels.md): auto (time the candidates when a worker
    starts and every 1000 steps, keep the fastest), reference (vmap(grad) + torchopt: the definition),
    fused (the hand-written dense kernel) or sparse (active latents only). All are equal to 1e-5; auto
    may choose differently in two runs, so pin one for bitwise-reproducible reruns."""
    compile: bool = True
    """torch.compile the fused kernel and Adam on CUDA workers (docs/kernels.md): the generated code fuses
    the elementwise passes between the GEMMs (measured on an H100: a step 1.3-2x faster; the first step
    of each ensemble shape compiles, ~10 s). CPU workers never compile: there the compiled step
    measured slower (112 vs 95 ms, small benchmark case) and inductor's C++ build costs up to a minute."""
    matmul_precision: str = "high"
    """float32 matmul precision on CUDA (torch.set_float32_matmul_precision): high (TF32, ~3x faster
    GEMMs on an H100), highest (full float32), or medium."""
    memory_budget: str = "auto"
    """Bytes one worker's ensembles may use (params, Adam moments, a step's temporaries): auto (90% of a
    GPU's free memory; on CPU, 90% of available RAM shared among the CPU workers, less 512MiB each for
    the runtime) or a size such as 8GiB or 512MiB. The plan splits members into ensembles, micro-batches
    and stages to fit it (on CPU its modelled peak stays 25% under, for heap fragmentation), and refuses
    a member that does not fit alone. A resume may change it: planned ensembles stay as they are."""
    halving: Halving = field(default_factory=Halving)
    """Successive halving across the whole grid (halving.py, docs/steering.md)."""

    def __post_init__(self) -> None:
        if isinstance(self.halving, dict):  # Training(**asdict(training)), as the workers rebuild it
            self.halving = Halving(**self.halving)


# -- devices -----------------------------------------------------------------------------------------


def torch_device(device: str) -> torch.device:
    return torch.device("cpu") if device.startswith("cpu") else torch.device(device)


# -- checkpoints ---------------------------------------------------------------------------------------


def ensemble_dir(run_dir: Path, index: int, plan: dict | None = None) -> Path:
    """Checkpoints of ensemble `index`: under the plan's `checkpoint_dir` (a halving segment's own; halving.py)."""
    return run_dir / (plan or {}).get("checkpoint_dir", "checkpoints") / f"ensemble_{index}"


def segment_end(plan: dict, training: Training) -> int:
    """The step this plan trains to: a halving segment's rung (halving.py), else training.steps."""
    return plan.get("until", training.steps)


def rung_file(directory: Path, step: int) -> Path:
    """Held-out metrics of an ensemble's members at a halving rung, written when its segment ends there."""
    return directory / f"rung_{step:09d}.json"


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete step dirs (those with resume.json), newest first."""
    records = directory.glob("step_*/resume.json")
    return sorted((p.parent for p in records), key=lambda p: int(p.name.split("_")[1]), reverse=True)


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete step dir or None."""
    steps = complete_checkpoints(directory)
    return steps[0] if steps else None


def load_checkpoint(step_dir: Path, members, training: Training, device, counter: metrics.FiringCounter, micro_batches: int = 1) -> tuple[Ensemble, Position]:
    """The ensemble, firing counts and store position saved in one step dir."""
    record = read_json(step_dir / "resume.json")
    ensemble = load_ensemble([step_dir / "members" / m.member_id for m in members], training.steps, device, training.autocast_bf16,
                             **ensemble_options(training, device, micro_batches))
    counter.load_state_dict(load_file(step_dir / "firing.safetensors"))
    return ensemble, Position.from_dict(record["position"])


def save_checkpoint(directory: Path, ensemble: Ensemble, position: Position, counter: metrics.FiringCounter) -> Path:
    """Write every member and the resume record into a fresh temp dir, rename it to step_<N>, prune old steps.

    A step dir is never written in place: after a fallback from an unreadable checkpoint the
    next save at that step would otherwise land beside the old resume.json, and a kill in
    between would leave a dir that looks complete but mixes two saves. A kill at any point
    leaves every older checkpoint as it was; pruning happens only after the rename.
    """
    step_dir = directory / f"step_{ensemble.step_count:09d}"
    for stale in directory.glob(".step_*.tmp"):  # left by a save that was killed or failed (disk full)
        shutil.rmtree(stale, ignore_errors=True)
    tmp_dir = directory / f".{step_dir.name}.{os.getpid()}.tmp"
    info = {"steps": ensemble.step_count, "tokens": ensemble.rows_seen}
    for index, member in enumerate(ensemble.members):
        params, moments = ensemble.member_state(index)
        save_member(tmp_dir / "members" / member.member_id, member, params, moments,
                    {**info, "alive": bool(ensemble.alive[index]), "nonfinite_streak": int(ensemble.nonfinite_streak[index]),
                     "controller": ensemble.controller_state(index)})
    atomic_write(tmp_dir / "firing.safetensors", lambda tmp: save_file(counter.state_dict(), tmp))
    write_json_atomic(tmp_dir / "resume.json", {**info, "position": position.to_dict(), "members": [m.member_id for m in ensemble.members]})
    if step_dir.exists():
        # Mark the old dir incomplete before anything of it goes: a kill from here on leaves no
        # complete-looking step_<N>, and resume falls back to an older checkpoint.
        (step_dir / "resume.json").unlink(missing_ok=True)
        fsync_dir(step_dir)
        shutil.rmtree(step_dir)
    os.rename(tmp_dir, step_dir)
    fsync_dir(directory)
    complete = sorted(directory.glob("step_*/resume.json"), key=lambda p: int(p.parent.name.split("_")[1]))
    for old in complete[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old.parent)
    return step_dir


def resume(directory: Path, members, training: Training, device, counter: metrics.FiringCounter, micro_batches: int = 1):
    """(ensemble, position, step dir or None, skipped) from the newest readable checkpoint, else a fresh start.

    An unreadable checkpoint falls back to the one before it (its name and error are in
    `skipped`); if checkpoints exist but none is readable, that is an error, never a restart.
    """
    unreadable = []
    for step_dir in complete_checkpoints(directory):
        try:
            ensemble, position = load_checkpoint(step_dir, members, training, device, counter, micro_batches)
            return ensemble, position, step_dir, unreadable
        except (CheckpointError, SafetensorError, KeyError, ValueError) as error:
            unreadable.append(f"{step_dir.name} ({error})")
    if unreadable:
        raise CheckpointError(f"no checkpoint in {directory} could be read: {'; '.join(unreadable)}")
    return (Ensemble(members, training.steps, device, training.autocast_bf16, **ensemble_options(training, device, micro_batches)),
            Position(), None, [])


def ensemble_options(training: Training, device: torch.device, micro_batches: int) -> dict:
    """Ensemble's keyword options, the same for a fresh ensemble and a resumed one."""
    compile_ = training.compile and torch.device(device).type == "cuda"
    return {"micro_batches": micro_batches, "freeze_after": training.freeze_after, "execution": training.execution, "compile": compile_}


# -- the worker's loop ---------------------------------------------------------------------------------


@dataclass
class _Slot:
    """One ensemble of a stage: its state, counter, checkpoint dir and next store position."""

    index: int
    members: list
    directory: Path
    ensemble: Ensemble
    counter: metrics.FiringCounter
    position: Position
    saved_step: int  # the step of its newest checkpoint: a stop before it moves again writes nothing
    joined: bool = False  # stepping with the stage's batch stream (see _train_stage)
    tuned: str = ""  # the execution its autotuner last chose, once announced


def train_worker(index, device, plan, store_path: Path, run_dir: Path, training: Training, threads, events, stop) -> None:
    torch.set_num_threads(threads)
    device_ = torch_device(device)
    if device_.type == "cpu":
        reuse_freed_memory()
    if device_.type == "cuda":
        torch.cuda.set_device(device_)
        torch.set_float32_matmul_precision(training.matmul_precision)
    baseline = resident_bytes() if device_.type == "cpu" else 0
    worker = plan["workers"][index]
    mine = [i for stage in worker["stages"] for i in stage]
    events.put(("start", index, {"step": sum(_steps_done(ensemble_dir(run_dir, i, plan), training) for i in mine)}))
    store = ActivationStore.open(store_path)
    until = segment_end(plan, training)
    for stage in worker["stages"]:
        ended = (lambda d: rung_file(d, until).exists()) if until < training.steps else (lambda d: (d / "done.json").exists())
        todo = [i for i in stage if not ended(ensemble_dir(run_dir, i, plan))]
        behind = sum(_steps_done(ensemble_dir(run_dir, i, plan), training) for i in mine if i not in todo)
        if todo and not _train_stage(index, todo, plan, store, run_dir, training, device_, baseline, behind, events, stop):
            events.put(("stopped", index, None))
            return
        if device_.type == "cuda":
            torch.cuda.empty_cache()  # the next stage's ensembles get the memory this one held
    events.put(("done", index, None))


def _train_stage(worker: int, indices: list[int], plan: dict, store: ActivationStore, run_dir: Path, training: Training,
                 device: torch.device, baseline: int, behind: int, events, stop) -> bool:
    """Train the stage's ensembles on shared batches to the end; False if stopped first (all checkpointed).

    `behind`: steps the worker's other ensembles have done, so progress reports count the whole worker."""
    slots = []
    for i in indices:
        members, directory = plan_members(plan, i), ensemble_dir(run_dir, i, plan)
        counter = metrics.FiringCounter(len(members), max(m.dict_size for m in members), training.dead_window_tokens, device)
        ensemble, position, checkpoint, unreadable = resume(directory, members, training, device, counter, plan["ensembles"][i]["micro_batches"])
        for skipped in unreadable:
            events.put(("note", worker, f"warning: ensemble {i}: unreadable checkpoint {skipped} skipped; using the one before"))
        if checkpoint:
            events.put(("note", worker, f"ensemble {i} resumed at step {ensemble.step_count} from {checkpoint}"))
        slots.append(_Slot(i, members, directory, ensemble, counter, position, ensemble.step_count if checkpoint else -1))

    # One batch stream for the stage, from the least advanced ensemble; an ensemble saved further on
    # joins when the stream reaches its step and position (the same stream, with the same skipped
    # batches, brought it there), and a checkpoint the stream passes by belongs to another run.
    slots.sort(key=lambda s: s.ensemble.step_count)
    step, stream_position = slots[0].ensemble.step_count, slots[0].position
    batches = store.train_batches(training.batch_size, seed=training.data_seed, position=stream_position, device=device,
                                  normalize=training.normalize, window=training.shuffle_window_chunks, skip_nonfinite=True)
    last_progress, skipped_in_a_row = time.monotonic(), 0
    stage, announced = Stage(), False
    until = segment_end(plan, training)
    while step < until and not stop.is_set():
        for slot in slots:  # an ensemble joins when the stream reaches its step and its saved position
            slot.joined = slot.joined or (slot.ensemble.step_count == step and slot.position == stream_position)
        active = [s for s in slots if s.joined and s.ensemble.step_count == step]
        batch, stream_position = next(batches)
        if batch is None:  # it holds a non-finite value: no member sees it (see _skip_batch)
            skipped_in_a_row = _skip_batch(store, training, worker, step, stream_position, skipped_in_a_row, events)
            for slot in active:  # they go on after it, as a resume from their next checkpoint will
                slot.position = stream_position
            continue
        skipped_in_a_row = 0
        step += 1
        for slot, stats in zip(active, stage.step([s.ensemble for s in active], batch)):
            _record_step(worker, slot, stats, batch, stream_position, training, events)
        if stage.choice and not announced:  # timed on this stage's first steady CUDA steps
            announced = True
            events.put(("note", worker, f"stage of ensembles {indices} replays its CUDA graphs {stage.choice} "
                                        f"(ms per step: {stage.report()})"))
        for slot in slots:
            if not slot.joined and slot.ensemble.step_count < step:
                raise CheckpointError(f"ensemble {slot.index} was saved at step {slot.ensemble.step_count} with store position "
                                      f"{slot.position.to_dict()}, which the batch stream passed; its checkpoint belongs to another run")
        if time.monotonic() - last_progress > PROGRESS_SECONDS:
            events.put(("progress", worker, {"step": behind + sum(s.ensemble.step_count for s in slots)}))
            last_progress = time.monotonic()
    for slot in slots:
        if slot.ensemble.step_count != slot.saved_step:
            save_checkpoint(slot.directory, slot.ensemble, slot.position, slot.counter)
    if any(s.ensemble.step_count < until for s in slots):
        return False
    for slot in slots:
        if until < training.steps:
            _rung_metrics(slot, store, training, device)
        else:
            _finish(slot, store, run_dir, training, device, baseline)
    return True


def _record_step(worker: int, slot: _Slot, stats: dict[str, torch.Tensor], batch: torch.Tensor, position: Position,
                 training: Training, events) -> None:
    """After the slot's ensemble stepped on `batch` (with `stats`): counts, logged metrics, a due checkpoint."""
    ensemble = slot.ensemble
    slot.position = position
    if ensemble.autotune_report and ensemble.choice != slot.tuned:
        slot.tuned = ensemble.choice
        events.put(("note", worker, f"ensemble {slot.index} runs {slot.tuned} (autotuned; ms per gradient: {ensemble.autotune_report})"))
    slot.counter.update(torch.nan_to_num(stats["fired"]), batch.shape[0])  # a diverged member may fire NaN
    step = ensemble.step_count
    if step % training.log_every == 0 or step == training.steps:
        dead = slot.counter.dead_fraction(ensemble.hparams["feature_mask"])
        report = {name: stats[name].detach().float().cpu() for name in ("loss", "mse", "l0", "l1_norm", "lr", "l1")}
        report["dead_frac"], report["alive"] = dead.cpu(), stats["alive"].float().cpu()
        events.put(("metrics", worker, {"step": step, "tokens": ensemble.rows_seen,
                                        "members": {m.member_id: {k: float(v[i]) for k, v in report.items()} for i, m in enumerate(slot.members)}}))
    if step % training.checkpoint_every == 0 and step < training.steps:
        save_checkpoint(slot.directory, ensemble, slot.position, slot.counter)
        slot.saved_step = step


def _finish(slot: _Slot, store: ActivationStore, run_dir: Path, training: Training, device: torch.device, baseline: int) -> None:
    """Final metrics and members of a finished ensemble; done.json (with the worker's peak memory so far) last."""
    ensemble, counter = slot.ensemble, slot.counter
    final = _final_metrics(ensemble, store, counter, training, device)
    info = {"steps": ensemble.step_count, "tokens": ensemble.rows_seen, "store_fingerprint": store.fingerprint,
            "normalize": training.normalize, "data_seed": training.data_seed}
    frequencies = counter.frequencies().cpu()
    coefficients = ensemble.schedules(ensemble.step_count)[1].cpu()  # the last coefficient (steered members': where the controller left it)
    for i, member in enumerate(slot.members):
        params, _ = ensemble.member_state(i)
        out = run_dir / "members" / member.member_id
        save_member(out, member, params, None, {**info, "alive": bool(ensemble.alive[i]), "l1_final": float(coefficients[i]),
                                                "metrics": {k: float(v[i]) for k, v in final.items()}})
        frequency = {"frequency": frequencies[i, : member.dict_size].contiguous()}
        atomic_write(out / "feature_freq.safetensors", lambda tmp: save_file(frequency, tmp))
    write_json_atomic(slot.directory / "done.json", {"steps": ensemble.step_count, "members": [m.member_id for m in slot.members],
                                                     "peak_bytes": peak_bytes(device, baseline)})


def _rung_metrics(slot: _Slot, store: ActivationStore, training: Training, device: torch.device) -> None:
    """At a halving rung: each member's held-out metrics and coefficient, for the ranking (halving.py)."""
    ensemble = slot.ensemble
    final = _final_metrics(ensemble, store, slot.counter, training, device)
    coefficients = ensemble.schedules(ensemble.step_count)[1].cpu()
    write_json_atomic(rung_file(slot.directory, ensemble.step_count),
                      {m.member_id: {"l1_final": float(coefficients[i]), "alive": bool(ensemble.alive[i]),
                                     "metrics": {k: float(v[i]) for k, v in final.items()}} for i, m in enumerate(slot.members)})


def _steps_done(directory: Path, training: Training) -> int:
    """Steps an ensemble has behind it (done, or its newest checkpoint), for the progress bar."""
    if (directory / "done.json").exists():
        return training.steps
    newest = latest_checkpoint(directory)
    return int(newest.name.split("_")[1]) if newest else 0


@torch.no_grad()
def _final_metrics(ensemble: Ensemble, store: ActivationStore, counter, training: Training, device) -> dict[str, torch.Tensor]:
    """Held-out reconstruction metrics, dead fraction over the training window, MMCS vs truth."""
    x = store.heldout(training.eval_rows, device=device, normalize=training.normalize)  # [R, d]
    mask = ensemble.hparams["feature_mask"]
    # Pieces as large as a step's micro-batch: its step held several [M, b, n] tensors at once, and
    # the plan counted those; a forward pass holds fewer. Larger pieces could break the budget.
    rows_per_part = -(-training.batch_size // ensemble.micro_batches)
    result = metrics.heldout_metrics(x, ensemble.forward, mask, rows_per_part)
    result["dead_frac"] = counter.dead_fraction(mask)
    truth = store.ground_truth()
    if truth is not None:
        result["mmcs_truth"] = metrics.mmcs_truth(ensemble.decoders(), mask, truth.to(device))
    return {name: value.float().cpu() for name, value in result.items()}


def _skip_batch(store: ActivationStore, training: Training, index: int, step: int, position: Position, in_a_row: int, events) -> int:
    """Report a skipped non-finite batch; refuse to spin through a store where every batch is bad."""
    in_a_row += 1
    events.put(("skipped", index, {"step": step, "position": position.to_dict()}))
    if in_a_row >= store.batches_per_epoch(training.batch_size):
        raise StoreError(f"every batch of a whole epoch of store {store.path} holds non-finite values; "
                         f"check it with ActivationStore.open(path, verify='checksum') and rebuild it")
    return in_a_row
