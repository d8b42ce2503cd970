"""The tiny local GPT-2s: deterministic training, the fingerprinted cache and its lock, and (the one
slow test) the trained model=tiny meeting its targets through the real sweep."""

import csv
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from sae_ensemble import pipeline
from sae_ensemble.activations.tiny_model import Recipe, ensure_tiny_gpt2, fingerprint, train_tiny_gpt2
from tests.sweeps import compose_config

REPO = Path(__file__).resolve().parents[1]
# A recipe of a few seconds: the real text and tokenizer, a toy model and three steps.
QUICK = Recipe(n_layer=1, d_model=16, n_head=2, n_ctx=16, vocab_size=300, steps=3, batch_size=4, warmup_steps=1)
MODEL_FILES = ("model.safetensors", "tokenizer.json", "config.json")


def test_two_trainings_give_identical_files_and_another_seed_does_not(tmp_path):
    first = train_tiny_gpt2(tmp_path / "a", QUICK, progress=False)
    train_tiny_gpt2(tmp_path / "b", QUICK, progress=False)
    train_tiny_gpt2(tmp_path / "c", replace(QUICK, seed=1), progress=False)
    for name in MODEL_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()
    assert first["fingerprint"] == fingerprint(QUICK, trained=True) and math.isfinite(first["heldout_ce"])


def test_changed_recipe_or_kind_gets_its_own_directory():
    prints = {
        fingerprint(QUICK, True),
        fingerprint(replace(QUICK, steps=4), True),
        fingerprint(replace(QUICK, lr=1e-3), True),
        fingerprint(QUICK, False),
    }
    assert len(prints) == 4
    assert fingerprint(QUICK, True) == fingerprint(replace(QUICK), True)


ENSURE = """
from sae_ensemble.activations.tiny_model import Recipe, ensure_tiny_gpt2
print(ensure_tiny_gpt2({root!r}, trained=True, recipe={recipe!r}))
"""


def test_concurrent_first_use_trains_once_and_both_get_the_model(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    killed_build = root / f".trained-{fingerprint(QUICK, True)}.tmp-otherhost-123"  # a build that died midway
    killed_build.mkdir()
    (killed_build / "config.json").write_text("{}")
    code = ENSURE.format(root=str(root), recipe=QUICK)
    users = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [user.communicate(timeout=300) for user in users]
    assert all(user.returncode == 0 for user in users), outputs
    directory = root / f"trained-{fingerprint(QUICK, True)}"
    assert [out.strip() for out, _ in outputs] == [str(directory)] * 2
    assert sum("training on first use" in err for _, err in outputs) == 1, outputs
    assert sorted(p.name for p in root.iterdir()) == [
        directory.name,
        directory.name + ".lock",
    ]  # the killed build is gone
    assert json.loads((directory / "training.json").read_text())["fingerprint"] == fingerprint(QUICK, True)
    mtime = (directory / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_gpt2(root, trained=True, recipe=QUICK, progress=False) == directory  # reused, not rebuilt
    assert (directory / "model.safetensors").stat().st_mtime_ns == mtime


def test_the_random_model_is_cached_beside_the_trained_one(tmp_path):
    directory = ensure_tiny_gpt2(tmp_path, trained=False)
    assert directory.name == f"random-{fingerprint(Recipe(), False)}" and (directory / "model.safetensors").exists()
    assert ensure_tiny_gpt2(tmp_path, trained=False) == directory


@pytest.fixture(scope="module")
def tiny_stores(tmp_path_factory):
    """One store root for this module's sweeps: the trained tiny model is built in it once."""
    return tmp_path_factory.mktemp("stores")


def test_model_tiny_sweep_scores_ce_recovered_with_the_trained_model(tmp_path, tiny_stores, capsys):
    """The acceptance run of model=tiny (the one test that pays for training the real recipe, a few CPU minutes) on both
    layers, as `python sweep.py -m data=lm model=tiny layer=0,1` runs them (that multirun CLI: tests/test_sweep.py)."""
    stores = tiny_stores
    for layer in (0, 1):
        cfg = compose_config(
            "data=lm",
            "model=tiny",
            f"layer={layer}",
            "grid=quick",
            "devices=cpu",
            f"data.store_root={stores}",
            "progress=false",
            "wandb=disabled",
        )
        assert pipeline.run(cfg, tmp_path / f"layer_{layer}") == pipeline.EXIT_OK, capsys.readouterr().err
    [model] = (stores / "models" / "tiny-gpt2").glob("trained-*/")
    training = json.loads((model / "training.json").read_text())
    assert training["heldout_ce"] <= 4.5 < training["ln_vocab"], training
    summaries = sorted(tmp_path.glob("layer_*/summary.csv"))
    assert len(summaries) == 2
    for run in tmp_path.glob("layer_*"):  # #35: the report, and each member's contexts from the store's tokens
        assert (run / "report" / "index.html").is_file() and len(list((run / "report" / "members").glob("*.html"))) == 4
        latents = json.loads(next(run.glob("members/relu-d128*/features.json")).read_text())["latents"]
        frequent = [latent for latent in latents if latent["why"] == "frequent"]
        assert len(latents) >= 10 and frequent and all(len(latent["contexts"]) == 10 for latent in frequent)
    for summary in summaries:
        for row in csv.DictReader(summary.open()):
            clean, zero = float(row["ce_clean"]), float(row["ce_zero_ablation"])
            assert clean <= 4.5 and zero - clean >= 0.5, row  # zero-ablating the hooked layer costs the model
            assert -0.5 <= float(row["ce_recovered"]) <= 1.05, row


def test_model_tiny_transcoder_sweep_splices_in_at_the_mlp_output(tmp_path, tiny_stores, capsys):
    """#34's acceptance run: transcoders from MLP 0's input to its output on the trained tiny model."""
    cfg = compose_config(
        "data=lm",
        "model=tiny",
        "grid=quick",
        "data.hooks=[blocks.0.ln2.hook_normalized]",
        "data.hooks_out=[blocks.0.hook_mlp_out]",
        "devices=cpu",
        f"data.store_root={tiny_stores}",
        "progress=false",
        "wandb=disabled",
    )
    assert pipeline.run(cfg, tmp_path / "run") == pipeline.EXIT_OK, capsys.readouterr().err
    summary = list(csv.DictReader((tmp_path / "run" / "summary.csv").open()))
    assert len(summary) == 4 and {row["d_out"] for row in summary} == {"64"}
    for row in summary:
        assert float(row["ce_zero_ablation"]) - float(row["ce_clean"]) >= 0.5, row  # the MLP matters to the model
        assert 0 <= float(row["ce_recovered"]) <= 1.05, row
