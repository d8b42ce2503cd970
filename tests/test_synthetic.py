"""Synthetic ground-truth stores: determinism, sparsity statistics, reuse, resume."""

import numpy as np
import pytest
import torch

from sae_ensemble.activations import synthetic
from sae_ensemble.activations.format import StoreError
from sae_ensemble.activations.synthetic import feature_probabilities, sample_rows, write_synthetic
from sae_ensemble.activations.writer import ChunkWriter

SMALL = dict(d_in=32, n_features=64, n_active=4, n_rows=3000, rows_per_chunk=1000)


def all_rows(store):
    return store.rows(np.arange(store.n_rows))


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    a = write_synthetic(tmp_path / "a", seed=1, **SMALL)
    b = write_synthetic(tmp_path / "b", seed=1, **SMALL)
    c = write_synthetic(tmp_path / "c", seed=2, **SMALL)
    assert torch.equal(all_rows(a), all_rows(b)) and a.fingerprint == b.fingerprint
    assert not torch.equal(all_rows(a), all_rows(c))
    assert torch.equal(a.ground_truth(), b.ground_truth())
    assert not torch.equal(a.ground_truth(), c.ground_truth())


def test_rows_are_sparse_nonnegative_mixtures_of_unit_norm_features(tmp_path):
    store = write_synthetic(
        tmp_path / "s", seed=0, d_in=128, n_features=64, n_active=4, n_rows=2000, rows_per_chunk=1000
    )
    features = store.ground_truth()  # [64, 128]: independent directions, so codes are unique
    assert features.shape == (64, 128)
    assert torch.allclose(features.norm(dim=1), torch.ones(64), atol=1e-5)
    x = store.rows(np.arange(store.n_rows))
    codes = torch.linalg.lstsq(features.T, x.T).solution.T  # [rows, n_features]
    assert torch.allclose(codes @ features, x, atol=1e-4)
    assert codes.min() > -1e-4 and codes.max() < 1 + 1e-4
    assert (codes > 1e-4).sum(1).float().mean().item() == pytest.approx(4, rel=0.1)
    assert store.manifest["source"]["kind"] == "synthetic"


@pytest.mark.parametrize("correlated", [False, True])
def test_active_feature_count_and_firing_frequencies_follow_the_parameters(correlated):
    n_features, n_active, decay = 200, 5, 0.98
    probs = feature_probabilities(n_features, n_active, decay)
    assert probs.sum().item() == pytest.approx(n_active, rel=1e-5)
    features = torch.eye(n_features)  # identity directions: rows are the codes themselves
    chol = synthetic._correlation_cholesky(n_features, 0) if correlated else None
    codes = sample_rows(40_000, features, probs, torch.Generator().manual_seed(0), chol)
    active = codes > 0
    assert active.sum(1).float().mean().item() == pytest.approx(n_active, rel=0.05)
    frequency = active.float().mean(0)
    assert torch.allclose(frequency[:20], probs[:20], atol=0.01)  # the copula keeps the marginals
    assert codes.max() < 1 and codes.min() >= 0
    pair_corr = torch.corrcoef(active[:, :20].float().T)[~torch.eye(20, dtype=torch.bool)]
    if correlated:
        assert pair_corr.abs().mean() > 0.05
    else:
        assert pair_corr.abs().mean() < 0.02


def test_noise_is_added(tmp_path):
    clean = all_rows(write_synthetic(tmp_path / "a", seed=0, **SMALL))
    noisy = all_rows(write_synthetic(tmp_path / "b", seed=0, noise_std=0.1, **SMALL))
    assert (noisy - clean).std().item() == pytest.approx(0.1, rel=0.05)


def test_existing_store_is_reused_and_other_parameters_refused(tmp_path, monkeypatch):
    store = write_synthetic(tmp_path / "s", seed=0, **SMALL)
    monkeypatch.setattr(synthetic, "sample_rows", lambda *a, **k: pytest.fail("regenerated a complete store"))
    again = write_synthetic(tmp_path / "s", seed=0, **SMALL)
    assert again.fingerprint == store.fingerprint
    with pytest.raises(StoreError, match="other parameters"):
        write_synthetic(tmp_path / "s", seed=1, **SMALL)


def test_interrupted_write_resumes_to_the_same_data(tmp_path, monkeypatch):
    reference = write_synthetic(tmp_path / "ref", seed=3, dtype="bfloat16", **SMALL)
    real = ChunkWriter._write_chunk
    written = []

    def fail_on_second(self, path, data):
        written.append(path)
        if len(written) == 2:
            raise RuntimeError("disk full")
        return real(self, path, data)

    monkeypatch.setattr(ChunkWriter, "_write_chunk", fail_on_second)
    with pytest.raises(RuntimeError):
        write_synthetic(tmp_path / "s", seed=3, dtype="bfloat16", **SMALL)
    monkeypatch.setattr(ChunkWriter, "_write_chunk", real)
    store = write_synthetic(tmp_path / "s", seed=3, dtype="bfloat16", **SMALL)
    assert store.fingerprint == reference.fingerprint
    assert torch.equal(all_rows(store), all_rows(reference))


def test_bad_parameters_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(StoreError, match=r"n_active \(0\)"):
        write_synthetic(tmp_path / "s", n_rows=10, n_active=0)
    assert not (tmp_path / "s").exists()
