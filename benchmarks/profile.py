"""Where an ensemble step's time goes: torch.profiler's table of ops for one case.

    python -m benchmarks.profile --d 256 --dict-size 2048 --members 8 --batch 1024 --execution fused
    python -m benchmarks.profile --device cuda --d 512 --dict-size 4096 --batch 4096 --variant topk
    python -m benchmarks.profile --device cuda --execution fused --passes transposed --no-cuda-graphs  # kernels by name
    python -m benchmarks.profile --execution fused --row-chunk 128 --passes c

Prints the ops sorted by their own time (CPU time on CPU, CUDA kernel time on CUDA),
grouped by input shape, over `--steps` steps after two warm-up steps (on CUDA three: the
graph's warm-up step and its capture); docs/benchmarks.md records the breakdowns before and after
each optimisation. `--execution` with `--row-chunk` / `--passes` pins one `execution.Execution`.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.ensemble import make_members, pinned_execution
from sae_ensemble import sae
from sae_ensemble.config import ExecutionKind
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.kernels.dense import PASSES
from sae_ensemble.memory import reuse_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--dict-size", type=int, default=2048)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--variant", choices=sae.VARIANTS, default="relu")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--execution", choices=list(ExecutionKind), default="auto")
    parser.add_argument(
        "--row-chunk",
        type=int,
        help="rows per kernel call (with --execution fused or sparse; default: the micro-batch)",
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25, help="ops shown")
    parser.add_argument("--autocast-bf16", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument(
        "--passes", choices=PASSES, help="where the fused kernel works between its GEMMs (with --execution fused)"
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="run the kernels eagerly on CUDA (training.compile=false)"
    )
    parser.add_argument(
        "--no-cuda-graphs", action="store_true", help="launch the step's kernels one by one, so the profiler names them"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    execution = pinned_execution(parser, args)
    device = torch.device(args.device)
    if device.type == "cpu":
        reuse_freed_memory()
    else:
        torch.set_float32_matmul_precision("high")
    ensemble = Ensemble(
        make_members(args.d, [args.dict_size], args.members, args.variant, args.k),
        10**9,
        device,
        autocast_bf16=args.autocast_bf16,
        execution=execution,
        cuda_graphs=not args.no_cuda_graphs,
        compile=device.type == "cuda" and not args.no_compile,
    )  # as a sweep worker (training.compile)
    batch = torch.randn(args.batch, args.d, device=device)
    for _ in range(3 if device.type == "cuda" else 2):
        ensemble.step(batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as profiler:
        for _ in range(args.steps):
            ensemble.step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    print(f"execution: {ensemble.choice}; autotune ms: {ensemble.autotune_report}")
    cuda = device.type == "cuda"
    events = [e for e in profiler.key_averages(group_by_input_shape=True) if not cuda or e.device_type.name == "CPU"]
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(own(e) for e in events)
    print(f"{'op':<32} {'ms/step':>8} {'share':>6}  input shapes")
    for event in sorted(events, key=own, reverse=True)[: args.rows]:
        print(f"{event.key:<32} {own(event) / 1e3 / args.steps:>8.2f} {own(event) / total:>6.1%}  {event.input_shapes}")
    print(f"{'total':<32} {total / 1e3 / args.steps:>8.2f}")


if __name__ == "__main__":
    main()
