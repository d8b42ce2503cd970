"""Ensemble training throughput against the device's GEMM peak and against sequential training.

    python -m benchmarks.ensemble                      # the recorded cases (docs/benchmarks.md)
    python -m benchmarks.ensemble --cases large,topk   # some of them
    python -m benchmarks.ensemble --d 512 --dict-sizes 2048,4096 --members 8 --batch 4096 --steps 10
    python -m benchmarks.ensemble --d 512 --dict-sizes 4096 --members 8 --batch 4096 --variant topk --k 32

The ensemble side runs exactly as a sweep worker does: the members are split into the
planner's ensembles (`plan.make_plan` with the device's auto budget: one per dict size, so
nothing is padded, with its micro-batches), stepped one after another on the same batch as a
worker steps a stage, each with the execution its autotuner picks (`--execution` pins a kind,
`--row-chunk` and `--passes` pin the rest of an `execution.Execution`), compiled on CUDA as
`training.compile` does (`--no-compile`: eager).
The sequential side is plain autograd + torch.optim.Adam, one member after another.
The ensemble, the sequential members and the encoder GEMMs take turns (`--rounds`, default 3),
and each side's time is its median round.

Measured in one run, per case:
  gemm_gflops        fp32 peak of a large square torch.mm on the device
  ensemble_gflops    12*B*d*n FLOPs per member per step (real dict sizes, padding not counted; the
                     dense-equivalent count, also for the sparse path) / step time
  mfu                ensemble_gflops / gemm_gflops
  sequential_gflops  the same members, one after another, plain autograd + torch.optim.Adam
  speedup            sequential time / ensemble time
  limit_ratio        ensemble step time / time of the members' encoder GEMMs alone (2*B*d*n each),
                     the part no SAE step can skip
  adam_vmap_ratio    torchopt's Adam (the tests' definition of kernels/adam.py) vmapped over members /
                     the same update on the stacked tensors
  execution          what each sub-ensemble ran (the autotuner's choice)
The last line of each case is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torchopt

from sae_ensemble import sae
from sae_ensemble.autotune import timed
from sae_ensemble.config import ExecutionKind
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.execution import Execution
from sae_ensemble.kernels import adam
from sae_ensemble.kernels.dense import PASSES
from sae_ensemble.member import Member
from sae_ensemble.memory import resolve_budget, reuse_freed_memory
from sae_ensemble.plan import make_plan

FREEZE_AFTER = 10  # training.freeze_after's default: time the step training runs
WARMUP_STEPS = 3  # before timing, on CUDA: the autotuning step, the eager step before the graph capture, the capture
# The cases docs/benchmarks.md records, (d, dict sizes, members, batch, variant): overhead-bound, mid, mixed
# sizes, GEMM-bound, sparse.
RECORDED_CASES = {
    "small": (128, [512], 32, 256, "relu"),
    "mid": (256, [2048], 8, 1024, "relu"),
    "mixed": (256, [1024, 2048], 16, 1024, "relu"),
    "large": (512, [2048, 4096], 8, 4096, "relu"),
    "topk": (512, [4096], 8, 4096, "topk"),
}


def largest_ensemble(case: str) -> dict[str, int]:
    """The planner's largest ensemble of a recorded case (one per dict size): d, dict_size, members, batch."""
    d, sizes, members, batch, _ = RECORDED_CASES[case]
    return {
        "d": d,
        "dict_size": max(sizes),
        "members": sum(sizes[i % len(sizes)] == max(sizes) for i in range(members)),
        "batch": batch,
    }


def gemm_peak_gflops(device: torch.device, size: int = 4096) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    seconds = timed(lambda: torch.mm(a, b), repeats=5 if device.type == "cpu" else 50, device=device)
    return 2 * size**3 / seconds / 1e9


def make_members(d: int, dict_sizes: list[int], n_members: int, variant: str = "relu", k: int = 32) -> list[Member]:
    sparsity = {"k": k} if variant == "topk" else {}
    return [
        Member(variant, d, dict_sizes[i % len(dict_sizes)], l1=1e-3 * (1 + i), lr=1e-3, seed=i, **sparsity)
        for i in range(n_members)
    ]


def sequential_steps(
    members: list[Member], batch: torch.Tensor, device: torch.device, autocast_bf16: bool = False
) -> list:
    """One step function per member, trained alone with plain autograd + torch.optim.Adam: the baseline."""
    steps = []
    for member in members:
        init = sae.init_params(member.variant, member.d_in, member.dict_size, member.seed)
        params = {k: v.to(device).requires_grad_() for k, v in init.items()}
        hp = {
            k: v.to(device)
            for k, v in sae.make_hparams(member.variant, member.dict_size, member.l1, k=member.k).items()
        }
        layout = sae.Layout.of([member.variant], [member.k])
        optimizer = torch.optim.Adam(params.values(), lr=member.lr)

        def step(params=params, hp=hp, layout=layout, optimizer=optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast_bf16):
                loss, _ = sae.loss(params, hp, batch, layout)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                params["W_dec"].copy_(torch.nn.functional.normalize(params["W_dec"], dim=-1))

        steps.append(step)
    return steps


def encoder_gemms(members: list[Member], batch: torch.Tensor, device: torch.device):
    """The members' encoder GEMMs alone (limit_ratio's denominator), as one function."""
    weights = [torch.randn(m.dict_size, m.d_in, device=device) for m in members]
    return lambda: [batch @ w.T for w in weights]


def adam_vmap_ratio(ensemble: Ensemble, device: torch.device) -> float:
    """Time of torchopt's Adam vmapped over members / applied to the stacked tensors directly: why the
    ensemble's Adam (kernels/adam.py, equal to torchopt's) works on the stack without vmap."""
    optimizer = torchopt.transform.scale_by_adam(b1=adam.BETAS[0], b2=adam.BETAS[1], eps=adam.EPS)
    grads = {k: torch.randn_like(v) for k, v in ensemble.params.items()}
    stacked_state = optimizer.init(ensemble.params)
    vmapped_state = torch.func.vmap(optimizer.init)(ensemble.params)
    vmapped_update = torch.func.vmap(lambda g, s: optimizer.update(g, s, inplace=False))
    stacked = timed(lambda: optimizer.update(grads, stacked_state, inplace=False), 5, device)
    vmapped = timed(lambda: vmapped_update(grads, vmapped_state), 5, device)
    return vmapped / stacked


def planned_ensembles(members: list[Member], batch_size: int, device: torch.device, **options) -> list[Ensemble]:
    """The members as a sweep worker on `device` would train them: the planner's ensembles, auto budget."""
    name = "cuda:0" if device.type == "cuda" else "cpu:0"
    plan = make_plan(members, [name], batch_size, resolve_budget("auto", [name]))
    return [
        Ensemble(
            plan.ensemble_members(e.index), total_steps=10**9, device=device, micro_batches=e.micro_batches, **options
        )
        for e in plan.ensembles
    ]


def step_all(ensembles: list[Ensemble], batch: torch.Tensor) -> None:
    """One step of every ensemble on the same batch, one after another, as a worker steps a stage (train.py)."""
    for ensemble in ensembles:
        ensemble.step(batch)


def run_case(
    d: int,
    dict_sizes: list[int],
    n_members: int,
    batch_size: int,
    steps: int,
    device: torch.device,
    variant: str = "relu",
    k: int = 32,
    execution: str | Execution = "auto",
    autocast_bf16: bool = False,
    compile: bool = True,
    rounds: int = 3,
) -> dict:
    """One case's figures (the module doc). `execution`: an ExecutionKind, or an Execution pinned for every ensemble."""
    members = make_members(d, dict_sizes, n_members, variant, k)
    batch = torch.randn(batch_size, d, device=device)
    flops_per_step = sum(12 * batch_size * d * m.dict_size for m in members)

    gemm = gemm_peak_gflops(device)
    compile = compile and device.type == "cuda"  # as a sweep worker (training.compile)
    ensembles = planned_ensembles(
        members,
        batch_size,
        device,
        autocast_bf16=autocast_bf16,
        execution=execution,
        freeze_after=FREEZE_AFTER,
        compile=compile,
    )
    if device.type == "cuda":  # tune, warm up and capture each graph before anything is timed
        for _ in range(WARMUP_STEPS):
            step_all(ensembles, batch)
    sides = {
        "ensemble": (lambda: step_all(ensembles, batch)),
        "sequential": sequential_steps(members, batch, device, autocast_bf16),
        "encoder": encoder_gemms(members, batch, device),
    }
    # The sides take turns, `rounds` times, and each keeps its median: on a shared machine a burst of
    # load then slows one round of every side, not the whole of one side, so it moves no ratio.
    times: dict[str, list[float]] = {side: [] for side in sides}
    per_round = max(1, -(-steps // rounds))
    for index in range(rounds):
        warmup = 2 if index == 0 else 0
        times["ensemble"].append(timed(sides["ensemble"], per_round, device, warmup=warmup))
        times["sequential"].append(sum(timed(step, per_round, device, warmup=warmup) for step in sides["sequential"]))
        times["encoder"].append(timed(sides["encoder"], 5, device, warmup=1))
    ensemble_time, sequential_time, encoder_time = (statistics.median(times[side]) for side in sides)
    result = {
        "case": f"d={d} dict_sizes={','.join(map(str, dict_sizes))} members={n_members} batch={batch_size}"
        + f" variant={variant}"
        + (f" k={k}" if variant == "topk" else "")
        + (" bf16" if autocast_bf16 else "")
        + (" compiled" if compile else ""),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "gemm_gflops": round(gemm, 1),
        "ensemble_gflops": round(flops_per_step / ensemble_time / 1e9, 1),
        "mfu": round(flops_per_step / ensemble_time / 1e9 / gemm, 3),
        "sequential_gflops": round(flops_per_step / sequential_time / 1e9, 1),
        "speedup": round(sequential_time / ensemble_time, 2),
        "limit_ratio": round(ensemble_time / encoder_time, 2),
        "adam_vmap_ratio": round(adam_vmap_ratio(ensembles[0], device), 2),
        "ensemble_step_ms": round(ensemble_time * 1e3, 2),
        "sequential_step_ms": round(sequential_time * 1e3, 2),
        # What each ran: an `auto` ensemble tunes in its first step (a warm-up step here), as in a worker.
        "execution": [e.choice for e in ensembles],
        "autotune_ms": [
            e.autotune_report for e in ensembles
        ],  # each candidate's ms per gradient, as that tuning timed it
    }
    return result


def pinned_execution(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | Execution:
    """--execution as the Ensemble takes it: the kind alone, or with --row-chunk / --passes an Execution pinned."""
    if args.passes and args.execution != ExecutionKind.fused:
        parser.error(f"--passes {args.passes} needs --execution fused; got --execution {args.execution}")
    if args.row_chunk is not None and args.execution not in (ExecutionKind.fused, ExecutionKind.sparse):
        parser.error(
            f"--row-chunk {args.row_chunk} needs --execution fused or sparse; got --execution {args.execution}"
        )
    if args.row_chunk is not None and args.row_chunk < 1:
        parser.error(f"--row-chunk={args.row_chunk} must be at least 1")
    if args.passes or args.row_chunk is not None:
        return Execution(args.execution, args.row_chunk, args.passes)
    return args.execution


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, help="d_in")
    parser.add_argument(
        "--dict-sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        help="comma-separated dict sizes, cycled over members",
    )
    parser.add_argument("--members", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument(
        "--steps", type=int, help="timed steps per side, split over the rounds (default: 10, or 3 for large cases)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="turns the sides take; each side's time is its median round"
    )
    parser.add_argument("--variant", choices=sae.VARIANTS, default="relu")
    parser.add_argument("--k", type=int, default=32, help="active features per row (topk)")
    parser.add_argument(
        "--execution", choices=list(ExecutionKind), default="auto", help="auto: as a sweep worker (autotuned)"
    )
    parser.add_argument(
        "--row-chunk",
        type=int,
        help="rows per kernel call (with --execution fused or sparse; default: the micro-batch)",
    )
    parser.add_argument(
        "--passes", choices=PASSES, help="where the fused kernel works between its GEMMs (with --execution fused)"
    )
    parser.add_argument("--autocast-bf16", action="store_true", help="bf16 autocast on both sides (CUDA)")
    parser.add_argument(
        "--no-compile", action="store_true", help="run the kernels eagerly on CUDA (training.compile=false)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--cases",
        type=lambda s: s.split(","),
        default=list(RECORDED_CASES),
        help=f"comma-separated recorded cases, run when --d is not given (default: all of {','.join(RECORDED_CASES)})",
    )
    args = parser.parse_args()
    if unknown := [name for name in args.cases if name not in RECORDED_CASES]:
        parser.error(f"--cases: unknown case {', '.join(unknown)}; allowed: {', '.join(RECORDED_CASES)}")
    if args.rounds < 1:
        parser.error(f"--rounds={args.rounds}: need at least 1 round")
    execution = pinned_execution(parser, args)
    device = torch.device(args.device)
    if device.type == "cpu":
        reuse_freed_memory()  # as the sweep's CPU workers do; helps both sides of the comparison
    else:
        torch.set_float32_matmul_precision("high")  # TF32, the sweep's default on CUDA (training.matmul_precision)
    if args.d is None:
        cases = [RECORDED_CASES[name] for name in args.cases]
    else:
        cases = [(args.d, args.dict_sizes or [4 * args.d], args.members or 8, args.batch or 1024, args.variant)]
    for d, sizes, m, b, variant in cases:
        steps = args.steps or (3 if device.type == "cpu" and b * m * max(sizes) > 10**8 else 10)
        result = run_case(
            d,
            sizes,
            m,
            b,
            steps,
            device,
            variant,
            args.k,
            execution,
            args.autocast_bf16,
            not args.no_compile,
            args.rounds,
        )
        print(json.dumps(result), flush=True)  # one line per case, as each finishes


if __name__ == "__main__":
    main()
