"""wandb tracking: one run per member, grouped by sweep, plus one sweep-level run for plots.

Offline by default: mode=None means "online" only when WANDB_API_KEY is set, else
"offline" (runs are written under `<directory>/wandb/` and can be uploaded later
with `wandb sync`). If an online run cannot start (no network), the tracker warns
once and carries on offline, so tracking never stops a sweep. The key is read by
wandb itself from the environment; this module never reads, copies or writes it.

Runs start lazily, on a member's first `log` or `finish`, with a stable id derived
from (group, member_id): rerunning a sweep into the same group continues the same
runs (resume="allow") instead of starting duplicates.

Every wandb call runs in one background thread, fed by a queue: `log`, `finish` and
`log_sweep_plots` return at once. Opening a run takes wandb a good fraction of a second,
and the dispatcher's parent calls `log` from the loop that watches its workers: opening
200+ runs inline would stall that loop for minutes. `flush()` waits for the queue;
`close()` drains it. A wandb error there is warned about and tracking goes on (it never
stops a sweep).

Not process-safe, and callers use one thread: one process owns the Tracker (the
dispatcher's parent, which receives workers' metrics through a queue).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sae_ensemble.member import Member

MODES = ("online", "offline", "disabled")
SWEEP_RUN = "__sweep__"  # key of the sweep-level run among the member runs


def run_id(group: str, member_id: str, run_dir: str | Path) -> str:
    """Stable wandb run id of a member of the sweep in `run_dir` (wandb ids allow [a-z0-9], so hash).

    The run dir is part of it: a resumed or requeued sweep (same dir) continues its runs,
    while another multirun job or a later sweep with the same group and members gets its own.
    """
    return hashlib.sha256(f"{group}/{Path(run_dir).resolve()}/{member_id}".encode()).hexdigest()[:24]


class Tracker:
    """One wandb run per member; `log` and `finish` take member ids."""

    def __init__(
        self,
        project: str,
        group: str,
        mode: str | None = None,
        entity: str | None = None,
        base_config: dict[str, Any] | None = None,
        directory: str | Path = ".",
    ) -> None:
        if mode is None:
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        if mode not in MODES:
            raise ValueError(
                f"wandb mode={mode!r} is unknown; allowed: {', '.join(MODES)} (or None to choose by WANDB_API_KEY)"
            )
        self.project, self.group, self.mode, self.entity = project, group, mode, entity
        self.base_config = dict(base_config or {})
        self.directory = Path(directory)
        self.members: dict[str, Member] = {}
        self.runs: dict[str, Any] = {}  # member_id (or SWEEP_RUN) -> open wandb Run (background thread only)
        self._started = False  # whether wandb's service was started by a run of ours
        self._calls: queue.Queue = queue.Queue()  # (function, args) for the background thread; None stops it
        self._thread: threading.Thread | None = None

    def register(self, members: Iterable[Member]) -> None:
        """Declare the members whose runs this tracker may start (their hyperparameters become the run config)."""
        for member in members:
            self.members[member.member_id] = member

    # -- per-member runs ---------------------------------------------------------------------

    def _run(self, key: str):
        if key in self.runs:
            return self.runs[key]
        if key == SWEEP_RUN:
            config, job_type, name = dict(self.base_config), "sweep", f"{self.group}-sweep"
        elif key in self.members:
            member = self.members[key]
            config = {**self.base_config, **member.to_dict(), "member_id": key}
            job_type, name = member.variant, key
        else:
            raise ValueError(
                f"member {key!r} was never registered with the tracker; registered: {sorted(self.members)[:5]}..."
            )
        self.runs[key] = self._init(
            config=config, job_type=job_type, name=name, id=run_id(self.group, key, self.directory)
        )
        return self.runs[key]

    def _init(self, **run_args):
        import wandb  # imported only when a run starts: mode="disabled" never needs wandb

        self.directory.mkdir(parents=True, exist_ok=True)
        self._started = True
        settings = wandb.Settings(
            console="off",  # many runs in one process: don't capture (and duplicate) stdout per run
            x_disable_stats=True,  # no system-metrics sampler per run
            silent=True,
            disable_git=True,
            save_code=False,
        )
        args = dict(
            project=self.project,
            entity=self.entity,
            group=self.group,
            dir=str(self.directory),
            resume="allow",
            reinit="create_new",  # several runs open at once in one process (wandb >= 0.19)
            settings=settings,
            **run_args,
        )
        try:
            return wandb.init(mode=self.mode, **args)
        except Exception as error:  # noqa: BLE001 - no network must never stop a sweep
            if self.mode != "online":
                raise
            warnings.warn(
                f"wandb could not start an online run ({error}); logging offline to {self.directory}/wandb instead",
                stacklevel=2,
            )
            self.mode = "offline"
            return wandb.init(mode=self.mode, **args)

    # -- the background thread -----------------------------------------------------------------

    def _submit(self, function, *args) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="wandb-tracker", daemon=True)
            self._thread.start()
        self._calls.put((function, args))

    def _serve(self) -> None:
        while True:
            call = self._calls.get()
            try:
                if call is None:
                    return
                function, args = call
                function(*args)
            except Exception as error:  # noqa: BLE001 - tracking must never stop a sweep
                warnings.warn(
                    f"wandb tracking failed ({type(error).__name__}: {error}); training goes on", stacklevel=2
                )
            finally:
                self._calls.task_done()

    def flush(self) -> None:
        """Wait until every call so far has reached wandb."""
        if self._thread is not None:
            self._calls.join()

    def _check_registered(self, key: str) -> None:
        if key != SWEEP_RUN and key not in self.members:
            raise ValueError(
                f"member {key!r} was never registered with the tracker; registered: {sorted(self.members)[:5]}..."
            )

    # -- the interface (returns at once) ------------------------------------------------------

    def log(self, member_id: str, step: int, metrics: dict[str, float]) -> None:
        """Log a member's metrics at a training step."""
        if self.mode == "disabled":
            return
        self._check_registered(member_id)
        self._submit(self._log, member_id, int(step), dict(metrics))

    def _log(self, member_id: str, step: int, metrics: dict[str, float]) -> None:
        self._run(member_id).log(metrics, step=step)

    def finish(self, member_id: str, summary: dict[str, Any] | None = None) -> None:
        """Record a member's final metrics as its run summary and close its run."""
        if self.mode == "disabled":
            return
        self._check_registered(member_id)
        self._submit(self._finish, member_id, dict(summary or {}))

    def _finish(self, member_id: str, summary: dict[str, Any]) -> None:
        run = self._run(member_id)
        if summary:
            run.summary.update(summary)
        run.finish()
        del self.runs[member_id]

    # -- sweep-level run ---------------------------------------------------------------------

    def log_sweep_plots(self, paths: Iterable[str | Path]) -> None:
        """Log report plots (PNG files) as images into the sweep-level run (job_type="sweep")."""
        if self.mode == "disabled":
            return
        import wandb

        images = {Path(p).stem: wandb.Image(str(p)) for p in paths}
        if images:
            self._submit(self._log_images, images)

    def _log_images(self, images: dict) -> None:
        self._run(SWEEP_RUN).log(images)

    def close(self) -> None:
        """Finish every run still open (interrupted members stay resumable under the same id).

        Then shut wandb's background service down: `finish()` returns before the service
        has flushed each run's log to disk, and teardown waits for it.
        """
        if self._thread is None:
            return
        self._submit(self._close)
        self._calls.put(None)
        self._thread.join()
        self._thread = None

    def _close(self) -> None:
        for key in list(self.runs):
            self.runs.pop(key).finish()
        if self._started:
            import wandb

            wandb.teardown()
            self._started = False

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
