"""Runs inside the SAELens venv (tests/test_interop_synthetic_firing.py): how often each feature of a
sae_lens.synthetic world fires, for worlds given in our parameters.

python synthetic_firing_check.py SPEC.json OUT_DIR

SPEC.json maps a case name to {"n_features", "rows", "batch", "seed", "world", "groups", "draws"}; each case
writes OUT_DIR/<name>.safetensors. "world" is data.world as our store records it (sources.world_params);
geometry does not change firing and is ignored. Each part maps onto the SAELens setting of the same meaning:

    zipf {exponent, p_max, p_min}             ZipfianFiringProbabilityConfig(exponent, max_prob, min_prob)
    magnitudes {mean_first, mean_last,        mean: LinearMagnitudeConfig(mean_first, mean_last);
                std_mean, std_spread}         std: FoldedNormalMagnitudeConfig(std_mean, std_spread), or the
                                              constant |std_mean| when std_spread is 0
    hierarchy {roots, branching, depth,       HierarchyConfig(total_root_nodes, branching_factor, max_depth,
               exclusive, compensate}         mutually_exclusive_portion 1 or 0, compensate_probabilities)
    correlation {rank, scale}                 LowRankCorrelationConfig(rank, correlation_scale)

"draws" (a safetensors path or null) holds the world's random per-feature parameters to use instead of SAELens'
own draws of the same distributions: std_magnitudes [n], correlation_factor [n, rank]. "groups" [n] assigns each
feature to a group (a hierarchy level, a band of free features) for the per-row group counts.

OUT_DIR/<name>.safetensors (never pickle):
    counts [n] int64               rows in which each feature is active (activation > 0)
    value_sum, value_sq_sum [n]    float64 sums of its activations and their squares over those rows
    group_sum, group_sq_sum [G]    float64 sums over rows of each group's active count in the row, and its square
    l0_hist [max L0 + 1] int64     rows by number of active features
    rows [] int64                  rows drawn
    probabilities [n]              the generator's firing probabilities (after compensation, before gating)
    mean_magnitudes, std_magnitudes [n]
    parents [n] int64              each feature's parent, -1 for roots and features outside the forest
    exclusive [n] bool             whether the feature's siblings are mutually exclusive
"""

import json
import sys
from pathlib import Path

import torch
from sae_lens.synthetic import (
    FoldedNormalMagnitudeConfig,
    HierarchyConfig,
    LinearMagnitudeConfig,
    LowRankCorrelationConfig,
    LowRankCorrelationMatrix,
    SyntheticModel,
    SyntheticModelConfig,
    ZipfianFiringProbabilityConfig,
)
from safetensors.torch import load_file, save_file


def saelens_config(n_features: int, world: dict, seed: int) -> SyntheticModelConfig:
    """Our world's parameters as a SyntheticModelConfig (the module doc's table); hidden_dim 8: only codes count."""
    settings = {}
    if zipf := world.get("zipf"):
        settings["firing_probability"] = ZipfianFiringProbabilityConfig(
            exponent=zipf["exponent"], max_prob=zipf["p_max"], min_prob=zipf["p_min"]
        )
    if magnitudes := world.get("magnitudes"):
        settings["mean_firing_magnitudes"] = LinearMagnitudeConfig(magnitudes["mean_first"], magnitudes["mean_last"])
        settings["std_firing_magnitudes"] = (
            FoldedNormalMagnitudeConfig(mean=magnitudes["std_mean"], std=magnitudes["std_spread"])
            if magnitudes["std_spread"] > 0
            else abs(magnitudes["std_mean"])
        )
    if hierarchy := world.get("hierarchy"):
        settings["hierarchy"] = HierarchyConfig(
            total_root_nodes=hierarchy["roots"],
            branching_factor=hierarchy["branching"],
            max_depth=hierarchy["depth"],
            mutually_exclusive_portion=1.0 if hierarchy["exclusive"] else 0.0,
            compensate_probabilities=hierarchy["compensate"],
        )
    if correlation := world.get("correlation"):
        settings["correlation"] = LowRankCorrelationConfig(
            rank=correlation["rank"], correlation_scale=correlation["scale"]
        )
    return SyntheticModelConfig(num_features=n_features, hidden_dim=8, bias=False, seed=seed, **settings)


def build_model(spec: dict) -> SyntheticModel:
    """The world's SyntheticModel, with the random per-feature parameters of spec["draws"] where given."""
    draws = load_file(spec["draws"]) if spec.get("draws") else {}
    correlation = None
    if "correlation_factor" in draws:
        factor = draws["correlation_factor"]
        correlation = LowRankCorrelationMatrix(factor, 1 - factor.square().sum(dim=1))  # SAELens' unit diagonal
    model = SyntheticModel(
        saelens_config(spec["n_features"], spec["world"], spec["seed"]), correlation_matrix=correlation
    )
    if "std_magnitudes" in draws:  # as SyntheticModel.load_from_disk sets the saved firing probabilities
        model.activation_generator.std_firing_magnitudes = draws["std_magnitudes"].float()
    return model


def forest(model: SyntheticModel, n_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(parent of each feature, whether its siblings are mutually exclusive), read from the model's hierarchy."""
    parents = torch.full((n_features,), -1, dtype=torch.int64)
    exclusive = torch.zeros(n_features, dtype=torch.bool)
    stack = list(model.hierarchy.roots) if model.hierarchy else []
    while stack:
        node = stack.pop()
        for child in node.children:
            parents[child.feature_index] = node.feature_index
            exclusive[child.feature_index] = node.mutually_exclusive_children
            stack.append(child)
    return parents, exclusive


def firing(spec: dict) -> dict[str, torch.Tensor]:
    n = spec["n_features"]
    model = build_model(spec)
    generator = model.activation_generator
    groups = torch.nn.functional.one_hot(torch.tensor(spec["groups"])).float()  # [n, G]
    counts = torch.zeros(n, dtype=torch.int64)
    value_sum, value_sq_sum = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    group_sum = torch.zeros(groups.shape[1], dtype=torch.float64)
    group_sq_sum = torch.zeros(groups.shape[1], dtype=torch.float64)
    l0_hist = torch.zeros(n + 1, dtype=torch.int64)
    torch.manual_seed(spec["seed"])  # sampling draws from the global stream
    for lo in range(0, spec["rows"], spec["batch"]):
        _, codes = model.sample_with_features(min(spec["batch"], spec["rows"] - lo))  # [batch, n]
        active = codes > 0
        counts += active.sum(0)
        value_sum += codes.sum(0).double()
        value_sq_sum += codes.square().sum(0).double()
        per_group = active.float() @ groups  # [batch, G]
        group_sum += per_group.sum(0).double()
        group_sq_sum += per_group.square().sum(0).double()
        l0_hist += torch.bincount(active.sum(1), minlength=n + 1)
    parents, exclusive = forest(model, n)
    return {
        "counts": counts,
        "value_sum": value_sum,
        "value_sq_sum": value_sq_sum,
        "group_sum": group_sum,
        "group_sq_sum": group_sq_sum,
        "l0_hist": l0_hist[: int(l0_hist.nonzero().max()) + 1],
        "rows": torch.tensor(spec["rows"]),
        "probabilities": generator.firing_probabilities,
        "mean_magnitudes": generator.mean_firing_magnitudes,
        "std_magnitudes": generator.std_firing_magnitudes,
        "parents": parents,
        "exclusive": exclusive,
    }


if __name__ == "__main__":
    torch.set_num_threads(1)  # a 2-core box: the test generates our rows beside this on the other core
    specs = json.loads(Path(sys.argv[1]).read_text())
    for name, spec in specs.items():
        tensors = firing(spec)
        save_file(
            {key: value.contiguous() for key, value in tensors.items()}, str(Path(sys.argv[2]) / f"{name}.safetensors")
        )
