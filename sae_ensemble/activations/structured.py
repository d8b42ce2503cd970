"""A structured synthetic world (data.world): the toy's mixture of unit directions, with each part replaceable.

Parameters mean what sae_lens.synthetic's mean (docs/synthetic.md):
- firing: the toy's decay^i, or Zipfian p_i ∝ (i+1)^-exponent rescaled to [p_min, p_max];
- magnitudes: the toy's U[0, 1), or relu(mean_i + std_i N(0, 1)) per feature;
- hierarchy: features 0..roots-1 are roots, children follow breadth first (children of node j are consecutive);
  a child fires only when its parent fires, and with `exclusive` one random sibling of several survives;
- correlation: a low-rank Gaussian copula, z = eps F^T + s eta, feature i fires when z_i > Φ⁻¹(1 - p_i);
- geometry: random unit directions, or Adam-orthogonalised ones down to a target mean max |cos|.

Rows come in blocks of BLOCK_ROWS, block b drawn from its own stream (seed, b): a row's value depends on its
global index only, never on the chunking, so a store streams block by block and any range can be regenerated.
Within a block, roots and features outside the forest are drawn for every row; a child is drawn only where its
parent fired (conditionally on the row's eps, children are independent, so the copula stays exact): the cost
follows the active features, not the forest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .format import StoreError

GENERATOR = "structured_world_v1"
BLOCK_ROWS = 4096  # rows drawn from one random stream


def random_stream(seed: int, *stream: int) -> torch.Generator:
    """One independent, reproducible stream per (seed, purpose, index): chunks and blocks regenerate alone."""
    mixed = np.random.SeedSequence([seed, *stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed))


@dataclass
class WorldModel:
    """What a world's rows are drawn from, built once per store (build_world)."""

    features: torch.Tensor  # [n, d] unit rows
    probs: torch.Tensor  # [n] firing probability of each feature on its own (before its parent's gate)
    mean: torch.Tensor | None  # [n] magnitude mean, None: U[0, 1)
    std: torch.Tensor | None  # [n]
    parents: torch.Tensor  # [n] int64, -1 for roots and free features
    level_starts: list[int]  # first feature id of each hierarchy level (roots at 0), then its end
    branching: int
    exclusive: bool
    factor: torch.Tensor | None  # [n, rank] copula factor, None: independent firing
    residual: torch.Tensor | None  # [n] sqrt(1 - |factor_i|^2)
    thresholds: torch.Tensor | None  # [n] Φ⁻¹(1 - p_i)

    @property
    def dense_ids(self) -> torch.Tensor:
        """Features drawn for every row: the roots and every feature outside the forest."""
        n = len(self.probs)
        if len(self.level_starts) < 3:
            return torch.arange(n)
        return torch.cat([torch.arange(self.level_starts[1]), torch.arange(self.level_starts[-1], n)])


def zipf_probabilities(n_features: int, exponent: float, p_max: float, p_min: float) -> torch.Tensor:
    """sae_lens' zipfian_firing_probabilities: 1 / rank^exponent rescaled to [p_min, p_max]. [n_features]"""
    if n_features == 1:
        return torch.tensor([p_max])
    p = 1.0 / torch.arange(1, n_features + 1, dtype=torch.float32) ** exponent
    return p_min + (p_max - p_min) * (p - p.min()) / (p.max() - p.min())


def hierarchy_parents(n_features: int, roots: int, branching: int, depth: int) -> tuple[torch.Tensor, list[int]]:
    """(parent of each feature [n] (-1: root or free), first id of each level and the forest's end)."""
    starts = [0]
    for level in range(depth + 1):
        starts.append(starts[-1] + roots * branching**level)
    if starts[-1] > n_features:
        raise StoreError(f"The hierarchy needs {starts[-1]} features but n_features={n_features}.")
    parents = torch.full((n_features,), -1, dtype=torch.int64)
    for level in range(1, depth + 1):
        ids = torch.arange(starts[level], starts[level + 1])
        parents[ids] = starts[level - 1] + (ids - starts[level]) // branching
    return parents, starts


def compensated(probs: torch.Tensor, parents: torch.Tensor, exclusive: bool) -> torch.Tensor:
    """sae_lens' compute_probability_correction_factors: each child's probability divided by its parent's (and,
    exclusive, times 1 + its siblings' summed probability over the parent's), so that after gating its rate is
    about its own; clipped at 1. [n]"""
    child = parents >= 0
    factor = torch.ones_like(probs)
    parent_p = probs[parents[child]]
    factor[child] = 1 / parent_p
    if exclusive:
        siblings = torch.zeros_like(probs).index_add_(0, parents[child], probs[child])
        factor[child] *= 1 + (siblings[parents[child]] - probs[child]).clamp(min=0) / parent_p
    return (probs * factor).clamp(max=1.0)


def mean_max_cos(vectors: torch.Tensor, chunk: int = 2048) -> float:
    """Mean over rows of the max |cos| to any other row."""
    u = F.normalize(vectors, dim=1)
    best = []
    for lo in range(0, len(u), chunk):
        c = (u[lo : lo + chunk] @ u.T).abs_()
        c[torch.arange(len(c)), torch.arange(lo, lo + len(c))] = 0
        best.append(c.amax(dim=1))
    return float(torch.cat(best).mean())


def orthogonalise(vectors: torch.Tensor, target: float, max_steps: int, lr: float, chunk: int = 1024) -> torch.Tensor:
    """Unit rows pushed apart until their mean max |cos| is at most `target`. [n, d]

    Adam on the unit rows' squared overlaps beyond 0.9 x target: sae_lens' orthogonalize_embeddings penalises every
    overlap (sum_{i≠j} (e_i·e_j)^2) and barely moves the max (0.235 -> 0.228 in 300 steps for 4096 rows in 256
    dims); penalising only the large ones reaches a target on the max."""
    e = F.normalize(vectors, dim=1).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([e], lr=lr)
    margin = 0.9 * target
    for step in range(max_steps + 1):
        with torch.no_grad():
            e.copy_(F.normalize(e, dim=1))
            reached = mean_max_cos(e)
        if reached <= target:
            return e.detach().clone()
        if step == max_steps:
            raise StoreError(
                f"data.world.geometry: {max_steps} steps reached a mean max cosine of {reached:.4f}, not the target "
                f"{target}; raise max_steps or lr, or the target."
            )
        optimizer.zero_grad()
        u = F.normalize(e, dim=1)
        for lo in range(0, len(u), chunk):
            dots = (u[lo : lo + chunk] @ u.T).abs()  # [chunk, n]
            dots[torch.arange(len(dots)), torch.arange(lo, lo + len(dots))] = 0
            (dots - margin).relu().square().sum().backward(retain_graph=True)
        optimizer.step()
    raise AssertionError("unreachable")


def build_world(world: dict, features: torch.Tensor, probs: torch.Tensor, seed: int) -> WorldModel:
    """The world `world` (SyntheticData.world as a dict) over the toy's `features` [n, d] and `probs` [n], each
    replaced where its part is set."""
    n = len(features)
    if zipf := world.get("zipf"):
        probs = zipf_probabilities(n, zipf["exponent"], zipf["p_max"], zipf["p_min"])
    mean = std = None
    if magnitudes := world.get("magnitudes"):
        mean = torch.linspace(magnitudes["mean_first"], magnitudes["mean_last"], n)
        spread = torch.randn(n, generator=random_stream(seed, 7)) * magnitudes["std_spread"]
        std = (magnitudes["std_mean"] + spread).abs()
    parents, starts = torch.full((n,), -1, dtype=torch.int64), [0, n]
    branching, exclusive = 1, False
    if hierarchy := world.get("hierarchy"):
        branching, exclusive = hierarchy["branching"], hierarchy["exclusive"]
        parents, starts = hierarchy_parents(n, hierarchy["roots"], branching, hierarchy["depth"])
        if hierarchy.get("compensate"):
            probs = compensated(probs, parents, exclusive)
    factor = residual = thresholds = None
    if correlation := world.get("correlation"):
        generator = random_stream(seed, 6)
        factor = torch.randn(n, correlation["rank"], generator=generator, dtype=torch.float64) * correlation["scale"]
        norm_sq = factor.square().sum(dim=1, keepdim=True)
        factor *= torch.where(norm_sq > 0.99, (0.99 / norm_sq).sqrt(), 1.0)  # sae_lens' cap: 1% own variance
        residual = (1 - factor.square().sum(dim=1)).sqrt().float()
        factor = factor.float()
        thresholds = math.sqrt(2) * torch.erfinv(1 - 2 * probs.double()).float()
    if geometry := world.get("geometry"):
        features = orthogonalise(features, geometry["target_mean_max_cos"], geometry["max_steps"], geometry["lr"])
    return WorldModel(
        features.contiguous(), probs, mean, std, parents, starts, branching, exclusive, factor, residual, thresholds
    )


# -- sampling -------------------------------------------------------------------------------------------------


def _fire(world: WorldModel, rows: torch.Tensor, ids: torch.Tensor, eps: torch.Tensor | None, g) -> torch.Tensor:
    """Whether children ids [P, b] fire in rows [P] (their parent's), each on its own (before gating). [P, b]"""
    if world.factor is None:
        return torch.rand(ids.shape, generator=g) < world.probs[ids]
    z = torch.randn(ids.shape, generator=g).mul_(world.residual[ids])
    z += (world.factor[ids] * eps[rows, None, :]).sum(dim=2)  # [P, b]: eps_row · F_child
    return z > world.thresholds[ids]


def _magnitudes(world: WorldModel, ids: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    if world.mean is None:
        return torch.rand(len(ids), generator=g)
    return (world.mean[ids] + world.std[ids] * torch.randn(len(ids), generator=g)).relu_()


def sample_block(world: WorldModel, seed: int, block: int, noise_std: float = 0.0):
    """Block `block`'s codes as (row within the block, feature, value) sorted by row then feature, and its rows
    [BLOCK_ROWS, d] = codes @ features (+ noise)."""
    g = random_stream(seed, 8, block)
    n_rows, dense = BLOCK_ROWS, world.dense_ids
    eps = None
    if world.factor is None:
        fired = torch.rand(n_rows, len(dense), generator=g) < world.probs[dense]
    else:
        eps = torch.randn(n_rows, world.factor.shape[1], generator=g)
        z = torch.randn(n_rows, len(dense), generator=g).mul_(world.residual[dense])
        fired = z.addmm_(eps, world.factor[dense].T) > world.thresholds[dense]
    rows, at = fired.nonzero(as_tuple=True)
    feats = dense[at]
    values = _magnitudes(world, feats, g)
    live = values > 0  # a zero magnitude is no firing (sae_lens gates children on activation > 0)
    rows, feats, values = rows[live], feats[live], values[live]
    starts, b = world.level_starts, world.branching
    parent_rows, parent_ids = rows, feats
    for level in range(1, len(starts) - 1):
        # parents: the features of the level above that fired; each offers its b children
        above = (parent_ids >= starts[level - 1]) & (parent_ids < starts[level])
        p_rows, p_ids = parent_rows[above], parent_ids[above]
        first_child = starts[level] + (p_ids - starts[level - 1]) * b
        c_ids = first_child[:, None] + torch.arange(b)  # [parents, b]
        c_fired = _fire(world, p_rows, c_ids, eps, g)
        c_values = torch.zeros(c_ids.shape)
        c_values[c_fired] = _magnitudes(world, c_ids[c_fired], g)
        alive = c_values > 0  # [parents, b]
        if world.exclusive:  # one sibling of several, uniformly at random
            scores = torch.rand(alive.shape, generator=g).masked_fill_(~alive, -1.0)
            alive &= torch.arange(b) == scores.argmax(dim=1, keepdim=True)
        parent_rows = p_rows[:, None].expand_as(c_ids)[alive]
        parent_ids = c_ids[alive]
        rows = torch.cat([rows, parent_rows])
        feats = torch.cat([feats, parent_ids])
        values = torch.cat([values, c_values[alive]])
    order = torch.argsort(rows * len(world.probs) + feats)
    rows, feats, values = rows[order], feats[order], values[order]
    x = decode(rows, feats, values, world.features, n_rows)
    if noise_std > 0:
        x += noise_std * torch.randn(x.shape, generator=g)
    return (rows, feats, values), x


def decode(rows: torch.Tensor, feats: torch.Tensor, values: torch.Tensor, features: torch.Tensor, n_rows: int):
    """Sparse codes (sorted by row) times the feature directions: [n_rows, d] by a CSR product."""
    crow = torch.zeros(n_rows + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    codes = torch.sparse_csr_tensor(crow, feats, values, (n_rows, len(features)), check_invariants=False)
    return torch.sparse.mm(codes, features) if len(values) else torch.zeros(n_rows, features.shape[1])


def sample_range(world: WorldModel, seed: int, start: int, stop: int, noise_std: float = 0.0):
    """Rows [start, stop) of the world's stream: (codes as (global row, feature, value), rows [stop - start, d]).

    On one thread: its many small ops ran 3-8x slower on two threads of a busy 2-core box, and one thread makes
    the bits independent of the thread count."""
    codes, xs = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        blocks = [sample_block(world, seed, b, noise_std) for b in range(start // BLOCK_ROWS, -(-stop // BLOCK_ROWS))]
    finally:
        torch.set_num_threads(threads)
    for block, ((rows, feats, values), x) in enumerate(blocks, start // BLOCK_ROWS):
        lo, hi = max(start - block * BLOCK_ROWS, 0), min(stop - block * BLOCK_ROWS, BLOCK_ROWS)
        keep = (rows >= lo) & (rows < hi)
        codes.append((rows[keep] + block * BLOCK_ROWS, feats[keep], values[keep]))
        xs.append(x[lo:hi])
    return tuple(torch.cat(parts) for parts in zip(*codes)), torch.cat(xs)
