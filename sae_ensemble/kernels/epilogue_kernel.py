"""kernels/epilogue.py's Triton kernel: imported on first use, so a process that never runs it
(every CPU worker) never imports Triton."""

import triton
import triton.language as tl

from sae_ensemble.kernels.epilogue import interpreted

# Tiles for Hopper/Ampere tensor cores in TF32 and bf16; the interpreter takes one (tuning times CUDA events).
CONFIGS = ([triton.Config({"BLOCK_N": 32, "BLOCK_K": 16})] if interpreted() else
           [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for n, k, w, s in ((128, 32, 8, 3), (64, 32, 4, 4))])  # few: each is a compile per shape at worker start


@triton.autotune(configs=CONFIGS, key=["rows", "n", "d", "MODE"])
@triton.jit
def gemm_with_epilogue(a_ptr, b_ptr, out_ptr, vector_ptr, codes_ptr, sum_a_ptr, sum_b_ptr, rows, n, d,
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
