"""The structured synthetic world (activations/structured.py) and the ground truth every synthetic store keeps."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_ensemble.activations import structured
from sae_ensemble.activations.format import GROUND_TRUTH, StoreError
from sae_ensemble.activations.synthetic import feature_probabilities, ground_truth_features, write_synthetic

SMALL = dict(d_in=16, n_features=32, n_active=3, n_rows=1000, rows_per_chunk=300, heldout_rows=100)
HIER = {"roots": 4, "branching": 3, "depth": 2, "exclusive": True, "compensate": False}
WORLD = {
    "zipf": {"exponent": 0.5, "p_max": 0.4, "p_min": 0.01},
    "magnitudes": {"mean_first": 2.0, "mean_last": 1.0, "std_mean": 0.3, "std_spread": 0.1},
    "hierarchy": {**HIER, "roots": 2},  # 26 of SMALL's 32 features
    "correlation": {"rank": 4, "scale": 0.3},
}


def all_rows(store):
    return store.rows(np.arange(store.n_rows))


def world_model(world, n_features=64, d=64, seed=0):
    return structured.build_world(
        world, ground_truth_features(d, n_features, seed), torch.full((n_features,), 0.1), seed
    )


def firing(world_model, n_blocks=6):
    """Dense firing [rows, n_features] of the first n_blocks blocks."""
    (rows, feats, _), _ = structured.sample_range(world_model, 0, 0, n_blocks * structured.BLOCK_ROWS)
    fired = torch.zeros(n_blocks * structured.BLOCK_ROWS, len(world_model.probs), dtype=torch.bool)
    fired[rows, feats] = True
    return fired


# -- the toy is unchanged ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params,expected",
    [
        (dict(seed=3), "df82d630c160fe3b"),
        (dict(seed=3, correlated=True, noise_std=0.1), "9c6f37d4ab794499"),
        (dict(seed=3, d_out=8, skip_std=0.1, noise_std=0.1), "67dc1d947cfb2e18"),
    ],
    ids=["toy", "correlated-noisy", "paired"],
)
def test_the_toy_stores_rows_are_those_of_the_code_before_worlds(tmp_path, params, expected):
    # fingerprints computed from the code before the structured generator (rows_per_chunk 300, 100 held out)
    store = write_synthetic(tmp_path / "s", **{**SMALL, **params})
    assert store.fingerprint == expected
    assert "world" not in store.manifest["source"] and store.manifest["source"]["generator"] == "sparse_mixture_v1"


def test_the_default_toy_store_keeps_its_fingerprint(tmp_path):
    store = write_synthetic(tmp_path / "s", n_rows=300_000, n_active=5.0, heldout_rows=8192)  # SyntheticData()
    assert store.fingerprint == "533c31f06360624d"  # the code before the structured generator


# -- held-out true codes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [None, WORLD], ids=["toy", "world"])
def test_the_heldout_true_codes_decode_to_the_heldout_rows(tmp_path, world):
    store = write_synthetic(tmp_path / "s", seed=1, world=world, **SMALL)
    rows = store.heldout_indices()
    codes = store.true_codes(rows, dense=True)  # [R, n_features]
    assert codes.shape == (store.heldout_rows, 32) and (codes > 0).sum(1).float().mean() > 0.5
    assert torch.allclose(codes @ store.ground_truth(), store.rows(rows), atol=1e-5)
    assert torch.equal(store.true_codes(rows[:5]).to_dense(), codes[:5])
    with pytest.raises(StoreError, match=r"are not held out"):
        store.true_codes(np.array([0]))


def test_a_store_without_true_codes_says_so_and_a_reused_toy_store_gains_them(tmp_path):
    store = write_synthetic(tmp_path / "s", seed=2, **SMALL)
    truth = load_file(store.path / GROUND_TRUTH)
    save_file({"features": truth["features"]}, str(store.path / GROUND_TRUTH))  # as written before the codes
    with pytest.raises(StoreError, match="keeps no true codes") as error:
        store.true_codes(store.heldout_indices())
    assert "\n" not in str(error.value)
    again = write_synthetic(tmp_path / "s", seed=2, **SMALL)
    assert again.fingerprint == store.fingerprint
    restored = load_file(store.path / GROUND_TRUTH)
    assert all(torch.equal(restored[name], truth[name]) for name in truth)


# -- the structured world ---------------------------------------------------------------------------------------


def test_a_world_is_seeded_bit_for_bit(tmp_path):
    a = write_synthetic(tmp_path / "a", seed=4, world=WORLD, **SMALL)
    b = write_synthetic(tmp_path / "b", seed=4, world=WORLD, **SMALL)
    c = write_synthetic(tmp_path / "c", seed=5, world=WORLD, **SMALL)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.manifest["source"]["world"] == WORLD and a.manifest["source"]["generator"] == structured.GENERATOR


def test_a_world_streamed_in_chunks_equals_its_rows_generated_in_one_piece(tmp_path):
    params = {**SMALL, "n_rows": structured.BLOCK_ROWS + 700, "noise_std": 0.05}
    chunked = write_synthetic(tmp_path / "a", seed=6, world=WORLD, **params)  # chunks of 300 cross the blocks
    one = write_synthetic(tmp_path / "b", seed=6, world=WORLD, **{**params, "rows_per_chunk": params["n_rows"]})
    reference_world = structured.build_world(
        WORLD, ground_truth_features(16, 32, 6), feature_probabilities(32, 3, 0.99), 6
    )
    _, reference = structured.sample_range(reference_world, 6, 0, params["n_rows"], 0.05)
    assert torch.equal(all_rows(chunked), reference) and torch.equal(all_rows(one), reference)


def test_zipf_firing_rates_match_the_configured_probabilities():
    model = world_model({"zipf": {"exponent": 0.5, "p_max": 0.4, "p_min": 0.01}})
    assert model.probs[0] == pytest.approx(0.4) and model.probs[-1] == pytest.approx(0.01)
    fired = firing(model)
    rate, p = fired.float().mean(0), model.probs
    sigma = (p * (1 - p) / len(fired)).sqrt()
    assert ((rate - p).abs() < 4.5 * sigma).all(), (rate - p).abs().div(sigma).max()


def test_a_child_fires_only_with_its_parent_and_siblings_exclude_each_other():
    for exclusive in (True, False):
        model = world_model({"hierarchy": {**HIER, "exclusive": exclusive}})
        fired = firing(model)
        child = model.parents >= 0
        assert not (fired[:, child] & ~fired[:, model.parents[child]]).any()
        families = fired[:, 4:16].view(-1, 4, 3)  # the roots' children, three per root
        if exclusive:
            assert families.sum(2).max() == 1
        else:
            assert families.sum(2).max() > 1
            with_parent = fired[:, model.parents[4]]
            assert fired[with_parent, 4].float().mean() == pytest.approx(0.1, abs=0.03)  # its own p given the parent


def test_correlation_is_present_when_on_and_absent_when_off():
    def mean_abs_correlation(world):
        fired = firing(world_model(world)).float()
        c = torch.corrcoef(fired.T)
        return c[~torch.eye(len(c), dtype=torch.bool)].abs().mean()

    assert mean_abs_correlation({}) < 0.02
    assert mean_abs_correlation({"correlation": {"rank": 4, "scale": 0.45}}) > 0.05


def test_orthogonalised_geometry_reaches_its_target():
    random = structured.mean_max_cos(ground_truth_features(32, 256, 0))
    model = world_model({"geometry": {"target_mean_max_cos": 0.8 * random, "max_steps": 300, "lr": 0.01}}, 256, 32)
    assert structured.mean_max_cos(model.features) <= 0.8 * random
    assert torch.allclose(model.features.norm(dim=1), torch.ones(256), atol=1e-5)
    with pytest.raises(StoreError, match="data.world.geometry: 1 steps reached"):
        world_model({"geometry": {"target_mean_max_cos": 0.5 * random, "max_steps": 1, "lr": 0.001}}, 256, 32)


def test_the_truth_file_keeps_the_hierarchy(tmp_path):
    store = write_synthetic(tmp_path / "s", seed=1, world={"hierarchy": HIER}, **{**SMALL, "n_features": 64})
    truth = load_file(store.path / GROUND_TRUTH)
    assert truth["parents"][:4].tolist() == [-1] * 4 and truth["parents"][4:7].tolist() == [0, 0, 0]
    assert truth["parents"][16:19].tolist() == [4, 4, 4] and (truth["parents"][52:] == -1).all()
