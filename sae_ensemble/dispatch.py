"""One worker process per device, each training its ensembles of a segment (train.py) from the shared store;
then (`evaluate`) one per device again, each evaluating the members of its ensembles (eval_worker.py).

Workers open the store themselves (memory-mapped: no activations cross a pipe), train,
checkpoint, and report through one queue. The parent shows a progress bar, forwards
metrics to a callback, and watches every worker: a worker that raises or dies makes
it stop the others (they checkpoint) and report which device and members failed.

Checkpoints: checkpoint.py; the run-dir layout: rundir.py.

Exit codes (also sweep.py's): 0 done, 1 a worker failed, 3 members froze (pipeline.py; see
Training.freeze_after), 75 stopped by SIGTERM/SIGINT after checkpointing (rerun into the same
run dir to resume; SLURM requeues on it). docs/reliability.md lists every fault and its code.
"""

from __future__ import annotations

import queue as queue_module
import signal
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path

import torch.multiprocessing as mp
from tqdm import tqdm

from sae_ensemble.config import Training
from sae_ensemble.devices import cpu_threads
from sae_ensemble.eval_worker import Evaluation, evaluate_worker, split_worker
from sae_ensemble.rundir import Plan, RunDir, Segment
from sae_ensemble.train import train_worker

StorePaths = str | Path | Mapping[str | None, str | Path]  # a member hook's store (one path: every member's)

EXIT_OK, EXIT_FAILED, EXIT_FROZEN, EXIT_REQUEUE = 0, 1, 3, 75


# -- the worker ----------------------------------------------------------------------------------------


class StopFlag:
    """The shared stop event plus a plain flag that this process's signal handler sets.

    A signal handler runs between two bytecodes of the main thread, possibly inside
    `stop.is_set()` while it holds the event's lock; `stop.set()` there would wait on that
    lock forever. So the handler only sets a Python attribute, and the training loop (which
    polls `is_set()` every step) passes it on to the shared event from ordinary code.
    """

    def __init__(self, stop) -> None:
        self.stop = stop
        self.signalled = False

    def install(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signalled = True  # nothing else here: see the class doc

    def is_set(self) -> bool:
        if self.signalled and not self.stop.is_set():
            self.stop.set()  # the other workers stop too, as the parent would make them
        return self.signalled or self.stop.is_set()


def _worker(
    job: str,
    index: int,
    device: str,
    work: Segment | Plan,
    paths: dict[str | None, str],
    run_dir: str,
    training: Training,
    evaluation: Evaluation | None,
    threads: int,
    events,
    stop,
) -> None:
    """Worker `index` on `device`: train its ensembles of a segment (stage by stage), or evaluate the members
    of its ensembles of a plan; report through `events`; obey `stop`."""
    # The parent decides when to stop; SIGINT/SIGTERM here (a process group signal) only raise a flag.
    stop = StopFlag(stop).install()
    try:
        if job == "train":
            train_worker(index, device, work, paths, Path(run_dir), training, threads, events, stop)
        else:
            worker = evaluate_worker if job == "evaluate" else split_worker
            worker(index, device, work, paths, Path(run_dir), training, evaluation, threads, events, stop)
    except BaseException as error:
        # One line first (what went wrong), then the traceback for whoever debugs it.
        message = str(error).strip().splitlines()
        summary = f"{type(error).__name__}: {message[0]}" if message else type(error).__name__
        events.put(("error", index, f"{summary}\n{traceback.format_exc()}"))
        raise SystemExit(EXIT_FAILED) from error


# -- the parent ----------------------------------------------------------------------------------------


def store_paths(stores: StorePaths) -> dict[str | None, str]:
    """Each member hook's store path (plain strings cross to the workers); one path is the store of every member."""
    return {k: str(v) for k, v in stores.items()} if isinstance(stores, Mapping) else {None: str(stores)}


def train(
    segment: Segment,
    stores: StorePaths,
    run_dir: str | Path,
    training: Training,
    on_metrics: Callable[[str, int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> int:
    """Train every ensemble of the segment to its end step, one worker per device; return an exit code (see module
    doc)."""
    totals = [segment.end_step * len(w.ensembles) for w in segment.plan.workers]
    return _supervise("train", segment, segment.plan, stores, run_dir, training, None, totals, on_metrics, progress)


def evaluate(
    plan: Plan,
    stores: StorePaths,
    run_dir: str | Path,
    training: Training,
    evaluation: Evaluation | None = None,
    progress: bool = True,
) -> int:
    """Evaluate every trained member (eval_worker.py), each on the device of the worker given its ensemble; an exit
    code.

    `evaluation`: what it computes beside MMCS (CE loss recovered in a language model, feature statistics)."""
    totals = [sum(len(plan.ensembles[i].members) for i in w.ensembles) for w in plan.workers]
    evaluation = evaluation or Evaluation()
    code = _supervise("evaluate", plan, plan, stores, run_dir, training, evaluation, totals, None, progress)
    if code != EXIT_OK or evaluation.features is None:
        return code
    # Feature splitting reads every member's statistics, which workers wrote independently: a second job.
    return _supervise("split", plan, plan, stores, run_dir, training, evaluation, totals, None, progress)


def _supervise(
    job: str,
    work: Segment | Plan,
    plan: Plan,
    stores: StorePaths,
    run_dir: str | Path,
    training: Training,
    evaluation: Evaluation | None,
    totals: list[int],
    on_metrics: Callable[[str, int, dict[str, float]], None] | None,
    progress: bool,
) -> int:
    """Start one `job` worker per device of the plan, follow them to the end (progress counts `totals` units
    per worker: ensemble-steps or members), stop them all on a failure or a signal; an exit code."""
    run_dir = Path(run_dir)
    plan_workers = plan.workers
    threads = cpu_threads(sum(w.device.startswith("cpu") for w in plan_workers))
    context = mp.get_context("spawn")
    events, stop = context.Queue(), context.Event()

    interrupted = []
    # SIGUSR2 is submitit's "about to time out / preempted" signal: when a handler (submitit's)
    # is installed, checkpoint first, then hand the signal on to it so it can requeue the job.
    stop_signals = [signal.SIGINT, signal.SIGTERM]
    if callable(signal.getsignal(signal.SIGUSR2)):
        stop_signals.append(signal.SIGUSR2)
    # Installed before any worker exists: a signal while they start still stops them (they see
    # `stop` at their first step and checkpoint); the old handlers would leave them running.
    # The handler only appends to a list; the loop below sets `stop` (see StopFlag for why).
    previous = {sig: signal.signal(sig, lambda signum, _: interrupted.append(signum)) for sig in stop_signals}
    workers = {}
    try:
        for index, w in enumerate(plan_workers):
            worker = context.Process(
                target=_worker,
                name=f"sae-worker-{w.device}",
                args=(
                    job,
                    index,
                    w.device,
                    work,
                    store_paths(stores),
                    str(run_dir),
                    training,
                    evaluation,
                    threads if w.device.startswith("cpu") else 1,
                    events,
                    stop,
                ),
            )
            worker.start()
            workers[index] = worker
    except BaseException:
        stop.set()
        _stop_workers(workers, previous, events)
        raise
    status = {index: "starting" for index in workers}
    skipped = {index: 0 for index in workers}
    steps_done = {index: 0 for index in workers}
    total_steps = dict(enumerate(totals))
    failures: list[str] = []
    # Training counts ensemble-steps (a worker with three ensembles has 3 x steps to do); evaluation counts members.
    bar = tqdm(
        total=sum(total_steps.values()),
        unit="step" if job == "train" else "member",
        desc=None if job == "train" else job,
        disable=not progress,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    started, first_step = time.monotonic(), None
    try:
        while any(s in ("starting", "running") for s in status.values()):
            if interrupted and not stop.is_set():
                stop.set()
            try:
                kind, index, payload = events.get(timeout=0.5)
            except queue_module.Empty:
                kind = None
            if kind == "start":
                status[index] = "running"
                steps_done[index] = payload["step"]
                if all(s != "starting" for s in status.values()) and first_step is None:
                    first_step, started = sum(steps_done.values()), time.monotonic()
            elif kind == "progress":
                steps_done[index] = payload["step"]
            elif kind == "note":
                tqdm.write(f"{plan_workers[index].device}: {payload}")
            elif kind == "metrics":
                if on_metrics:
                    for member_id, values in payload["members"].items():
                        on_metrics(member_id, payload["step"], values)
            elif kind == "done":
                status[index], steps_done[index] = "done", total_steps[index]
            elif kind == "stopped":
                status[index] = "stopped"
            elif kind == "skipped":
                skipped[index] += 1
                if skipped[index] == 1:
                    tqdm.write(
                        f"warning: {plan_workers[index].device}: skipped a batch holding non-finite values before step "
                        f"{payload['step'] + 1} (store position {payload['position']}); no member saw it"
                    )
            elif kind == "error":
                status[index] = "failed"
                failures.append(_describe(plan, index, f"raised an exception: {payload}"))
                stop.set()
            # Liveness: a worker that exited without a final event died (SIGKILL, OOM killer, segfault).
            for i, worker in workers.items():
                if status[i] in ("starting", "running") and not worker.is_alive() and events.empty():
                    worker.join()
                    if status[i] in ("starting", "running"):
                        status[i] = "failed"
                        failures.append(_describe(plan, i, f"died with {_exit_reason(worker.exitcode)}"))
                        stop.set()
            done_now = sum(steps_done.values())
            if done_now != bar.n:
                states = " ".join(f"{plan_workers[i].device}={s}" for i, s in status.items())
                if job == "train":
                    rows_per_s = (
                        (done_now - (first_step or 0)) * training.batch_size / max(time.monotonic() - started, 1e-9)
                    )
                    states = f"{rows_per_s:,.0f} rows/s {states}"
                bar.set_postfix_str(states, refresh=False)
                bar.update(done_now - bar.n)  # tqdm rate-limits redraws (mininterval)
    finally:
        bar.close()
        _stop_workers(workers, previous, events)

    run = RunDir(run_dir)
    if isinstance(work, Segment):
        what, where = "checkpoints", run.path / work.checkpoint_dir
    else:
        what, where = "evaluation results (eval.json)", run.members
    for index, count in skipped.items():
        if count:
            print(
                f"warning: {plan_workers[index].device}: skipped {count} batch(es) holding non-finite values this run",
                flush=True,
            )
    for message in failures:
        print(f"error: {message}", flush=True)
    if failures:
        print(f"error: {len(failures)} worker(s) failed; {what} are kept in {where}; rerun to resume", flush=True)
        return EXIT_FAILED
    if interrupted or any(s == "stopped" for s in status.values()):
        print(
            f"interrupted: {what} written to {where}; rerun into {run_dir} to resume (exit {EXIT_REQUEUE})", flush=True
        )
        if signal.SIGUSR2 in interrupted:
            signal.raise_signal(signal.SIGUSR2)  # now the restored (submitit) handler requeues
        return EXIT_REQUEUE
    return EXIT_OK


def _stop_workers(workers: dict, previous_handlers: dict, events) -> None:
    """Restore the caller's signal handlers and wait for the workers (stop is already set or they are done)."""
    for sig, handler in previous_handlers.items():
        signal.signal(sig, handler)
    for worker in workers.values():
        worker.join(timeout=60)
        if worker.is_alive():  # a worker stuck past a minute after stop: do not hang the sweep
            worker.kill()
            worker.join()
    events.close()


def _describe(plan: Plan, index: int, what: str) -> str:
    worker = plan.workers[index]
    members = [m for i in worker.ensembles for m in plan.ensembles[i].members]
    shown = ", ".join(members[:6]) + (f" and {len(members) - 6} more" if len(members) > 6 else "")
    return f"worker on {worker.device} (ensembles {', '.join(map(str, worker.ensembles))}: {shown}) {what}"


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"
