"""The config's closed choices: each an Enum that Hydra checks, and the variant families the engine branches on.

A leaf: it imports nothing of ours (sae_ensemble.config re-exports these names).
"""

from __future__ import annotations

from enum import StrEnum


class Variant(StrEnum):
    """SAE architectures (docs/architectures.md); architectures.MODULES implements each."""

    relu = "relu"
    tied = "tied"
    topk = "topk"
    batchtopk = "batchtopk"
    matryoshka = "matryoshka"
    jumprelu = "jumprelu"
    gated = "gated"


K_VARIANTS = (Variant.topk, Variant.batchtopk, Variant.matryoshka)  # sparsity set by k (no L1 term)
L1_VARIANTS = (Variant.relu, Variant.tied, Variant.gated)  # sparsity set by l1
STEERABLE = (Variant.relu, Variant.tied)  # target-L0 members steer their l1 (steering.py); topk takes k = round(target)
KERNEL_VARIANTS = (Variant.relu, Variant.tied, Variant.topk)  # what the hand-written kernels (kernels/) implement
# Variants that can be transcoders (an encoder of the input's width, a decoder of the output's): not tied (one matrix
# for both; measured on the tiny LM's MLP it predicts worse than zero), nor gated (not implemented).
TRANSCODER_VARIANTS = (Variant.relu, Variant.topk, Variant.batchtopk, Variant.matryoshka, Variant.jumprelu)


class StoreDtype(StrEnum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Verify(StrEnum):
    """How a store's chunks are checked beyond their sizes and headers (activations/reader.py)."""

    size = "size"
    once = "once"
    checksum = "checksum"


class Normalize(StrEnum):
    none = "none"
    center = "center"
    center_scale = "center_scale"


class ExecutionKind(StrEnum):
    """How a step computes its gradients (execution.py, docs/kernels.md)."""

    auto = "auto"
    reference = "reference"
    fused = "fused"
    sparse = "sparse"


class NativeKernels(StrEnum):
    """Whether CPU workers use the C kernels (kernels/native.py)."""

    auto = "auto"
    on = "on"
    off = "off"


class MatmulPrecision(StrEnum):
    highest = "highest"
    high = "high"
    medium = "medium"


class HalvingMetric(StrEnum):
    auto = "auto"
    pareto = "pareto"
    mmcs_truth = "mmcs_truth"
    fvu = "fvu"


class TinyModel(StrEnum):
    trained = "trained"
    random = "random"


class WandbMode(StrEnum):
    online = "online"
    offline = "offline"
    disabled = "disabled"
