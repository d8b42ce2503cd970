"""Several hooks in one run (data.hooks): one harvest for all of them, the inner grid on each, and each hook's
members equal to a one-hook run of the same grid on that hook."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from sae_ensemble import pipeline
from sae_ensemble.checkpoint import load_member
from tests.sweeps import compose_config

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
TINY_LM = [
    "data=lm",
    "model=tiny",
    "model.build_tiny=random",  # instant; tests/test_tiny_model.py runs the trained one
    "grid=quick",
    "training.steps=20",
    "training.execution=reference",  # the autotuner's choice may differ between runs; the equality needs one
    "devices=cpu",
]


def sweep(run_dir: Path, stores: Path, *overrides: str) -> int:
    return pipeline.run(
        compose_config(*TINY_LM, *overrides, f"data.store_root={stores}", "progress=false", "wandb=disabled"), run_dir
    )


def rows(run_dir: Path) -> list[dict]:
    return list(csv.DictReader(open(run_dir / "summary.csv")))


def test_two_hooks_are_harvested_in_one_pass_and_each_equals_its_one_hook_run(tmp_path, forward_passes):
    stores = tmp_path / "stores"
    assert sweep(tmp_path / "one", stores, f"hook={HOOKS[0]}", "eval.ce_loss=false") == 0
    one_hook_passes = len(forward_passes)
    forward_passes.clear()
    for store in stores.glob("*/manifest.json"):
        store.parent.rename(store.parent.with_name(store.parent.name + ".moved"))  # harvest both hooks afresh

    assert sweep(tmp_path / "two", stores, f"data.hooks=[{','.join(HOOKS)}]") == 0
    assert len(forward_passes) == one_hook_passes  # one pass over the tokens for both hooks, not one per hook
    assert all(hooks == HOOKS for hooks in forward_passes)

    summary = rows(tmp_path / "two")
    assert sorted({r["hook"] for r in summary}) == HOOKS and len(summary) == 8  # quick's 4 members on each hook
    for r in summary:
        assert r["member_id"].startswith(r["hook"] + "-")
        assert math.isfinite(float(r["ce_clean"])) and math.isfinite(float(r["ce_recon"])), r  # spliced at its hook
    assert (tmp_path / "two" / "plots" / HOOKS[1] / "pareto_l0_fvu.png").exists()

    # The second hook's one-hook run reuses its sibling store: no forward pass at all.
    forward_passes.clear()
    assert sweep(tmp_path / "second", stores, f"hook={HOOKS[1]}", "eval.ce_loss=false") == 0
    assert forward_passes == []
    for hook, single in ((HOOKS[0], tmp_path / "one"), (HOOKS[1], tmp_path / "second")):
        for r in rows(single):
            _, alone, _, _ = load_member(single / "members" / r["member_id"])
            member, together, _, _ = load_member(tmp_path / "two" / "members" / f"{hook}-{r['member_id']}")
            assert member.hook == hook
            for name, value in alone.items():
                torch.testing.assert_close(together[name], value, atol=1e-5, rtol=0)


def test_only_the_hooks_without_a_cached_store_are_harvested(tmp_path, forward_passes):
    stores = tmp_path / "stores"
    assert sweep(tmp_path / "a", stores, f"hook={HOOKS[0]}", "plan_only=true") == 0
    forward_passes.clear()
    assert sweep(tmp_path / "b", stores, f"data.hooks=[{','.join(HOOKS)}]", "plan_only=true") == 0
    assert forward_passes and all(hooks == HOOKS[1:] for hooks in forward_passes)
    assert len(list(stores.glob("*/manifest.json"))) == 2


@pytest.mark.parametrize(
    "hooks, expected",
    [
        (f"[{HOOKS[0]},{HOOKS[0]}]", f"data.hooks=['{HOOKS[0]}', '{HOOKS[0]}'] must be distinct"),
        (f"[{HOOKS[0]},blocks.0.hook_resid_psot]", "'blocks.0.hook_resid_psot' is not a hook of this model"),
    ],
)
def test_bad_hooks_are_refused_with_one_line_before_any_harvest(tmp_path, forward_passes, capsys, hooks, expected):
    assert sweep(tmp_path / "run", tmp_path / "stores", f"data.hooks={hooks}") == pipeline.EXIT_BAD_INPUT
    [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert expected in error, error
    assert forward_passes == [] and not list((tmp_path / "stores").glob("*/manifest.json"))


def test_halving_ranks_each_hooks_members_among_themselves(tmp_path):
    overrides = [f"data.hooks=[{','.join(HOOKS)}]", "training.halving.rungs=[0.5]", "eval.ce_loss=false"]
    assert sweep(tmp_path / "run", tmp_path / "stores", *overrides) == 0
    ranking = json.loads((tmp_path / "run" / "halving" / "rung_1" / "ranking.json").read_text())
    for hook in HOOKS:  # quick's 4 members per hook, eta 3: the best ceil(4 / 3) = 2 of each hook go on
        assert len([m for m in ranking["survivors"] if m.startswith(hook + "-")]) == 2, ranking["survivors"]
    summary = rows(tmp_path / "run")
    assert len(summary) == 8 and sum(r["stopped_early"] == "True" for r in summary) == 4
