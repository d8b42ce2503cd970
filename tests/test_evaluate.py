"""CE loss recovered and KL on a tiny random GPT-2, and reconstructions from saved members."""

import math

import pytest
import torch
import torch.nn.functional as F

from sae_ensemble.activations.tiny_model import build_tiny_gpt2
from sae_ensemble.checkpoint import save_member
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.evaluate import ce_loss_recovered, evaluate_members, reconstruction_from_checkpoint
from sae_ensemble.member import Member

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    from transformer_lens import TransformerBridge

    directory = build_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"), n_layer=2, d_model=64)
    return TransformerBridge.boot_transformers(str(directory), device="cpu")


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(0))


def test_identity_recovers_everything_and_zeros_recover_nothing(bridge, tokens):
    identity, zeros = (lambda x: x), torch.zeros_like
    # min_ce_gap=-inf: this random model barely uses the hook (ablation even lowers CE), but the formulas are tested
    # here
    results = ce_loss_recovered(
        bridge, tokens, HOOK, [identity, zeros], batch_size=4, progress=False, min_ce_gap=-math.inf
    )
    assert results[0]["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert results[0]["ce_loss_score"] == results[0]["ce_recovered"]
    assert results[0]["kl_div_score"] == pytest.approx(1.0, abs=1e-4)
    assert results[1]["kl_div_score"] == pytest.approx(0.0, abs=1e-4)
    assert results[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert results[1]["ce_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert results[1]["kl"] == pytest.approx(results[1]["kl_zero_ablation"], rel=1e-4)
    assert results[1]["kl"] > 1e-3

    logits = bridge(tokens)  # the clean CE, computed the plain way
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert results[0]["ce_clean"] == pytest.approx(expected.item(), rel=1e-5)


def test_scores_are_nan_with_one_warning_line_when_ablation_barely_changes_ce(bridge, tokens, capsys):
    results = ce_loss_recovered(bridge, tokens, HOOK, [lambda x: x, torch.zeros_like], progress=False, min_ce_gap=1e6)
    for result in results:
        assert (
            math.isnan(result["ce_recovered"])
            and math.isnan(result["ce_loss_score"])
            and math.isnan(result["kl_div_score"])
        )
        assert all(math.isfinite(result[name]) for name in ("ce_clean", "ce_zero_ablation", "ce_recon", "kl"))
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith(f"warning: zero-ablating {HOOK} raises CE by only")
    assert "min_ce_gap=1000000.0" in warning[0]


def test_members_batched_in_one_pass_match_members_run_alone(bridge, tokens):
    g = torch.Generator().manual_seed(1)
    noise = [0.1 * torch.randn(64, generator=g) for _ in range(3)]
    members = [lambda x, n=n: x + n for n in noise] + [lambda x: 0.5 * x]
    together = ce_loss_recovered(
        bridge, tokens, HOOK, members, members_per_pass=3, progress=False, min_ce_gap=-math.inf
    )
    alone = [ce_loss_recovered(bridge, tokens, HOOK, m, progress=False, min_ce_gap=-math.inf)[0] for m in members]
    for a, b in zip(together, alone):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    assert len({round(r["ce_recon"], 6) for r in together}) == 4  # each copy got its own member


def test_reconstruction_from_checkpoint_matches_the_ensemble_and_undoes_normalisation(tmp_path):
    members = [Member("relu", 6, 8, l1=1e-3, seed=0), Member("topk", 6, 12, k=3, seed=1), Member("tied", 6, 5, seed=2)]
    ensemble = Ensemble(members, total_steps=5)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        ensemble.step(torch.randn(32, 6, generator=g))
    x = torch.randn(2, 4, 6, generator=g)
    codes, x_hat = ensemble.forward(x.reshape(-1, 6))
    shift, scale = torch.randn(6, generator=g), 3.0
    for index, member in enumerate(members):
        params, moments = ensemble.member_state(index)
        directory = save_member(tmp_path / member.member_id, member, params, moments, info={"steps": 5, "tokens": 160})
        plain = reconstruction_from_checkpoint(directory)
        assert torch.allclose(plain(x), x_hat[index].reshape(x.shape), atol=1e-5), member.member_id
        normalised = reconstruction_from_checkpoint(directory, normalization=(shift, scale))
        assert torch.allclose(normalised(x * scale + shift), x_hat[index].reshape(x.shape) * scale + shift, atol=1e-4)
    with pytest.raises(ValueError, match="d_in=6"):
        plain(torch.randn(3, 7))


def test_evaluate_members_keys_results_by_member_id(bridge, tokens, tmp_path):
    member = Member("relu", 64, 32, l1=1e-3)
    ensemble = Ensemble([member], total_steps=1)
    params, moments = ensemble.member_state(0)
    directory = save_member(tmp_path / member.member_id, member, params, moments, info={"steps": 0, "tokens": 0})
    results = evaluate_members(bridge, tokens[:2], HOOK, [directory], progress=False)
    assert list(results) == [member.member_id]
    assert set(results[member.member_id]) >= {
        "ce_clean",
        "ce_zero_ablation",
        "ce_recon",
        "ce_recovered",
        "kl",
        "ce_loss_score",
        "kl_div_score",
    }
