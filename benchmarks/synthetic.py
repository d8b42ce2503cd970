"""Synthetic generation speed: rows per second written to a store, the default toy and the structured presets.

    .venv/bin/python -m benchmarks.synthetic [--rows 524288] [--presets synthetic_hier synthsaebench16k]

toy_rows_per_s   = the default toy (data=synthetic: 512 features in 256 dims) written to a fresh store
hier_rows_per_s  = data=synthetic_hier's world (4096 features, forest, Zipf, correlation), rows only (the
                   world's build, orthogonalisation included, is hier_build_s) — goal >= 16,667 (1M rows a minute)
16k_rows_per_s   = data=synthsaebench16k's (16,384 features in 768 dims; a GPU preset, measured here on CPU at
                   --rows_16k rows; its build is 16k_build_s)
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from sae_ensemble.activations import structured
from sae_ensemble.activations.synthetic import feature_probabilities, ground_truth_features, write_synthetic
from sae_ensemble.config import SyntheticData
from sae_ensemble.sources import world_params

PRESETS = Path(__file__).resolve().parent.parent / "conf" / "data"
SHORT = {"synthetic_hier": "hier", "synthsaebench16k": "16k"}
BUILD = structured.build_world  # timed apart from the rows, then stood in for by the built world


def preset(name: str) -> SyntheticData:
    """conf/data/<name>.yaml over SyntheticData's defaults (its `defaults` list names only the schema)."""
    raw = OmegaConf.load(PRESETS / f"{name}.yaml")
    raw.pop("defaults", None)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SyntheticData), raw))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=524_288)
    parser.add_argument("--rows_16k", type=int, default=65_536)
    parser.add_argument("--presets", nargs="*", default=["synthetic_hier", "synthsaebench16k"], choices=list(SHORT))
    args = parser.parse_args()
    result = {"benchmark": "synthetic", "rows": args.rows, "rows_16k": args.rows_16k}
    cases = [("toy", SyntheticData())] + [(SHORT[name], preset(name)) for name in args.presets]
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in cases:
            rows = args.rows_16k if name == "16k" else args.rows
            params = {f.name: getattr(data, f.name) for f in dataclasses.fields(SyntheticData)}
            kwargs = {k: params[k] for k in ("d_in", "n_features", "n_active", "feature_prob_decay", "seed")}
            if data.world is not None:
                start = time.perf_counter()
                world = BUILD(
                    world_params(data),
                    ground_truth_features(data.d_in, data.n_features, data.seed),
                    feature_probabilities(data.n_features, data.n_active, data.feature_prob_decay),
                    data.seed,
                )
                result[f"{name}_build_s"] = time.perf_counter() - start
                structured.build_world = lambda *args, world=world: world  # time the rows alone
                kwargs["world"] = world_params(data)
            start = time.perf_counter()
            write_synthetic(Path(tmp) / name, n_rows=rows, rows_per_chunk=65_536, heldout_rows=8192, **kwargs)
            seconds = time.perf_counter() - start
            result[f"{name}_rows_per_s"] = rows / seconds
            print(f"{name}: {rows} rows in {seconds:.1f} s, {rows / seconds:,.0f} rows/s")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
