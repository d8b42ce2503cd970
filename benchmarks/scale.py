"""A sweep larger than its memory budget: the plan splits it, the workers train it, the peak is measured.

    python -m benchmarks.scale                         # CPU: d_in=768, dict sizes 6144 and 12288, 8 members, 4GiB
    python -m benchmarks.scale --device cuda           # one GPU with the auto budget (90% of its free memory)
    python -m benchmarks.scale --budget 2GiB --steps 3
    python -m benchmarks.scale --execution fused       # the plan and the run of a kernel's step
    python -m benchmarks.scale --calibrate             # refit plan.STEP_COST["reference"] from single-ensemble peaks
    python -m benchmarks.scale --calibrate --execution fused   # the same for a kernel (fused or sparse)

Runs the real path (plan -> store -> dispatch.train of the run's one segment -> worker ->
checkpoints) on one device for a few steps. The worker measures its own peak (CPU: peak RSS over its RSS at start; CUDA:
torch.cuda.max_memory_allocated) and writes it into done.json. The last line is one JSON
object: budget_bytes, planned_bytes (the plan's peak for the worker), peak_bytes (measured),
ratio = peak / planned, and the plan's shape (ensembles, stages, micro-batches).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sae_ensemble import dispatch, segments
from sae_ensemble.activations.synthetic import write_synthetic
from sae_ensemble.config import ExecutionKind, Grid, Training
from sae_ensemble.grid import members as grid_members
from sae_ensemble.member import Member
from sae_ensemble.memory import format_size, resolve_budget
from sae_ensemble.plan import BYTES, CPU_RUNTIME_BYTES, STEP_COST, ensemble_memory, format_plan, make_plan
from sae_ensemble.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
# Shapes (d_in, dict size, members, batch): a tiny one (the runtime's own memory), then ones
# where one term dominates: params P, activations [M, b, n] A, [M, b, d] tensors X; then mixed ones.
CALIBRATION_SHAPES = [
    (32, 32, 1, 32),
    (512, 4096, 2, 16),
    (32, 4096, 2, 2048),
    (768, 16, 2, 2048),
    (384, 16, 2, 1024),
    (256, 2048, 4, 512),
    (768, 3072, 2, 1024),
]


# -- measuring one ensemble's peak -----------------------------------------------------------------


def measure_step_peak(
    members: list[Member],
    batch_size: int,
    micro_batches: int = 1,
    steps: int = 2,
    repeats: int = 3,
    execution: str = "reference",
) -> int:
    """Peak bytes of building `members` as one ensemble and stepping it with `execution`, on CPU: the median of
    `repeats` fresh processes.

    Each child runs as a worker does (glibc heap reuse, one thread) and reports its peak anonymous
    RSS over that just before building the ensemble (`memory.peak_bytes`: library pages the kernel
    pages out and back in do not count): a fresh process, so the peak is this ensemble's and
    nothing before it. The median, because the untrimmed heap's peak varies between identical runs.
    """
    spec = json.dumps(
        {
            "members": [m.to_dict() for m in members],
            "batch_size": batch_size,
            "micro_batches": micro_batches,
            "steps": steps,
            "execution": execution,
        }
    )
    peaks = []
    for _ in range(repeats):
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.scale", "--measure", spec],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=600,
        )
        if result.returncode != 0:
            raise RuntimeError(f"measuring {spec} failed:\n{result.stderr}")
        peaks.append(int(result.stdout.split()[-1]))
    return sorted(peaks)[len(peaks) // 2]


def _measure_child(spec: dict) -> None:
    import torch

    from sae_ensemble.ensemble import Ensemble
    from sae_ensemble.memory import peak_bytes, resident_bytes, reuse_freed_memory

    torch.set_num_threads(1)
    reuse_freed_memory()
    members = [Member.from_dict(m) for m in spec["members"]]
    batch = torch.randn(spec["batch_size"], members[0].row_width)  # transcoders: [x | y]
    baseline = resident_bytes()
    ensemble = Ensemble(members, spec["steps"], micro_batches=spec["micro_batches"], execution=spec["execution"])
    for _ in range(spec["steps"]):
        ensemble.step(batch)
    print(peak_bytes(torch.device("cpu"), baseline))


def calibrate(execution: str) -> None:
    """Fit (c_P, c_A, c_X, runtime bytes) of `execution` per variant over CALIBRATION_SHAPES (least relative
    error); print them beside plan.STEP_COST's."""
    for variant in ("relu", "tied", "topk"):
        rows, peaks, states = [], [], []
        for d, n, m, b in CALIBRATION_SHAPES:
            members = [Member(variant, d, n, l1=1e-3, k=min(32, n), seed=i) for i in range(m)]
            rows.append([BYTES * m * (2 * n * d + n + d), BYTES * m * b * n, BYTES * m * b * d, 1.0])
            states.append(ensemble_memory(members, b)["state_bytes"])
            peaks.append(measure_step_peak(members, b, repeats=1, execution=execution))
        rows, peaks, states = np.array(rows), np.array(peaks, dtype=float), np.array(states, dtype=float)
        current = STEP_COST.get(execution, STEP_COST["reference"])[
            variant
        ]  # a path not yet fitted is planned as the reference
        fit = np.linalg.lstsq(rows / peaks[:, None], (peaks - states) / peaks, rcond=None)[0]
        for shape, row, peak, state in zip(CALIBRATION_SHAPES, rows, peaks, states):
            planned = state + row[:3] @ np.array(current) + CPU_RUNTIME_BYTES
            print(
                f"{variant} d,n,M,B={shape}: measured {format_size(peak)}, fit {format_size(state + row @ fit)}, "
                f"plan {format_size(planned)} ({planned / peak - 1:+.0%})",
                flush=True,
            )
        print(
            json.dumps(
                {
                    "execution": execution,
                    "variant": variant,
                    "fit": [round(float(c), 2) for c in fit[:3]],
                    "plan": current,
                    "runtime_mib": round(float(fit[3]) / 2**20),
                    "plan_runtime_mib": CPU_RUNTIME_BYTES / 2**20,
                }
            ),
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--budget", default=None, help="memory_budget per worker (default: 4GiB on CPU, auto on CUDA)")
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--dict-sizes", default="6144,12288")
    parser.add_argument(
        "--members", type=int, default=8, help="members in all, spread evenly over the dict sizes (by l1)"
    )
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--calibrate", action="store_true", help=calibrate.__doc__)
    parser.add_argument(
        "--execution",
        default="reference",
        choices=["reference", "fused", "sparse"],
        help="the step whose peak is measured: the scale run's execution, or the one --calibrate fits",
    )
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child of measure_step_peak
    args = parser.parse_args()
    if args.measure:
        return _measure_child(json.loads(args.measure))
    if args.calibrate:
        return calibrate(args.execution)

    sizes = [int(s) for s in args.dict_sizes.split(",")]
    per_size = max(1, args.members // len(sizes))
    members = grid_members(Grid(dict_sizes=sizes, l1=[1e-4 * 2**i for i in range(per_size)]), args.d_in)
    device = "cuda:0" if args.device == "cuda" else "cpu:0"
    budget = resolve_budget(args.budget or ("auto" if args.device == "cuda" else "4GiB"), [device])
    # The plan models the execution that runs (plan.STEP_COST); a pinned one, so the run takes the path modelled.
    training = Training(
        steps=args.steps,
        batch_size=args.batch,
        checkpoint_every=10**9,
        log_every=args.steps,
        eval_rows=args.batch,
        dead_window_tokens=args.batch * args.steps,
        execution=ExecutionKind(args.execution),
    )
    plan = make_plan(members, [device], args.batch, budget, args.execution)
    print(format_plan(plan), flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        store = write_synthetic(
            Path(tmp) / "store",
            d_in=args.d_in,
            n_features=2 * args.d_in,
            n_active=8,
            n_rows=args.batch * (args.steps + 1) + args.batch,
            rows_per_chunk=args.batch * 2,
            heldout_rows=args.batch,
            seed=0,
        )
        run = RunDir(Path(tmp) / "run")
        segment = segments.first(plan, training)  # no halving: the whole run is one segment
        started = time.perf_counter()
        code = dispatch.train(segment, store.path, run.path, training, progress=False)
        seconds = time.perf_counter() - started
        if code != dispatch.EXIT_OK:
            raise SystemExit(f"the scale run failed with exit code {code}")
        peaks = [run.ensemble(segment, e.index).read_done().peak_bytes for e in plan.ensembles]
        peak = max(peaks)
        print(
            "worker's peak when each ensemble finished: "
            + ", ".join(f"{i}: {format_size(p)}" for i, p in enumerate(peaks))
        )

    worker = plan.workers[0]
    planned = worker.planned_bytes
    print(
        f"budget {format_size(budget)}, planned {format_size(planned)}, measured peak {format_size(peak)} "
        f"({peak / planned:.2f} of planned), {seconds:.0f}s for {args.steps} steps",
        flush=True,
    )
    print(
        json.dumps(
            {
                "benchmark": "scale",
                "device": args.device,
                "d_in": args.d_in,
                "dict_sizes": sizes,
                "members": len(members),
                "batch": args.batch,
                "steps": args.steps,
                "ensembles": len(plan.ensembles),
                "stages": len(worker.stages),
                "micro_batches": [e.micro_batches for e in plan.ensembles],
                "budget_bytes": budget,
                "planned_bytes": planned,
                "peak_bytes": peak,
                "ratio": round(peak / planned, 3),
                "seconds": round(seconds, 1),
                "execution": training.execution,
            }
        )
    )


if __name__ == "__main__":
    main()
