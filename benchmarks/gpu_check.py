"""Everything that needs a GPU, checked and measured in one go (`make gpu-check`).

    python -m benchmarks.gpu_check                 # on the visible GPUs
    python -m benchmarks.gpu_check --budget 300    # seconds for all steps together (default 560)
    python -m benchmarks.gpu_check --only tests,sweep_lm

Steps, each in its own process group with its own timeout; one failing never stops the next:
    gemms           python -m benchmarks.gemms --device cuda  (the large case's GEMMs, per operand layout)
    bench_large     python -m benchmarks.ensemble --device cuda --cases large  (GEMM-bound: mfu)
    tests           pytest on the tests marked `cuda` (tests/test_cuda.py), their `gpu-figure` lines
    profile_large   python -m benchmarks.profile on the large case's 4096-feature ensemble, as autotuned
    bench_ensemble  python -m benchmarks.ensemble --device cuda --cases small,mid,mixed,topk
    bench_store     python -m benchmarks.store --device cuda  (feed_ratio on the GPU)
    sweep_default   python sweep.py devices=cuda  (the default synthetic sweep, wandb off)
    sweep_lm        python sweep.py data=lm model=tiny grid=quick devices=cuda  (harvest, train, CE eval)
    memory_model    python -m benchmarks.scale --device cuda  (the plan's peak against max_memory_allocated)
Writes gpu_report.json, gpu_report.md (a table to paste into docs/benchmarks.md) and gpu_check.log
(every step's full output) into $OUT when that is set, else into gpu_check/ in the repo.
Exits 1 if any step failed or ran out of time, else 0. Without a CUDA device it prints
"no CUDA device: nothing to check" and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from benchmarks.ensemble import largest_ensemble
from sae_ensemble import segments
from sae_ensemble.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "torchopt", "hydra-core", "omegaconf", "transformer-lens", "transformers", "safetensors", "wandb")
# faulthandler_timeout: a test hung past 90 s dumps every thread's stack into the log.
PYTEST_OPTIONS = ["-q", "-s", "-m", "cuda", "-p", "no:cacheprovider", "-o", "faulthandler_timeout=90"]
SWEEP_ARGS = ["devices=cuda", "wandb=disabled", "progress=false"]  # wandb's service start would dominate a short sweep


@dataclass
class Step:
    """One check: a command, its time limit, and how to read figures from its output."""

    name: str
    command: list[str]
    timeout: float
    parse: Callable[[str, Path], dict] = lambda output, work: {}
    what: str = ""
    check: Callable[[dict], str | None] = lambda figures: None if figures else "printed no result"
    """Given the figures of a step that exited 0: None, or why it still failed."""


@dataclass
class Result:
    name: str
    status: str  # passed, failed, timeout, skipped (out of time)
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)
    detail: str = ""


# -- reading figures --------------------------------------------------------------------------------


def json_lines(output: str) -> list[dict]:
    """Every line of `output` that is one JSON object (the benchmarks' result lines)."""
    found = []
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return found


def parse_tests(output: str, work: Path) -> dict:
    figures = {
        line.split()[1]: float(line.split()[2])
        for line in output.splitlines()
        if line.startswith("gpu-figure ") and len(line.split()) == 3
    }
    junit = work / "junit.xml"
    if junit.exists():
        outcomes = {"passed": 0, "failed": 0, "skipped": 0}
        not_passed = []
        for case in ElementTree.parse(junit).iter("testcase"):
            problem = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
            outcome = "passed" if problem is None else ("skipped" if problem.tag == "skipped" else "failed")
            outcomes[outcome] += 1
            if problem is not None:
                message = (problem.get("message") or "").strip().splitlines()
                not_passed.append(f"{outcome}: {case.get('name')}: {message[0][:200] if message else ''}")
        figures.update(outcomes)
        if not_passed:
            figures["not_passed"] = not_passed
    return figures


def parse_ensemble(output: str, work: Path) -> dict:
    cases = [c for c in json_lines(output) if "case" in c]
    return {"cases": cases} if cases else {}


def parse_profile(output: str, work: Path) -> dict:
    """benchmarks.profile's execution, GPU time per step and three costliest kernels (the table is in the log)."""
    lines = output.splitlines()
    header = next((i for i, line in enumerate(lines) if line.startswith("op ")), None)
    total = next((line.split()[1] for line in lines if line.startswith("total ")), None)
    if header is None or total is None:
        return {}
    top = [" ".join(line.split()[:3]) for line in lines[header + 1 : header + 4]]
    ran = next((line.split(";")[0].removeprefix("execution: ") for line in lines if line.startswith("execution: ")), "")
    return {"execution": ran, "gpu_ms_per_step": float(total), "top": "; ".join(top)}


def parse_last_json(output: str, work: Path) -> dict:
    found = json_lines(output)
    return found[-1] if found else {}


def parse_sweep(run_dir: Path) -> Callable[[str, Path], dict]:
    """Wall time comes from the runner; here: training time and rows/s from the run dir, best metrics."""

    def parse(output: str, work: Path) -> dict:
        figures: dict = {}
        run = RunDir(run_dir)
        record = run.read_run()
        done = []
        if record is not None:  # the last segment's ensembles finish the training (the only segment without halving)
            last = segments.latest(run, record.plan, record.training)
            done = [d.done for d in (run.ensemble(last, e.index) for e in last.plan.ensembles) if d.is_done()]
        if done:
            steps, batch, n_members = record.training.steps, record.training.batch_size, len(record.plan.members)
            # plan.json is written just before the workers start, done.json when each ensemble finishes.
            train_s = max(p.stat().st_mtime for p in done) - run.plan.stat().st_mtime
            # Every worker steps through all `steps` batches: rows/s is per device; member rows/s is the whole sweep's.
            figures.update(
                members=n_members,
                devices=len(record.plan.workers),
                steps=steps,
                batch_size=batch,
                train_s=round(train_s, 1),
                rows_per_s=round(steps * batch / train_s),
                member_rows_per_s=round(steps * batch * n_members / train_s),
            )
        if run.summary.exists():
            rows = list(csv.DictReader(run.summary.open()))
            figures["summary_rows"] = len(rows)
            for metric in ("mmcs_truth", "ce_recovered", "fvu"):
                values = [float(r[metric]) for r in rows if r.get(metric) not in (None, "", "nan")]
                if values:
                    figures[f"best_{metric}"] = round(min(values) if metric == "fvu" else max(values), 4)
        return figures

    return parse


# -- running --------------------------------------------------------------------------------------


def run_step(step: Step, seconds_left: float, work: Path, log) -> Result:
    """Run one step in its own process group (so a timeout also ends its workers); log its output."""
    timeout = min(step.timeout, seconds_left - 5)
    if timeout < 20:
        return Result(step.name, "skipped", detail=f"out of time: {seconds_left:.0f} s of the budget left")
    log.write(f"\n===== {step.name}: {' '.join(step.command)} (timeout {timeout:.0f} s)\n")
    log.flush()
    # Offline flags: every model here is a local tiny one, so a hub lookup is a bug; fail fast, not at the timeout.
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HYDRA_FULL_ERROR": "1",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
    }
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(
            step.command,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
            _stop_group(process)
        seconds = time.monotonic() - started
        output.seek(0)
        text = output.read()
    log.write(text)
    log.flush()
    try:
        figures = step.parse(text, work)
    except Exception as error:  # a figure we cannot read must not hide whether the step passed
        figures = {"parse_error": f"{type(error).__name__}: {error}"}
    if code is None:
        return Result(step.name, "timeout", seconds, figures, f"stopped after {timeout:.0f} s\n{_tail(text)}")
    if code != 0:
        return Result(step.name, "failed", seconds, figures, f"exit code {code}\n{_tail(text)}")
    problem = step.check(figures)
    if problem:
        return Result(step.name, "failed", seconds, figures, f"exit code 0, but {problem}\n{_tail(text)}")
    return Result(step.name, "passed", seconds, figures)


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the step's process group (sweeps checkpoint on it), then SIGKILL what is left."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def cuda_test_files() -> list[str]:
    """Test files that hold tests marked `cuda` (only these are collected: other files may need more)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if "mark.cuda" in p.read_text())


def _wrote_summary(figures: dict) -> str | None:
    return None if figures.get("summary_rows") else "it wrote no summary.csv rows"


def steps(work: Path, python: str) -> list[Step]:
    default_dir, lm_dir, stores = work / "sweep_default", work / "sweep_lm", work / "stores"
    large = [
        arg for key, value in largest_ensemble("large").items() for arg in (f"--{key.replace('_', '-')}", str(value))
    ]
    plan = [
        # The GEMM-bound case first: the figure issue #10 still needs. Then what explains it.
        Step(
            "gemms",
            [python, "-m", "benchmarks.gemms", "--device", "cuda"],
            90,
            parse_last_json,
            "the step's five GEMMs, per layout",
        ),
        Step(
            "bench_large",
            [python, "-m", "benchmarks.ensemble", "--device", "cuda", "--cases", "large"],
            240,
            parse_ensemble,
            "large case, every candidate",
        ),
        Step(
            "tests",
            [python, "-m", "pytest", *PYTEST_OPTIONS, f"--junitxml={work / 'junit.xml'}", *cuda_test_files()],
            200,
            parse_tests,
            "CUDA-marked tests",
            lambda f: None if f.get("passed") else "no CUDA test passed (all skipped?)",
        ),
        Step(
            "profile_large",
            [python, "-m", "benchmarks.profile", "--device", "cuda", *large, "--execution", "auto", "--no-cuda-graphs"],
            150,
            parse_profile,
            "the autotuner's choice, its kernels",
        ),
        Step(
            "bench_ensemble",
            [python, "-m", "benchmarks.ensemble", "--device", "cuda", "--cases", "small,mid,mixed,topk"],
            300,
            parse_ensemble,
            "ensemble throughput, other cases",
        ),
        Step(
            "bench_store",
            [python, "-m", "benchmarks.store", "--device", "cuda"],
            150,
            parse_last_json,
            "store feed and harvest",
        ),
        Step(
            "sweep_default",
            [python, "sweep.py", *SWEEP_ARGS, f"hydra.run.dir={default_dir}", f"data.store_root={stores}"],
            150,
            parse_sweep(default_dir),
            "default synthetic sweep",
            _wrote_summary,
        ),
        Step(
            "sweep_lm",
            [
                python,
                "sweep.py",
                "data=lm",
                "model=tiny",
                "model.build_tiny=random",
                "grid=quick",
                *SWEEP_ARGS,
                f"hydra.run.dir={lm_dir}",
                f"data.store_root={stores}",
            ],
            150,
            parse_sweep(lm_dir),
            "LM sweep, tiny GPT-2",
            _wrote_summary,
        ),
        Step(
            "memory_model",
            [python, "-m", "benchmarks.scale", "--device", "cuda"],
            120,
            parse_last_json,
            "memory model vs max_memory_allocated",
        ),
    ]
    return plan


def environment() -> dict:
    """What the figures were measured on."""
    gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    driver = _first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or "unknown"
    commit = _first_line(["git", "rev-parse", "--short", "HEAD"])  # none where the tree travelled without .git
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = "missing"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gpus": [f"{g.name} ({g.total_memory / 2**30:.0f} GiB)" for g in gpus],
        "driver": driver,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "commit": commit or "unknown (no git checkout)",
        "packages": packages,
    }


def _first_line(command: list[str]) -> str:
    """First line a command prints, or "" when it is missing or fails."""
    if not shutil.which(command[0]):
        return ""
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return ""
    lines = done.stdout.strip().splitlines()
    return lines[0] if done.returncode == 0 and lines else ""


# -- the report -----------------------------------------------------------------------------------


def _figure_text(result: Result) -> str:
    figures = dict(result.figures)
    if "cases" in figures:
        return "<br>".join(
            f"{c['case']}: speedup {c.get('speedup')}, mfu {c.get('mfu')}, {c.get('ensemble_step_ms')} ms/step "
            f"({c.get('ensemble_gflops')} of {c.get('gemm_gflops')} GFLOP/s)"
            for c in figures["cases"]
        )
    if "rows" in figures:  # benchmarks.gemms: each product's share of the peak
        return f"peak {figures.get('peak_tflops')} TFLOP/s<br>" + "<br>".join(
            f"{name}: {row['ms']} ms, {row['of_peak']} of peak"
            + (f" (+{row['copy_ms']} ms copy)" if "copy_ms" in row else "")
            for name, row in figures["rows"].items()
        )
    figures.pop("not_passed", None)
    return ", ".join(
        f"{k} {round(v, 4) if isinstance(v, float) else v}"
        for k, v in figures.items()
        if isinstance(v, (int, float, str))
    )


def markdown(env: dict, results: list[Result], descriptions: dict[str, str]) -> str:
    lines = [
        f"### GPU: {', '.join(env['gpus'])}, driver {env['driver']}, CUDA {env['cuda']}, torch {env['torch']}, "
        f"Python {env['python']} ({env['date']}, commit {env['commit']})",
        "",
        "| step | what | result | wall s | figures |",
        "|------|------|--------|-------:|---------|",
    ]
    for r in results:
        why = r.detail.splitlines()[0] if r.status != "passed" and r.detail else ""
        figures = "; ".join(part for part in (why, _figure_text(r)) if part)
        lines.append(
            f"| {r.name} | {descriptions.get(r.name, '')} "
            f"| {'**' + r.status + '**' if r.status != 'passed' else r.status} "
            f"| {r.seconds:.0f} | {figures} |"
        )
    failed = [r.name for r in results if r.status != "passed"]
    lines += [
        "",
        f"{len(results) - len(failed)} of {len(results)} steps passed"
        + (f"; failed: {', '.join(failed)}" if failed else ""),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=560, help="seconds for all steps together (default 560)")
    parser.add_argument("--only", help="comma-separated step names to run (default: all)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "gpu_check"
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))  # stores and run dirs: many files, kept out of $OUT
    deadline = time.monotonic() + args.budget
    env = environment()
    print(
        f"gpu-check on {', '.join(env['gpus'])}: driver {env['driver']}, torch {env['torch']}, "
        f"packages {env['packages']}",
        flush=True,
    )
    plan = steps(work, sys.executable)
    if args.only:
        plan = [s for s in plan if s.name in args.only.split(",")]
    results = []
    with open(out / "gpu_check.log", "w") as log:
        for step in plan:
            print(f"  {step.name} ...", end=" ", flush=True)
            result = run_step(step, deadline - time.monotonic(), work, log)
            results.append(result)
            print(f"{result.status} ({result.seconds:.0f} s) {_figure_text(result)[:300]}", flush=True)
    shutil.rmtree(work, ignore_errors=True)

    descriptions = {s.name: s.what for s in plan}
    report = {
        "environment": env,
        "budget_s": args.budget,
        "steps": [
            {
                "name": r.name,
                "status": r.status,
                "seconds": round(r.seconds, 1),
                "figures": r.figures,
                "detail": r.detail,
            }
            for r in results
        ],
    }
    (out / "gpu_report.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(env, results, descriptions)
    (out / "gpu_report.md").write_text(table)
    failed = [r for r in results if r.status != "passed"]
    for r in failed:
        print(f"\n----- {r.name} {r.status}: {r.detail}")
        for line in r.figures.get("not_passed", []):
            print(f"  {line}")
    print("\n" + table)
    print(f"report: {out / 'gpu_report.json'}, {out / 'gpu_report.md'}, full output {out / 'gpu_check.log'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
