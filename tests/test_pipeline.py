"""The sweep in-process (sae_ensemble.pipeline): what `python sweep.py` does after Hydra composed the config."""

import csv
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from sae_ensemble import pipeline
from tests.sweeps import compose_config

FIXTURE = Path(__file__).parent / "fixtures" / "run_from_126c8c5"
FIXTURE_OVERRIDES = [
    "data.d_in=16",
    "data.n_features=24",
    "data.n_active=3",
    "data.n_rows=3000",
    "data.rows_per_chunk=1000",
    "data.heldout_rows=200",
    "grid.dict_sizes=[32,64]",
    "grid.dict_ratios=[]",
    "grid.l1=[0.001]",
    "training.steps=40",
    "training.checkpoint_every=20",
    "training.batch_size=64",
    "training.execution=fused",
    "training.eval_rows=200",
    "training.dead_window_tokens=1000",
    "devices=cpu",
    "wandb=disabled",
    "progress=false",
]


def test_a_run_dir_written_before_the_restructure_resumes_to_that_versions_members(tmp_path):
    """tests/fixtures/README.md: commit 126c8c5's run dir, stopped after step 20, resumed by today's code to step 40,
    gives the members and summary.csv that 126c8c5 gave running on."""
    run_dir, store = tmp_path / "run", tmp_path / "store"
    shutil.copytree(FIXTURE / "run", run_dir)
    shutil.copytree(FIXTURE / "store", store)
    assert pipeline.run(compose_config(*FIXTURE_OVERRIDES, f"data.store={store}"), run_dir) == pipeline.EXIT_OK
    for expected in sorted((FIXTURE / "expected" / "members").iterdir()):
        got = load_file(run_dir / "members" / expected.name / "sae.safetensors")
        for name, value in load_file(expected / "sae.safetensors").items():
            torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0, msg=f"{expected.name} {name}")
    with open(FIXTURE / "expected" / "summary.csv") as f, open(run_dir / "summary.csv") as g:
        before, after = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert [r["member_id"] for r in before] == [r["member_id"] for r in after]
    for old, new in zip(before, after):
        for column in ("mse", "fvu", "l0", "dead_frac", "mmcs_truth", "mmcs_next"):
            if old[column]:
                assert abs(float(new[column]) - float(old[column])) <= 1e-6 * max(1.0, abs(float(old[column]))), (
                    old["member_id"],
                    column,
                )
