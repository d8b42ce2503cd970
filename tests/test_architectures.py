"""Each architecture equals an nn.Module written from its paper's equations; members of mixed ensembles
equal members trained alone; extra tensors (thresholds, gate params) save, load and resume exactly."""

import csv

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sae_ensemble import architectures
from sae_ensemble.checkpoint import load_ensemble, save_member
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.member import Member
from sae_ensemble.plan import make_plan
from sae_ensemble.report import write_summary

D_IN = 24
STEPS = 50


def sparse_batches(n_batches: int, batch: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """Sparse mixtures of random directions (as tests/test_ensemble.py)."""
    g = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(40, D_IN, generator=g), dim=-1)
    return [
        (torch.rand(batch, 40, generator=g) < 0.08).float() * torch.rand(batch, 40, generator=g) @ features + 0.3
        for _ in range(n_batches)
    ]


# -- references from the papers' equations, sharing no code with architectures/ ----------------------


def unit_rows(W):
    return W / W.pow(2).sum(1, keepdim=True).sqrt()


def rectangle(u):
    return ((u > -0.5) & (u < 0.5)).float()


class JumpReLUReference(nn.Module):
    """Rajamanoharan et al. 2024 ("Jumping Ahead"), eqs. 4-12: the pseudo-derivatives written as
    straight-through surrogates (value of the step, gradient of the kernel) instead of autograd Functions."""

    def __init__(self, p, l0_coefficient, bandwidth, bias_decay):
        super().__init__()
        self.p = nn.ParameterDict({k: nn.Parameter(v.clone()) for k, v in p.items()})
        self.l0_coefficient, self.eps, self.bias_decay = l0_coefficient, bandwidth, bias_decay

    def forward(self, x):
        p, eps = self.p, self.eps
        pre = (x - p["b_dec"]) @ p["W_enc"].T + p["b_enc"]
        theta = p["log_threshold"].exp()
        H = (pre > theta).float()
        kernel = rectangle((pre - theta).detach() / eps)  # no gradient to pre through the kernel
        surrogate_jump = -(theta.detach() / eps) * kernel * theta  # d/dtheta = -(theta/eps) K
        surrogate_step = -(1 / eps) * kernel * theta  # d/dtheta = -(1/eps) K
        codes = pre * H + (surrogate_jump - surrogate_jump.detach())
        step = H + (surrogate_step - surrogate_step.detach())
        x_hat = codes @ unit_rows(p["W_dec"]) + p["b_dec"]
        mse = ((x_hat - x) ** 2).sum() / x.numel()
        return mse + self.l0_coefficient * step.sum() / x.shape[0] + self.bias_decay * p["b_enc"].norm()


class GatedReference(nn.Module):
    """Rajamanoharan et al. 2024 ("Gated SAEs"), eqs. 5-8, with unit-norm decoder rows."""

    def __init__(self, p, l1, bias_decay):
        super().__init__()
        self.p = nn.ParameterDict({k: nn.Parameter(v.clone()) for k, v in p.items()})
        self.l1, self.bias_decay = l1, bias_decay

    def forward(self, x):
        p = self.p
        centred = x - p["b_dec"]
        pi_gate = centred @ p["W_enc"].T + p["b_gate"]
        W_mag = p["W_enc"] * torch.exp(p["r_mag"])[:, None]
        pi_mag = centred @ W_mag.T + p["b_mag"]
        f = (pi_gate > 0).float() * torch.clamp(pi_mag, min=0)
        D = unit_rows(p["W_dec"])
        recon = ((f @ D + p["b_dec"] - x) ** 2).sum() / x.numel()
        gate = torch.clamp(pi_gate, min=0)
        sparsity = self.l1 * gate.sum() / x.shape[0]
        aux = ((gate @ D.detach() + p["b_dec"].detach() - x) ** 2).sum() / x.numel()
        return recon + sparsity + aux + self.bias_decay * p["b_gate"].norm()


def auxk_reference(pre, residual, D, dead, k_aux, coefficient):
    """Gao et al. 2024 AuxK, looping over rows: the k_aux largest dead pre-activations (as they are, as in
    SAELens) reconstruct the residual; scaled by min(n_dead / k_aux, 1) as SAELens."""
    dead_index = dead.nonzero().flatten()
    k = min(k_aux, len(dead_index))
    rows = []
    for b in range(pre.shape[0]):
        top = pre[b, dead_index].topk(k)
        rows.append(top.values @ D[dead_index[top.indices]])
    recon = torch.stack(rows)
    return coefficient * min(len(dead_index) / k_aux, 1.0) * ((recon - residual.detach()) ** 2).sum() / residual.numel()


class MatryoshkaReference(nn.Module):
    """BatchTopK (Bussmann et al. 2024): the k*B largest ReLU activations of the batch; Matryoshka: one
    reconstruction loss per prefix width (the last is the whole dictionary); AuxK when `dead` is given."""

    def __init__(self, p, k, widths, bias_decay, dead=None, k_aux=0, auxk_coefficient=0.0):
        super().__init__()
        self.p = nn.ParameterDict({k_: nn.Parameter(v.clone()) for k_, v in p.items() if k_ != "threshold"})
        self.k, self.widths, self.bias_decay = k, widths, bias_decay
        self.dead, self.k_aux, self.auxk_coefficient = dead, k_aux, auxk_coefficient

    def forward(self, x):
        p = self.p
        pre = (x - p["b_dec"]) @ p["W_enc"].T + p["b_enc"]
        flat = torch.clamp(pre, min=0).flatten()
        top = flat.topk(self.k * x.shape[0])
        codes = torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(pre)
        D = unit_rows(p["W_dec"])
        loss = sum(((codes[:, :w] @ D[:w] + p["b_dec"] - x) ** 2).sum() / x.numel() for w in self.widths)
        if self.dead is not None:
            loss = loss + auxk_reference(
                pre, x - (codes @ D + p["b_dec"]), D, self.dead, self.k_aux, self.auxk_coefficient
            )
        return loss + self.bias_decay * p["b_enc"].norm()


class TopKAuxKReference(nn.Module):
    """TopK (Gao et al. 2024): the k largest pre-activations per row, ReLU'd; plus AuxK over `dead`."""

    def __init__(self, p, k, dead, k_aux, auxk_coefficient):
        super().__init__()
        self.p = nn.ParameterDict({k_: nn.Parameter(v.clone()) for k_, v in p.items()})
        self.k, self.dead, self.k_aux, self.auxk_coefficient = k, dead, k_aux, auxk_coefficient

    def forward(self, x):
        p = self.p
        pre = (x - p["b_dec"]) @ p["W_enc"].T + p["b_enc"]
        top = pre.topk(self.k, dim=1)
        codes = torch.zeros_like(pre).scatter(1, top.indices, torch.clamp(top.values, min=0))
        D = unit_rows(p["W_dec"])
        x_hat = codes @ D + p["b_dec"]
        return ((x_hat - x) ** 2).sum() / x.numel() + auxk_reference(
            pre, x - x_hat, D, self.dead, self.k_aux, self.auxk_coefficient
        )


def perturbed(member, scale=0.1):
    torch.manual_seed(0)
    return {k: v + scale * torch.randn_like(v) if v.dim() else v for k, v in architectures.init_params(member).items()}


DEAD_MANY = (torch.arange(24) % 3 == 1).float() * (torch.arange(24) < 27)
DEAD_FEW = torch.zeros(24).index_fill_(0, torch.tensor([2, 11, 20]), 1.0)
CASES = {
    "jumprelu": (
        Member("jumprelu", 16, 24, l0_coefficient=0.02, threshold=0.3, bandwidth=0.2, bias_decay=0.3),
        lambda m, p: JumpReLUReference(p, 0.02, 0.2, 0.3),
    ),
    "gated": (Member("gated", 16, 24, l1=0.02, bias_decay=0.3), lambda m, p: GatedReference(p, 0.02, 0.3)),
    "batchtopk": (Member("batchtopk", 16, 24, k=5, bias_decay=0.3), lambda m, p: MatryoshkaReference(p, 5, [24], 0.3)),
    "matryoshka": (
        Member("matryoshka", 16, 24, k=5, bias_decay=0.3, matryoshka_widths=(4, 10)),
        lambda m, p: MatryoshkaReference(p, 5, [4, 10, 24], 0.3),
    ),
    # AuxK: 9 dead features and k_aux 6, then 3 dead features (fewer than k_aux: the scale and the -inf ranks)
    "topk+auxk": (
        Member("topk", 16, 24, k=3, auxk_dead_tokens=100, k_aux=6, auxk_coefficient=0.5),
        lambda m, p: TopKAuxKReference(p, 3, DEAD_MANY, 6, 0.5),
    ),
    "topk+auxk few dead": (
        Member("topk", 16, 24, k=3, auxk_dead_tokens=100, k_aux=6, auxk_coefficient=0.5),
        lambda m, p: TopKAuxKReference(p, 3, DEAD_FEW, 6, 0.5),
    ),
    "matryoshka+auxk": (
        Member("matryoshka", 16, 24, k=5, matryoshka_widths=(4,), auxk_dead_tokens=100),
        lambda m, p: MatryoshkaReference(p, 5, [4, 24], 0.0, DEAD_MANY, 8, 1 / 32),
    ),
}


@pytest.mark.parametrize("variant", list(CASES))
def test_loss_and_gradients_match_reference_module(variant):
    member, make_reference = CASES[variant]
    module = architectures.module_of(member.variant)
    params = perturbed(member)
    hp = architectures.make_hparams(member)
    if "auxk" in variant:  # the ensemble sets the dead features each step; here the reference's
        hp["dead"] = make_reference(member, params).dead
    x = torch.randn(32, 16) * 0.5
    grads, aux = torch.func.grad(module.loss, has_aux=True)(params, hp, x, module.layout([member]))

    reference = make_reference(member, params)
    ref_loss = reference(x)
    ref_loss.backward()
    torch.testing.assert_close(aux["loss"], ref_loss.detach(), rtol=1e-5, atol=1e-6)
    for name, param in reference.p.items():
        ref_grad = torch.zeros_like(param) if param.grad is None else param.grad
        torch.testing.assert_close(grads[name], ref_grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
    if variant == "jumprelu":  # the estimator really reaches the thresholds on this batch
        assert grads["log_threshold"].abs().sum() > 0


# -- mixed ensembles ---------------------------------------------------------------------------------

MIXED = {
    "batchtopk": [
        Member("batchtopk", D_IN, 48, k=4, seed=0, lr_warmup_steps=10),
        Member("matryoshka", D_IN, 64, k=3, seed=1, matryoshka_widths=(8, 24), bias_decay=0.05),
        Member("batchtopk", D_IN, 32, k=6, seed=2, topk_threshold_lr=0.05, use_b_dec=False),
        Member("matryoshka", D_IN, 48, k=5, seed=3, matryoshka_widths=(12,), lr=2e-3),
        Member("batchtopk", D_IN, 64, k=2, seed=4, auxk_dead_tokens=128, k_aux=10),
        Member("batchtopk", D_IN, 48, k=4, seed=5, learned_decoder_norm=True, auxk_dead_tokens=128, k_aux=10),
        Member("matryoshka", D_IN, 48, k=3, seed=6, matryoshka_widths=(12,), learned_decoder_norm=True),
    ],
    "sae": [  # AuxK members mix with the others of sae.py (on the reference execution)
        Member("topk", D_IN, 64, k=2, seed=0, auxk_dead_tokens=128),
        Member("topk", D_IN, 48, k=4, seed=1, auxk_dead_tokens=256, k_aux=5, auxk_coefficient=0.1),
        Member("relu", D_IN, 32, l1=1e-3, seed=2),
        Member("relu", D_IN, 48, l1=3e-2, seed=3, resample_every=10),  # resamples at steps 10, 20, ...
        Member("tied", D_IN, 32, l1=3e-2, seed=4, resample_every=8),
    ],
    "jumprelu": [
        Member("jumprelu", D_IN, 48, l0_coefficient=1e-3, threshold=0.05, bandwidth=0.1, seed=0),
        Member("jumprelu", D_IN, 32, l0_coefficient=1e-2, threshold=0.1, bandwidth=0.05, seed=1, l1_warmup_steps=20),
        Member(
            "jumprelu",
            D_IN,
            64,
            l0_coefficient=3e-3,
            threshold=0.02,
            bandwidth=0.2,
            seed=2,
            bias_decay=0.1,
            lr_decay_steps=15,
        ),
    ],
    "gated": [
        Member("gated", D_IN, 48, l1=1e-3, seed=0),
        Member("gated", D_IN, 32, l1=1e-2, seed=1, bias_decay=0.05, use_b_dec=False),
    ],
}
CASES_MIXED = [(family, i) for family, members in MIXED.items() for i in range(len(members))]


def train(members, batches, total_steps=STEPS):
    ensemble = Ensemble(members, total_steps=total_steps)
    for batch in batches:
        ensemble.step(batch)
    return ensemble


@pytest.fixture(scope="module")
def mixed_runs():
    return {family: train(members, sparse_batches(STEPS)) for family, members in MIXED.items()}


@pytest.mark.parametrize("family,index", CASES_MIXED, ids=[MIXED[f][i].member_id for f, i in CASES_MIXED])
def test_member_in_mixed_ensemble_matches_solo_training(mixed_runs, family, index):
    member = MIXED[family][index]
    solo = train([member], sparse_batches(STEPS))
    mixed_params, mixed_moments = mixed_runs[family].member_state(index)
    solo_params, solo_moments = solo.member_state(0)
    assert set(mixed_params) == set(architectures.module_of(member.variant).PARAMS) - {"W_skip"}  # SAEs have none
    for name in solo_params:
        torch.testing.assert_close(mixed_params[name], solo_params[name], atol=1e-5, rtol=0, msg=name)
    for name in solo_moments:
        torch.testing.assert_close(mixed_moments[name], solo_moments[name], atol=1e-5, rtol=1e-4, msg=name)
    init = architectures.init_params(member)
    assert (solo_params["W_enc"] - init["W_enc"]).abs().max() > 1e-3  # it really trained
    if member.variant in ("batchtopk", "matryoshka"):
        assert solo_params["threshold"] > 0  # the running threshold was estimated
    if member.variant == "jumprelu":
        assert (solo_params["log_threshold"] - init["log_threshold"]).abs().max() > 1e-4  # the thresholds learned


def test_a_learned_norm_batchtopk_member_is_saelens_batchtopk():
    """Member.learned_decoder_norm on BatchTopK (SAELens' default, rescale_acts_by_decoder_norm): activations scaled by
    the decoder rows' norms s, the batch's k * B largest kept, decoded by the rows' directions W_dec / s; the loss and
    its gradients (W_dec's through s too) equal that formula written out."""
    from sae_ensemble.architectures import batchtopk

    member = Member("batchtopk", 16, 24, k=3, seed=0, learned_decoder_norm=True)
    generator = torch.Generator().manual_seed(1)
    params = architectures.init_params(member)
    params["W_dec"] = params["W_dec"] * (0.5 + torch.rand(24, 1, generator=generator))
    params["b_enc"], params["b_dec"] = (
        0.1 * torch.randn(24, generator=generator),
        0.1 * torch.randn(16, generator=generator),
    )
    hp, layout = architectures.make_hparams(member), architectures.layout([member])
    x = torch.randn(32, 16, generator=generator)

    def saelens(p):
        norms = p["W_dec"].norm(dim=-1)
        acts = F.relu((x - p["b_dec"]) @ p["W_enc"].T + p["b_enc"]) * norms
        kept = torch.zeros(acts.numel()).scatter(0, acts.flatten().topk(3 * 32).indices, 1.0).view_as(acts)
        return ((acts * kept) @ (p["W_dec"] / norms.unsqueeze(-1)) + p["b_dec"] - x).pow(2).mean()

    want = torch.func.grad_and_value(saelens)(params)
    got = torch.func.grad_and_value(lambda p: batchtopk.loss(p, hp, x, layout)[0])(params)
    torch.testing.assert_close(got[1], want[1])
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(got[0][name], want[0][name], msg=name)
    assert (want[0]["W_dec"] * params["W_dec"]).sum(-1).abs().max() > 1e-6  # the norms' own gradient is in play


def test_learned_norm_batchtopk_members_save_unit_rows_that_encode_as_they_trained(mixed_runs):
    ensemble = mixed_runs["batchtopk"]
    index = next(i for i, m in enumerate(MIXED["batchtopk"]) if m.learned_decoder_norm)
    member, x = MIXED["batchtopk"][index], sparse_batches(1, seed=9)[0]
    raw, saved = ensemble.member_state(index)[0], ensemble.member_state(index, folded=True)[0]
    assert (raw["W_dec"].norm(dim=-1) - 1).abs().max() > 1e-3  # the norms were learned
    torch.testing.assert_close(saved["W_dec"].norm(dim=-1), torch.ones(member.dict_size))
    hp, layout = architectures.make_hparams(member), architectures.layout([member])
    module = architectures.module_of(member.variant)
    torch.testing.assert_close(module.encode(saved, hp, x, layout), module.encode(raw, hp, x, layout))


def test_batchtopk_threshold_encodes_one_row_as_in_a_batch(mixed_runs):
    """After training, inference uses the saved threshold: a row's codes do not depend on its batch."""
    ensemble = mixed_runs["batchtopk"]
    x = sparse_batches(1, seed=9)[0]
    codes, _ = ensemble.forward(x)
    for row in (0, 7):
        alone, _ = ensemble.forward(x[row : row + 1])
        torch.testing.assert_close(alone[:, 0], codes[:, row], atol=1e-6, rtol=0)
    threshold = ensemble.params["threshold"].view(-1, 1, 1)  # [M]: every code is 0 or above its member's threshold
    assert (threshold > 0).all() and ((codes == 0) | (codes > threshold)).all()
    assert ((codes > 0) & (codes < 2 * threshold)).any()  # and the threshold is where codes are, not below them all


@pytest.mark.parametrize("family", list(MIXED))
def test_resume_from_checkpoint_equals_uninterrupted_training(tmp_path, family):
    members, batches = MIXED[family], sparse_batches(30, seed=4)
    whole = train(members, batches, total_steps=30)
    first = train(members, batches[:12], total_steps=30)
    directories = []
    for i, member in enumerate(members):
        params, moments = first.member_state(i)
        directories.append(
            save_member(
                tmp_path / member.member_id,
                member,
                params,
                moments,
                {"steps": first.step_count, "tokens": first.rows_seen},
            )
        )
    resumed = load_ensemble(directories, total_steps=30)
    for batch in batches[12:]:
        resumed.step(batch)
    for i, member in enumerate(members):  # member_state: a tied member's saved W_dec is its normalised encoder
        (resumed_params, resumed_moments), (whole_params, whole_moments) = (
            resumed.member_state(i),
            whole.member_state(i),
        )
        for name, value in {**whole_params, **whole_moments}.items():
            torch.testing.assert_close(
                {**resumed_params, **resumed_moments}[name], value, atol=1e-6, rtol=0, msg=f"{member.member_id} {name}"
            )


# -- the one grouping rule, and the kernels' reach ---------------------------------------------------


def test_plan_puts_each_family_in_its_own_ensembles():
    members = [
        Member("relu", D_IN, 48),
        Member("topk", D_IN, 48, k=4),
        Member("batchtopk", D_IN, 48, k=4),
        Member("matryoshka", D_IN, 48, k=4, matryoshka_widths=(8,)),
        Member("jumprelu", D_IN, 48),
        Member("gated", D_IN, 48),
    ]
    plan = make_plan(members, ["cpu"], batch_size=64, budget=2**30)
    groups = sorted(sorted(m.split("-")[0] for m in e.members) for e in plan.ensembles)
    assert groups == [["batchtopk", "matryoshka"], ["gated"], ["jumprelu"], ["relu", "topk"]]


def test_ensemble_refuses_members_of_different_families():
    with pytest.raises(ValueError, match=r"variants \['gated', 'relu'\] cannot share an ensemble"):
        Ensemble([Member("relu", D_IN, 8), Member("gated", D_IN, 8)], 1)


@pytest.mark.parametrize("execution", ["fused", "sparse"])
def test_kernels_refuse_architectures_they_do_not_implement(execution):
    with pytest.raises(
        ValueError,
        match=rf"execution={execution} implements relu, tied, topk( without AuxK)? only; variants \['jumprelu'\]",
    ):
        Ensemble([Member("jumprelu", D_IN, 8)], 1, execution=execution)


def test_auto_execution_runs_the_reference_for_architectures_the_kernels_do_not_implement():
    ensemble = Ensemble([Member("batchtopk", D_IN, 16, k=2)], 3, execution="auto")
    ensemble.step(sparse_batches(1)[0])
    assert ensemble.choice == "reference" and not ensemble.autotune_report


def test_existing_member_ids_do_not_change_and_new_ones_name_their_hyperparameters():
    assert Member("relu", 8, 32, l1=1e-3, bias_decay=0.05).member_id == "relu-d32-l1_0.001-bd0.05-lr0.001-s0"
    assert Member("topk", 8, 32, k=4).member_id == "topk-d32-k4-bd0-lr0.001-s0"
    assert (
        Member("jumprelu", 8, 32, l0_coefficient=1e-3).member_id == "jumprelu-d32-l0c0.001-th0.01-bw0.05-bd0-lr0.001-s0"
    )
    assert (
        Member("matryoshka", 8, 32, k=4, matryoshka_widths=(4, 16)).member_id
        == "matryoshka-d32-k4-w4_16-bd0-lr0.001-s0"
    )
    assert Member("gated", 8, 32, l1=1e-2).member_id == "gated-d32-l1_0.01-bd0-lr0.001-s0"
    assert Member("topk", 8, 32, k=4, encoder_init_norm=0.1).member_id == "topk-d32-k4-ein0.1-bd0-lr0.001-s0"
    assert Member("relu", 8, 32, hook="blocks.1.hook_resid_post").member_id.startswith("blocks.1.hook_resid_post-relu-")


@pytest.mark.parametrize("variant", ["relu", "tied", "topk", "batchtopk", "jumprelu", "gated", "matryoshka"])
def test_every_architecture_starts_its_encoder_rows_at_encoder_init_norm_along_the_decoder(variant):
    extra = {"k": 4} if variant in ("topk", "batchtopk", "matryoshka") else {}
    extra.update({"matryoshka_widths": (8,)} if variant == "matryoshka" else {})
    default = architectures.init_params(Member(variant, D_IN, 16, **extra))
    scaled = architectures.init_params(Member(variant, D_IN, 16, encoder_init_norm=0.25, **extra))
    torch.testing.assert_close(scaled["W_enc"].norm(dim=-1), torch.full((16,), 0.25))
    torch.testing.assert_close(scaled["W_enc"], 0.25 * default["W_enc"])
    for name in default.keys() - {"W_enc"}:
        assert torch.equal(scaled[name], default[name]), name
    with pytest.raises(ValueError, match="encoder_init_norm=0 must be positive"):
        Member(variant, D_IN, 16, encoder_init_norm=0, **extra)


def test_summary_csv_carries_each_members_architecture_hyperparameters(tmp_path):
    members = [
        Member("jumprelu", D_IN, 16, l0_coefficient=3e-4, threshold=0.05, bandwidth=0.1),
        Member("matryoshka", D_IN, 16, k=2, matryoshka_widths=(4, 8), auxk_dead_tokens=640),
        Member("relu", D_IN, 16, l1=1e-3, resample_every=100),
    ]
    for member in members:
        params = architectures.init_params(member)
        save_member(
            tmp_path / "members" / member.member_id,
            member,
            params,
            None,
            {"steps": 1, "tokens": 1, "metrics": {"fvu": 0.5}},
        )
    with open(write_summary(tmp_path), newline="") as f:
        rows = {row["variant"]: row for row in csv.DictReader(f)}
    assert (rows["jumprelu"]["l0_coefficient"], rows["jumprelu"]["threshold"], rows["jumprelu"]["bandwidth"]) == (
        "0.0003",
        "0.05",
        "0.1",
    )
    assert (
        rows["matryoshka"]["k"],
        rows["matryoshka"]["matryoshka_widths"],
        rows["matryoshka"]["auxk_dead_tokens"],
    ) == ("2", "[4, 8]", "640")
    assert rows["matryoshka"]["auxk_coefficient"] == "0.03125" and rows["relu"]["resample_every"] == "100"
