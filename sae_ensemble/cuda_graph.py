"""One ensemble's step as a replayed CUDA graph (ensemble.py runs its fused step through it on CUDA).

Launching the fused step's ~200 small kernels one by one from Python keeps the GPU waiting on the host
(docs/kernels.md). So the step is captured once and replayed: one eager step on
the graph's own stream first (cuBLAS sets up its workspaces), then a capture, then replays. Each
ensemble captures on a stream of its own: graphs captured on one stream share its cuBLAS workspace
(pytorch/pytorch#193402), and re-capturing one ensemble's graph (after a re-tune) could then free the
workspace another ensemble's graph still replays with.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

Step = Callable[[torch.Tensor], dict[str, torch.Tensor]]


class GraphedStep:
    """Replays a step function captured on a batch of one shape; the stats it returns live in the graph's buffers."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm = False
        self.failed = False  # a capture failed: the ensemble steps eagerly from then on

    def drop(self) -> None:
        """Forget the captured graph (the step now runs other code, e.g. after a re-tune)."""
        self.graph = None

    def __call__(self, step: Step, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.graph is not None and batch.shape == self._batch.shape:
            self._batch.copy_(batch)
            self.graph.replay()
            return self._stats
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        if not self.warm:
            with torch.cuda.stream(self.stream):
                stats = step(batch)
            main.wait_stream(self.stream)
            self.warm = True
            return stats
        graph, static_batch = torch.cuda.CUDAGraph(), batch.clone()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                static_stats = step(static_batch)
        except RuntimeError as error:  # an op that cannot be captured: train eagerly, say so once
            warnings.warn(f"CUDA graph capture of the fused step failed ({error}); stepping eagerly", stacklevel=2)
            self.failed = True
            return step(batch)
        self.graph, self._batch, self._stats = graph, static_batch, static_stats
        self.graph.replay()  # capturing recorded the step; replaying runs it
        return self._stats
