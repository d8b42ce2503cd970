"""The fused step's two passes inside the GEMMs that produce their tiles: Triton, for CUDA.

kernels/dense.py's loop runs five batched GEMMs and two passes over each [M, b, n] tile. Two
of the GEMMs have the form `A [M, b, d] @ B [M, n, d]^T` and each pass reads what one of
them just wrote:

- `encode`: pre = (x - b_dec) @ W_enc^T, then the bias, ReLU, and each feature's firing count
  and code sum over the rows;
- `backward`: dL/dcodes = g @ D^T, then ReLU's mask from the codes with the L1 term added,
  and each feature's sum over the rows (the encoder-bias gradient).

Here that work is the GEMM's epilogue, on the accumulator while it is still in registers: the
[M, b, n] tile is written once (the codes, then dL/dpre), never written as a GEMM output and
read back by a pass. On an H100 each pass over the large case's tiles cost 0.35-0.55 ms against
1.64 ms for the five GEMMs (docs/benchmarks.md, GPU rounds 2 and 3).

The elementwise rules are the C passes' (kernels/relu_cpu.c): `v < 0 ? 0 : v` (a NaN stays
NaN, -0.0 stays -0.0), a code fired when > 0, and the mask is threshold_backward's `code <= 0`.
The sums over rows are taken per block of BLOCK_ROWS rows into a [M, blocks, n] buffer and
then summed by torch, so every run adds in the same order. `available(device)` says where this
runs: CUDA with Triton, or any device under Triton's interpreter (TRITON_INTERPRET=1, set before
Triton is first imported), which is how CPU tests check the arithmetic. The kernel itself is in
kernels/epilogue_kernel.py, imported on first use.
"""

from __future__ import annotations

import importlib.util
import os

import torch

INSTALLED = importlib.util.find_spec("triton") is not None  # without importing it
BLOCK_ROWS = 128  # rows per program; fixed (not tuned) so the row-sum buffers' shape is known before the launch
ENCODE, BACKWARD = 0, 1


def interpreted() -> bool:
    """Whether Triton interprets kernels (on CPU tensors): set before Triton's first import to take effect."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether `encode` and `backward` run on `device`: Triton is installed, and the device is CUDA or Triton
    interprets."""
    return INSTALLED and (device.type == "cuda" or interpreted())


@torch.library.custom_op("sae_ensemble::gemm_with_epilogue", mutates_args=())
def gemm_with_epilogue(mode: int, a: torch.Tensor, b: torch.Tensor, vector: torch.Tensor,
                       codes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [M, rows, n], two row-block sums [M, blocks, n]) of `a @ b^T` with `mode`'s epilogue.

    A custom op, so torch.compile treats the launch as one opaque call in its graph (dynamo cannot
    trace into a Triton launch without breaking the row loop's graph) and CUDA graphs capture it.
    Float32 products are TF32 where torch's are (training.matmul_precision); bf16 ones are exact.
    """
    from sae_ensemble.kernels.epilogue_kernel import gemm_with_epilogue as kernel  # imports Triton on first use

    precision = "tf32" if a.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest" else "ieee"
    a, b = a.contiguous(), b.contiguous()
    M, rows, d = a.shape
    n = b.shape[1]
    blocks = -(-rows // BLOCK_ROWS)
    out = torch.empty(M, rows, n, device=a.device, dtype=a.dtype)
    sum_a, sum_b = (torch.empty(M, blocks, n, device=a.device, dtype=torch.float32) for _ in range(2))
    kernel[lambda meta: (blocks, -(-n // meta["BLOCK_N"]), M)](
        a, b, out, vector.contiguous(), out if codes is None else codes.contiguous(), sum_a, sum_b, rows, n, d,
        MODE=mode, PRECISION=precision, UPCAST=interpreted() and a.dtype != torch.float32, BLOCK_ROWS=BLOCK_ROWS)
    return out, sum_a, sum_b


@gemm_with_epilogue.register_fake
def _(mode, a, b, vector, codes):
    M, rows, _ = a.shape
    n, blocks = b.shape[1], -(-rows // BLOCK_ROWS)
    return a.new_empty(M, rows, n), a.new_empty(M, blocks, n, dtype=torch.float32), a.new_empty(M, blocks, n, dtype=torch.float32)


def encode(centred: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, fired: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Codes [M, b, n] = ReLU(centred [M, b, d] @ W_enc [M, n, d]^T + bias [M, n]), in centred's dtype; each
    feature's firing count and code sum over the rows are added to fired and total [M, n]."""
    codes, count, code_sum = gemm_with_epilogue(ENCODE, centred, W_enc, bias, None)
    fired += count.sum(1)
    total += code_sum.sum(1)
    return codes


def backward(g_xhat: torch.Tensor, D: torch.Tensor, codes: torch.Tensor, add: torch.Tensor, g_sum: torch.Tensor) -> torch.Tensor:
    """dL/dpre [M, b, n] = (g_xhat [M, b, d] @ D [M, n, d]^T + add [M]) where codes > 0 (or NaN), else 0;
    each feature's sum over the rows is added to g_sum [M, n]."""
    g_pre, pre_sum, _ = gemm_with_epilogue(BACKWARD, g_xhat, D, add, codes)
    g_sum += pre_sum.sum(1)
    return g_pre
