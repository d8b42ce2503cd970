"""Synthetic generation speed: rows per second written to a store, the default toy and the hierarchical preset.

    .venv/bin/python -m benchmarks.synthetic [--rows 524288]

toy_rows_per_s   = the default toy (data=synthetic: 512 features in 256 dims) written to a fresh store
hier_rows_per_s  = data=synthetic_hier's world (4096 features, forest, Zipf, correlation), rows only (the
                   world's build, orthogonalisation included, is hier_build_s) — goal >= 16,667 (1M rows a minute)
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from sae_ensemble.activations import structured
from sae_ensemble.activations.synthetic import feature_probabilities, ground_truth_features, write_synthetic
from sae_ensemble.config import SyntheticData
from sae_ensemble.sources import world_params
from tests.sweeps import compose_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=524_288)
    rows = parser.parse_args().rows
    toy, hier = SyntheticData(), compose_config("data=synthetic_hier").data
    result = {"benchmark": "synthetic", "rows": rows}
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in (("toy", toy), ("hier", hier)):
            params = {f.name: getattr(data, f.name) for f in dataclasses.fields(SyntheticData)}
            kwargs = {k: params[k] for k in ("d_in", "n_features", "n_active", "feature_prob_decay", "seed")}
            if data.world is not None:
                start = time.perf_counter()
                world = structured.build_world(
                    world_params(data),
                    ground_truth_features(data.d_in, data.n_features, data.seed),
                    feature_probabilities(data.n_features, data.n_active, data.feature_prob_decay),
                    data.seed,
                )
                result["hier_build_s"] = time.perf_counter() - start
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
