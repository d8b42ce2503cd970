"""Issue #15's acceptance, end to end through sweep.py; prints one JSON object per check on its last lines.

    python -m benchmarks.steering [--devices cuda] [--out DIR] [--lm]

1. target_l0: `grid.target_l0=[4,8,16]` on the default synthetic store (default grid: relu, d512 and
   d1024, 3000 steps); every member's held-out L0 within 10% of its target. `--lm` adds the same on
   the tiny LM store (`data=lm model=tiny`, 3000 steps).
2. halving: a 32-member grid (relu d512, 16 l1 values x 2 seeds) trained in full and with
   `training.halving.rungs=[0.25,0.5] eta=3`; the halving run's best mmcs_truth within 0.01 of the
   full grid's, with at most 45% of its member-steps.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from sae_ensemble.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
GRID_32 = ["grid.dict_ratios=[2]", "grid.l1=${logspace:-4,-2.5,16}", "grid.seeds=[0,1]"]
HALVING = ["training.halving.rungs=[0.25,0.5]", "training.halving.eta=3"]


def sweep(out: Path, name: str, devices: str, *overrides: str) -> list[dict]:
    run_dir = out / name
    args = [
        sys.executable,
        str(REPO / "sweep.py"),
        *overrides,
        f"devices={devices}",
        "wandb=disabled",
        "progress=false",
        f"hydra.run.dir={run_dir}",
    ]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(
            f"{name}: sweep.py exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    with open(RunDir(run_dir).summary) as summary:
        return list(csv.DictReader(summary))


def target_l0(out: Path, devices: str, name: str, *overrides: str) -> dict:
    rows = sweep(out, name, devices, "grid.target_l0=[4,8,16]", *overrides)
    ratios = {r["member_id"]: round(float(r["l0"]) / float(r["target_l0"]), 4) for r in rows}
    return {
        "check": name,
        "heldout_l0_over_target": ratios,
        "l1_final": {r["member_id"]: float(r["l1_final"]) for r in rows},
        "pass": all(abs(v - 1) <= 0.1 for v in ratios.values()),
    }


def halving(out: Path, devices: str, steps: int) -> dict:
    common = [*GRID_32, f"training.steps={steps}"]
    full = sweep(out, "full_32", devices, *common)
    halved = sweep(out, "halving_32", devices, *common, *HALVING)
    best_full = max(float(r["mmcs_truth"]) for r in full)
    best_halved = max(float(r["mmcs_truth"]) for r in halved)
    member_steps = sum(int(r["steps"]) for r in halved)
    full_steps = sum(int(r["steps"]) for r in full)
    fraction = member_steps / full_steps
    return {
        "check": "halving_32",
        "steps": steps,
        "best_mmcs_truth_full": round(best_full, 4),
        "best_mmcs_truth_halving": round(best_halved, 4),
        "member_steps_halving": member_steps,
        "member_steps_full": full_steps,
        "fraction": round(fraction, 4),
        "pass": best_full - best_halved <= 0.01 and fraction <= 0.45,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "steering_acceptance")
    parser.add_argument("--steps", type=int, default=3000, help="training steps of the halving comparison")
    parser.add_argument("--lm", action="store_true", help="also steer members on the tiny LM store")
    args = parser.parse_args()
    results = [target_l0(args.out, args.devices, "target_l0_synthetic")]
    if args.lm:
        results.append(
            target_l0(args.out, args.devices, "target_l0_tiny_lm", "data=lm", "model=tiny", "training.steps=3000")
        )
    results.append(halving(args.out, args.devices, args.steps))
    for result in results:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
