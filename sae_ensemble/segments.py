"""A run as a list of segments: trained one after another, with halving's rung transitions between them.

Without `training.halving` a run is one segment, step 0 to training.steps. With rungs it is one segment
per stretch between rungs: each is an ordinary plan whose workers train to the segment's end step and
write their members' held-out results there (train.py); here, between segments, the members still
training are ranked together (halving.py; in a run over several hooks, each hook's members among
themselves), the worst stop where they are and the rest are planned afresh into the next segment.

A rung's transition, all of it derived from files already on disk, so redoing it gives the same:
  1. dropped members get their final directory `members/<member_id>/` (weights at the rung,
     the rung's metrics, `stopped_early: true`); their ensembles' checkpoints stay as they are;
  2. the survivors are planned afresh (plan.make_plan: fewer or smaller ensembles), and each new
     ensemble gets a first checkpoint at the rung's step assembled from its members' saved
     states (weights, Adam moments, controller, firing counts; checkpoint.seed_checkpoint), so
     training goes on exactly;
  3. all of it is built in `halving/.rung_<k>.tmp/` and committed by renaming it to
     `halving/rung_<k>/` (its plan.json, ranking.json and checkpoints/): a SIGTERM or kill at
     any point leaves either no transition (redone on the rerun) or a whole one.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable

from sae_ensemble import checkpoint, halving
from sae_ensemble.activations.reader import ActivationStore
from sae_ensemble.atomic import fsync_dir, write_json_atomic
from sae_ensemble.config import Training
from sae_ensemble.dispatch import EXIT_OK
from sae_ensemble.plan import assign, make_plan
from sae_ensemble.rundir import CheckpointRecord, EnsembleDir, Plan, Ranking, RunDir, Segment, read_json


def end_steps(training: Training) -> list[int]:
    """The step each segment ends at: every rung's, then training.steps."""
    return [*training.halving.steps_at(training.steps), training.steps]


def first(plan: Plan, training: Training) -> Segment:
    return Segment(0, 0, end_steps(training)[0], RunDir.CHECKPOINTS, plan)


def latest(run: RunDir, plan: Plan, training: Training) -> Segment:
    """The newest committed segment (the first before any rung), on the plan's devices."""
    committed = [n for n in range(1, len(end_steps(training))) if (run.rung(n) / RunDir.PLAN).exists()]
    if not committed:
        return first(plan, training)
    number = committed[-1]
    return Segment.from_json(read_json(run.rung(number) / RunDir.PLAN), end_steps(training)[number])


def ended(segment: Segment, run: RunDir) -> bool:
    """Every ensemble of the segment reached its end step."""
    return all(run.ensemble(segment, e.index).is_done() for e in segment.plan.ensembles)


def finished(run: RunDir, plan: Plan, training: Training) -> bool:
    """The last segment ended and the report was written: a rerun has nothing to do."""
    segment = latest(run, plan, training)
    return run.summary.exists() and segment.end_step == training.steps and ended(segment, run)


def run(
    plan: Plan,
    stores: dict[str | None, ActivationStore],
    run_dir: RunDir,
    training: Training,
    devices: list[str],
    budget: int,
    train: Callable[[Segment], int],
) -> int:
    """Train every segment (see the module doc) with `train(segment) -> exit code` (dispatch.train); an exit code.

    Resumes wherever the run dir stands: committed rungs are taken as they are, a segment's
    ensembles resume from their checkpoints, an uncommitted transition is redone."""
    metric = (
        halving.resolve_metric(training.halving, all(s.ground_truth() is not None for s in stores.values()))
        if training.halving.rungs
        else ""
    )
    segment = first(plan, training)
    for number in range(1, len(end_steps(training))):
        if not run_dir.rung(number).exists():
            code = EXIT_OK if ended(segment, run_dir) else train(segment)
            if code != EXIT_OK:
                return code
            _transition(segment, number, metric, stores, run_dir, training, devices, budget)
        committed = Segment.from_json(read_json(run_dir.rung(number) / RunDir.PLAN), end_steps(training)[number])
        segment = dataclasses.replace(
            committed, plan=assign(committed.plan, devices, budget, training.execution, training.native_kernels)
        )
    return EXIT_OK if ended(segment, run_dir) else train(segment)


def _transition(
    segment: Segment,
    number: int,
    metric: str,
    stores: dict[str | None, ActivationStore],
    run: RunDir,
    training: Training,
    devices: list[str],
    budget: int,
) -> None:
    """Rank, stop the dropped members, seed the survivors' new ensembles, commit (module doc, steps 1-3)."""
    step = segment.end_step
    tmp = run.rung_in_progress(number)
    shutil.rmtree(tmp, ignore_errors=True)  # a transition killed before its commit: start it again
    sources, ends, records = {}, {}, []
    for e in segment.plan.ensembles:
        directory = run.ensemble(segment, e.index)
        step_dir = directory.step_dir(step)
        if directory.latest() != step_dir or not directory.is_done():
            raise halving.HalvingError(
                f"ensemble {e.index} in {directory.path} has no complete checkpoint and results at rung step "
                f"{step}; its segment did not end there: use a new run dir"
            )
        done = directory.read_done()
        records.append(CheckpointRecord.from_json(read_json(step_dir / EnsembleDir.RESUME)))
        for row, member_id in enumerate(e.members):
            sources[member_id] = (step_dir, row)
            ends[member_id] = done.ends[member_id]
    if any(r.position != records[0].position or r.tokens != records[0].tokens for r in records):
        raise halving.HalvingError(
            f"the ensembles of {run.path} stand at different store positions at step {step}; use a new run dir"
        )
    order, keep = [], []
    for hook in dict.fromkeys(m.hook for m in segment.plan.members.values()):  # a hook's members among themselves
        ranked = halving.rank(
            {m: end.metrics for m, end in ends.items() if segment.plan.members[m].hook == hook}, metric
        )
        order += ranked
        keep += ranked[: halving.survivors_count(len(ranked), training.halving.eta)]
    kept = set(keep)
    for member_id in (m for m in order if m not in kept):
        step_dir, row = sources[member_id]
        end = ends[member_id]
        checkpoint.write_stopped_member(
            run.member(member_id),
            EnsembleDir.saved_member(step_dir, member_id),
            step_dir,
            row,
            {
                **checkpoint.result_info(stores[segment.plan.members[member_id].hook].fingerprint, training),
                "alive": end.alive,
                "l1_final": end.l1_final,
                "stopped_early": True,
                "metrics": end.metrics,
            },
        )

    members = [segment.plan.members[m] for m in sorted(keep)]
    new = Segment(
        number,
        step,
        end_steps(training)[number],
        run.rung_checkpoint_dir(number),
        make_plan(members, devices, training.batch_size, budget, training.execution, training.native_kernels),
    )
    for e in new.plan.ensembles:
        directory = EnsembleDir(tmp / RunDir.CHECKPOINTS / RunDir.ensemble_name(e.index))
        checkpoint.seed_checkpoint(directory, new.plan.ensemble_members(e.index), sources, records[0])
    ranking = Ranking(step, metric, order, sorted(keep), {m: ends[m].metrics for m in order})
    write_json_atomic(tmp / RunDir.RANKING, dataclasses.asdict(ranking))
    write_json_atomic(tmp / RunDir.PLAN, new.to_json())
    os.rename(tmp, run.rung(number))  # the commit
    fsync_dir(run.halving)
