"""Ground-truth scores (truth_metrics.py) on dictionaries with known answers."""

import pytest
import torch
import torch.nn.functional as F

from sae_ensemble.truth_metrics import Absorption, Detection, best_matches, mcc, uniqueness

D, N_TRUE = 24, 16


def world(seed=0):
    g = torch.Generator().manual_seed(seed)
    truth = F.normalize(torch.randn(N_TRUE, D, generator=g), dim=-1)
    codes = (torch.rand(500, N_TRUE, generator=g) < 0.2) * torch.rand(500, N_TRUE, generator=g)
    return truth, codes


def test_the_true_dictionary_scores_one_in_any_order_and_sign_and_scale():
    truth, codes = world()
    order = torch.randperm(N_TRUE, generator=torch.Generator().manual_seed(1))
    decoder = truth[order] * torch.where(torch.arange(N_TRUE) % 2 == 0, 2.0, -0.5).unsqueeze(1)
    assert mcc(decoder, truth) == pytest.approx(1.0) and uniqueness(decoder, truth) == 1.0
    detection = Detection(decoder, truth)
    detection.add(codes[:, order], codes)  # each latent fires exactly when its true feature does
    assert detection.scores() == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_one_feature_removed_and_another_duplicated_loses_exactly_that():
    truth, _ = world()
    decoder = torch.cat([truth[:-1], truth[:1]])  # feature F-1 gone, feature 0 twice
    assert uniqueness(decoder, truth) == pytest.approx((N_TRUE - 1) / N_TRUE)
    # MCC: the duplicate is matched one-to-one to the missing feature, at that pair's |cosine|
    leftover = float((F.normalize(truth[0], dim=0) @ truth[-1]).abs())
    assert mcc(decoder, truth) == pytest.approx((N_TRUE - 1 + leftover) / N_TRUE, abs=1e-6)
    assert best_matches(decoder, truth).tolist() == [*range(N_TRUE - 1), 0]


def test_detection_counts_false_positives_and_misses_per_latent():
    truth, codes = world()
    detection = Detection(truth[:2], truth)
    fires = codes[:, :2].clone()
    fires[:, 1] = 1.0  # latent 1 fires on every row: recall 1, precision = its feature's firing rate
    detection.add(fires, codes)
    rate = float((codes[:, 1] > 0).float().mean())
    scores = detection.scores()
    assert scores["recall"] == pytest.approx(1.0)
    assert scores["precision"] == pytest.approx((1 + rate) / 2)
    assert scores["f1"] == pytest.approx((1 + 2 * rate / (1 + rate)) / 2)


def hierarchical_world(rows=4000, seed=0):
    """Features 0 (parent) with children 1 and 2 (exclusive, each half the time the parent fires), and 3 (root)."""
    g = torch.Generator().manual_seed(seed)
    truth = F.normalize(torch.randn(4, D, generator=g), dim=-1)
    parent = torch.rand(rows, generator=g) < 0.5
    child = torch.randint(0, 3, (rows,), generator=g)  # 0: no child, 1, 2
    codes = torch.stack([parent, parent & (child == 1), parent & (child == 2), torch.rand(rows, generator=g) < 0.3], 1)
    return truth, codes.float(), torch.tensor([-1, 0, 0, -1])


def test_a_dictionary_whose_child_latents_absorb_the_parent_shows_exactly_that_absorption():
    truth, true_codes, parents = hierarchical_world()
    faithful = Absorption(truth, truth, parents)
    faithful.add(true_codes, true_codes)  # every latent fires with its feature
    assert faithful.score() == 0.0

    # An absorbing dictionary: child latents point at child + parent, and the parent's latent is silent whenever a
    # child fires (it fires for the parent alone).
    absorbing_decoder = torch.stack([truth[0], truth[1] + truth[0], truth[2] + truth[0], truth[3]])
    codes = true_codes.clone()
    codes[:, 0] = codes[:, 0] * (codes[:, 1] + codes[:, 2] == 0)
    absorbing = Absorption(absorbing_decoder, truth, parents)
    absorbing.add(codes, true_codes)
    parent_on = true_codes[:, 0] > 0
    expected = float(((true_codes[:, 1] + true_codes[:, 2]) > 0)[parent_on].float().mean())  # about 2/3
    assert absorbing.score() == pytest.approx(expected) and 0.6 < expected < 0.73


def test_a_sweep_on_a_hierarchical_world_reports_every_ground_truth_score_as_the_metrics_compute_them(tmp_path):
    """summary.csv of a small hierarchical world has mcc, uniqueness, precision, recall, f1 and absorption for every
    member, each equal to truth_metrics on the saved member and the store's held-out rows and true codes."""
    import csv

    from sae_ensemble import architectures, pipeline
    from sae_ensemble.activations.reader import ActivationStore
    from sae_ensemble.activations.truth import load_truth
    from sae_ensemble.checkpoint import load_member
    from tests.sweeps import compose_config

    overrides = [
        "data=synthetic_hier",
        "data.d_in=64",
        "data.n_features=256",
        "data.n_rows=20000",
        "data.rows_per_chunk=5000",
        "data.heldout_rows=2000",
        "data.world.hierarchy.roots=8",
        "data.world.hierarchy.depth=2",
        "data.world.geometry=null",
        "grid=quick",
        "training.steps=100",
        "eval.features=false",
        f"data.store_root={tmp_path / 'stores'}",
        "progress=false",
        "wandb=disabled",
    ]
    assert pipeline.run(compose_config(*overrides), tmp_path / "run") == 0
    store = ActivationStore.open(next((tmp_path / "stores").glob("*/manifest.json")).parent)
    truth, parents = store.ground_truth(), load_truth(store.path)["parents"]
    rows = store.heldout_indices()
    true_codes = store.true_codes(rows, dense=True)
    for row in csv.DictReader(open(tmp_path / "run" / "summary.csv")):
        member, params, _, _ = load_member(tmp_path / "run" / "members" / row["member_id"])
        architecture = architectures.module_of(member.variant)
        hp = architectures.make_hparams(member)
        codes = architecture.encode(params, hp, store.rows(rows), architecture.layout([member]))
        decoder = torch.nn.functional.normalize(params["W_dec"], dim=-1)
        detection, absorption = Detection(decoder, truth), Absorption(decoder, truth, parents)
        detection.add(codes, true_codes)
        absorption.add(codes, true_codes)
        expected = {"mcc": mcc(decoder, truth), "uniqueness": uniqueness(decoder, truth), **detection.scores()}
        expected["absorption"] = absorption.score()
        for name, value in expected.items():
            assert float(row[name]) == pytest.approx(value, abs=1e-5), (row["member_id"], name)
