"""Stand-in for `sweep.py` in the SLURM tests: same command line, run dir and exit codes.

    python tests/slurm_standin.py [key=value ...] hydra.run.dir=RUN_DIR

Counts STANDIN_STEPS steps (env, default 20) of STANDIN_STEP_S seconds (default 0.1),
writing RUN_DIR/progress.json after each. On SIGTERM/SIGINT it writes
RUN_DIR/checkpoint.json and exits 75; a rerun into the same RUN_DIR resumes from the
checkpoint. At the end it writes RUN_DIR/done.json and exits 0; a rerun into a finished
run dir exits 0 at once. Every start appends one line to RUN_DIR/starts.log, so a test
can tell a resumed run from a fresh one. An argument without `=` is refused as Hydra refuses
it in sweep.py (its override parser): exit 1.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

EXIT_DONE, EXIT_HYDRA_ERROR, EXIT_INTERRUPTED = 0, 1, 75


def write_json(path: Path, data: dict) -> None:
    # Write-then-rename so a reader (the test) never sees a half-written file.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    bad = [a for a in argv if "=" not in a]
    if bad:
        print(f"Error parsing override(s) {bad}: expected key=value", file=sys.stderr)
        return EXIT_HYDRA_ERROR
    overrides = dict(a.split("=", 1) for a in argv)
    run_dir = Path(overrides.pop("hydra.run.dir", "standin_run"))
    run_dir.mkdir(parents=True, exist_ok=True)
    steps = int(os.environ.get("STANDIN_STEPS", "20"))
    step_s = float(os.environ.get("STANDIN_STEP_S", "0.1"))

    if (run_dir / "done.json").exists():
        print(f"{run_dir} is already finished; nothing to do")
        return EXIT_DONE

    # The state is (step, total): total sums the step indices, so a resume that skips or
    # repeats a step ends with a different total than an uninterrupted run.
    state = {"step": 0, "total": 0}
    checkpoint = run_dir / "checkpoint.json"
    if checkpoint.exists():
        state = json.loads(checkpoint.read_text())
    with open(run_dir / "starts.log", "a") as f:
        f.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "from_step": state["step"],
                    "job": os.environ.get("SLURM_JOB_ID"),
                    "restarts": os.environ.get("SLURM_RESTART_COUNT", "0"),
                    "overrides": overrides,
                }
            )
            + "\n"
        )

    stop = []
    # Only set a flag in the handler: the loop checkpoints at a step boundary, like the
    # real dispatcher. A second TERM (batch shell forwarding + --full) is harmless.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.append(signum))

    while state["step"] < steps:
        if stop:
            write_json(checkpoint, state)
            print(f"signal {stop[0]}: checkpointed at step {state['step']}, exiting {EXIT_INTERRUPTED}", flush=True)
            return EXIT_INTERRUPTED
        time.sleep(step_s)
        state = {"step": state["step"] + 1, "total": state["total"] + state["step"]}
        write_json(run_dir / "progress.json", state)

    write_json(run_dir / "done.json", state)
    print(f"done: {state}", flush=True)
    return EXIT_DONE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
