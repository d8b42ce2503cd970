"""BatchTopK, Matryoshka and JumpReLU transcoders (Member.d_out > 0, with and without skip_connection) on the
reference step: the loss is the plain formula, a member trained in a mixed ensemble equals it trained alone, and
training recovers a known sparse map. Gated and tied members cannot be transcoders."""

import pytest
import torch
import torch.nn.functional as F

from sae_ensemble import architectures
from sae_ensemble.checkpoint import load_member, save_member
from sae_ensemble.member import Member
from sae_ensemble.metrics import heldout_metrics, mmcs
from tests.test_transcoders import D_IN, D_OUT, N_FEATURES, paired_batches, train

N = 24  # features of the loss-formula members
WIDTHS = (8, 16)  # matryoshka levels below N


def transcoder(variant: str, skip: bool = False, **fields) -> Member:
    sparsity = {"l0_coefficient": 2e-3, "threshold": 0.05} if variant == "jumprelu" else {"k": 3}
    widths = {"matryoshka_widths": WIDTHS} if variant == "matryoshka" else {}
    return Member(variant, D_IN, N, d_out=D_OUT, skip_connection=skip, bias_decay=0.05, **sparsity, **widths, **fields)


def perturbed_params(member: Member) -> dict[str, torch.Tensor]:
    """The member's init with non-zero biases and skip path, so every term of the formula matters."""
    g = torch.Generator().manual_seed(5)
    params = architectures.init_params(member)
    params["b_enc"] = 0.1 * torch.randn(N, generator=g)
    params["b_dec"] = torch.randn(D_OUT, generator=g)
    if member.skip_connection:
        params["W_skip"] = 0.1 * torch.randn(D_OUT, D_IN, generator=g)
    return params


def plain_loss(member: Member, params, hp, x, y):
    """The transcoder's loss written out (no code shared with architectures/): codes of W_enc x + b_enc, without
    input centring; y_hat = c D + b_dec (+ x W_skip^T); one error term per nested prefix (one for batchtopk)."""
    pre = x @ params["W_enc"].T + params["b_enc"]
    if member.variant == "jumprelu":
        theta = params["log_threshold"].exp()
        codes = pre * (pre > theta).float()
        sparsity = member.l0_coefficient * (pre > theta).float().sum() / x.shape[0]
    else:  # the k * B largest ReLU activations of the whole batch
        acts = F.relu(pre).flatten()
        kept = torch.zeros_like(acts).scatter(0, acts.topk(member.k * x.shape[0]).indices, 1.0)
        codes, sparsity = (acts * kept).view_as(pre), 0.0
    D = params["W_dec"] / params["W_dec"].norm(dim=1, keepdim=True)
    base = params["b_dec"] + (x @ params["W_skip"].T if member.skip_connection else 0.0)
    ends = [*member.matryoshka_widths, N]
    error = sum(((codes[:, :end] @ D[:end] + base - y) ** 2).mean() for end in ends)
    y_hat = codes @ D + base
    return error + sparsity + member.bias_decay * params["b_enc"].norm(), codes, y_hat


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("variant", ["batchtopk", "matryoshka", "jumprelu"])
def test_the_loss_is_the_plain_formula(variant, skip):
    batch = paired_batches(1)[0][0]
    x, y = batch[:, :D_IN], batch[:, D_IN:]
    member = transcoder(variant, skip)
    module = architectures.module_of(variant)
    params, hp = perturbed_params(member), architectures.make_hparams(member)
    total, aux = module.loss(params, hp, batch, module.layout([member]))
    expected, codes, y_hat = plain_loss(member, params, hp, x, y)
    assert codes.count_nonzero() > 0
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(aux["mse"], ((y_hat - y) ** 2).mean())  # the whole dictionary's error
    torch.testing.assert_close(aux["l0"], codes.count_nonzero() / x.shape[0])


def test_batchtopk_auxk_reconstructs_the_targets_residual():
    batch = paired_batches(1)[0][0]
    x, y = batch[:, :D_IN], batch[:, D_IN:]
    member = transcoder("batchtopk", auxk_dead_tokens=1, k_aux=4, auxk_coefficient=0.5)
    module = architectures.module_of("batchtopk")
    params, hp = perturbed_params(member), architectures.make_hparams(member)
    dead = torch.zeros(N)
    dead[::3] = 1.0  # 8 dead features, more than k_aux
    hp["dead"] = dead
    total, _ = module.loss(params, hp, batch, module.layout([member]))
    expected, _, y_hat = plain_loss(member, params, hp, x, y)
    pre = x @ params["W_enc"].T + params["b_enc"]
    top = torch.where(dead > 0, pre, -torch.inf).topk(4, dim=1)
    aux_codes = torch.zeros_like(pre).scatter(1, top.indices, top.values)  # unrectified, as SAELens
    D = params["W_dec"] / params["W_dec"].norm(dim=1, keepdim=True)
    auxk = ((aux_codes @ D - (y - y_hat)) ** 2).mean()  # min(n_dead / k_aux, 1) = 1
    torch.testing.assert_close(total, expected + 0.5 * auxk)


MIXED = {
    "batchtopk": [
        Member("batchtopk", D_IN, 48, k=4, d_out=D_OUT, seed=0),
        Member("batchtopk", D_IN, 32, k=2, d_out=D_OUT, seed=1, lr=3e-3, auxk_dead_tokens=256, k_aux=8),
        Member("matryoshka", D_IN, 40, k=3, d_out=D_OUT, seed=2, matryoshka_widths=(8, 20), bias_decay=0.05),
    ],
    "jumprelu": [
        Member("jumprelu", D_IN, 48, l0_coefficient=1e-3, threshold=0.05, d_out=D_OUT, seed=0),
        Member("jumprelu", D_IN, 32, l0_coefficient=3e-3, threshold=0.02, d_out=D_OUT, seed=1, lr=3e-3),
        Member("jumprelu", D_IN, 40, l0_coefficient=1e-3, bandwidth=0.1, d_out=D_OUT, seed=2, bias_decay=0.05),
    ],
}


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("family", list(MIXED))
def test_a_transcoder_in_a_mixed_ensemble_equals_it_trained_alone(family, skip):
    skip_w = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(1)) * 0.2 if skip else None
    batches = paired_batches(50, skip=skip_w)[0]
    members = [Member(**{**m.to_dict(), "skip_connection": skip}) for m in MIXED[family]]
    together = train(members, batches)
    for index, member in enumerate(members):
        alone = train([member], batches).member_state(0)[0]
        params = together.member_state(index)[0]
        assert set(params) == set(alone) and ("W_skip" in params) == skip
        for name in alone:
            torch.testing.assert_close(params[name], alone[name], atol=1e-5, rtol=0, msg=f"{member.member_id} {name}")
        init = architectures.init_params(member)
        assert (alone["W_dec"] - init["W_dec"]).abs().max() > 1e-3, member.member_id  # it really trained
        if skip:
            assert alone["W_skip"].abs().max() > 1e-3, member.member_id
        if family == "batchtopk":
            assert alone["threshold"] > 0, member.member_id  # the inference threshold was estimated


STEPS = 500
RECOVERING = {  # ~3 of N_FEATURES active per row
    "batchtopk": [
        Member("batchtopk", D_IN, 2 * N_FEATURES, k=4, d_out=D_OUT, lr=3e-3),
        Member("matryoshka", D_IN, 2 * N_FEATURES, k=4, d_out=D_OUT, lr=1e-2, matryoshka_widths=(N_FEATURES,)),
    ],
    "jumprelu": [  # thresholds and bandwidth at the pre-activations' scale (features of magnitude 1 to 2)
        Member(
            "jumprelu", D_IN, 2 * N_FEATURES, l0_coefficient=1e-2, threshold=0.3, bandwidth=0.2, d_out=D_OUT, lr=1e-2
        )
    ],
}


@pytest.mark.parametrize("family", list(RECOVERING))
def test_training_recovers_the_output_dictionary(family, tmp_path):
    batches, _, f_out = paired_batches(STEPS + 8)
    batches, heldout = batches[:STEPS], torch.cat(batches[STEPS:])  # the same features, rows never trained on
    members = RECOVERING[family]
    ensemble = train(members, batches)
    # held out: batchtopk's codes by its inference threshold, one row at a time
    result = heldout_metrics(heldout, ensemble.forward, ensemble.hparams["feature_mask"], 512, D_IN)
    assert (result["fvu"] < 0.05).all() and (result["l0"] < 5).all(), result
    for index, member in enumerate(members):
        params, _ = ensemble.member_state(index)
        assert mmcs(f_out, params["W_dec"]) > 0.9, member  # each true output feature's best latent
        save_member(tmp_path / member.member_id, member, params, None, {"steps": 1, "tokens": 1})
        loaded, loaded_params, _, _ = load_member(tmp_path / member.member_id)
        assert loaded == member and all(torch.equal(loaded_params[name], params[name]) for name in params)


@pytest.mark.parametrize("variant", ["gated", "tied"])
def test_gated_and_tied_members_cannot_be_transcoders(variant):
    with pytest.raises(ValueError, match=f"variant={variant} cannot be a transcoder"):
        Member(variant, D_IN, 16, d_out=D_OUT)
