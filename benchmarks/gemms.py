"""The fused step's five GEMMs at one case's shapes, each against the device's GEMM peak.

    python -m benchmarks.gemms --device cuda                       # the large case's 4096-feature ensemble
    python -m benchmarks.gemms --device cuda --members 4 --d 512 --dict-size 2048 --batch 4096

kernels/dense.py runs, per row chunk, with x [M, B, d], codes and dL/dpre [M, B, n] and the
weights [M, n, d]:
  encoder   codes  = x @ W_enc^T         (both operands K-major)
  decoder   x_hat  = codes @ D           (D is N-major: d is contiguous, the sum runs over n)
  dcodes    dL/dc  = g @ D^T             (both K-major)
  grad_D    dL/dD  = codes^T @ g         (both M/N-major: the sum runs over the rows)
  grad_W    dL/dW  = dL/dpre^T @ x       (as grad_D)
Hopper's TF32 tensor-core instructions read only K-major operands from shared memory, so a
library may run the other layouts on a slower kernel. Each row prints the layout the step uses
and, where one exists, the same product from K-major copies (`kmajor`), with the copy's own
time (`copy_ms`) that such a layout would add per step.
The last line is one JSON object: every row's ms and TFLOP/s, and the peak.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.ensemble import gemm_peak_gflops, largest_ensemble
from sae_ensemble.autotune import timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    large = largest_ensemble("large")  # the defaults: the large case's 4096-feature ensemble
    parser.add_argument("--members", type=int, default=large["members"])
    parser.add_argument("--d", type=int, default=large["d"])
    parser.add_argument("--dict-size", type=int, default=large["dict_size"])
    parser.add_argument("--batch", type=int, default=large["batch"])
    parser.add_argument("--bf16", action="store_true", help="bf16 operands (else float32, TF32 products)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("high")  # TF32, the sweep's default on CUDA
    M, B, d, n = args.members, args.batch, args.d, args.dict_size
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    new = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731 - a one-line shorthand
    x, W, D, g = new(M, B, d), new(M, n, d), new(M, n, d), new(M, B, d)
    codes, g_pre = new(M, B, n).relu_(), new(M, B, n)
    flops = 2 * M * B * d * n  # every one of the five products
    peak = gemm_peak_gflops(device) * 1e9
    time = lambda fn: timed(fn, args.repeats, device, warmup=2)  # noqa: E731

    rows: dict[str, dict] = {}

    def row(name: str, seconds: float, work: float = flops, **extra) -> None:
        # of_peak to 3 significant figures: a product far below the peak (CPU, tiny shapes) still shows its share
        rows[name] = {
            "ms": round(seconds * 1e3, 3),
            "tflops": round(work / seconds / 1e12, 1),
            "of_peak": float(f"{work / seconds / peak:.3g}"),
            **extra,
        }
        print(
            f"{name:<28} {seconds * 1e3:8.3f} ms {work / seconds / 1e12:7.1f} TFLOP/s "
            f"{work / seconds / peak:6.1%} of peak " + " ".join(f"{k}={v}" for k, v in extra.items()),
            flush=True,
        )

    D_t, codes_t, g_t = D.mT.contiguous(), codes.mT.contiguous(), g.mT.contiguous()  # K-major copies
    row("encoder", time(lambda: torch.bmm(x, W.mT)))
    row("decoder", time(lambda: torch.bmm(codes, D)))
    row(
        "decoder kmajor",
        time(lambda: torch.bmm(codes, D_t.mT)),
        copy_ms=round(time(lambda: D.mT.contiguous()) * 1e3, 3),
    )
    row("dcodes", time(lambda: torch.bmm(g, D.mT)))
    row("grad_D", time(lambda: torch.bmm(codes.mT, g)))
    row(
        "grad_D kmajor",
        time(lambda: torch.bmm(codes_t, g_t.mT)),
        copy_ms=round(time(lambda: (codes.mT.contiguous(), g.mT.contiguous())) * 1e3, 3),
    )
    row("grad_W", time(lambda: torch.bmm(g_pre.mT, x)))
    step_gemms = sum(rows[k]["ms"] for k in ("encoder", "decoder", "dcodes", "grad_D", "grad_W")) / 1e3
    row("five GEMMs as the step", step_gemms, 5 * flops)

    print(
        json.dumps(
            {
                "case": f"members={M} d={d} dict_size={n} batch={B} {'bf16' if args.bf16 else 'tf32'}",
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "peak_tflops": round(peak / 1e12, 1),
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
