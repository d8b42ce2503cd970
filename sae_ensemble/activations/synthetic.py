"""Ground-truth toy data: the seeds' sparse mixture of random unit-norm feature directions.

x = sum_i a_i f_i + noise, with f_i [d_in] unit norm; feature i is active with probability
p_i ∝ decay^i (scaled so about n_active are active per row); active magnitudes a_i ~ U[0, 1).
With correlated=True, activity comes from a Gaussian copula: z ~ N(0, C) with a random
correlation matrix C, and feature i is active when z_i < Φ⁻¹(p_i), so marginals stay p_i.

Paired mode (d_out > 0, transcoders' ground truth): each row is [x | y], with y = sum_i a_i g_i + x @ S.T,
the same active features read through a second unit-norm dictionary g_i [d_out], plus a true linear skip
S [d_out, d_in] ~ N(0, skip_std^2) (zero by default). The skip is identifiable only through the part of x no
feature explains, so a skip needs noise_std > 0. ground_truth.safetensors then holds `features`,
`features_out` and `skip`.

Every store's ground_truth.safetensors also keeps the hierarchy and the true codes of the held-out rows
(truth.py). With `world` (SyntheticData.world as a dict), rows come from the structured generator instead
(structured.py: Zipfian firing, magnitudes, hierarchy, copula correlation, geometry); this module stays the entry.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from . import structured, truth
from .format import DEFAULT_HELDOUT_CAP, DEFAULT_HELDOUT_FRACTION, StoreError
from .lock import store_lock
from .reader import ActivationStore
from .writer import ChunkWriter

GENERATOR = "sparse_mixture_v1"
CORRELATION_RANK = 16  # low-rank factor model: strong, structured correlations between features


_generator = structured.random_stream  # one stream per (seed, purpose, chunk): chunks can be regenerated alone


def feature_probabilities(n_features: int, n_active: float, decay: float) -> torch.Tensor:
    """p_i ∝ decay^i, scaled to sum to n_active (clipped at 1). [n_features]"""
    p = decay ** torch.arange(n_features, dtype=torch.float64)
    return (p * n_active / p.sum()).clamp(max=1.0).float()


def ground_truth_features(d_in: int, n_features: int, seed: int) -> torch.Tensor:
    """Random unit-norm directions [n_features, d_in]."""
    f = torch.randn(n_features, d_in, generator=_generator(seed, 0))
    return f / f.norm(dim=1, keepdim=True)


def _correlation_cholesky(n_features: int, seed: int) -> torch.Tensor:
    """Cholesky factor [n, n] of a random correlation matrix C = normalise(L Lᵀ + I)."""
    factors = torch.randn(n_features, CORRELATION_RANK, generator=_generator(seed, 1), dtype=torch.float64)
    cov = factors @ factors.T + torch.eye(n_features, dtype=torch.float64)
    inv_std = cov.diagonal().rsqrt()
    return torch.linalg.cholesky(cov * inv_std[:, None] * inv_std[None, :]).float()


def sample_codes(
    n_rows: int, probs: torch.Tensor, generator: torch.Generator, chol: torch.Tensor | None = None
) -> torch.Tensor:
    """The toy's true codes of one block [n_rows, n_features]: the first draws of sample_rows' stream."""
    n_features = len(probs)
    if chol is None:
        active = torch.rand(n_rows, n_features, generator=generator) < probs  # [n_rows, n_features]
    else:
        z = torch.randn(n_rows, n_features, generator=generator) @ chol.T  # rows ~ N(0, C)
        active = z < torch.special.ndtri(probs.clamp(1e-12, 1 - 1e-7))
    return torch.rand(n_rows, n_features, generator=generator) * active


def sample_rows(
    n_rows: int,
    features: torch.Tensor,
    probs: torch.Tensor,
    generator: torch.Generator,
    chol: torch.Tensor | None = None,
    noise_std: float = 0.0,
    pair: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One block of synthetic rows [n_rows, d_in]; with `pair` = (features_out, skip), rows [x | y]."""
    return mix(sample_codes(n_rows, probs, generator, chol), features, generator, noise_std, pair)


def mix(
    codes: torch.Tensor,
    features: torch.Tensor,
    generator: torch.Generator,
    noise_std: float = 0.0,
    pair: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The toy's rows from its codes [n_rows, n_features]: codes @ features (+ noise; [x | y] with `pair`)."""
    x = codes @ features  # [n_rows, d_in]
    if noise_std > 0:
        x += noise_std * torch.randn(x.shape, generator=generator)
    if pair is None:
        return x
    features_out, skip = pair
    return torch.cat([x, codes @ features_out + x @ skip.T], dim=1)


def write_synthetic(
    path: str | Path,
    *,
    d_in: int = 256,
    n_features: int = 512,
    n_active: float = 5,
    feature_prob_decay: float = 0.99,
    n_rows: int,
    rows_per_chunk: int = 65_536,
    seed: int = 0,
    correlated: bool = False,
    noise_std: float = 0.0,
    dtype: str = "float32",
    heldout_rows: int | None = None,
    d_out: int = 0,
    skip_std: float = 0.0,
    world: dict | None = None,
) -> ActivationStore:
    """Write (or reuse, or resume) a synthetic store with `ground_truth.safetensors`; deterministic in seed
    (paired with d_out > 0: rows [x | y]; with `world`: a structured world, structured.py; the module doc).

    Rows are generated one chunk at a time (never the whole dataset in memory); chunk k depends
    only on (seed, k), so an interrupted write resumes from its last complete chunk.
    """
    if d_out < 0 or skip_std < 0 or (skip_std and not d_out) or (world and d_out):
        raise StoreError(
            f"Paired mode needs d_out ({d_out}) >= 0 and skip_std ({skip_std}) >= 0, skip_std only with d_out, "
            "and no world."
        )
    if not 0 < n_active <= n_features or not 0 < feature_prob_decay <= 1 or n_rows <= 0 or noise_std < 0:
        raise StoreError(
            f"Synthetic parameters out of range: need 0 < n_active ({n_active}) <= n_features ({n_features}), "
            f"0 < feature_prob_decay ({feature_prob_decay}) <= 1, n_rows ({n_rows}) > 0, noise_std ({noise_std}) >= 0."
        )
    path = Path(path)
    source = {
        "kind": "synthetic",
        "generator": structured.GENERATOR if world else GENERATOR,
        "d_in": d_in,
        "n_features": n_features,
        "n_active": n_active,
        "feature_prob_decay": feature_prob_decay,
        "n_rows": n_rows,
        "seed": seed,
        "correlated": correlated,
        "noise_std": noise_std,
        **({"d_out": d_out, "skip_std": skip_std} if d_out else {}),  # only when paired: other stores keep their key
        **({"world": world} if world else {}),  # only when structured: the toy keeps its key
    }
    with store_lock(path):
        return _write_synthetic_locked(path, source, rows_per_chunk, dtype, heldout_rows)


class _Generation:
    """One store's generator: its truth, and each chunk's rows and codes by chunk index."""

    def __init__(self, source: dict, rows_per_chunk: int) -> None:
        self.source, self.rows_per_chunk = source, rows_per_chunk
        n_features, seed = source["n_features"], source["seed"]
        features = ground_truth_features(source["d_in"], n_features, seed)
        probs = feature_probabilities(n_features, source["n_active"], source["feature_prob_decay"])
        self.chol = _correlation_cholesky(n_features, seed) if source["correlated"] else None
        self.world = structured.build_world(source["world"], features, probs, seed) if "world" in source else None
        if self.world is not None:
            features, probs = self.world.features, self.world.probs
        self.features, self.probs = features, probs
        d_out, skip_std = source.get("d_out", 0), source.get("skip_std", 0.0)
        self.truth = {
            "features": features,
            "parents": self.world.parents if self.world else torch.full((n_features,), -1, dtype=torch.int64),
            "probabilities": probs,
        }
        self.pair = None
        if d_out:
            self.pair = (
                F.normalize(torch.randn(n_features, d_out, generator=_generator(seed, 4)), dim=1),
                skip_std * torch.randn(d_out, source["d_in"], generator=_generator(seed, 3)),
            )
            self.truth.update(features_out=self.pair[0], skip=self.pair[1])

    def chunk(self, k: int, n_rows: int, rows: bool = True):
        """Chunk k: (sparse codes (global row, feature, value) sorted by row, its rows [n_rows, width] or None)."""
        start, seed, noise = k * self.rows_per_chunk, self.source["seed"], self.source["noise_std"]
        if self.world is not None:
            return structured.sample_range(self.world, seed, start, start + n_rows, noise)
        generator = _generator(seed, 2, k)
        codes = sample_codes(n_rows, self.probs, generator, self.chol)
        x = mix(codes, self.features, generator, noise, self.pair) if rows else None
        line, feature = codes.nonzero(as_tuple=True)
        return (line + start, feature, codes[line, feature]), x


def _chunk_rows(n_rows: int, rows_per_chunk: int) -> list[int]:
    return [min(rows_per_chunk, n_rows - lo) for lo in range(0, n_rows, rows_per_chunk)]


def _heldout_truth(gen: _Generation, heldout_rows: int, chunk_codes) -> dict[str, torch.Tensor]:
    """The CODES tensors (truth.py) of the held-out rows, from each chunk's codes (`chunk_codes(k, rows)`)."""
    sizes = _chunk_rows(gen.source["n_rows"], gen.rows_per_chunk)
    tails = truth.heldout_tails(sizes, heldout_rows)
    parts, row_ids = [], []
    for k, (size, tail) in enumerate(zip(sizes, tails)):
        if tail:
            rows, feats, values = chunk_codes(k, size)
            first = k * gen.rows_per_chunk + size - tail
            keep = rows >= first
            parts.append((rows[keep], feats[keep], values[keep]))
            row_ids.append(torch.arange(first, first + tail))
    if not parts:
        return {}
    rows, feats, values = (torch.cat(p) for p in zip(*parts))
    return truth.heldout_codes(torch.cat(row_ids), rows, feats, values)


def _write_synthetic_locked(
    path: Path, source: dict, rows_per_chunk: int, dtype: str, heldout_rows: int | None
) -> ActivationStore:
    """write_synthetic under the store's lock; `source` (the manifest's record of the parameters) says what to write."""
    if (path / "manifest.json").exists():
        store = ActivationStore.open(path)
        wanted = {"source": source, "dtype": dtype, "rows_per_chunk": rows_per_chunk}
        found = {k: store.manifest.get(k) for k in wanted}
        if heldout_rows is not None:
            wanted["heldout_rows"], found["heldout_rows"] = heldout_rows, store.heldout_rows
        if found != wanted:
            raise StoreError(
                f"Store {path} already holds synthetic data with other parameters ({found}); choose another path."
            )
        _add_missing_truth(store)
        return store

    n_rows = source["n_rows"]
    gen = _Generation(source, rows_per_chunk)
    width = source["d_in"] + source.get("d_out", 0)
    writer = ChunkWriter(path, width, dtype, rows_per_chunk, source=source, hook=None, heldout_rows=heldout_rows)
    if heldout_rows is None:  # the writer's default split, known before the rows
        heldout_rows = min(int(n_rows * DEFAULT_HELDOUT_FRACTION), DEFAULT_HELDOUT_CAP)
    written = writer.resume_rows // rows_per_chunk
    kept: dict[int, tuple] = {}

    def chunk_codes(k: int, size: int):
        return kept[k] if k in kept else gen.chunk(k, size, rows=False)[0]

    tails = truth.heldout_tails(_chunk_rows(n_rows, rows_per_chunk), heldout_rows)
    for k in range(written, -(-n_rows // rows_per_chunk)):
        codes, x = gen.chunk(k, min(rows_per_chunk, n_rows - k * rows_per_chunk))
        writer.write(x)
        if tails[k]:
            kept[k] = codes
    truth.save_truth(path, {**gen.truth, **_heldout_truth(gen, heldout_rows, chunk_codes)})
    return writer.close()


def _add_missing_truth(store: ActivationStore) -> None:
    """A store written before the truth file kept the held-out codes and hierarchy: add them (same rows, same key)."""
    held = truth.load_truth(store.path)
    if all(name in held for name in truth.CODES) or not store.manifest["source"].get("kind") == "synthetic":
        return
    gen = _Generation(store.manifest["source"], store.manifest["rows_per_chunk"])
    if gen.world is None and store.heldout_rows:
        gen_codes = _heldout_truth(gen, store.heldout_rows, lambda k, size: gen.chunk(k, size, rows=False)[0])
    else:
        gen_codes = {}
    try:
        truth.save_truth(store.path, {**gen.truth, **held, **gen_codes})
    except OSError as error:  # a read-only store is still usable; true_codes will say what it lacks
        warnings.warn(f"could not add the held-out true codes to {store.path} ({error.strerror})", stacklevel=2)
