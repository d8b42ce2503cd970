"""The sweep end to end: each behaviour of the `python sweep.py` CLI once in a subprocess (bad input, Hydra's
errors, the reduced default sweep, multirun, plan_only), everything else in-process through pipeline.run.

Config values alone are tested in tests/test_config.py; here the cases that need a store, a plan or a run dir."""

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sae_ensemble import pipeline
from sae_ensemble.checkpoint import load_member
from sae_ensemble.config import Grid
from sae_ensemble.evaluate import MIN_CE_GAP
from sae_ensemble.grid import members
from tests.sweeps import compose_config

REPO = Path(__file__).resolve().parents[1]
# A reduced default sweep: same data generator and grid shape, fewer rows and steps.
SMALL_DATA = ["data.n_rows=60000", "data.rows_per_chunk=10000", "data.heldout_rows=4000"]


def sweep(tmp_path: Path, *overrides: str, multirun: bool = False) -> subprocess.CompletedProcess:
    """`python sweep.py` with `overrides`, into tmp_path/run (or tmp_path/multirun)."""
    args = [
        sys.executable,
        str(REPO / "sweep.py"),
        *(["-m"] if multirun else []),
        *overrides,
        f"data.store_root={tmp_path / 'stores'}",
        "progress=false",
        "wandb=offline",
    ]
    if multirun:
        args.append(f"hydra.sweep.dir={tmp_path / 'multirun'}")
    else:
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    """One store cache for the in-process sweeps: stores are content-addressed, so equal data settings share one."""
    return tmp_path_factory.mktemp("stores")


def run(run_dir: Path, stores: Path, *overrides: str) -> int:
    """The sweep in this process, as `python sweep.py OVERRIDES` runs it after Hydra composed; its exit code."""
    return pipeline.run(
        compose_config(*overrides, f"data.store_root={stores}", "progress=false", "wandb=disabled"), run_dir
    )


def one_error_line(err: str) -> str:
    """stderr of a sweep that refused its input: exactly one line, `error: <sentence>`."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# -- the CLI, one subprocess per behaviour ----------------------------------------------------------


def test_cli_bad_value_exits_2_with_one_sentence_on_stderr_and_no_traceback(tmp_path):
    result = sweep(tmp_path, "grid.l1=[-0.001]", *SMALL_DATA, "plan_only=true")
    assert result.returncode == 2, result.stdout + result.stderr
    assert (
        one_error_line(result.stderr)
        == "error: grid: l1=-0.001 of a relu member must be positive (variant topk has no L1 term)"
    )
    assert "Traceback" not in result.stdout and not (tmp_path / "stores").exists()  # refused before any work


def test_cli_hydra_error_exits_1_with_hydras_message_and_no_traceback(tmp_path):
    result = sweep(tmp_path, "training.execution=bogus", "plan_only=true")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Error merging override training.execution=bogus" in result.stderr, result.stderr
    assert "Invalid value 'bogus', expected one of [auto, reference, fused, sparse]" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_plan_only_prints_the_plan_and_trains_nothing(tmp_path):
    result = sweep(tmp_path, *SMALL_DATA, "devices=cpu:2", "plan_only=true")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(
        r"^4 members in \d+ ensembles on 2 workers \(batch 256, budget .* per worker\)$", result.stdout, re.M
    ), result.stdout
    assert "cpu:0      planned peak" in result.stdout and "cpu:1      planned peak" in result.stdout
    run_dir = tmp_path / "run"
    assert len(json.loads((run_dir / "plan.json").read_text())["members"]) == 4
    assert not any((run_dir / name).exists() for name in ("members", "checkpoints", "summary.csv"))


def test_cli_reduced_default_sweep_recovers_the_ground_truth(tmp_path):
    result = sweep(tmp_path, *SMALL_DATA, "training.steps=600", "training.checkpoint_every=200", "devices=cpu:2")
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = tmp_path / "run"
    rows = list(csv.DictReader(open(run_dir / "summary.csv")))
    expected = members(Grid(variants=["relu"], dict_ratios=[2, 4], l1=[3.16228e-4, 1e-3], lr=[3e-3]), 256)
    assert sorted(r["member_id"] for r in rows) == sorted(m.member_id for m in expected)
    for row in rows:
        for column in ("mse", "fvu", "l0", "dead_frac", "mmcs_truth"):
            assert math.isfinite(float(row[column])), (row["member_id"], column)
        assert load_member(run_dir / "members" / row["member_id"])[0].member_id == row["member_id"]
    # 600 steps reach ~0.70 (the full 3000-step default reaches 0.99); untrained dictionaries score ~0.2.
    best = max(float(r["mmcs_truth"]) for r in rows)
    assert best > 0.65, best
    for name in ("plan.json", ".hydra/config.yaml", "plots/pareto_l0_fvu.png"):
        assert (run_dir / name).exists(), name
    assert "Pareto front" in result.stdout


def test_cli_multirun_runs_one_job_per_layer_of_the_tiny_model_each_with_ce_scores(tmp_path):
    # The random tiny model keeps this fast; tests/test_tiny_model.py runs the trained one.
    result = sweep(
        tmp_path,
        "data=lm",
        "model=tiny",
        "model.build_tiny=random",
        "layer=0,1",
        "grid=quick",
        "training.steps=20",
        "devices=cpu",
        multirun=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = sorted(p for p in (tmp_path / "multirun").iterdir() if p.is_dir() and (p / "summary.csv").exists())
    assert len(jobs) == 2, list((tmp_path / "multirun").iterdir())
    for job in jobs:
        rows = list(csv.DictReader(open(job / "summary.csv")))
        assert len(rows) == 4
        for r in rows:
            assert all(math.isfinite(float(r[c])) for c in ("ce_clean", "ce_zero_ablation", "ce_recon", "kl")), r
            # The random tiny model barely uses its residual stream: below evaluate.MIN_CE_GAP the scores are NaN,
            # with a warning.
            meaningful = float(r["ce_zero_ablation"]) - float(r["ce_clean"]) >= MIN_CE_GAP
            assert all(
                math.isfinite(float(r[c])) == meaningful for c in ("ce_recovered", "ce_loss_score", "kl_div_score")
            ), r
            assert meaningful or "ce_recovered, ce_loss_score and kl_div_score are NaN" in result.stderr
    assert len(list((tmp_path / "stores").glob("*/manifest.json"))) == 2  # one store per hook


# -- input the config alone cannot refuse -----------------------------------------------------------


def test_a_store_of_another_width_is_refused(tmp_path, capsys):
    assert (
        run(tmp_path / "a", tmp_path / "stores", *SMALL_DATA, "data.d_in=32", "data.n_features=40", "plan_only=true")
        == 0
    )
    store = next((tmp_path / "stores").glob("synthetic-*"))
    capsys.readouterr()
    assert (
        run(tmp_path / "b", tmp_path / "stores", f"data.store={store}", "data.d_in=64", "plan_only=true")
        == pipeline.EXIT_BAD_INPUT
    )
    assert "has d_in=32 and d_out=0 but data.d_in=64" in one_error_line(capsys.readouterr().err)


def test_a_misspelt_hook_is_refused_naming_the_valid_ones(tmp_path, stores, capsys):
    code = run(
        tmp_path / "run",
        stores,
        "model=tiny",
        "data=lm",
        "model.build_tiny=random",
        "hook=blocks.0.hook_resid_psot",
        "plan_only=true",
    )
    assert code == pipeline.EXIT_BAD_INPUT
    err = capsys.readouterr().err  # also the model loader's progress bars: progress=false does not reach them
    [error] = [line for line in err.splitlines() if line.startswith("error: ")]
    assert (
        "'blocks.0.hook_resid_psot' is not a hook of this model" in error and "'blocks.0.hook_resid_post'" in error
    ), err
    assert "Traceback" not in err


def test_a_member_too_large_for_the_budget_exits_2_before_any_work(tmp_path, capsys):
    assert (
        run(tmp_path / "run", tmp_path / "stores", "grid=quick", *SMALL_DATA, "training.memory_budget=1MiB")
        == pipeline.EXIT_BAD_INPUT
    )
    error = one_error_line(capsys.readouterr().err)
    assert re.search(
        r"error: member (relu-d128-l1_0.001|topk-d128-k8)-bd0-lr0.001-s0 needs .* even alone .* more than fits "
        r"training.memory_budget=1.00MiB",
        error,
    ), error
    assert not (tmp_path / "stores").exists()  # nothing synthesised


def test_a_batch_larger_than_the_store_is_a_config_error(tmp_path, stores, capsys):
    code = run(
        tmp_path / "run",
        stores,
        "data.n_rows=9000",
        "data.rows_per_chunk=3000",
        "data.heldout_rows=1000",
        "training.batch_size=10000",
        "plan_only=true",
    )
    assert code == pipeline.EXIT_BAD_INPUT
    assert "training.batch_size=10000 needs at most the store's 8000 training rows" in one_error_line(
        capsys.readouterr().err
    )


# -- resuming ---------------------------------------------------------------------------------------


def test_resume_with_other_settings_is_refused_but_other_device_counts_are_not(tmp_path, stores, capsys):
    run_dir = tmp_path / "run"
    assert run(run_dir, stores, *SMALL_DATA, "devices=cpu:2", "plan_only=true") == 0
    capsys.readouterr()
    assert (
        run(run_dir, stores, *SMALL_DATA, "devices=cpu:2", "training.batch_size=512", "plan_only=true")
        == pipeline.EXIT_BAD_INPUT
    )
    assert "was started with training.batch_size=256; resuming with 512" in one_error_line(capsys.readouterr().err)
    assert (
        run(run_dir, stores, *SMALL_DATA, "devices=cpu:2", "grid.lr_warmup_steps=100", "plan_only=true")
        == pipeline.EXIT_BAD_INPUT
    )
    assert "was started with grid.lr_warmup_steps=0; resuming with 100" in one_error_line(capsys.readouterr().err)
    for devices in ("cpu", "cpu:8"):
        assert run(run_dir, stores, *SMALL_DATA, f"devices={devices}", "plan_only=true") == 0, capsys.readouterr().err


TINY_RUN = [
    "data.d_in=16",
    "data.n_features=24",
    "data.n_active=3",
    "data.n_rows=3000",
    "data.rows_per_chunk=1000",
    "data.heldout_rows=200",
    "grid.dict_sizes=[32]",
    "grid.dict_ratios=[]",
    "grid.l1=[0.001]",
    "training.steps=20",
    "training.checkpoint_every=10",
    "training.batch_size=64",
    "training.eval_rows=200",
    "training.dead_window_tokens=1000",
    "training.execution=fused",
    "devices=cpu",
]


def test_a_resume_with_a_changed_matmul_precision_is_refused_with_one_line_and_leaves_the_run_as_it_was(
    tmp_path, stores, capsys
):
    """matmul_precision changes results on CUDA, and sweep.py's old hand list of fixed fields forgot it."""
    run_dir = tmp_path / "run"
    assert run(run_dir, stores, *TINY_RUN) == 0
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    capsys.readouterr()
    assert run(run_dir, stores, *TINY_RUN, "training.matmul_precision=highest") == pipeline.EXIT_BAD_INPUT
    assert one_error_line(capsys.readouterr().err) == (
        f"error: {run_dir} was started with training.matmul_precision=high; "
        "resuming with highest would mix two trainings: "
        "set training.matmul_precision=high or use a new run dir"
    )
    assert before == {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}


def test_resume_with_more_devices_than_ensembles_then_a_rerun_of_the_finished_run_does_nothing(
    tmp_path, stores, capsys
):
    # The case: grid=quick packs 4 members into 3 ensembles; a requeue reruns the same command.
    run_dir = tmp_path / "run"
    args = ("grid=quick", *SMALL_DATA, "training.steps=30", "training.checkpoint_every=10")
    assert run(run_dir, stores, *args, "devices=cpu", "plan_only=true") == 0  # planned on one device: 2 ensembles
    assert run(run_dir, stores, *args, "devices=cpu:8") == 0, capsys.readouterr().err
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "members").rglob("*")}
    assert len(list((run_dir / "members").iterdir())) == 4
    capsys.readouterr()
    assert run(run_dir, stores, *args, "devices=cpu:8") == 0
    out = capsys.readouterr().out
    assert "finished sweep" in out and "nothing to do" in out, out
    assert before == {p: p.stat().st_mtime_ns for p in (run_dir / "members").rglob("*")}


def test_a_halving_sweep_of_target_l0_members_reports_stopped_members_and_a_rerun_does_nothing(
    tmp_path, stores, capsys
):
    run_dir = tmp_path / "run"
    args = (
        *SMALL_DATA,
        "grid.dict_ratios=[0.25]",
        "grid.target_l0=[2,4,8]",
        "grid.seeds=[0,1]",
        "training.steps=40",
        "training.checkpoint_every=10",
        "training.halving.rungs=[0.25,0.5]",
        "training.halving.eta=2",
        "training.execution=fused",
    )
    assert run(run_dir, stores, *args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    rows = {r["member_id"]: r for r in csv.DictReader(open(run_dir / "summary.csv"))}
    assert len(rows) == 6 and "relu-d64-L0_4-bd0-lr0.003-s1" in rows
    assert sorted(int(r["steps"]) for r in rows.values()) == [10, 10, 10, 20, 40, 40]  # 6 -> 3 -> 2 members
    for r in rows.values():
        assert r["stopped_early"] == str(int(r["steps"]) < 40) and float(r["target_l0"]) in (2, 4, 8)
        assert float(r["l1_final"]) > 0 and float(r["l1_final"]) != float(r["l1"])  # the controller moved it
    assert "halving: 130 member-steps of the full grid's 240 (54.2%); 4 members stopped early; best mmcs_truth" in out
    assert run(run_dir, stores, *args) == 0 and "nothing to do" in capsys.readouterr().out
    assert (
        run(run_dir, stores, *args[:-3], "training.halving.rungs=[0.5]", "training.execution=fused")
        == pipeline.EXIT_BAD_INPUT
    )
    assert "was started with training.halving.rungs=[0.25, 0.5]" in one_error_line(capsys.readouterr().err)
