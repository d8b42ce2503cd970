"""#37: where our structured world generator and SAELens' (sae_lens.synthetic, in the interop venv) share
parameters, their firing statistics agree within sampling error. Skips without the venv locally; fails with
SAE_REQUIRE_INTEROP=1.

Each case is data=synthetic_hier scaled to 1024 features (8 trees instead of 32, so the forest keeps its share:
680 features, the rest free), without geometry (directions do not change firing):
- zipf: Zipfian firing and magnitudes alone, every feature independent;
- hierarchy: + the forest (branching 4, depth 3, exclusive siblings, compensated probabilities);
- correlated_hierarchy: + the rank-25 Gaussian copula: the preset's whole firing model.
tests/interop/synthetic_firing_check.py maps the parameters onto SAELens' configs (its table), samples there, and
the test samples ours in-process meanwhile.

What the two share, read from both sources:
- The Zipf probabilities, the linear mean magnitudes, the forest (ids breadth first from feature 0, children of a
  node consecutive) and the compensation (a child's probability / its parent's base probability, x 1 + its
  siblings' summed base probability / the parent's; clipped at 1) are the same formulas: asserted equal.
- A feature's probability is in both its own draw's, before its parent's gate. SAELens draws every feature in
  every row, then level by level zeroes the children of inactive parents and keeps one uniformly random active
  sibling of an exclusive group whose parent is active; ours draws a child only where its parent fired, then
  keeps one uniformly random live sibling. A child's own draw is independent of its parent's (given the row's
  copula factor eps, which ours reuses for children), so the two are the same distribution, and the compared
  per-feature rates are marginal ones after every gate and exclusion, counted the same way (activation > 0: a
  magnitude relu'd to 0 is no firing, and gates the children, in both).
- Two parameters are random draws of the same distribution in both: each feature's magnitude spread
  (|N(std_mean, std_spread²)|) and the copula factor (N(0, scale²) [n, rank], rows capped at norm² 0.99). They
  change rates (P(magnitude > 0); a child's co-firing with its parent), so SAELens is given ours (the script's
  "draws"); their distributions themselves are not compared here.
Not comparable, so not compared: SAELens' mutually_exclusive_portion between 0 and 1, random branching and
scale_children_by_parent (ours has none of them), and its bias vector (not firing).

The statistics, each valid whatever the dependence between features (rows are independent in both):
- per feature, its rate (two-sample binomial z) and its mean magnitude where it fires (Welch z), each held to a
  Bonferroni bound over the features (family-wise false alarm ALPHA), features with at least MIN_COUNT firings
  on each side; and the sum of those squared rate z's, held to a tail bound that accounts for the features'
  co-firing (sum_z2_bound): small shifts of many features that no single z shows;
- per group (each hierarchy level; the free features in four bands of ids), the mean active count per row
  (Welch z on row counts, Bonferroni over the groups);
- the distribution of L0 over rows (two-sample chi-square homogeneity, p > ALPHA).
"""

import json
import math
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy import stats

from sae_ensemble import config
from sae_ensemble.activations import structured
from sae_ensemble.activations.synthetic import feature_probabilities, ground_truth_features
from sae_ensemble.sources import world_params
from tests.sweeps import compose_config
from tests.test_interop import REPO, library_python

CHECK = REPO / "tests" / "interop" / "synthetic_firing_check.py"
ALPHA = 1e-4  # chance that one family of tests fails although the generators agree
MIN_COUNT = 50  # firings on each side for a feature's z (the normal approximation's tail)
SCALED = [
    "data=synthetic_hier",
    "data.n_features=1024",
    "data.d_in=16",
    "data.world.hierarchy.roots=8",
    "data.world.geometry=null",
]
CASES = {  # name: (overrides, our rows, SAELens rows); SAELens' dense hierarchy takes ~70 us a row here
    "zipf": (["data.world.hierarchy=null", "data.world.correlation=null"], 200_000, 200_000),
    "hierarchy": (["data.world.correlation=null"], 200_000, 100_000),
    "correlated_hierarchy": ([], 200_000, 100_000),
}


def our_world(overrides: list[str]) -> tuple[dict, structured.WorldModel, int]:
    """(data.world as the store records it, the world built as a synthetic store builds it, its seed)."""
    cfg = compose_config(*SCALED, *overrides, "devices=cpu")
    config.validate(cfg)
    data, world = cfg.data, world_params(cfg.data)
    toy = feature_probabilities(data.n_features, data.n_active, data.feature_prob_decay)
    model = structured.build_world(world, ground_truth_features(data.d_in, data.n_features, data.seed), toy, data.seed)
    return world, model, data.seed


def groups(world: structured.WorldModel) -> torch.Tensor:
    """Each feature's group [n]: its hierarchy level, or (outside the forest) one of four bands of ids."""
    n, starts = len(world.probs), world.level_starts
    forest = starts if len(starts) > 2 else [0]  # [0, n]: no forest
    group = torch.empty(n, dtype=torch.int64)
    for level in range(len(forest) - 1):
        group[forest[level] : forest[level + 1]] = level
    free = torch.arange(forest[-1], n)
    group[free] = len(forest) - 1 + (free - forest[-1]) * 4 // len(free)
    return group


def our_firing(world: structured.WorldModel, seed: int, rows: int, group: torch.Tensor) -> dict[str, torch.Tensor]:
    """The script's statistics of our rows [0, rows)."""
    n = len(world.probs)
    (row, feat, value), _ = structured.sample_range(world, seed, 0, rows)
    value = value.double()
    per_group = torch.zeros(rows, int(group.max()) + 1, dtype=torch.float64)
    per_group.index_put_((row, group[feat]), torch.ones(len(row), dtype=torch.float64), accumulate=True)
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(row, minlength=rows).cumsum(0)
    fired = torch.sparse_csr_tensor(crow, feat, torch.ones(len(feat)), (rows, n))  # [rows, n]
    fired_t = fired.to_sparse_coo().t().coalesce().to_sparse_csr()
    return {
        "cofiring": torch.sparse.mm(fired_t, fired).to_dense(),  # [n, n] rows in which both fire
        "counts": torch.bincount(feat, minlength=n),
        "value_sum": torch.zeros(n, dtype=torch.float64).index_add_(0, feat, value),
        "value_sq_sum": torch.zeros(n, dtype=torch.float64).index_add_(0, feat, value.square()),
        "group_sum": per_group.sum(0),
        "group_sq_sum": per_group.square().sum(0),
        "l0_hist": torch.bincount(torch.bincount(row, minlength=rows)),
        "rows": torch.tensor(rows),
    }


@pytest.fixture(scope="module")
def firing(tmp_path_factory):
    """Per case: (our world, our statistics, SAELens' statistics). SAELens samples in its venv while ours run."""
    python = library_python("saelens")
    tmp = tmp_path_factory.mktemp("firing")
    started = time.perf_counter()
    worlds, specs = {}, {}
    for name, (overrides, _, their_rows) in CASES.items():
        params, world, seed = our_world(overrides)
        draws = {"std_magnitudes": world.std}
        if world.factor is not None:
            draws["correlation_factor"] = world.factor
        save_file({key: value.contiguous() for key, value in draws.items()}, tmp / f"{name}_draws.safetensors")
        group = groups(world)
        specs[name] = {
            "n_features": len(world.probs),
            "rows": their_rows,
            "batch": 4096,
            "seed": seed,
            "world": params,
            "groups": group.tolist(),
            "draws": str(tmp / f"{name}_draws.safetensors"),
        }
        worlds[name] = (world, seed, group)
    (tmp / "spec.json").write_text(json.dumps(specs))
    theirs = subprocess.Popen(
        [str(python), str(CHECK), str(tmp / "spec.json"), str(tmp)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ours = {name: our_firing(world, seed, CASES[name][1], group) for name, (world, seed, group) in worlds.items()}
        _, stderr = theirs.communicate(timeout=600)
    finally:
        theirs.kill()  # only if still running: a failure here must not leave it sampling
    assert theirs.returncode == 0, stderr[-3000:]
    print(f"\nfiring statistics of {len(CASES)} worlds, ours and SAELens', in {time.perf_counter() - started:.1f} s")
    return {name: (worlds[name][0], ours[name], load_file(tmp / f"{name}.safetensors")) for name in CASES}


def bonferroni(tests: int) -> float:
    """The |z| that any of `tests` standard normals exceeds with probability at most ALPHA."""
    return float(stats.norm.isf(ALPHA / (2 * tests)))


def rate_z(ours: dict, theirs: dict) -> torch.Tensor:
    """Two-sample binomial z of each feature's firing rate, ours minus theirs (pooled variance). [n]"""
    n1, n2 = int(ours["rows"]), int(theirs["rows"])
    c1, c2 = ours["counts"].double(), theirs["counts"].double()
    pooled = (c1 + c2) / (n1 + n2)
    return (c1 / n1 - c2 / n2) / (pooled * (1 - pooled) * (1 / n1 + 1 / n2)).sqrt()


def sum_z2_bound(ours: dict, compared: torch.Tensor) -> float:
    """The sum of the compared features' squared rate z's that agreeing generators exceed with probability at most
    ALPHA. The z's are ~ N(0, R), R the features' firing correlation (estimated from our rows' co-firing), so the
    sum is sum_k λ_k χ²_1 over R's eigenvalues; Laurent & Massart (2000): P(sum - n >= 2 |λ|_2 sqrt(x) + 2 λ_max x)
    <= e^-x, with x = ln(1 / ALPHA). |λ|_2 = |R|_F, and λ_max <= |λ|_8 = |R^4|_F^(1/4) (no eigensolver: MKL's
    threaded one took 7 s for this on a busy 2-core box)."""
    rows, p = int(ours["rows"]), ours["counts"][compared].double() / int(ours["rows"])
    cov = ours["cofiring"][compared][:, compared].double() / rows - p[:, None] * p[None, :]
    scale = cov.diagonal().sqrt()
    correlation = cov / scale[:, None] / scale[None, :]  # [n, n], unit diagonal
    square = correlation @ correlation
    largest = float((square @ square).norm() ** 0.25)
    x = math.log(1 / ALPHA)
    return len(correlation) + 2 * float(correlation.norm()) * math.sqrt(x) + 2 * largest * x


def welch_z(sum1, sq1, k1, sum2, sq2, k2) -> torch.Tensor:
    """Welch z of two means from sums, sums of squares and sample sizes."""
    m1, m2 = sum1 / k1, sum2 / k2
    v1, v2 = (sq1 / k1 - m1.square()).clamp(min=0), (sq2 / k2 - m2.square()).clamp(min=0)
    return (m1 - m2) / (v1 / k1 + v2 / k2).sqrt()


def l0_homogeneity(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, int]:
    """Two-sample chi-square p-value of the L0 histograms and its degrees of freedom; L0 values seen fewer than
    20 times in both together share one bin."""
    width = max(len(ours), len(theirs))
    table = torch.stack([torch.nn.functional.pad(h.double(), (0, width - len(h))) for h in (ours, theirs)])
    big = table.sum(0) >= 20
    table = torch.cat([table[:, big], table[:, ~big].sum(1, keepdim=True)], dim=1)
    table = table[:, table.sum(0) > 0]
    _, p, dof, _ = stats.chi2_contingency(table.numpy(), correction=False)
    return float(p), int(dof)


@pytest.mark.parametrize("case", CASES)
def test_the_saelens_world_has_our_probabilities_magnitudes_and_forest(firing, case):
    world, _, theirs = firing[case]
    assert torch.allclose(theirs["probabilities"], world.probs, rtol=1e-5, atol=0)
    assert torch.allclose(theirs["mean_magnitudes"], world.mean, rtol=1e-6, atol=0)
    assert torch.equal(theirs["std_magnitudes"], world.std)  # ours, given to it
    assert torch.equal(theirs["parents"], world.parents)
    assert torch.equal(theirs["exclusive"], (world.parents >= 0) & world.exclusive)


@pytest.mark.parametrize("case", CASES)
def test_each_feature_fires_as_often_in_ours_as_in_saelens(firing, case):
    _, ours, theirs = firing[case]
    compared = (ours["counts"] >= MIN_COUNT) & (theirs["counts"] >= MIN_COUNT)
    z = rate_z(ours, theirs)[compared]
    z_bound, sum_bound = bonferroni(len(z)), sum_z2_bound(ours, compared)
    rows1, rows2 = int(ours["rows"]), int(theirs["rows"])
    group_z = welch_z(
        ours["group_sum"], ours["group_sq_sum"], rows1, theirs["group_sum"], theirs["group_sq_sum"], rows2
    )
    l0_p, l0_dof = l0_homogeneity(ours["l0_hist"], theirs["l0_hist"])
    mean_l0 = [float((h * torch.arange(len(h))).sum() / h.sum()) for h in (ours["l0_hist"], theirs["l0_hist"])]
    print(
        f"{case}: {int(compared.sum())}/{len(compared)} features compared on {rows1:,} rows of ours and {rows2:,} "
        f"of SAELens': max |z| {z.abs().max():.2f} (bound {z_bound:.2f}), sum z^2 / n {z.square().mean():.3f} "
        f"(bound {sum_bound / len(z):.3f}); groups' max |z| {group_z.abs().max():.2f} (bound "
        f"{bonferroni(len(group_z)):.2f}); L0 {mean_l0[0]:.3f} vs {mean_l0[1]:.3f}, chi-square p {l0_p:.3f} "
        f"({l0_dof} dof)"
    )
    assert compared.sum() >= 0.95 * len(compared)  # the rare tail too, not only the frequent head
    assert z.abs().max() < z_bound
    assert z.square().sum() < sum_bound  # small shifts of many features, which no single z shows
    assert group_z.abs().max() < bonferroni(len(group_z))
    assert l0_p > ALPHA


@pytest.mark.parametrize("case", CASES)
def test_each_feature_s_mean_magnitude_when_firing_is_saelens(firing, case):
    _, ours, theirs = firing[case]
    compared = (ours["counts"] >= MIN_COUNT) & (theirs["counts"] >= MIN_COUNT)
    args = [side[key][compared] for side in (ours, theirs) for key in ("value_sum", "value_sq_sum", "counts")]
    z = welch_z(*args)
    print(f"{case}: mean magnitudes of {int(compared.sum())} features, max |z| {z.abs().max():.2f}")
    assert z.abs().max() < bonferroni(len(z))
