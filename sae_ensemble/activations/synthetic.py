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
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .format import GROUND_TRUTH, StoreError
from .lock import store_lock
from .reader import ActivationStore
from .writer import ChunkWriter

GENERATOR = "sparse_mixture_v1"
CORRELATION_RANK = 16  # low-rank factor model: strong, structured correlations between features


def _generator(seed: int, *stream: int) -> torch.Generator:
    # one independent, reproducible stream per (seed, purpose, chunk): chunks can be regenerated alone
    mixed = np.random.SeedSequence([seed, *stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed))


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
    n_features = features.shape[0]
    if chol is None:
        active = torch.rand(n_rows, n_features, generator=generator) < probs  # [n_rows, n_features]
    else:
        z = torch.randn(n_rows, n_features, generator=generator) @ chol.T  # rows ~ N(0, C)
        active = z < torch.special.ndtri(probs.clamp(1e-12, 1 - 1e-7))
    codes = torch.rand(n_rows, n_features, generator=generator) * active
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
) -> ActivationStore:
    """Write (or reuse, or resume) a synthetic store with `ground_truth.safetensors`; deterministic in seed
    (paired with d_out > 0: rows [x | y], the module doc).

    Rows are generated one chunk at a time (never the whole dataset in memory); chunk k depends
    only on (seed, k), so an interrupted write resumes from its last complete chunk.
    """
    if d_out < 0 or skip_std < 0 or (skip_std and not d_out):
        raise StoreError(
            f"Paired mode needs d_out ({d_out}) >= 0 and skip_std ({skip_std}) >= 0, skip_std only with d_out."
        )
    if not 0 < n_active <= n_features or not 0 < feature_prob_decay <= 1 or n_rows <= 0 or noise_std < 0:
        raise StoreError(
            f"Synthetic parameters out of range: need 0 < n_active ({n_active}) <= n_features ({n_features}), "
            f"0 < feature_prob_decay ({feature_prob_decay}) <= 1, n_rows ({n_rows}) > 0, noise_std ({noise_std}) >= 0."
        )
    path = Path(path)
    source = {
        "kind": "synthetic",
        "generator": GENERATOR,
        "d_in": d_in,
        "n_features": n_features,
        "n_active": n_active,
        "feature_prob_decay": feature_prob_decay,
        "n_rows": n_rows,
        "seed": seed,
        "correlated": correlated,
        "noise_std": noise_std,
        **({"d_out": d_out, "skip_std": skip_std} if d_out else {}),  # only when paired: other stores keep their key
    }
    with store_lock(path):
        return _write_synthetic_locked(path, source, rows_per_chunk, dtype, heldout_rows)


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
        return store

    d_in, n_features, n_rows, seed = source["d_in"], source["n_features"], source["n_rows"], source["seed"]
    features = ground_truth_features(d_in, n_features, seed)
    probs = feature_probabilities(n_features, source["n_active"], source["feature_prob_decay"])
    chol = _correlation_cholesky(n_features, seed) if source["correlated"] else None
    d_out, skip_std = source.get("d_out", 0), source.get("skip_std", 0.0)
    truth, pair = {"features": features}, None
    if d_out:
        pair = (
            F.normalize(torch.randn(n_features, d_out, generator=_generator(seed, 4)), dim=1),
            skip_std * torch.randn(d_out, d_in, generator=_generator(seed, 3)),
        )
        truth.update(features_out=pair[0], skip=pair[1])
    width = d_in + d_out
    writer = ChunkWriter(path, width, dtype, rows_per_chunk, source=source, hook=None, heldout_rows=heldout_rows)
    from safetensors.torch import save_file

    tmp = path / (GROUND_TRUTH + ".tmp")
    save_file({name: value.contiguous() for name, value in truth.items()}, str(tmp))
    tmp.replace(path / GROUND_TRUTH)
    for k in range(writer.resume_rows // rows_per_chunk, -(-n_rows // rows_per_chunk)):
        rows = min(rows_per_chunk, n_rows - k * rows_per_chunk)
        writer.write(sample_rows(rows, features, probs, _generator(seed, 2, k), chol, source["noise_std"], pair))
    return writer.close()
