"""How an ensemble computes its gradients, as a value: what the autotuner returns and the step runs.

`training.execution` (config.ExecutionKind) asks for one kind or for `auto`; an `Execution` is one
concrete way: the kind, the rows per kernel call and, for the fused kernel, where its passes run
(kernels.dense.PASSES). `check` is the one rule for which kinds may run which members: the pipeline
applies it to the config before any work, the Ensemble to its members.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sae_ensemble.config import K_VARIANTS, KERNEL_VARIANTS, ExecutionKind


@dataclass(frozen=True)
class Execution:
    """One way to compute an ensemble's gradients."""

    kind: str
    """reference (vmap(grad) of the loss: the definition), fused or sparse (kernels/, equal to it)."""
    row_chunk: int | None = None
    """Rows per kernel call (None: the whole micro-batch); on CPU a chunk's [M, rows, n] tiles stay in cache."""
    passes: str | None = None
    """fused only: kernels.dense.PASSES, where the work between its GEMMs runs (None: its default)."""

    def describe(self) -> str:
        """The name logs and reports show: `fused(rows=64, transposed)`."""
        options = ([f"rows={self.row_chunk}"] if self.row_chunk is not None else []) + (
            [self.passes] if self.passes else []
        )
        return f"{self.kind}({', '.join(options)})" if options else self.kind


REFERENCE = Execution("reference")


def kernels_apply(variants: Sequence[str], auxk: bool) -> bool:
    """Whether the hand-written kernels implement these members: sae.py's variants without AuxK (SAEs and, for
    relu and topk, transcoders with or without the skip path)."""
    return set(variants) <= set(KERNEL_VARIANTS) and not (auxk and set(variants) & set(K_VARIANTS))


def check(kind: str, variants: Sequence[str], auxk: bool, autocast_bf16: bool) -> None:
    """Raise ValueError, one sentence naming the settings, if execution `kind` cannot train these members."""
    if kind not in ExecutionKind.__members__:
        raise ValueError(f"training.execution={kind!r} is unknown; allowed: {', '.join(ExecutionKind)}")
    if kind in (ExecutionKind.fused, ExecutionKind.sparse) and not kernels_apply(variants, auxk):
        raise ValueError(
            f"training.execution={kind} implements {', '.join(KERNEL_VARIANTS)} without AuxK only; variants "
            f"{sorted(set(map(str, variants)))} (AuxK {'on' if auxk else 'off'}) need training.execution=auto or "
            "reference"
        )
    if kind == ExecutionKind.sparse and autocast_bf16:
        raise ValueError(
            "training.execution=sparse runs in float32; with training.autocast_bf16=true use auto, fused or reference"
        )
