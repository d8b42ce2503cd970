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
this module is imported), which is how CPU tests check the arithmetic.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: `available` is False and the other layouts run
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_ROWS = 128  # rows per program; fixed (not tuned) so the row-sum buffers' shape is known before the launch
ENCODE, BACKWARD = 0, 1


def available(device: torch.device) -> bool:
    """Whether `encode` and `backward` run on `device`."""
    return triton is not None and (device.type == "cuda" or INTERPRETED)


if triton is not None:
    # Tiles for Hopper/Ampere tensor cores in TF32 and bf16; the interpreter takes one (tuning times CUDA events).
    CONFIGS = ([triton.Config({"BLOCK_N": 32, "BLOCK_K": 16})] if INTERPRETED else
               [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                for n, k, w, s in ((128, 32, 8, 3), (64, 32, 4, 4))])  # few: each is a compile per shape at worker start

    @triton.autotune(configs=CONFIGS, key=["rows", "n", "d", "MODE"])
    @triton.jit
    def _gemm_with_epilogue(a_ptr, b_ptr, out_ptr, vector_ptr, codes_ptr, sum_a_ptr, sum_b_ptr, rows, n, d,
                            MODE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[m, r, c] = epilogue(sum_k a[m, r, k] * b[m, c, k]); every tensor contiguous.

        ENCODE: vector is the bias [M, n]; out gets the codes; sum_a the firing counts and sum_b the
        code sums, per row block [M, blocks, n]. BACKWARD: vector is the L1 term [M]; codes [M, rows, n]
        give the mask; out gets dL/dpre and sum_a its sums per row block.
        """
        row_block, column_block, member = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        r = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        c = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_K)
        a = a_ptr + member * rows * d + r[:, None] * d + k[None, :]  # [BLOCK_ROWS, BLOCK_K]
        b = b_ptr + member * n * d + c[:, None] * d + k[None, :]  # [BLOCK_N, BLOCK_K], transposed for the product
        accumulator = tl.zeros((BLOCK_ROWS, BLOCK_N), dtype=tl.float32)
        for start in range(0, d, BLOCK_K):
            in_k = start + k < d
            a_tile = tl.load(a, mask=(r[:, None] < rows) & in_k[None, :], other=0.0)
            b_tile = tl.load(b, mask=(c[:, None] < n) & in_k[None, :], other=0.0)
            if UPCAST:  # the interpreter's dot garbles bf16; the tensor cores' bf16 products are exact in float32 anyway
                a_tile, b_tile = a_tile.to(tl.float32), b_tile.to(tl.float32)
            accumulator = tl.dot(a_tile, tl.trans(b_tile), accumulator, input_precision=PRECISION)
            a += BLOCK_K
            b += BLOCK_K

        in_tile = (r[:, None] < rows) & (c[None, :] < n)
        at = member * rows * n + r[:, None].to(tl.int64) * n + c[None, :]  # past 2^31 elements at large b and n
        sums_at = (member * tl.num_programs(0) + row_block) * n + c
        if MODE == 0:  # ENCODE
            pre = accumulator + tl.load(vector_ptr + member * n + c, mask=c < n, other=0.0)[None, :]
            codes = tl.where(pre < 0.0, 0.0, pre)
            tl.store(out_ptr + at, codes.to(out_ptr.dtype.element_ty), mask=in_tile)
            tl.store(sum_a_ptr + sums_at, tl.sum(tl.where(in_tile & (codes > 0.0), 1.0, 0.0), axis=0), mask=c < n)
            tl.store(sum_b_ptr + sums_at, tl.sum(tl.where(in_tile, codes, 0.0), axis=0), mask=c < n)
        else:  # BACKWARD
            code = tl.load(codes_ptr + at, mask=in_tile, other=0.0)
            g = tl.where(code <= 0.0, 0.0, accumulator + tl.load(vector_ptr + member))
            tl.store(out_ptr + at, g.to(out_ptr.dtype.element_ty), mask=in_tile)
            tl.store(sum_a_ptr + sums_at, tl.sum(tl.where(in_tile, g, 0.0), axis=0), mask=c < n)


@torch.library.custom_op("sae_ensemble::gemm_with_epilogue", mutates_args=())
def gemm_with_epilogue(mode: int, a: torch.Tensor, b: torch.Tensor, vector: torch.Tensor,
                       codes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [M, rows, n], two row-block sums [M, blocks, n]) of `a @ b^T` with `mode`'s epilogue.

    A custom op, so torch.compile treats the launch as one opaque call in its graph (dynamo cannot
    trace into a Triton launch without breaking the row loop's graph) and CUDA graphs capture it.
    Float32 products are TF32 where torch's are (training.matmul_precision); bf16 ones are exact.
    """
    precision = "tf32" if a.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest" else "ieee"
    a, b = a.contiguous(), b.contiguous()
    M, rows, d = a.shape
    n = b.shape[1]
    blocks = triton.cdiv(rows, BLOCK_ROWS)
    out = torch.empty(M, rows, n, device=a.device, dtype=a.dtype)
    sum_a, sum_b = (torch.empty(M, blocks, n, device=a.device, dtype=torch.float32) for _ in range(2))
    _gemm_with_epilogue[lambda meta: (blocks, triton.cdiv(n, meta["BLOCK_N"]), M)](
        a, b, out, vector.contiguous(), out if codes is None else codes.contiguous(), sum_a, sum_b, rows, n, d,
        MODE=mode, PRECISION=precision, UPCAST=INTERPRETED and a.dtype != torch.float32, BLOCK_ROWS=BLOCK_ROWS)
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
