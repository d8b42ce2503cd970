"""The dead-latent remedies: where plain training leaves at least 20% of latents dead, AuxK (topk) and
resampling (relu) each at least halve the dead fraction at equal or better FVU; a resample does what
dictionary_learning's resample_neurons does, inside the stacked tensors."""

import pytest
import torch

from sae_ensemble.activations.synthetic import feature_probabilities, ground_truth_features
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.member import Member

D_IN, TRUE_FEATURES, DICT, BATCH, STEPS, LR = 32, 256, 128, 64, 200, 3e-2
WINDOW_STEPS = 20  # dead = fired in none of the last 20 steps' rows (as dead_frac, over a shorter window)
# A dictionary half as wide as the true features, trained at a high lr: many latents die.
MEMBERS = [
    Member("topk", D_IN, DICT, k=4, lr=LR),
    Member("topk", D_IN, DICT, k=4, lr=LR, auxk_dead_tokens=10 * BATCH),
    Member("relu", D_IN, DICT, l1=2e-2, lr=LR),
    Member("relu", D_IN, DICT, l1=2e-2, lr=LR, resample_every=25),
]


def sparse_mixture(rows: int, generator: torch.Generator) -> torch.Tensor:
    """Rows of the synthetic store's generator (activations/synthetic.py): 4 active features per row on average."""
    features = ground_truth_features(D_IN, TRUE_FEATURES, seed=0)
    p = feature_probabilities(TRUE_FEATURES, 4.0, 0.99)
    active = (torch.rand(rows, TRUE_FEATURES, generator=generator) < p).float() * torch.rand(
        rows, TRUE_FEATURES, generator=generator
    )
    return active @ features


@pytest.fixture(scope="module")
def trained():
    generator = torch.Generator().manual_seed(1)
    ensemble = Ensemble(MEMBERS, STEPS)
    for _ in range(STEPS):
        ensemble.step(sparse_mixture(BATCH, generator))
    heldout = sparse_mixture(2048, generator)
    _, x_hat = ensemble.forward(heldout)
    fvu = ((x_hat - heldout) ** 2).sum((1, 2)) / ((heldout - heldout.mean(0)) ** 2).sum()
    dead = (ensemble.tokens_since_fired >= WINDOW_STEPS * BATCH).float().mean(1)
    return {"fvu": fvu.tolist(), "dead": dead.tolist()}


@pytest.mark.parametrize("plain,remedy", [(0, 1), (2, 3)], ids=["auxk_for_topk", "resampling_for_relu"])
def test_remedy_at_least_halves_dead_latents_at_equal_or_better_fvu(trained, plain, remedy):
    dead, fvu = trained["dead"], trained["fvu"]
    print(
        f"{MEMBERS[plain].member_id}: dead {dead[plain]:.3f} fvu {fvu[plain]:.3f}; "
        f"{MEMBERS[remedy].member_id}: dead {dead[remedy]:.3f} fvu {fvu[remedy]:.3f}"
    )
    assert dead[plain] >= 0.2  # the setup really kills latents
    assert dead[remedy] <= dead[plain] / 2
    assert fvu[remedy] <= fvu[plain]


def test_resample_reinitialises_dead_features_and_their_moments_only():
    member = Member("relu", D_IN, 16, l1=1e-3, resample_every=4)
    ensemble = Ensemble([member], 10)
    batch = sparse_mixture(BATCH, torch.Generator().manual_seed(2))
    for _ in range(3):
        ensemble.step(batch)
    dead = torch.tensor([1, 5, 9])
    ensemble.tokens_since_fired[0] = 0.0
    ensemble.tokens_since_fired[0, dead] = 1e6  # these three fired in none of the last rows,
    ensemble.params["b_enc"][0, dead] = -100.0  # nor will they in the next step
    before = {name: value.clone() for name, value in ensemble.params.items()}
    ensemble.step(batch)  # step 4: the resample step
    assert ensemble.last_resampled == {0: 3}
    W_dec = ensemble.params["W_dec"][0]
    batch_directions = torch.nn.functional.normalize(batch, dim=-1)
    for feature in dead:  # each a normalised input row of the batch, with zero bias and zero moments
        assert torch.isclose(batch_directions @ W_dec[feature], torch.tensor(1.0), atol=1e-5).any()
        assert ensemble.params["b_enc"][0, feature] == 0
        for moments in (ensemble.opt_state.mu, ensemble.opt_state.nu):
            assert (moments["W_enc"][0, feature] == 0).all() and (moments["W_dec"][0, feature] == 0).all()
    live = torch.ones(16, dtype=torch.bool)
    live[dead] = False
    assert not torch.allclose(W_dec[live], before["W_dec"][0][live])  # the live ones just trained on
    assert (ensemble.tokens_since_fired[0, dead] == 0).all()
