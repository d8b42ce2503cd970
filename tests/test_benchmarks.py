"""The ensemble benchmark runs end to end on a tiny case and prints what docs/benchmarks.md records."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

KEYS = {
    "case",
    "device",
    "gemm_gflops",
    "ensemble_gflops",
    "mfu",
    "sequential_gflops",
    "speedup",
    "limit_ratio",
    "adam_vmap_ratio",
    "ensemble_step_ms",
    "sequential_step_ms",
    "execution",
    "autotune_ms",
}


@pytest.mark.parametrize("variant", ["relu", "topk"])
def test_ensemble_benchmark_prints_one_json_line_with_its_keys(variant):
    options = "--d 32 --dict-sizes 64,128 --members 4 --batch 64 --steps 2 --rounds 2 --k 4".split()
    command = [sys.executable, "-m", "benchmarks.ensemble", *options, "--variant", variant]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result) == KEYS
    assert result["case"].endswith(f"variant={variant}" + (" k=4" if variant == "topk" else ""))
    assert all(result[key] > 0 for key in ("speedup", "limit_ratio", "ensemble_step_ms", "sequential_step_ms"))
    assert len(result["execution"]) == 2  # one ensemble per dict size, as the planner makes them
    # a timed candidate won
    assert all(choice in timings for choice, timings in zip(result["execution"], result["autotune_ms"]))


def test_gemm_benchmark_times_each_product_and_layout():
    options = "--device cpu --members 2 --d 32 --dict-size 64 --batch 64 --repeats 1".split()
    command = [sys.executable, "-m", "benchmarks.gemms", *options]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    products = {
        "encoder",
        "decoder",
        "decoder kmajor",
        "dcodes",
        "grad_D",
        "grad_D kmajor",
        "grad_W",
        "five GEMMs as the step",
    }
    assert set(result["rows"]) == products
    assert all(row["ms"] > 0 for row in result["rows"].values())
    assert all(result["rows"][name]["of_peak"] > 0 for name in products)
    assert {"copy_ms"} <= set(result["rows"]["grad_D kmajor"])


def test_ensemble_benchmark_names_the_recorded_cases_it_allows():
    command = [sys.executable, "-m", "benchmarks.ensemble", "--cases", "small,huge"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert done.returncode == 2
    assert "unknown case huge; allowed: small, mid, mixed, large, topk" in done.stderr


def test_ensemble_benchmark_pins_passes_only_for_the_fused_execution():
    command = [sys.executable, "-m", "benchmarks.ensemble", "--execution", "sparse", "--passes", "c"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert done.returncode == 2
    assert "--passes c needs --execution fused; got --execution sparse" in done.stderr


def test_the_feature_statistics_benchmark_prints_each_grids_cost_in_forward_passes():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.features", "--device", "cpu"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    for grid in ("default", "tiny_lm"):
        assert printed[f"{grid}_forward_s"] > 0 and printed[f"{grid}_features_s"] > 0, printed
        ratio = printed[f"{grid}_features_s"] / printed[f"{grid}_forward_s"]
        assert printed[f"{grid}_ratio"] == pytest.approx(ratio, rel=1e-2)
        assert printed[f"{grid}_splits_s"] > 0  # both grids have members with a next size


def test_the_synthetic_benchmark_reads_the_presets_as_the_sweep_composes_them():
    from benchmarks.synthetic import preset
    from tests.sweeps import compose_config

    for name in ("synthetic_hier", "synthsaebench16k"):
        assert preset(name) == compose_config(f"data={name}").data
    command = [sys.executable, "-m", "benchmarks.synthetic", "--rows", "16384", "--presets", "synthetic_hier"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["toy_rows_per_s"] > 0 and result["hier_rows_per_s"] > 0 and result["hier_build_s"] > 0
