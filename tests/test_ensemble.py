"""Members trained together equal members trained alone; padding, NaN isolation, save/load."""

import json

import pytest
import torch

from sae_ensemble.checkpoint import CheckpointError, load_ensemble, load_member, save_member
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.member import Member

D_IN = 24
STEPS = 50

MIXED = [
    Member("relu", D_IN, 48, l1=1e-3, seed=0, lr_warmup_steps=10),
    Member("relu", D_IN, 32, l1=3e-3, bias_decay=0.05, seed=1, l1_warmup_steps=20),
    Member("relu", D_IN, 64, l1=1e-2, bias_decay=0.1, lr=3e-3, seed=2, lr_decay_steps=15),
    Member("tied", D_IN, 48, l1=3e-3, seed=3),
    Member("tied", D_IN, 16, l1=1e-3, bias_decay=0.1, seed=4, use_b_dec=False),
    Member("topk", D_IN, 64, k=4, seed=5),
    Member("topk", D_IN, 32, k=8, lr=2e-3, seed=6, lr_warmup_steps=5),
]


def sparse_batches(n_batches: int, batch: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """Sparse mixtures of random directions: data an SAE can actually fit."""
    g = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(40, D_IN, generator=g), dim=-1)
    out = []
    for _ in range(n_batches):
        active = (torch.rand(batch, 40, generator=g) < 0.08).float() * torch.rand(batch, 40, generator=g)
        out.append(active @ features + 0.3)
    return out


def train(members, batches, total_steps=STEPS):
    ensemble = Ensemble(members, total_steps=total_steps)
    for batch in batches:
        ensemble.step(batch)
    return ensemble


@pytest.fixture(scope="module")
def mixed_run():
    return train(MIXED, sparse_batches(STEPS))


@pytest.mark.parametrize("index", range(len(MIXED)), ids=[m.member_id for m in MIXED])
def test_member_in_mixed_ensemble_matches_solo_training(mixed_run, index):
    solo = train([MIXED[index]], sparse_batches(STEPS))
    mixed_params, mixed_moments = mixed_run.member_state(index)
    solo_params, solo_moments = solo.member_state(0)
    for name in solo_params:
        torch.testing.assert_close(mixed_params[name], solo_params[name], atol=1e-5, rtol=0, msg=name)
    # The members really trained: weights moved away from init.
    init = Ensemble([MIXED[index]], STEPS).member_state(0)[0]
    assert (solo_params["W_enc"] - init["W_enc"]).abs().max() > 1e-3


def test_padded_features_never_fire_and_never_move(mixed_run):
    codes, _ = mixed_run.forward(sparse_batches(1, seed=9)[0])
    for index, member in enumerate(MIXED):
        n = member.dict_size
        assert (codes[index, :, n:] == 0).all()
        for name in ("W_enc", "b_enc", "W_dec"):
            assert (mixed_run.params[name][index, n:] == 0).all(), name
            assert (mixed_run.opt_state.mu[name][index, n:] == 0).all(), name
        assert codes[index, :, :n].abs().sum() > 0


def test_decoder_rows_stay_unit_norm(mixed_run):
    norms = mixed_run.params["W_dec"].norm(dim=-1)
    mask = mixed_run.hparams["feature_mask"] > 0
    torch.testing.assert_close(norms[mask], torch.ones_like(norms[mask]))


def test_diverging_member_is_frozen_and_others_are_unchanged():
    healthy = MIXED[:3]
    diverging = Member("relu", D_IN, 32, l1=1e-3, lr=1e30, seed=7)
    batches = sparse_batches(20)
    with_bad = train([*healthy, diverging], batches, total_steps=20)
    without = train(healthy, batches, total_steps=20)
    assert with_bad.alive.tolist() == [True, True, True, False]
    for name, tensor in with_bad.params.items():
        assert torch.isfinite(tensor[3]).all(), f"frozen member's {name} must keep finite weights"
    for index in range(3):
        a, _ = with_bad.member_state(index)
        b, _ = without.member_state(index)
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_save_load_round_trip_is_exact(tmp_path, mixed_run):
    for index, member in enumerate(MIXED):
        params, moments = mixed_run.member_state(index)
        save_member(tmp_path / member.member_id, member, params, moments, {"steps": STEPS, "tokens": 123})
        loaded_member, loaded, loaded_moments, cfg = load_member(tmp_path / member.member_id, with_moments=True)
        assert loaded_member == member
        assert cfg["member_id"] == member.member_id and cfg["steps"] == STEPS and cfg["dict_size"] == member.dict_size
        for name in params:
            assert torch.equal(loaded[name], params[name])
        for name in moments:
            assert torch.equal(loaded_moments[name], moments[name])
    assert json.loads((tmp_path / MIXED[0].member_id / "cfg.json").read_text())["variant"] == "relu"


def test_resume_from_saved_members_equals_uninterrupted_training(tmp_path):
    batches = sparse_batches(STEPS)
    uninterrupted = train(MIXED, batches)
    first_half = Ensemble(MIXED, total_steps=STEPS)
    for batch in batches[:20]:
        first_half.step(batch)
    dirs = []
    for index, member in enumerate(MIXED):
        params, moments = first_half.member_state(index)
        dirs.append(save_member(tmp_path / member.member_id, member, params, moments, {"steps": 20, "tokens": 20 * 64}))
    resumed = load_ensemble(dirs, total_steps=STEPS)
    for batch in batches[20:]:
        resumed.step(batch)
    for index in range(len(MIXED)):
        a, _ = resumed.member_state(index)
        b, _ = uninterrupted.member_state(index)
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)


def test_loading_wrong_shapes_or_missing_tensors_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    member = MIXED[0]
    params, _ = Ensemble([member], 1).member_state(0)
    save_member(tmp_path / "m", member, params)
    save_file({**params, "W_enc": torch.zeros(5, D_IN)}, tmp_path / "m" / "sae.safetensors")
    with pytest.raises(CheckpointError, match=r"W_enc has shape \[5, 24\], expected \[48, 24\]"):
        load_member(tmp_path / "m")
    save_file({k: v for k, v in params.items() if k != "b_dec"}, tmp_path / "m" / "sae.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks tensors \['b_dec'\]"):
        load_member(tmp_path / "m")
    (tmp_path / "m" / "sae.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_member(tmp_path / "m")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_member(tmp_path / "nowhere")


def test_invalid_members_are_rejected_with_the_field_named():
    with pytest.raises(ValueError, match="k=0 must be between 1 and dict_size=8"):
        Member("topk", 4, 8, k=0)
    with pytest.raises(ValueError, match="variant='crosscoder' is unknown"):
        Member("crosscoder", 4, 8)
    with pytest.raises(ValueError, match="must share d_in"):
        Ensemble([Member("relu", 4, 8), Member("relu", 5, 8)], 1)


def test_gradient_clipping_equals_torchs_clip_grad_norm_member_by_member():
    from sae_ensemble.kernels.adam import broadcast, clip_factors, gradient_norms

    g = torch.Generator().manual_seed(0)
    grads = {"W_enc": torch.randn(3, 8, 4, generator=g), "b_enc": torch.randn(3, 8, generator=g)}
    grads["threshold"] = torch.randn(3, generator=g)  # a scalar per member (batchtopk's), stacked: [M]
    max_norm = torch.tensor([0.5, float("inf"), 100.0])
    factors = clip_factors(gradient_norms(grads), max_norm)
    clipped = {name: g * broadcast(factors, g) for name, g in grads.items()}  # as kernels/adam.py's step_ scales them
    for i in range(3):
        plain = [torch.nn.Parameter(torch.zeros_like(v[i])) for v in grads.values()]
        for p, v in zip(plain, grads.values()):
            p.grad = v[i].clone()
        torch.nn.utils.clip_grad_norm_(plain, float(max_norm[i]))
        for p, name in zip(plain, grads):
            torch.testing.assert_close(clipped[name][i], p.grad, atol=1e-6, rtol=1e-6)
    assert torch.equal(clipped["W_enc"][1], grads["W_enc"][1])  # inf: as it was


def test_a_clipped_member_in_a_mixed_ensemble_equals_it_trained_alone():
    clipped = Member("relu", D_IN, 48, l1=1e-3, seed=0, max_grad_norm=1e-3)
    assert clipped.member_id == "relu-d48-l1_0.001-gc0.001-bd0-lr0.001-s0"
    together = train([MIXED[0], clipped, MIXED[5]], sparse_batches(STEPS)).member_state(1)[0]
    alone = train([clipped], sparse_batches(STEPS)).member_state(0)[0]
    unclipped = train([Member("relu", D_IN, 48, l1=1e-3, seed=0)], sparse_batches(STEPS)).member_state(0)[0]
    for name in alone:
        torch.testing.assert_close(together[name], alone[name], atol=1e-5, rtol=0, msg=name)
    assert (alone["W_enc"] - unclipped["W_enc"]).abs().max() > 1e-4  # the clipping changed the training
