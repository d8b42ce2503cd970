"""Each metric against a plain, separately written computation, plus hand-made cases."""

import numpy as np
import pytest
import torch

from sae_ensemble.member import Member
from sae_ensemble.metrics import FiringCounter, heldout_metrics, mmcs, mmcs_between, mmcs_truth, reconstruction_metrics


def _random_case(seed=0, members=3, batch=16, d=5, n=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d, generator=g)
    x_hat = x + 0.3 * torch.randn(members, batch, d, generator=g)
    codes = torch.relu(torch.randn(members, batch, n, generator=g))
    mask = torch.ones(members, n)
    mask[1, 5:] = 0  # member 1 has 5 real features, 2 of padding
    codes = codes * mask[:, None, :] + (1 - mask[:, None, :]) * 9.0  # padding holds junk that must not count
    return x, x_hat, codes, mask


def test_reconstruction_metrics_match_a_loop_over_members():
    x, x_hat, codes, mask = _random_case()
    got = reconstruction_metrics(x, x_hat, codes, mask)
    xn = x.double().numpy()
    for m in range(x_hat.shape[0]):
        err = x_hat[m].double().numpy() - xn
        real = mask[m].numpy() > 0
        c = codes[m].double().numpy()[:, real]
        expected = {
            "mse": np.mean(err**2),
            "fvu": np.sum(err**2) / np.sum((xn - xn.mean(axis=0)) ** 2),
            "l0": np.mean([np.count_nonzero(row > 0) for row in c]),
            "l1": np.mean([np.sum(np.abs(row)) for row in c]),
            # SAELens / SAEBench names (sae_lens.evals.get_sparsity_and_variance_metrics), row by row
            "explained_variance": 1
            - np.mean(np.sum(err**2, 1)) / (np.mean(np.sum(xn**2, 1)) - np.sum(xn.mean(0) ** 2)),
            "cossim": np.mean([np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(xn, xn + err)]),
            "l2_ratio": np.mean([np.linalg.norm(b) / np.linalg.norm(a) for a, b in zip(xn, xn + err)]),
            "relative_reconstruction_bias": np.mean(np.sum((xn + err) ** 2, 1)) / np.mean(np.sum(xn * (xn + err), 1)),
        }
        for name, value in expected.items():
            assert got[name][m].item() == pytest.approx(value, rel=1e-5), (name, m)


def test_heldout_metrics_over_parts_equal_one_call_on_all_rows():
    x, x_hat, codes, mask = _random_case(batch=37)
    whole = reconstruction_metrics(x, x_hat, codes, mask)
    starts = iter(range(0, 37, 5))

    def forward(rows):
        start = next(starts)
        return codes[:, start : start + len(rows)], x_hat[:, start : start + len(rows)]

    parts = heldout_metrics(x, forward, mask, rows_per_part=5)
    assert set(parts) == set(whole)
    for name in whole:
        torch.testing.assert_close(parts[name], whole[name], rtol=1e-5, atol=1e-6, msg=name)


def test_shrunken_reconstruction_has_relative_bias_and_l2_ratio_below_one():
    x, _, codes, mask = _random_case(members=2)
    got = reconstruction_metrics(x, torch.stack([0.5 * x, x]), codes, mask)
    assert got["relative_reconstruction_bias"].tolist() == pytest.approx([0.5, 1.0], rel=1e-5)
    assert got["l2_ratio"].tolist() == pytest.approx([0.5, 1.0], rel=1e-5)
    assert got["cossim"].tolist() == pytest.approx([1.0, 1.0], rel=1e-5)
    assert got["explained_variance"][1].item() == pytest.approx(1.0, abs=1e-6)


def test_fvu_is_zero_for_a_perfect_reconstruction_and_one_for_the_mean():
    x, _, codes, mask = _random_case(members=2)
    x_hat = torch.stack([x, x.mean(0).expand_as(x)])
    fvu = reconstruction_metrics(x, x_hat, codes, mask)["fvu"]
    assert fvu[0].item() == 0.0
    assert fvu[1].item() == pytest.approx(1.0, abs=1e-6)


def test_dead_fraction_counts_planted_dead_features_and_ignores_padding():
    members, n = 2, 10
    mask = torch.ones(members, n)
    mask[1, 6:] = 0  # member 1: 6 real features
    counter = FiringCounter(members, n, window_tokens=1000)
    fired = torch.full((members, n), 3.0)
    fired[0, [2, 7]] = 0  # member 0: 2 of 10 dead
    fired[1, 0] = 0  # member 1: 1 of 6 real dead; padding (never fires) must not count
    fired[1, 6:] = 0
    for _ in range(5):
        counter.update(fired, n_tokens=64)
    assert counter.dead_fraction(mask).tolist() == pytest.approx([0.2, 1 / 6])
    assert counter.frequencies()[0, 0].item() == pytest.approx(3 * 5 / (64 * 5))


def test_dead_fraction_window_forgets_old_firing_but_keeps_the_whole_window():
    counter = FiringCounter(1, 2, window_tokens=100, n_blocks=4)  # blocks of 25 tokens
    mask = torch.ones(1, 2)
    counter.update(torch.tensor([[1.0, 1.0]]), n_tokens=10)  # both fire once, early
    for _ in range(9):  # 90 more tokens where feature 1 is silent: still inside the window
        counter.update(torch.tensor([[1.0, 0.0]]), n_tokens=10)
    assert counter.dead_fraction(mask).item() == 0.0
    for _ in range(20):  # 200 more silent tokens: the early firing leaves the window
        counter.update(torch.tensor([[1.0, 0.0]]), n_tokens=10)
    assert counter.dead_fraction(mask).item() == 0.5
    assert 100 <= counter.tokens() < 100 + 25 + 10


def test_firing_counter_matches_a_plain_sliding_sum_and_resumes():
    g = torch.Generator().manual_seed(1)
    window, batch = 120, 10
    counter = FiringCounter(2, 6, window_tokens=window, n_blocks=3)
    history = []
    for step in range(40):
        fired = (torch.rand(2, 6, generator=g) < 0.05).float() * batch
        history.append(fired)
        counter.update(fired, batch)
        if step == 20:  # resume from a saved state midway
            restored = FiringCounter(2, 6, window_tokens=window, n_blocks=3)
            restored.load_state_dict(counter.state_dict())
            counter = restored
        # every token of the last `window` is counted, and nothing older than window + block + batch
        covered = counter.tokens() // batch
        assert window <= covered * batch or covered == step + 1
        assert counter.tokens() < window + counter.block_tokens + batch
        assert torch.equal(counter.counts(), torch.stack(history[-covered:]).sum(0).long())


@pytest.mark.parametrize("chunk_elements", [1 << 26, 20])  # one similarity matrix, or rows in chunks
def test_mmcs_matches_a_double_loop(chunk_elements, monkeypatch):
    monkeypatch.setattr("sae_ensemble.metrics._MAX_COS_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(6, 4, generator=g), torch.randn(9, 4, generator=g)
    an, bn = a.double().numpy(), b.double().numpy()
    best = [max(np.dot(r, s) / np.linalg.norm(r) / np.linalg.norm(s) for s in bn) for r in an]
    assert mmcs(a, b) == pytest.approx(float(np.mean(best)), rel=1e-5)


def test_mmcs_truth_is_one_for_a_permuted_rescaled_copy_and_ignores_padding():
    g = torch.Generator().manual_seed(3)
    truth = torch.randn(5, 8, generator=g)
    copy = truth[torch.randperm(5, generator=g)] * 2.5  # positive rescaling keeps direction
    padded = torch.zeros(2, 7, 8)
    padded[0, :5] = copy
    padded[1, :5] = torch.randn(5, 8, generator=g)
    padded[1, 5:] = truth[:2]  # a perfect match hidden in member 1's padding must not count
    mask = torch.zeros(2, 7)
    mask[:, :5] = 1
    scores = mmcs_truth(padded, mask, truth)
    assert scores[0].item() == pytest.approx(1.0, abs=1e-6)
    assert scores[1].item() == pytest.approx(mmcs(truth, padded[1, :5]), abs=1e-6)
    assert scores[1].item() < 0.99
    assert mmcs_truth(-padded[:1], mask[:1], truth).item() < 0.99  # a sign flip is not a match


def test_mmcs_between_pairs_next_dict_size_and_seeds():
    def m(dict_size, l1=1e-3, seed=0):
        return Member("relu", 4, dict_size, l1=l1, seed=seed)

    members = [m(8), m(16), m(32), m(16, l1=1e-2), m(64, l1=1e-2), m(8, seed=1), m(16, seed=1)]
    g = torch.Generator().manual_seed(4)
    decoders = {x.member_id: torch.randn(x.dict_size, 4, generator=g) for x in members}
    ids = {key: x.member_id for key, x in zip(["a8", "a16", "a32", "b16", "b64", "s8", "s16"], members)}

    nxt = mmcs_between(members, decoders)
    assert set(nxt) == {ids["a8"], ids["a16"], ids["b16"], ids["s8"]}
    assert nxt[ids["a8"]] == mmcs(decoders[ids["a8"]], decoders[ids["a16"]])
    assert nxt[ids["a16"]] == mmcs(decoders[ids["a16"]], decoders[ids["a32"]])
    assert nxt[ids["b16"]] == mmcs(decoders[ids["b16"]], decoders[ids["b64"]])
    assert nxt[ids["s8"]] == mmcs(decoders[ids["s8"]], decoders[ids["s16"]])

    seed = mmcs_between(members, decoders, pairing="seed")
    assert set(seed) == {ids["a8"], ids["a16"], ids["s8"], ids["s16"]}
    assert seed[ids["a8"]] == mmcs(decoders[ids["a8"]], decoders[ids["s8"]])
    assert seed[ids["s16"]] == mmcs(decoders[ids["s16"]], decoders[ids["a16"]])

    with pytest.raises(ValueError, match="pairing"):
        mmcs_between(members, decoders, pairing="size")
