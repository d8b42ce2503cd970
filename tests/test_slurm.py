"""The SLURM launchers against a real one-node SLURM cluster (tests/slurm_cluster.py).

Needs root and the Debian packages slurm-wlm + munge (launchers/install_slurm.sh). Without
them these tests skip with the reason; set SAE_REQUIRE_SLURM=1 (CI) to fail instead.
The program under test is tests/slurm_standin.py (sweep.py's command line and exit codes)
and tests/hydra_standin.py (a Hydra app); test_sweep_py_multirun_on_slurm and
test_real_sweep_py_sigterm_requeues_and_resumes_to_uninterrupted_weights run the real sweep.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from sae_ensemble.rundir import EnsembleDir, RunDir, step_of
from tests.slurm_cluster import missing_tools, slurm_cluster

REPO = Path(__file__).resolve().parent.parent
SBATCH_SCRIPT = REPO / "launchers" / "slurm_array.sbatch"
LOCAL_SCRIPT = REPO / "launchers" / "local_multi_gpu.sh"
STANDIN = REPO / "tests" / "slurm_standin.py"
HYDRA_STANDIN = REPO / "tests" / "hydra_standin.py"
SWEEP = REPO / "sweep.py"
# Overrides for the real-sweep.py smoke test: small enough for 2 CPU cores in ~1 minute.
SWEEP_SMOKE_OVERRIDES = [
    "data=lm",
    "model=tiny",
    "model.build_tiny=random",
    "layer=0,1",
    "grid=quick",
    "training.steps=20",
    "devices=cpu",
    "progress=false",
    "wandb=offline",
]

EXIT_REQUEUE = 75


def _slurm_unavailable() -> str | None:
    missing = missing_tools()
    if missing:
        return f"SLURM not installed (missing {', '.join(missing)}); run launchers/install_slurm.sh"
    if os.geteuid() != 0:
        return "the test SLURM cluster runs slurmd as SlurmUser=root and needs root"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = _slurm_unavailable()
    if reason:
        if os.environ.get("SAE_REQUIRE_SLURM") == "1":
            pytest.fail(f"SAE_REQUIRE_SLURM=1 but {reason}")
        print(f"skipping SLURM tests: {reason}")
        pytest.skip(reason)
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def test_cluster_that_fails_to_start_shows_logs_and_stops_its_daemons(tmp_path):
    reason = _slurm_unavailable()
    if reason:
        pytest.skip(reason)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    # A 0.1 s start-up budget cannot be met: start-up must fail cleanly, not hang or leak.
    with pytest.raises(TimeoutError, match="slurmctld log"):
        with slurm_cluster(tmp_path / "broken", start_timeout=0.1):
            pass
    leaked = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not leaked, f"daemons left running: {[(p.pid, p.name()) for p in leaked]}"


def expected_total(steps: int) -> int:
    """The stand-ins' final `total` for an uninterrupted run of `steps` steps."""
    return sum(range(steps))


def submit_array(
    cluster, tmp: Path, lines: list[str], array: str, steps: int, step_s: float = 0.05, extra_env: dict | None = None
) -> str:
    """sbatch the array script over `lines` with the contract stand-in; returns the array job id."""
    tasks = tmp / "tasks.txt"
    tasks.write_text("# outer points\n" + "\n".join(lines) + "\n")
    env = dict(
        cluster.env,
        SWEEP_PROGRAM=str(STANDIN),
        STANDIN_STEPS=str(steps),
        STANDIN_STEP_S=str(step_s),
        **(extra_env or {}),
    )
    # Submitted from tmp, not the repo: the script must find the repo (and .venv) by itself.
    proc = cluster.run(
        [
            "sbatch",
            "--parsable",
            f"--array={array}",
            f"--output={tmp}/%x_%A_%a.out",
            str(SBATCH_SCRIPT),
            str(tasks),
            str(tmp / "runs"),
        ],
        env=env,
        cwd=tmp,
    )
    return proc.stdout.strip().split(";")[0]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def starts(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "starts.log").read_text().splitlines()]


def wait_for_file(cluster, path: Path, timeout: float = 30, predicate=lambda p: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and predicate(path):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{path} not ready after {timeout:.0f}s\n" + cluster.daemon_logs())


def test_array_of_two_points_runs_both_to_done(cluster, tmp_path):
    jid = submit_array(cluster, tmp_path, ["model=tiny layer=0", "model=tiny layer=1"], array="0-1", steps=10)
    for task in (0, 1):
        fields = cluster.wait_for_state(f"{jid}_{task}", {"COMPLETED", "FAILED"}, timeout=60)
        log = (tmp_path / f"sae_sweep_{jid}_{task}.out").read_text()
        assert fields["JobState"] == "COMPLETED", log
        assert fields["ExitCode"] == "0:0"
    for layer in (0, 1):
        run_dir = tmp_path / "runs" / f"model=tiny,layer={layer}"
        assert read_json(run_dir / "done.json") == {"step": 10, "total": expected_total(10)}
        assert starts(run_dir)[0]["overrides"] == {"model": "tiny", "layer": str(layer)}


@pytest.mark.parametrize("scancel_flag", ["--batch", "--full"])
def test_sigterm_checkpoints_requeues_and_resumes_to_same_result(cluster, tmp_path, scancel_flag):
    """--batch signals only the batch shell (which forwards); --full also the program itself."""
    steps = 60
    jid = submit_array(cluster, tmp_path, ["model=tiny layer=0"], array="0", steps=steps, step_s=0.1)
    task = f"{jid}_0"
    run_dir = tmp_path / "runs" / "model=tiny,layer=0"
    wait_for_file(cluster, run_dir / "progress.json", predicate=lambda p: read_json(p)["step"] >= 5)
    cluster.run(["scancel", "--signal=TERM", scancel_flag, task])

    fields = cluster.wait_for_state(task, {"COMPLETED", "FAILED"}, timeout=60)
    log = (tmp_path / f"sae_sweep_{jid}_0.out").read_text()
    assert fields["JobState"] == "COMPLETED", log
    assert fields["Restarts"] == "1", log
    assert f"exiting {EXIT_REQUEUE}" in log and f"requeued {task}" in log, log
    first, second = starts(run_dir)
    checkpoint = read_json(run_dir / "checkpoint.json")
    assert first["from_step"] == 0
    assert 0 < second["from_step"] == checkpoint["step"] < steps
    assert second["restarts"] == "1"
    assert read_json(run_dir / "done.json") == {"step": steps, "total": expected_total(steps)}


def test_plain_scancel_checkpoints_but_is_not_undone_by_a_requeue(cluster, tmp_path):
    """scancel (no --signal) also SIGTERMs the program, which exits 75; the script must see
    that SLURM is ending the job and not requeue it, or a user could never cancel."""
    jid = submit_array(cluster, tmp_path, ["model=tiny layer=2"], array="0", steps=200, step_s=0.1)
    run_dir = tmp_path / "runs" / "model=tiny,layer=2"
    wait_for_file(cluster, run_dir / "progress.json")
    cluster.run(["scancel", f"{jid}_0"])
    fields = cluster.wait_for_state(f"{jid}_0", {"CANCELLED", "COMPLETED", "FAILED"}, timeout=30)
    time.sleep(2)  # a wrongly requeued task would show up as PENDING/RUNNING by now
    log = (tmp_path / f"sae_sweep_{jid}_0.out").read_text()
    assert cluster.job_state(f"{jid}_0") == "CANCELLED", log
    assert fields["Restarts"] == "0", log
    assert (run_dir / "checkpoint.json").exists() and "not requeueing" in log, log


def test_resubmitting_a_finished_point_is_a_no_op(cluster, tmp_path):
    lines = ["model=tiny layer=3"]
    run_dir = tmp_path / "runs" / "model=tiny,layer=3"
    first = submit_array(cluster, tmp_path, lines, array="0", steps=5)
    cluster.wait_for_state(f"{first}_0", {"COMPLETED"}, timeout=60)
    done_before = (run_dir / "done.json").stat().st_mtime_ns

    second = submit_array(cluster, tmp_path, lines, array="0", steps=5)
    fields = cluster.wait_for_state(f"{second}_0", {"COMPLETED", "FAILED"}, timeout=60)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0"
    assert "already finished" in (tmp_path / f"sae_sweep_{second}_0.out").read_text()
    assert len(starts(run_dir)) == 1
    assert (run_dir / "done.json").stat().st_mtime_ns == done_before


def test_failures_pass_their_exit_code_through_and_are_not_requeued(cluster, tmp_path):
    # Line 0 is an override Hydra cannot parse (sweep.py and the stand-in exit 1); index 1 has no
    # line in the file (the script's own bad usage: exit 2).
    jid = submit_array(cluster, tmp_path, ["not-an-override"], array="0-1", steps=5)
    for task, code in ((0, 1), (1, 2)):
        fields = cluster.wait_for_state(f"{jid}_{task}", {"COMPLETED", "FAILED"}, timeout=60)
        assert fields["JobState"] == "FAILED"
        assert fields["ExitCode"] == f"{code}:0"
        assert fields["Restarts"] == "0"
    log = (tmp_path / f"sae_sweep_{jid}_1.out").read_text()
    assert "array index 1 has no line" in log and "--array=0-0" in log


def _hydra_multirun(cluster, tmp_path: Path, program: Path, overrides: list[str], env: dict) -> subprocess.Popen:
    # --config-dir puts the repo's conf/ (hydra/launcher/slurm.yaml) on the search path.
    return subprocess.Popen(
        [
            sys.executable,
            str(program),
            "-m",
            "--config-dir",
            str(REPO / "conf"),
            "hydra/launcher=slurm",
            *overrides,
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        env=env,
        stdout=open(tmp_path / "multirun.log", "w"),
        stderr=subprocess.STDOUT,
    )


def test_hydra_submitit_slurm_launcher_runs_array_and_resumes_after_usr2(cluster, tmp_path):
    """conf/hydra/launcher/slurm.yaml on the real cluster; USR2 is submitit's preemption
    signal: it requeues the same Hydra job, which must rerun into the same output dir."""
    steps = 60
    env = dict(cluster.env, STANDIN_STEPS=str(steps), STANDIN_STEP_S="0.1")
    proc = _hydra_multirun(cluster, tmp_path, HYDRA_STANDIN, ["+point=a,b"], env)
    try:
        job0 = tmp_path / "sweep" / "0"
        wait_for_file(cluster, job0 / "progress.json", timeout=60, predicate=lambda p: read_json(p)["step"] >= 5)
        array_job = json.loads((job0 / "starts.log").read_text().splitlines()[0])["job"]
        # The array's task 0 has its own job id; submitit's own test hook does the same.
        cluster.run(["scancel", "--signal=USR2", array_job])
        rc = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "multirun.log").read_text()
    assert rc == 0, log + cluster.daemon_logs()
    for point, job_dir in (("a", job0), ("b", tmp_path / "sweep" / "1")):
        assert read_json(job_dir / "done.json") == {"step": steps, "total": expected_total(steps)}
        assert starts(job_dir)[0]["cfg"] == {"point": point}
    first, second = starts(job0)
    assert 0 < second["from_step"] < steps and second["restarts"] == "1"


@pytest.mark.skipif(not SWEEP.exists(), reason="sweep.py does not exist yet")
def test_sweep_py_multirun_on_slurm(cluster, tmp_path):
    proc = _hydra_multirun(cluster, tmp_path, SWEEP, SWEEP_SMOKE_OVERRIDES, dict(cluster.env))
    try:
        rc = proc.wait(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "multirun.log").read_text()
    assert rc == 0, log + cluster.daemon_logs()
    # One job dir per outer point (layer=0,1), each a finished run with its summary.
    for job in ("0", "1"):
        assert RunDir(tmp_path / "sweep" / job).summary.exists(), log


def _real_sweep_overrides(tmp: Path) -> list[str]:
    """A synthetic sweep (4 members, one CPU ensemble) of about a minute on 2 loaded cores,
    checkpointing every 50 of 600 steps: time to signal it after its first checkpoint."""
    return [
        "grid=quick",
        "data.d_in=32",
        "data.n_features=48",
        "data.n_rows=40000",
        "data.rows_per_chunk=5000",
        "data.heldout_rows=2000",
        "training.steps=600",
        "training.batch_size=256",
        "training.checkpoint_every=50",
        "training.log_every=50",
        "training.execution=fused",
        "devices=cpu",
        "wandb=disabled",
        "progress=false",
        f"data.store_root={tmp / 'stores'}",
    ]


def _first_ensemble(run_dir: Path) -> EnsembleDir:
    """Ensemble 0's checkpoints of a run without halving (its one segment)."""
    return EnsembleDir(run_dir / RunDir.CHECKPOINTS / RunDir.ensemble_name(0))


def _checkpoints(run_dir: Path) -> set[tuple[int, int, int]]:
    """The complete checkpoints (resume.json written) of ensemble 0 right now, as
    (step, inode, mtime) of their resume.json: a step written again counts as new."""
    found = set()
    for step_dir in _first_ensemble(run_dir).checkpoints():
        try:
            stat = (step_dir / EnsembleDir.RESUME).stat()
            found.add((step_of(step_dir), stat.st_ino, stat.st_mtime_ns))
        except OSError:  # pruned while we looked
            pass
    return found


@pytest.mark.skipif(not SWEEP.exists(), reason="sweep.py does not exist yet")
def test_real_sweep_py_sigterm_requeues_and_resumes_to_uninterrupted_weights(cluster, tmp_path):
    """The array script with the real sweep.py: `scancel --signal=TERM --batch` mid-run ->
    checkpoint, exit 75, requeue, resume -> the same SAE weights as an uninterrupted run."""
    import torch
    from safetensors.torch import load_file

    from sae_ensemble.checkpoint import load_member

    overrides = _real_sweep_overrides(tmp_path)
    # Both runs use the same interpreter and the same (content-addressed) store under tmp.
    env = dict(os.environ, SWEEP_PYTHON=sys.executable)
    env.pop("WANDB_API_KEY", None)

    # 1. The uninterrupted reference, without SLURM (it also writes the shared store).
    reference = tmp_path / "reference"
    ref = subprocess.run(
        [sys.executable, str(SWEEP), *overrides, f"hydra.run.dir={reference}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ref.returncode == 0, ref.stdout[-4000:] + ref.stderr[-4000:]
    assert _first_ensemble(reference).is_done(), ref.stdout[-4000:]

    # 2. The same line as one array task on the cluster.
    line = " ".join(overrides)
    tasks = tmp_path / "tasks.txt"
    tasks.write_text(f"# one outer point, the real sweep.py\n{line}\n")
    runs = tmp_path / "runs"
    proc = cluster.run(
        [
            "sbatch",
            "--parsable",
            "--array=0-0",
            f"--output={tmp_path}/%x_%A_%a.out",
            str(SBATCH_SCRIPT),
            str(tasks),
            str(runs),
        ],
        env=dict(cluster.env, SWEEP_PYTHON=sys.executable),
        cwd=tmp_path,
    )
    jid = proc.stdout.strip().split(";")[0]
    task = f"{jid}_0"
    log_path = tmp_path / f"sae_sweep_{jid}_0.out"
    # A line this long (> 200 chars as a dir name) runs into task_<md5 of the line>.
    run_dir = runs / f"task_{hashlib.md5(line.encode()).hexdigest()[:16]}"

    def log() -> str:
        text = log_path.read_text(errors="replace") if log_path.exists() else "(no task log yet)"
        return f"--- task log {log_path} ---\n{text[-6000:]}\n"

    def wait(ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.2)
        fields = cluster.job_fields(task) or {}
        seen = {k: fields.get(k) for k in ("JobState", "Reason", "ExitCode", "Restarts")}
        raise TimeoutError(
            f"timed out after {timeout:.0f}s waiting for {what} (job {task}: {seen})\n" + log() + cluster.daemon_logs()
        )

    try:
        # 3. Signal it once it has a complete checkpoint (step 50), well before step 600.
        wait(lambda: bool(_checkpoints(run_dir)), 180, f"a checkpoint in {run_dir}")
        assert cluster.job_state(task) == "RUNNING", log()
        cluster.run(["scancel", "--signal=TERM", "--batch", task])
        # The script logs the requeue right after sweep.py exits; the rerun cannot start
        # before cred_expire (5 s) has passed, so the checkpoints seen now are the first run's.
        wait(
            lambda: f"requeued {task}" in log() or "not requeueing" in log(),
            120,
            "the first run to checkpoint, exit 75 and be requeued",
        )
        first_run = _checkpoints(run_dir)
        interrupted_at = max(step for step, _, _ in first_run)
        assert 0 < interrupted_at < 600, (first_run, log())
        assert not _first_ensemble(run_dir).is_done(), log()
        assert not RunDir(run_dir).members.exists(), log()

        # The rerun must resume from that checkpoint, not start over: a fresh start would
        # write step_50 again (kept ~10 s until pruned), a resumed one only steps above it.
        rerun_steps: set[int] = set()

        def finished() -> bool:
            rerun_steps.update(step for step, _, _ in _checkpoints(run_dir) - first_run)
            return cluster.job_state(task) in {"COMPLETED", "FAILED", "CANCELLED"}

        wait(finished, 400, "the requeued run to finish")
        fields = cluster.job_fields(task)
        assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log()
        assert fields["Restarts"] == "1", log()
    finally:
        # Nothing of this test may keep running on a failure (the fixture outlives the test).
        cluster.run(["scancel", task], check=False)

    text = log()
    assert "got SIGTERM, forwarding" in text, text
    assert f"(exit {EXIT_REQUEUE})" in text and "interrupted: checkpoints written" in text, text
    assert f"checkpointed; requeued {task}" in text, text
    assert "restart 0 on" in text and "restart 1 on" in text, text
    assert rerun_steps and min(rerun_steps) > interrupted_at, (
        f"the rerun wrote checkpoints {sorted(rerun_steps)}, not all after the interrupted "
        f"step {interrupted_at}: it did not resume\n{text}"
    )
    assert [p.name for p in runs.iterdir()] == [run_dir.name], "the rerun must reuse the run dir"
    assert _first_ensemble(run_dir).is_done(), text
    assert RunDir(run_dir).summary.exists(), text

    # 4. Every member equals the uninterrupted run's.
    expected = sorted(p.name for p in RunDir(reference).members.iterdir())
    assert len(expected) == 4 and sorted(p.name for p in RunDir(run_dir).members.iterdir()) == expected
    for member_id in expected:
        resumed, uninterrupted = RunDir(run_dir).member(member_id), RunDir(reference).member(member_id)
        got, want = load_member(resumed.path)[1], load_member(uninterrupted.path)[1]
        assert sorted(got) == sorted(want) == ["W_dec", "W_enc", "b_dec", "b_enc"]
        for name in want:
            torch.testing.assert_close(
                got[name], want[name], atol=1e-6, rtol=0, msg=lambda m, what=f"{member_id} {name}": f"{what}: {m}"
            )
        # Firing counts are checkpointed too: the dead-feature statistics must match.
        torch.testing.assert_close(load_file(resumed.frequency), load_file(uninterrupted.frequency), atol=1e-6, rtol=0)


def test_local_multi_gpu_runs_points_in_turn_and_resumes_after_sigterm(tmp_path):
    """No SLURM needed: the one-node script forwards SIGTERM, exits 75, and resumes."""
    steps = 40
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("model=tiny layer=0\n\n# second point\nmodel=tiny layer=1 devices=cpu\n")
    env = dict(
        os.environ,
        SWEEP_PROGRAM=str(STANDIN),
        SWEEP_PYTHON=sys.executable,
        STANDIN_STEPS=str(steps),
        STANDIN_STEP_S="0.05",
    )
    cmd = [str(LOCAL_SCRIPT), str(tasks), str(tmp_path / "runs")]
    first_dir = tmp_path / "runs" / "model=tiny,layer=0"
    second_dir = tmp_path / "runs" / "model=tiny,layer=1,devices=cpu"

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not ((first_dir / "progress.json").exists() and read_json(first_dir / "progress.json")["step"] >= 5):
        assert time.monotonic() < deadline, "first point never made progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_REQUEUE, out
    assert not second_dir.exists(), "the script must stop after an interrupted point"

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    for run_dir in (first_dir, second_dir):
        assert read_json(run_dir / "done.json") == {"step": steps, "total": expected_total(steps)}
    assert starts(first_dir)[0]["overrides"]["devices"] == "auto"  # added by the script
    assert starts(second_dir)[0]["overrides"]["devices"] == "cpu"  # the line's choice kept
    assert starts(first_dir)[1]["from_step"] > 0
