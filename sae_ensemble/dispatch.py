"""One worker process per device, each training one ensemble of the plan from the shared store.

Workers open the store themselves (memory-mapped: no activations cross a pipe), train,
checkpoint, and report through one queue. The parent shows a progress bar, forwards
metrics to a callback, and watches every worker: a worker that raises or dies makes
it stop the others (they checkpoint) and report which device and members failed.

Run-dir layout written here:
    checkpoints/ensemble_<i>/step_<N>/members/<member_id>/   members with optimizer moments
    checkpoints/ensemble_<i>/step_<N>/resume.json            written last: marks the step complete
    checkpoints/ensemble_<i>/done.json                       the ensemble finished
    members/<member_id>/{sae.safetensors,cfg.json,feature_freq.safetensors}   final members

Exit codes (also sweep.py's): 0 done, 1 a worker failed, 3 members froze (sweep.py; see
Training.freeze_after), 75 stopped by SIGTERM/SIGINT after checkpointing (rerun into the same
run dir to resume; SLURM requeues on it). docs/reliability.md lists every fault and its code.
"""

from __future__ import annotations

import ctypes
import os
import queue as queue_module
import shutil
import signal
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.multiprocessing as mp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from sae_ensemble import metrics
from sae_ensemble.activations.store import ActivationStore, Position, StoreError
from sae_ensemble.atomic import atomic_write, fsync_dir, write_json_atomic
from sae_ensemble.checkpoint import CheckpointError, load_ensemble, read_json, save_member
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.grid import plan_members

EXIT_OK, EXIT_FAILED, EXIT_FROZEN, EXIT_REQUEUE = 0, 1, 3, 75
PROGRESS_SECONDS = 1.0  # how often a worker reports its step between metric reports
KEEP_CHECKPOINTS = 2  # the newest and one before it, in case the newest is ever unreadable
FINAL_METRICS_ELEMENTS = 2**26  # [M, rows, n] codes per piece of the final metrics (256 MiB in float32)


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
    """A member whose loss or new weights are non-finite skips that step; after this many such steps
    in a row it is frozen at its last finite weights for the rest of the run (1 = at the first)."""
    allow_frozen: bool = False
    """Exit 0 even when members froze (otherwise the sweep reports them and exits 3)."""


# -- devices -----------------------------------------------------------------------------------------


def resolve_devices(spec: str) -> list[str]:
    """`auto`, `cpu`, `cpu:N` (N CPU workers), `cuda`, `cuda:0,2,...` -> worker device names."""
    spec = str(spec).strip()
    n_gpus = torch.cuda.device_count()
    if spec == "auto":
        return [f"cuda:{i}" for i in range(n_gpus)] if n_gpus else ["cpu:0"]
    if spec == "cpu":
        return ["cpu:0"]
    if spec.startswith("cpu:"):
        count = spec[4:]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"devices={spec!r}: cpu:N needs a worker count N >= 1, e.g. cpu:2")
        return [f"cpu:{i}" for i in range(int(count))]
    if spec == "cuda" or spec.startswith("cuda:"):
        indices = list(range(n_gpus)) if spec == "cuda" else spec[5:].split(",")
        if not all(str(i).strip().isdigit() for i in indices) or not indices:
            raise ValueError(f"devices={spec!r}: write cuda:0,1,... with GPU indices")
        indices = [int(i) for i in indices]
        bad = [i for i in indices if i >= n_gpus]
        if bad or not n_gpus:
            raise ValueError(f"devices={spec!r} asks for GPU(s) {bad or indices} but {n_gpus} are visible; use auto, cpu:N, or cuda:0..{max(n_gpus - 1, 0)}")
        if len(set(indices)) != len(indices):
            raise ValueError(f"devices={spec!r} names a GPU twice")
        return [f"cuda:{i}" for i in indices]
    raise ValueError(f"devices={spec!r} is unknown; allowed: auto, cpu, cpu:N, cuda, cuda:0,1,...")


def reuse_freed_memory() -> None:
    """Make glibc keep freed memory for reuse instead of returning it to the OS.

    A training step allocates and frees the same large [members, batch, features]
    tensors every step; glibc serves blocks over 32 MiB with fresh mmaps, so each step
    page-faults every page again (measured: 14% of a large CPU step). Heap-only
    allocation with no trimming reuses the pages. CPU only; a no-op without glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from malloc.h
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**62)


def cpu_threads(n_cpu_workers: int) -> int:
    """Threads per CPU worker: this process's CPU allocation (SLURM cgroups, taskset) split evenly.

    os.cpu_count() counts the whole machine and would oversubscribe a job given part of it.
    """
    try:
        allocated = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        allocated = os.cpu_count() or 1
    return max(1, allocated // max(1, n_cpu_workers))


def _torch_device(device: str) -> torch.device:
    return torch.device("cpu") if device.startswith("cpu") else torch.device(device)


# -- checkpoints ---------------------------------------------------------------------------------------


def ensemble_dir(run_dir: Path, index: int) -> Path:
    return run_dir / "checkpoints" / f"ensemble_{index}"


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete step dirs (those with resume.json), newest first."""
    records = directory.glob("step_*/resume.json")
    return sorted((p.parent for p in records), key=lambda p: int(p.name.split("_")[1]), reverse=True)


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete step dir or None."""
    steps = complete_checkpoints(directory)
    return steps[0] if steps else None


def load_checkpoint(step_dir: Path, members, training: Training, device, counter: metrics.FiringCounter) -> tuple[Ensemble, Position]:
    """The ensemble, firing counts and store position saved in one step dir."""
    record = read_json(step_dir / "resume.json")
    ensemble = load_ensemble([step_dir / "members" / m.member_id for m in members], training.steps, device, training.autocast_bf16,
                             freeze_after=training.freeze_after)
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
                    {**info, "alive": bool(ensemble.alive[index]), "nonfinite_streak": int(ensemble.nonfinite_streak[index])})
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


def resume(directory: Path, members, training: Training, device, counter: metrics.FiringCounter):
    """(ensemble, position, step dir or None, skipped) from the newest readable checkpoint, else a fresh start.

    An unreadable checkpoint falls back to the one before it (its name and error are in
    `skipped`); if checkpoints exist but none is readable, that is an error, never a restart.
    """
    unreadable = []
    for step_dir in complete_checkpoints(directory):
        try:
            ensemble, position = load_checkpoint(step_dir, members, training, device, counter)
            return ensemble, position, step_dir, unreadable
        except (CheckpointError, SafetensorError, KeyError, ValueError) as error:
            unreadable.append(f"{step_dir.name} ({error})")
    if unreadable:
        raise CheckpointError(f"no checkpoint in {directory} could be read: {'; '.join(unreadable)}")
    return Ensemble(members, training.steps, device, training.autocast_bf16, freeze_after=training.freeze_after), Position(), None, []


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

    def install(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signalled = True  # nothing else here: see the class doc

    def is_set(self) -> bool:
        if self.signalled and not self.stop.is_set():
            self.stop.set()  # the other workers stop too, as the parent would make them
        return self.signalled or self.stop.is_set()


def _worker(index: int, device: str, plan: dict, store_path: str, run_dir: str, training: dict, threads: int, events, stop) -> None:
    """Train ensemble `index` of the plan on `device`; report through `events`; obey `stop`."""
    # The parent decides when to stop; SIGINT/SIGTERM here (a process group signal) only raise a flag.
    stop = StopFlag(stop).install()
    try:
        _train(index, device, plan, Path(store_path), Path(run_dir), Training(**training), threads, events, stop)
    except BaseException as error:
        # One line first (what went wrong), then the traceback for whoever debugs it.
        message = str(error).strip().splitlines()
        summary = f"{type(error).__name__}: {message[0]}" if message else type(error).__name__
        events.put(("error", index, f"{summary}\n{traceback.format_exc()}"))
        raise SystemExit(EXIT_FAILED)


def _train(index, device, plan, store_path: Path, run_dir: Path, training: Training, threads, events, stop) -> None:
    torch.set_num_threads(threads)
    torch_device = _torch_device(device)
    if torch_device.type == "cpu":
        reuse_freed_memory()
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    members = plan_members(plan, index)
    directory = ensemble_dir(run_dir, index)
    if (directory / "done.json").exists():
        events.put(("done", index, None))
        return

    store = ActivationStore.open(store_path)
    counter = metrics.FiringCounter(len(members), max(m.dict_size for m in members), training.dead_window_tokens, torch_device)
    ensemble, position, checkpoint, unreadable = resume(directory, members, training, torch_device, counter)
    events.put(("start", index, {"step": ensemble.step_count, "resumed_from": str(checkpoint) if checkpoint else None,
                                 "skipped": unreadable}))

    batches = store.train_batches(training.batch_size, seed=training.data_seed, position=position, device=torch_device,
                                  normalize=training.normalize, window=training.shuffle_window_chunks, skip_nonfinite=True)
    last_progress, skipped_in_a_row = time.monotonic(), 0
    while ensemble.step_count < training.steps and not stop.is_set():
        batch, position = next(batches)
        if batch is None:  # it holds a non-finite value: no member sees it (see _skip_batch)
            skipped_in_a_row = _skip_batch(store, training, index, ensemble.step_count, position, skipped_in_a_row, events)
            continue
        skipped_in_a_row = 0
        stats = ensemble.step(batch)
        counter.update(torch.nan_to_num(stats["fired"]), batch.shape[0])  # a diverged member may fire NaN
        step = ensemble.step_count
        if step % training.log_every == 0 or step == training.steps:
            dead = counter.dead_fraction(ensemble.hparams["feature_mask"])
            report = {name: stats[name].detach().float().cpu() for name in ("loss", "mse", "l0", "l1_norm", "lr")}
            report["dead_frac"], report["alive"] = dead.cpu(), stats["alive"].float().cpu()
            events.put(("metrics", index, {"step": step, "tokens": ensemble.rows_seen,
                                           "members": {m.member_id: {k: float(v[i]) for k, v in report.items()} for i, m in enumerate(members)}}))
        elif time.monotonic() - last_progress > PROGRESS_SECONDS:
            events.put(("progress", index, {"step": step}))
            last_progress = time.monotonic()
        if step % training.checkpoint_every == 0 and step < training.steps:
            save_checkpoint(directory, ensemble, position, counter)
    save_checkpoint(directory, ensemble, position, counter)
    if ensemble.step_count < training.steps:
        events.put(("stopped", index, {"step": ensemble.step_count}))
        return

    final = _final_metrics(ensemble, store, counter, training, torch_device)
    info = {"steps": ensemble.step_count, "tokens": ensemble.rows_seen, "store_fingerprint": store.fingerprint,
            "normalize": training.normalize, "data_seed": training.data_seed}
    frequencies = counter.frequencies().cpu()
    for i, member in enumerate(members):
        params, _ = ensemble.member_state(i)
        out = run_dir / "members" / member.member_id
        save_member(out, member, params, None, {**info, "alive": bool(ensemble.alive[i]), "metrics": {k: float(v[i]) for k, v in final.items()}})
        frequency = {"frequency": frequencies[i, : member.dict_size].contiguous()}
        atomic_write(out / "feature_freq.safetensors", lambda tmp: save_file(frequency, tmp))
    write_json_atomic(directory / "done.json", {"steps": ensemble.step_count, "members": [m.member_id for m in members]})
    events.put(("done", index, None))


def _skip_batch(store: ActivationStore, training: Training, index: int, step: int, position: Position, in_a_row: int, events) -> int:
    """Report a skipped non-finite batch; refuse to spin through a store where every batch is bad."""
    in_a_row += 1
    events.put(("skipped", index, {"step": step, "position": position.to_dict()}))
    if in_a_row >= store.batches_per_epoch(training.batch_size):
        raise StoreError(f"every batch of a whole epoch of store {store.path} holds non-finite values; "
                         f"check it with ActivationStore.open(path, verify='checksum') and rebuild it")
    return in_a_row


@torch.no_grad()
def _final_metrics(ensemble: Ensemble, store: ActivationStore, counter, training: Training, device) -> dict[str, torch.Tensor]:
    """Held-out reconstruction metrics, dead fraction over the training window, MMCS vs truth."""
    x = store.heldout(training.eval_rows, device=device, normalize=training.normalize)  # [R, d]
    mask = ensemble.hparams["feature_mask"]
    # Pieces as large as a training batch (whose step held several [M, B, n] tensors at once), or
    # larger while the codes stay within FINAL_METRICS_ELEMENTS: one or two rows per forward
    # pass would make evaluating a large ensemble take longer than training it.
    rows_per_part = max(training.batch_size, FINAL_METRICS_ELEMENTS // (len(ensemble) * ensemble.n_padded))
    result = metrics.heldout_metrics(x, ensemble.forward, mask, rows_per_part)
    result["dead_frac"] = counter.dead_fraction(mask)
    truth = store.ground_truth()
    if truth is not None:
        result["mmcs_truth"] = metrics.mmcs_truth(ensemble.decoders(), mask, truth.to(device))
    return {name: value.float().cpu() for name, value in result.items()}


# -- the parent ----------------------------------------------------------------------------------------


def run(
    plan: dict,
    store_path: str | Path,
    run_dir: str | Path,
    training: Training,
    on_metrics: Callable[[str, int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> int:
    """Train every ensemble of the plan, one worker per device; return an exit code (see module doc)."""
    run_dir = Path(run_dir)
    ensembles = plan["ensembles"]
    devices = [e["device"] for e in ensembles]
    threads = cpu_threads(sum(d.startswith("cpu") for d in devices))
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
        for e in ensembles:
            worker = context.Process(
                target=_worker, name=f"sae-worker-{e['device']}",
                args=(e["index"], e["device"], plan, str(store_path), str(run_dir), asdict(training),
                      threads if e["device"].startswith("cpu") else 1, events, stop),
            )
            worker.start()
            workers[e["index"]] = worker
    except BaseException:
        stop.set()
        _stop_workers(workers, previous, events)
        raise
    status = {e["index"]: "starting" for e in ensembles}
    skipped = {e["index"]: 0 for e in ensembles}
    steps_done = {e["index"]: 0 for e in ensembles}
    failures: list[str] = []
    bar = tqdm(total=training.steps * len(ensembles), unit="step", disable=not progress, dynamic_ncols=True, mininterval=1.0)
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
                for skipped in payload["skipped"]:
                    tqdm.write(f"warning: {ensembles[index]['device']}: unreadable checkpoint {skipped} skipped; using the one before")
                if payload["resumed_from"]:
                    tqdm.write(f"{ensembles[index]['device']}: ensemble {index} resumed at step {payload['step']} from {payload['resumed_from']}")
                if all(s != "starting" for s in status.values()) and first_step is None:
                    first_step, started = sum(steps_done.values()), time.monotonic()
            elif kind == "progress":
                steps_done[index] = payload["step"]
            elif kind == "metrics":
                steps_done[index] = payload["step"]
                if on_metrics:
                    for member_id, values in payload["members"].items():
                        on_metrics(member_id, payload["step"], values)
            elif kind == "done":
                status[index], steps_done[index] = "done", training.steps
            elif kind == "stopped":
                status[index] = "stopped"
            elif kind == "skipped":
                skipped[index] += 1
                if skipped[index] == 1:
                    tqdm.write(f"warning: {ensembles[index]['device']}: skipped a batch holding non-finite values before step "
                               f"{payload['step'] + 1} (store position {payload['position']}); no member saw it")
            elif kind == "error":
                status[index] = "failed"
                failures.append(_describe(ensembles[index], f"raised an exception: {payload}"))
                stop.set()
            # Liveness: a worker that exited without a final event died (SIGKILL, OOM killer, segfault).
            for i, worker in workers.items():
                if status[i] in ("starting", "running") and not worker.is_alive() and events.empty():
                    worker.join()
                    if status[i] in ("starting", "running"):
                        status[i] = "failed"
                        failures.append(_describe(ensembles[i], f"died with {_exit_reason(worker.exitcode)}"))
                        stop.set()
            done_now = sum(steps_done.values())
            if done_now != bar.n:
                rows_per_s = (done_now - (first_step or 0)) * training.batch_size / max(time.monotonic() - started, 1e-9)
                states = " ".join(f"{ensembles[i]['device']}={s}" for i, s in status.items())
                bar.set_postfix_str(f"{rows_per_s:,.0f} rows/s {states}", refresh=False)
                bar.update(done_now - bar.n)  # tqdm rate-limits redraws (mininterval)
    finally:
        bar.close()
        _stop_workers(workers, previous, events)

    for index, count in skipped.items():
        if count:
            print(f"warning: {ensembles[index]['device']}: skipped {count} batch(es) holding non-finite values this run", flush=True)
    for message in failures:
        print(f"error: {message}", flush=True)
    if failures:
        print(f"error: {len(failures)} worker(s) failed; checkpoints are kept in {run_dir / 'checkpoints'}; rerun to resume", flush=True)
        return EXIT_FAILED
    if interrupted or any(s == "stopped" for s in status.values()):
        print(f"interrupted: checkpoints written to {run_dir / 'checkpoints'}; rerun into {run_dir} to resume (exit {EXIT_REQUEUE})", flush=True)
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


def _describe(ensemble: dict, what: str) -> str:
    members = ensemble["members"]
    shown = ", ".join(members[:6]) + (f" and {len(members) - 6} more" if len(members) > 6 else "")
    return f"worker on {ensemble['device']} (ensemble {ensemble['index']}: {shown}) {what}"


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"
