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


def kernels_for(variants: Sequence[str], auxk: bool) -> tuple[str, ...]:
    """The hand-written kernels that implement these members: fused and sparse for sae.py's variants (SAEs and,
    for relu and topk, transcoders with or without the skip path); with AuxK on top-k members, sparse alone."""
    if not set(variants) <= set(KERNEL_VARIANTS):
        return ()
    return (
        (ExecutionKind.sparse,)
        if auxk and set(variants) & set(K_VARIANTS)
        else (ExecutionKind.fused, ExecutionKind.sparse)
    )


def check(kind: str, variants: Sequence[str], auxk: bool, autocast_bf16: bool) -> None:
    """Raise ValueError, one sentence naming the settings, if execution `kind` cannot train these members."""
    if kind not in ExecutionKind.__members__:
        raise ValueError(f"training.execution={kind!r} is unknown; allowed: {', '.join(ExecutionKind)}")
    if kind in (ExecutionKind.fused, ExecutionKind.sparse) and kind not in kernels_for(variants, auxk):
        instead = ["auto", *kernels_for(variants, auxk), "reference"]
        raise ValueError(
            f"training.execution={kind} implements {', '.join(KERNEL_VARIANTS)}"
            f"{' without AuxK' if kind == ExecutionKind.fused else ''} only; variants "
            f"{sorted(set(map(str, variants)))} (AuxK {'on' if auxk else 'off'}) need training.execution="
            f"{', '.join(instead[:-1])} or {instead[-1]}"
        )
    if kind == ExecutionKind.sparse and autocast_bf16:
        raise ValueError(
            "training.execution=sparse runs in float32; with training.autocast_bf16=true use auto, fused or reference"
        )
