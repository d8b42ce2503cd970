/* The sparse kernel's backward at a chunk's active entries (kernels/sparse.py), called through kernels/native.py.
 *
 * The codes are a block-diagonal CSR matrix [M*b, M*n] (crow, columns, values). For each entry (row r of member m,
 * column c): dL/dcode = dL/dx_hat[r] . D[c] + the L1 term, masked where the code did not fire; then
 * g_D[c] += code * dL/dx_hat[r], g_W[c] += dL/dpre * x[r], and c's firing count and dL/dpre sum. The torch ops
 * take four sparse products for this (sampled_addmm, then a transposed pattern, sorted by column, through two CSR
 * products that zero-fill and copy their outputs); here each entry is met once, in row order, so every column
 * adds its rows' terms in the order the transposed products do. The work is split over (member, block of
 * columns): a unit walks its member's entries and takes those in its columns, so the gradients' rows stay in
 * its cache and every run adds in the same order. The threads are torch's own OpenMP pool. */
#include <stdint.h>
#include <string.h>

#include "dot_cpu.h"

/* Inputs: crow [M*b + 1], columns [nnz] (m*n + feature), values [nnz]; g_xhat [M*b, o] (dL/dx_hat); D [M*n, o]
 * (unit decoder rows); x [M*b, d] at row stride x_stride (the centred input); l1 [M] (dL/dcode of the L1 term).
 * Outputs: g_D [M*n, o] and g_W [M*n, d], set (zero != 0) or added to; g_pre_sum [M*n] and fired [M*n], added to. */
void sparse_backward(const int64_t *crow, const int64_t *columns, const float *values, const float *g_xhat,
                     const float *D, const float *x, int64_t x_stride, const float *l1, float *g_D, float *g_W,
                     float *g_pre_sum, float *fired, int64_t M, int64_t b, int64_t n, int64_t o, int64_t d, int zero,
                     int threads) {
  /* members split evenly over the threads: a unit per member; else each member's columns split too (its units then
   * skip the other units' entries, a branch that mispredicts) */
  int64_t parts = threads > 1 && M % threads ? threads : 1;
  int64_t work = crow[M * b] * (o + d);
#pragma omp parallel for num_threads(work < 65536 ? 1 : threads) schedule(static)
  for (int64_t unit = 0; unit < M * parts; ++unit) {
    int64_t m = unit / parts, p = unit % parts;
    int64_t lo = m * n + n * p / parts, hi = m * n + n * (p + 1) / parts; /* this unit's columns */
    if (zero) {
      memset(g_D + lo * o, 0, sizeof(float) * (size_t)((hi - lo) * o));
      memset(g_W + lo * d, 0, sizeof(float) * (size_t)((hi - lo) * d));
    }
    const float add = l1[m];
    for (int64_t r = m * b; r < (m + 1) * b; ++r) {
      const float *restrict gx = g_xhat + r * o, *restrict xr = x + r * x_stride;
      for (int64_t e = crow[r]; e < crow[r + 1]; ++e) {
        int64_t c = columns[e];
        if (c < lo || c >= hi) continue;
        float code = values[e], on = code > 0.0f ? 1.0f : 0.0f;
        float g_pre = (dot(gx, D + c * o, o) + add) * on; /* as torch's g_codes * (codes > 0) */
        fired[c] += on;
        g_pre_sum[c] += g_pre;
        float *restrict gD = g_D + c * o, *restrict gW = g_W + c * d;
        for (int64_t i = 0; i < o; ++i) gD[i] += code * gx[i];
        for (int64_t i = 0; i < d; ++i) gW[i] += g_pre * xr[i];
      }
    }
  }
}
