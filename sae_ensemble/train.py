"""The worker's training loop: its ensembles of a segment, stage by stage, on shared batches, to the segment's end.

A worker (dispatch.py) runs `train_worker` for its entry of a segment's plan (rundir.Segment). The
ensembles of a stage are stepped on the same batch, one after another; stages follow each other over
the whole segment. Each ensemble checkpoints on its own (checkpoint.py), so any of them resumes alone.
At the segment's end step each ensemble writes its members' held-out results into done.json, and at
the run's last step also the finished members. What comes between segments (halving's rungs) is
segments.py's business: the loop knows only where its segment ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_ensemble import metrics, truth_metrics
from sae_ensemble.activations.format import StoreError
from sae_ensemble.activations.reader import ActivationStore
from sae_ensemble.activations.stream import Position, train_batches
from sae_ensemble.checkpoint import result_info, resume, save_checkpoint, save_member, write_done
from sae_ensemble.config import Training
from sae_ensemble.devices import torch_device
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.kernels import native
from sae_ensemble.member import Member
from sae_ensemble.memory import peak_bytes, resident_bytes, reuse_freed_memory
from sae_ensemble.rundir import CheckpointError, EnsembleDir, EnsembleEnd, MemberEnd, RunDir, Segment

PROGRESS_SECONDS = 1.0  # how often a worker reports its progress


def ensemble_options(training: Training, device: torch.device, micro_batches: int) -> dict:
    """Ensemble's options for a sweep's ensembles, the same for a fresh ensemble and a resumed one."""
    compile_ = training.compile and torch.device(device).type == "cuda"
    return {
        "micro_batches": micro_batches,
        "freeze_after": training.freeze_after,
        "execution": training.execution,
        "compile": compile_,
    }


@dataclass
class _Slot:
    """One ensemble of a stage: its state, counter, checkpoint dir and next store position."""

    index: int
    members: list[Member]
    directory: EnsembleDir
    ensemble: Ensemble
    counter: metrics.FiringCounter
    position: Position
    saved_step: int  # the step of its newest checkpoint: a stop before it moves again writes nothing
    joined: bool = False  # stepping with the stage's batch stream (see _train_stage)
    tuned: str = ""  # the execution its autotuner last chose, once announced


def train_worker(
    index: int,
    device: str,
    segment: Segment,
    store_paths: dict[str | None, str],
    run_dir: Path,
    training: Training,
    threads: int,
    events,
    stop,
) -> None:
    """Train worker `index`'s ensembles of the segment, stage by stage; `store_paths`: each member hook's store."""
    torch.set_num_threads(threads)
    native.use(training.native_kernels)
    device_ = torch_device(device)
    if device_.type == "cpu":
        reuse_freed_memory()
    if device_.type == "cuda":
        torch.cuda.set_device(device_)
        torch.set_float32_matmul_precision(training.matmul_precision)
    baseline = resident_bytes() if device_.type == "cpu" else 0
    worker, run = segment.plan.workers[index], RunDir(run_dir)
    directories = {i: run.ensemble(segment, i) for i in worker.ensembles}
    events.put(("start", index, {"step": sum(directories[i].steps_done(segment.end_step) for i in worker.ensembles)}))
    stores: dict[str | None, ActivationStore] = {}
    for stage in worker.stages:
        todo = [i for i in stage if not directories[i].is_done()]
        behind = sum(directories[i].steps_done(segment.end_step) for i in worker.ensembles if i not in todo)
        hook = segment.plan.ensemble_members(stage[0])[0].hook  # a stage holds one hook's ensembles (plan.py)
        if hook not in stores:
            stores[hook] = ActivationStore.open(store_paths[hook])
        if todo and not _train_stage(
            index, todo, segment, stores[hook], run, training, device_, baseline, behind, events, stop
        ):
            events.put(("stopped", index, None))
            return
        if device_.type == "cuda":
            torch.cuda.empty_cache()  # the next stage's ensembles get the memory this one held
    events.put(("done", index, None))


def _train_stage(
    worker: int,
    indices: list[int],
    segment: Segment,
    store: ActivationStore,
    run: RunDir,
    training: Training,
    device: torch.device,
    baseline: int,
    behind: int,
    events,
    stop,
) -> bool:
    """Train the stage's ensembles on shared batches to the segment's end; False if stopped first (all checkpointed).

    `behind`: steps the worker's other ensembles have done, so progress reports count the whole worker."""
    slots = []
    for i in indices:
        members, directory = segment.plan.ensemble_members(i), run.ensemble(segment, i)
        counter = metrics.FiringCounter(
            len(members), max(m.dict_size for m in members), training.dead_window_tokens, device
        )
        options = ensemble_options(training, device, segment.plan.ensembles[i].micro_batches)
        ensemble, position, checkpoint, unreadable = resume(
            directory, members, training.steps, device, counter, training.autocast_bf16, **options
        )
        for skipped in unreadable:
            events.put(
                (
                    "note",
                    worker,
                    f"warning: ensemble {i}: unreadable checkpoint {skipped} skipped; using the one before",
                )
            )
        if checkpoint:
            events.put(("note", worker, f"ensemble {i} resumed at step {ensemble.step_count} from {checkpoint}"))
        slots.append(
            _Slot(i, members, directory, ensemble, counter, position, ensemble.step_count if checkpoint else -1)
        )

    # One batch stream for the stage, from the least advanced ensemble; an ensemble saved further on
    # joins when the stream reaches its step and position (the same stream, with the same skipped
    # batches, brought it there), and a checkpoint the stream passes by belongs to another run.
    slots.sort(key=lambda s: s.ensemble.step_count)
    step, stream_position = slots[0].ensemble.step_count, slots[0].position
    batches = train_batches(
        store,
        training.batch_size,
        seed=training.data_seed,
        position=stream_position,
        device=device,
        normalize=training.normalize,
        window=training.shuffle_window_chunks,
        skip_nonfinite=True,
    )
    last_progress, skipped_in_a_row = time.monotonic(), 0
    until = segment.end_step
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
        for slot in active:
            _record_step(worker, slot, slot.ensemble.step(batch), batch, stream_position, training, events)
        for slot in slots:
            if not slot.joined and slot.ensemble.step_count < step:
                raise CheckpointError(
                    f"ensemble {slot.index} was saved at step {slot.ensemble.step_count} with store position "
                    f"{slot.position.to_dict()}, which the batch stream passed; its checkpoint belongs to another run"
                )
        if time.monotonic() - last_progress > PROGRESS_SECONDS:
            events.put(("progress", worker, {"step": behind + sum(s.ensemble.step_count for s in slots)}))
            last_progress = time.monotonic()
    for slot in slots:
        if slot.ensemble.step_count != slot.saved_step:
            save_checkpoint(slot.directory, slot.ensemble, slot.position, slot.counter)
    if any(s.ensemble.step_count < until for s in slots):
        return False
    for slot in slots:
        _end_segment(slot, store, run, training, device, baseline, final=until == training.steps)
    return True


def _record_step(
    worker: int,
    slot: _Slot,
    stats: dict[str, torch.Tensor],
    batch: torch.Tensor,
    position: Position,
    training: Training,
    events,
) -> None:
    """After the slot's ensemble stepped on `batch` (with `stats`): counts, logged metrics, a due checkpoint."""
    ensemble = slot.ensemble
    slot.position = position
    if ensemble.autotune_report and ensemble.choice != slot.tuned:
        slot.tuned = ensemble.choice
        events.put(
            (
                "note",
                worker,
                f"ensemble {slot.index} runs {slot.tuned} (autotuned; ms per gradient: {ensemble.autotune_report})",
            )
        )
    slot.counter.update(torch.nan_to_num(stats["fired"]), batch.shape[0])  # a diverged member may fire NaN
    step = ensemble.step_count
    if step % training.log_every == 0 or step == training.steps:
        dead = slot.counter.dead_fraction(ensemble.hparams["feature_mask"])
        report = {name: stats[name].detach().float().cpu() for name in ("loss", "mse", "l0", "l1_norm", "lr", "l1")}
        report["dead_frac"], report["alive"] = dead.cpu(), stats["alive"].float().cpu()
        events.put(
            (
                "metrics",
                worker,
                {
                    "step": step,
                    "tokens": ensemble.rows_seen,
                    "members": {
                        m.member_id: {k: float(v[i]) for k, v in report.items()} for i, m in enumerate(slot.members)
                    },
                },
            )
        )
    if step % training.checkpoint_every == 0 and step < training.steps:
        save_checkpoint(slot.directory, ensemble, slot.position, slot.counter)
        slot.saved_step = step


def _end_segment(
    slot: _Slot,
    store: ActivationStore,
    run: RunDir,
    training: Training,
    device: torch.device,
    baseline: int,
    final: bool,
) -> None:
    """Each member's held-out results into done.json (written last); at the run's last step the finished members
    first."""
    ensemble, counter = slot.ensemble, slot.counter
    final_metrics = _final_metrics(ensemble, store, counter, training, device)
    coefficients = ensemble.schedules(ensemble.step_count)[
        1
    ].cpu()  # the last coefficient (steered members': where the controller left it)
    ends = {
        m.member_id: MemberEnd(
            bool(ensemble.alive[i]), float(coefficients[i]), {k: float(v[i]) for k, v in final_metrics.items()}
        )
        for i, m in enumerate(slot.members)
    }
    if final:
        info = {"steps": ensemble.step_count, "tokens": ensemble.rows_seen, **result_info(store.fingerprint, training)}
        frequencies = counter.frequencies().cpu()
        for i, member in enumerate(slot.members):
            params, _ = ensemble.member_state(i, folded=True)
            end = ends[member.member_id]
            save_member(
                run.member(member.member_id).path,
                member,
                params,
                None,
                {**info, "alive": end.alive, "l1_final": end.l1_final, "metrics": end.metrics},
                frequency=frequencies[i, : member.dict_size],
            )
    write_done(
        slot.directory,
        EnsembleEnd(ensemble.step_count, [m.member_id for m in slot.members], peak_bytes(device, baseline), ends),
    )


@torch.no_grad()
def _final_metrics(
    ensemble: Ensemble, store: ActivationStore, counter, training: Training, device
) -> dict[str, torch.Tensor]:
    """Held-out reconstruction metrics, dead fraction over the training window, MMCS vs truth."""
    x = store.heldout(training.eval_rows, device=device, normalize=training.normalize)  # [R, d]
    mask = ensemble.hparams["feature_mask"]
    # Pieces as large as a step's micro-batch: its step held several [M, b, n] tensors at once, and
    # the plan counted those; a forward pass holds fewer. Larger pieces could break the budget.
    rows_per_part = -(-training.batch_size // ensemble.micro_batches)
    truth = store.ground_truth()  # a paired store's: of the target, which transcoders' decoders write
    truth = None if truth is None else truth.to(device)
    scan = _detection(ensemble, store, len(x), truth) if truth is not None and not store.target_at else None
    target_at = getattr(ensemble.layout, "target_at", 0)
    result = metrics.heldout_metrics(x, ensemble.forward, mask, rows_per_part, target_at, scan and scan.observe)
    result["dead_frac"] = counter.dead_fraction(mask)
    if truth is not None:
        decoders = ensemble.decoders()
        result["mmcs_truth"] = metrics.mmcs_truth(decoders, mask, truth)
        result.update(truth_metrics.dictionary_scores(decoders, mask, truth))
        result.update(scan.scores() if scan is not None else {})
    if truth is not None and store.target_at:  # and their encoders read the input's features
        paired = store.paired_truth()
        encoders = torch.nn.functional.normalize(ensemble.params["W_enc"], dim=-1)
        result["mmcs_truth_in"] = metrics.mmcs_truth(encoders, mask, paired["features"].to(device))
        if "W_skip" in ensemble.params and paired["skip"].any():  # a learned skip against the true one
            result["skip_error"] = metrics.relative_error(ensemble.params["W_skip"], paired["skip"].to(device))
    return {name: value.float().cpu() for name, value in result.items()}


def _detection(ensemble: Ensemble, store: ActivationStore, n_rows: int, truth) -> truth_metrics.DetectionScan | None:
    """The detection and absorption scan of the first `n_rows` held-out rows (those of store.heldout), or None for a
    store that keeps no true codes."""
    try:
        codes = store.true_codes(store.heldout_indices()[:n_rows])
    except StoreError:
        return None
    parents = store.truth_tensors().get("parents")
    return truth_metrics.DetectionScan(codes, ensemble.decoders(), ensemble.hparams["feature_mask"], truth, parents)


def _skip_batch(
    store: ActivationStore, training: Training, index: int, step: int, position: Position, in_a_row: int, events
) -> int:
    """Report a skipped non-finite batch; refuse to spin through a store where every batch is bad."""
    in_a_row += 1
    events.put(("skipped", index, {"step": step, "position": position.to_dict()}))
    if in_a_row >= store.batches_per_epoch(training.batch_size):
        raise StoreError(
            f"every batch of a whole epoch of store {store.path} holds non-finite values; "
            f"check it with ActivationStore.open(path, verify='checksum') and rebuild it"
        )
    return in_a_row
