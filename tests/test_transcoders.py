"""Transcoders and skip transcoders (Member.d_out, skip_connection) on the reference step: the loss is the plain
formula, a member trained in an ensemble equals it trained alone, and training recovers a known sparse map."""

import pytest
import torch
import torch.nn.functional as F

from sae_ensemble import sae
from sae_ensemble.checkpoint import load_member, save_member
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.member import Member
from sae_ensemble.metrics import heldout_metrics, mmcs

D_IN, D_OUT, N_FEATURES = 64, 48, 32
NOISE = 0.5  # dense noise in x (the skip path's data): see paired_batches


def paired_batches(n_batches: int, batch: int = 128, skip: torch.Tensor | None = None, seed: int = 0):
    """[x | y] rows: a few of N_FEATURES sparse features read through one dictionary in, another out (y = c F_out),
    and the two dictionaries. With `skip`, x also holds dense noise and y = c F_out + x @ skip.T: without a part of
    x that no sparse feature explains, the skip would not be identifiable (c F_in skip.T could as well be the
    decoder's, F_out + F_in skip.T)."""
    g = torch.Generator().manual_seed(seed)
    f_in = F.normalize(torch.randn(N_FEATURES, D_IN, generator=g), dim=-1)
    f_out = F.normalize(torch.randn(N_FEATURES, D_OUT, generator=g), dim=-1)
    batches = []
    for _ in range(n_batches):
        codes = (torch.rand(batch, N_FEATURES, generator=g) < 3 / N_FEATURES).float()
        codes = codes * (1 + torch.rand(batch, N_FEATURES, generator=g))
        x, y = codes @ f_in, codes @ f_out
        if skip is not None:
            x = x + NOISE * torch.randn(batch, D_IN, generator=g)
            y = y + x @ skip.T
        batches.append(torch.cat([x, y], dim=1))
    return batches, f_in, f_out


def train(members, batches, steps=None):
    ensemble = Ensemble(members, steps or len(batches), execution="reference")
    for batch in batches:
        ensemble.step(batch)
    return ensemble


def test_the_loss_is_the_plain_formula_with_and_without_the_skip_path():
    batch = paired_batches(1)[0][0]
    x, y = batch[:, :D_IN], batch[:, D_IN:]
    for member in (Member("relu", D_IN, 24, l1=3e-3, d_out=D_OUT), Member("topk", D_IN, 24, k=3, d_out=D_OUT)):
        for skip in (False, True):
            member = Member(**{**member.to_dict(), "skip_connection": skip})
            params = sae.init_params(member.variant, D_IN, 24, 0, d_out=D_OUT, skip_connection=skip)
            params["b_dec"] = torch.randn(D_OUT)
            params["b_enc"] = torch.randn(24) * 0.1
            if skip:
                params["W_skip"] = torch.randn(D_OUT, D_IN) * 0.1
            hp = sae.make_hparams(member.variant, 24, l1=member.l1, k=member.k, d_in=D_IN)
            total, aux = sae.loss(params, hp, batch, sae.layout([member]))
            codes = F.relu(x @ params["W_enc"].T + params["b_enc"])  # no input centring
            if member.variant == "topk":
                codes = codes * torch.zeros_like(codes).scatter(1, codes.topk(3, dim=1).indices, 1.0)
            y_hat = codes @ F.normalize(params["W_dec"], dim=-1) + params["b_dec"]
            if skip:
                y_hat = y_hat + x @ params["W_skip"].T
            mse = (y_hat - y).pow(2).mean()
            torch.testing.assert_close(aux["mse"], mse)
            torch.testing.assert_close(total, mse + hp["l1"] * codes.sum() / x.shape[0])


def test_a_transcoder_in_a_mixed_ensemble_equals_it_trained_alone():
    batches = paired_batches(50)[0]
    mixed = [
        Member("relu", D_IN, 48, l1=1e-3, d_out=D_OUT, seed=0),
        Member("topk", D_IN, 32, k=4, d_out=D_OUT, seed=1, lr=3e-3),
        Member("relu", D_IN, 32, l1=3e-3, d_out=D_OUT, seed=2, bias_decay=0.05),
    ]
    together = train(mixed, batches)
    for index, member in enumerate(mixed):
        alone = train([member], batches).member_state(0)[0]
        params = together.member_state(index)[0]
        for name in alone:
            torch.testing.assert_close(params[name], alone[name], atol=1e-5, rtol=0, msg=name)
    skips = [Member("relu", D_IN, 32, l1=1e-3, d_out=D_OUT, skip_connection=True, seed=s) for s in (0, 1)]
    together = train(skips, batches)
    alone = train(skips[1:], batches).member_state(0)[0]
    for name, value in together.member_state(1)[0].items():
        torch.testing.assert_close(value, alone[name], atol=1e-5, rtol=0, msg=name)


def test_training_recovers_the_output_dictionary(tmp_path):
    batches, f_in, f_out = paired_batches(2008)
    batches, heldout = batches[:2000], torch.cat(batches[2000:])  # the same features, rows never trained on
    members = [
        Member("topk", D_IN, 2 * N_FEATURES, k=6, d_out=D_OUT, lr=3e-3),  # ~3 active, rarely more than 6
        Member("relu", D_IN, 2 * N_FEATURES, l1=3e-3, d_out=D_OUT, lr=3e-3),
    ]
    ensemble = train(members, batches)
    result = heldout_metrics(heldout, ensemble.forward, ensemble.hparams["feature_mask"], 512, D_IN)
    assert (result["fvu"] < 0.05).all(), result["fvu"]
    for index, member in enumerate(members):
        params, _ = ensemble.member_state(index)
        # each true output feature's best latent, as mmcs_truth. (The encoder is not scored here: the data span
        # N_FEATURES of D_IN input directions, and the encoder's random start in the rest never moves.)
        assert mmcs(f_out, params["W_dec"]) > 0.95, member


def test_a_skip_transcoder_learns_the_true_skip_path_and_saves_it(tmp_path):
    skip = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(1)) * 0.2
    member = Member("relu", D_IN, 2 * N_FEATURES, l1=3e-3, d_out=D_OUT, skip_connection=True, lr=3e-3)
    params, _ = train([member], paired_batches(2000, skip=skip)[0]).member_state(0)
    # From W_skip = 0 (relative error 1) to within 15% in 2000 steps; the 5% is for the paired
    # synthetic store's longer training.
    assert (params["W_skip"] - skip).norm() / skip.norm() < 0.15
    save_member(tmp_path / member.member_id, member, params, None, {"steps": 1, "tokens": 1})
    loaded, loaded_params, _, _ = load_member(tmp_path / member.member_id)
    assert loaded == member and torch.equal(loaded_params["W_skip"], params["W_skip"])


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"variant": "tied", "d_out": D_IN}, "variant=tied cannot be a transcoder"),
        ({"variant": "gated", "d_out": D_OUT}, "variant=gated cannot be a transcoder"),
        ({"variant": "relu", "skip_connection": True}, "skip_connection=True is for transcoders only"),
        ({"variant": "relu", "d_out": D_OUT, "resample_every": 10}, "transcoders have none"),
    ],
)
def test_a_member_that_cannot_be_a_transcoder_is_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        Member(d_in=D_IN, dict_size=16, **fields)


def test_a_mix_of_saes_and_transcoders_in_one_ensemble_is_refused():
    member = Member("relu", D_IN, 16, d_out=D_OUT)
    with pytest.raises(ValueError, match="all be SAEs or all transcoders"):
        Ensemble([member, Member("relu", D_IN, 16, seed=1)], 1)


# -- a sweep on a paired synthetic store (data.d_out > 0) ---------------------------------------------------

PAIRED = [
    "data.d_in=32",
    "data.d_out=24",
    "data.n_features=48",
    "data.n_active=3",
    "data.n_rows=60000",
    "data.rows_per_chunk=10000",
    "data.heldout_rows=4000",
    "grid.variants=[relu,topk]",
    "grid.dict_ratios=[]",
    "grid.dict_sizes=[96]",
    "grid.k=[6]",
    "grid.l1=[1e-3]",
    "training.steps=1500",
    "training.execution=auto",
    "devices=cpu",
]


def paired_sweep(tmp_path, *overrides: str) -> int:
    from sae_ensemble import pipeline
    from tests.sweeps import compose_config

    cfg = compose_config(*PAIRED, *overrides, f"data.store_root={tmp_path / 'stores'}", "progress=false")
    return pipeline.run(cfg, tmp_path / "run")


def test_a_sweep_on_a_paired_store_trains_transcoders_scored_against_both_dictionaries(tmp_path):
    import csv

    from sae_ensemble.activations.reader import ActivationStore

    assert paired_sweep(tmp_path, "grid.skip_connection=[false,true]", "data.noise_std=0.1", "wandb=disabled") == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "summary.csv")))
    assert len(rows) == 4 and {(r["variant"], r["skip_connection"]) for r in rows} == {
        (v, s) for v in ("relu", "topk") for s in ("False", "True")
    }
    for r in rows:
        assert r["d_out"] == "24" and r["d_in"] == "32" and "tc24" in r["member_id"], r
        assert float(r["fvu"]) < 0.2 and float(r["mmcs_truth"]) > 0.9 and float(r["mmcs_truth_in"]) > 0.8, r
    (manifest,) = (tmp_path / "stores").glob("synthetic-*/manifest.json")
    store = ActivationStore.open(manifest.parent)
    assert (store.d_in, store.target_at) == (56, 32) and store.ground_truth().shape == (48, 24)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.d_out=0", "grid.skip_connection=[true]"], "grid.skip_connection=[True] is for transcoders"),
        (["training.normalize=center"], "training.normalize=center is for SAEs"),
    ],
)
def test_a_transcoder_setting_without_a_paired_store_is_one_line_exit_2(tmp_path, capsys, overrides, message):
    assert paired_sweep(tmp_path, *overrides, "wandb=disabled", "plan_only=true") == 2
    [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert message in error, error
