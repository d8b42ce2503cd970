"""Runs inside the SAELens venv (tests/test_interop_synthetic.py): its synthetic world and its scores.

python synthetic_check.py world OUT.safetensors    a small SynthSAEBench-style world (sae_lens.synthetic): rows,
                                                   their feature activations and the feature directions
python synthetic_check.py score IN.safetensors     SAELens' MCC, uniqueness and classification metrics of the
                                                   decoder and codes in IN; one JSON line
"""

import json
import sys

import torch
from sae_lens.synthetic import HierarchyConfig, SyntheticModel, SyntheticModelConfig, ZipfianFiringProbabilityConfig
from sae_lens.synthetic.evals import compute_classification_metrics, feature_uniqueness, mean_correlation_coefficient
from safetensors.torch import load_file, save_file


def world(path: str) -> None:
    config = SyntheticModelConfig(
        num_features=96,
        hidden_dim=48,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.3, min_prob=0.02),
        hierarchy=HierarchyConfig(total_root_nodes=8, branching_factor=2, max_depth=2, mutually_exclusive_portion=1.0),
        bias=False,
        seed=0,
    )
    model = SyntheticModel(config)
    torch.manual_seed(0)
    rows, codes = model.sample_with_features(24_000)
    features = model.feature_dict.feature_vectors.detach()
    save_file({"rows": rows.contiguous(), "codes": codes.contiguous(), "features": features.contiguous()}, path)


def score(path: str) -> None:
    data = load_file(path)
    decoder, truth = data["decoder"], data["truth"]
    metrics = compute_classification_metrics(data["codes"], data["true_codes"], decoder, truth)
    print(
        json.dumps(
            {
                "mcc": mean_correlation_coefficient(decoder, truth),
                "uniqueness": feature_uniqueness(decoder, truth),
                "precision": metrics.precision,
                "recall": metrics.recall,
                "f1": metrics.f1_score,
            }
        )
    )


if __name__ == "__main__":
    {"world": world, "score": score}[sys.argv[1]](sys.argv[2])
