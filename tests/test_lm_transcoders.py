"""Transcoders on a language model (data.hooks_out): each (input, output) hook pair harvested in the same pass into
one paired store of rows [input | output], trained as transcoders, and spliced in at the output hook for CE."""

import copy
import math

import numpy as np
import pytest
import torch

from sae_ensemble import pipeline
from sae_ensemble.activations import harvest
from sae_ensemble.activations.harvest import HarvestSpec, get_or_harvest, iter_contexts, iter_texts
from sae_ensemble.checkpoint import load_member
from sae_ensemble.evaluate import ce_loss_recovered
from tests.test_harvest import CONTEXT, harvest_kwargs, stored_rows
from tests.test_hooks import rows, sweep

MLP_IN, MLP_OUT = (
    "blocks.0.ln2.hook_normalized",
    "blocks.0.hook_mlp_out",
)  # the bridge's names for MLP 0's input, output


def test_a_pair_is_harvested_in_one_pass_as_rows_of_input_then_output(
    tmp_path, model_dir, text_file, bridge, forward_passes
):
    stores = get_or_harvest(
        model_dir,
        [MLP_IN, "blocks.1.hook_resid_post"],
        text_file,
        hooks_out=[MLP_OUT, None],
        **harvest_kwargs(tmp_path),
    )
    assert forward_passes and all(
        set(hooks) == {MLP_IN, MLP_OUT, "blocks.1.hook_resid_post"} for hooks in forward_passes
    )
    paired, sae = stores[MLP_IN], stores["blocks.1.hook_resid_post"]
    assert (paired.target_at, paired.d_in, sae.target_at, sae.d_in) == (64, 128, 0, 64)
    assert paired.manifest["source"]["hook_out"] == MLP_OUT and "hook_out" not in sae.manifest["source"]

    contexts = list(iter_contexts(iter_texts(text_file), bridge.tokenizer, CONTEXT))
    _, cache = bridge.run_with_cache(torch.tensor(contexts[: -(-2000 // (CONTEXT - 1))]))
    flat = {hook: cache[hook][:, 1:].reshape(-1, 64)[:2000] for hook in (MLP_IN, MLP_OUT)}  # BOS position dropped
    assert torch.equal(stored_rows(paired), torch.cat([flat[MLP_IN], flat[MLP_OUT]], dim=1))
    assert paired.ground_truth() is None and paired.paired_truth() is None  # a model's pair has no ground truth


def test_an_sae_stores_key_is_unchanged_and_a_pair_has_its_own():
    spec = HarvestSpec("gpt2", "blocks.3.hook_resid_pre", "NeelNanda/pile-10k", 1000)
    assert spec.key() == "cee3a75be5d2058958f4"  # the key before output hooks existed: cached stores stay valid
    assert HarvestSpec(*list(spec.record().values()), hook_out="blocks.3.hook_mlp_out").key() != spec.key()


def test_an_output_hook_that_runs_before_its_input_is_refused(tmp_path, model_dir, text_file):
    with pytest.raises(harvest.StoreError, match="runs before its input hook"):
        get_or_harvest(model_dir, "blocks.1.hook_resid_pre", text_file, hooks_out=[MLP_OUT], **harvest_kwargs(tmp_path))
    assert not list((tmp_path / "cache").glob("*/manifest.json"))


def test_splicing_the_models_own_mlp_as_the_transcoder_recovers_all_of_the_ce(bridge):
    """The splice reads the input and writes the output of one forward pass: the MLP itself loses nothing, and a zero
    output is zero-ablation."""
    mlp = copy.deepcopy(bridge.blocks[0].mlp.original_component)  # without the bridge's hooks, which would recurse
    tokens = torch.randint(0, bridge.cfg.d_vocab, (4, 16), generator=torch.Generator().manual_seed(0))
    itself, zero = ce_loss_recovered(
        bridge,
        tokens,
        MLP_OUT,
        [mlp, torch.zeros_like],
        input_hook=MLP_IN,
        progress=False,
        min_ce_gap=-math.inf,
        members_per_pass=2,
    )
    assert itself["ce_recon"] == pytest.approx(itself["ce_clean"], abs=1e-5) and itself["kl"] == pytest.approx(
        0, abs=1e-6
    )
    assert zero["ce_recon"] == pytest.approx(zero["ce_zero_ablation"], abs=1e-5)
    assert zero["ce_zero_ablation"] != pytest.approx(zero["ce_clean"], abs=1e-4)


def test_a_transcoder_sweep_on_the_tiny_lm_trains_and_splices_each_member(tmp_path):
    overrides = [f"data.hooks=[{MLP_IN}]", f"data.hooks_out=[{MLP_OUT}]", "grid.variants=[relu,topk]"]
    assert sweep(tmp_path / "run", tmp_path / "stores", *overrides) == 0
    summary = rows(tmp_path / "run")
    assert len(summary) == 4 and {r["d_out"] for r in summary} == {"64"}
    for r in summary:
        assert math.isfinite(float(r["mse"])) and math.isfinite(float(r["ce_recon"])), r  # spliced at the output
        member, params, _, _ = load_member(tmp_path / "run" / "members" / r["member_id"])
        assert (member.d_in, member.d_out) == (64, 64) and params["W_dec"].shape[1] == 64


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            [f"data.hooks=[{MLP_IN},blocks.1.hook_resid_pre]", f"data.hooks_out=[{MLP_OUT}]"],
            f"data.hooks_out=['{MLP_OUT}'] must name one output hook per input hook (2:",
        ),
        ([f"hook={MLP_IN}", "data.hooks_out=[blocks.0.hook_mlp_otu]"], "'blocks.0.hook_mlp_otu' is not a hook"),
        (["hook=blocks.1.hook_resid_pre", f"data.hooks_out=[{MLP_OUT}]"], "runs before its input hook"),
        (["grid.skip_connection=[true]"], "grid.skip_connection=[True] is for transcoders"),
        (["hook=blocks.0.hook_mlp_in"], "cannot be hooked: Cannot add hook blocks.0.hook_mlp_in"),
        (
            [f"hook={MLP_IN}", f"data.hooks_out=[{MLP_OUT}]", "training.normalize=center"],
            "training.normalize=center is for SAEs",
        ),
    ],
)
def test_bad_transcoder_settings_are_refused_with_one_line_before_any_training(
    tmp_path, capsys, forward_passes, overrides, expected
):
    assert sweep(tmp_path / "run", tmp_path / "stores", *overrides) == pipeline.EXIT_BAD_INPUT
    [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert expected in error, error
    assert not (tmp_path / "run" / "members").exists()
    assert not list((tmp_path / "stores").glob("*/manifest.json"))


def test_one_hooks_pair_and_sae_side_by_side_keep_their_store_rows_apart(tmp_path, model_dir, text_file):
    """An SAE store and a pair on the same input hook are distinct stores (keys), each complete."""
    sae = get_or_harvest(model_dir, MLP_IN, text_file, **harvest_kwargs(tmp_path))[MLP_IN]
    pair = get_or_harvest(model_dir, MLP_IN, text_file, hooks_out=[MLP_OUT], **harvest_kwargs(tmp_path))[MLP_IN]
    assert sae.path != pair.path
    np.testing.assert_array_equal(stored_rows(pair)[:, :64].numpy(), stored_rows(sae).numpy())
