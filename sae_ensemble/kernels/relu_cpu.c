/* kernels/dense.py's passes on its CPU path (float32), called through kernels/native.py: two over
 * the [M, rows, n] code tiles, one over the decoder's output (error_pass) and one over the decoder's
 * [M, n, d] gradient (normalise_backward).
 *
 * relu_count: the encoder bias, ReLU in place, and each feature's firing count and code sum over
 *   the rows. The torch ops make a pass each (the add, clamp_min_, a 0/1 tile, its sum over rows).
 * relu_backward: dL/dcodes -> dL/dpre in place: the L1 term's constant added where the code fired,
 *   0 where it did not (threshold_backward), and each feature's sum over the rows (the encoder-bias
 *   gradient).
 * error_pass: the decoder's output -> dL/dx_hat in place: the error against the target, each member's
 *   squared error, the MSE's scale, and the sum over the rows (the decoder-bias gradient). The torch ops
 *   make five passes (sub_, vecdot's product and sum, mul_, the sum over rows).
 * The elementwise results and the counts are the torch ops' numbers bit for bit (a NaN stays NaN,
 * -0.0 stays -0.0; a count is a sum of 0s and 1s, exact in float32 below 2^24 rows); the sums over
 * rows are added in row order, so they differ from torch's reductions by rounding only.
 * Work is split over (member, block of columns), so a thread's accumulators stay in L1 while it
 * walks the rows and every run adds in the same order; the threads are torch's own OpenMP pool. */
#include <stddef.h>
#include <stdint.h>

#include "dot_cpu.h"

#define COLUMNS 512

static int threads_for(int64_t elements, int threads) {
  return elements < (int64_t)65536 * threads ? 1 : threads; /* small tiles: threads cost more than they save */
}

/* Work unit `unit` of a tile split into (member, block of COLUMNS columns): its member, first column and width. */
typedef struct { int64_t member, first, width; } span;
static span unit_span(int64_t unit, int64_t n) {
  int64_t blocks = (n + COLUMNS - 1) / COLUMNS, first = unit % blocks * COLUMNS;
  return (span){unit / blocks, first, n - first < COLUMNS ? n - first : COLUMNS};
}
static int64_t units_of(int64_t members, int64_t n) { return members * ((n + COLUMNS - 1) / COLUMNS); }

void relu_count(float *x, const float *bias, float *fired, float *total, int64_t members, int64_t rows, int64_t n,
                int threads) {
#pragma omp parallel for num_threads(threads_for(members * rows * n, threads)) schedule(static)
  for (int64_t unit = 0; unit < units_of(members, n); ++unit) {
    span u = unit_span(unit, n);
    int64_t member = u.member, first = u.first, width = u.width;
    float *restrict count = fired + member * n + first;
    float *restrict sum = total ? total + member * n + first : NULL;
    const float *restrict b = bias ? bias + member * n + first : NULL;
    for (int64_t r = 0; r < rows; ++r) {
      float *restrict row = x + (member * rows + r) * n + first;
      if (b)
        for (int64_t i = 0; i < width; ++i) row[i] += b[i];
      for (int64_t i = 0; i < width; ++i) {
        float v = row[i] < 0.0f ? 0.0f : row[i];
        row[i] = v;
        count[i] += v > 0.0f ? 1.0f : 0.0f;
      }
      if (sum)
        for (int64_t i = 0; i < width; ++i) sum[i] += row[i];
    }
  }
}

void relu_backward(float *g, const float *codes, const float *add, float *g_sum, int64_t members, int64_t rows,
                   int64_t n, int threads) {
#pragma omp parallel for num_threads(threads_for(members * rows * n, threads)) schedule(static)
  for (int64_t unit = 0; unit < units_of(members, n); ++unit) {
    span u = unit_span(unit, n);
    int64_t member = u.member, first = u.first, width = u.width;
    float *restrict sum = g_sum + member * n + first;
    float a = add[member];
    for (int64_t r = 0; r < rows; ++r) {
      int64_t start = (member * rows + r) * n + first;
      float *restrict row = g + start;
      const float *restrict code = codes + start;
      for (int64_t i = 0; i < width; ++i) {
        row[i] = code[i] <= 0.0f ? 0.0f : row[i] + a; /* threshold_backward's test: a NaN code passes */
        sum[i] += row[i];
      }
    }
  }
}

/* The gradient through the decoder's row normalisation D = rows / |rows|, in place on g [R, d]
 * (dL/dD, R = members * n rows): g = (g - D (g . D)) / |rows|, a row at a time in L1. The torch
 * ops (vecdot, addcmul, div) make three passes over [M, n, d]; the dot product's order is dot_cpu.h's,
 * so the result differs from theirs by rounding only. */
void normalise_backward(float *g, const float *D, const float *norms, int64_t R, int64_t d, int threads) {
#pragma omp parallel for num_threads(threads_for(R * d, threads)) schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    float *restrict gr = g + r * d;
    const float *restrict Dr = D + r * d;
    float radial = dot(gr, Dr, d);
    float norm = norms[r];
    for (int64_t i = 0; i < d; ++i) gr[i] = (gr[i] - Dr[i] * radial) / norm;
  }
}

/* x [M, rows, o] (the decoder's output) -> (x - target) * scale in place, a row at a time in L1; adds each
 * member's sum of squared errors (before the scale) to squared [M] and its rows' sum of the result to
 * g_sum [M, o]. target [rows, o] has rows target_stride apart (a transcoder's target is a column slice). */
void error_pass(float *x, const float *target, int64_t target_stride, float scale, float *squared, float *g_sum,
                int64_t members, int64_t rows, int64_t o, int threads) {
#pragma omp parallel for num_threads(threads_for(members * rows * o, threads)) schedule(static)
  for (int64_t member = 0; member < members; ++member) {
    float *restrict sum = g_sum + member * o;
    float total = 0.0f;
    for (int64_t r = 0; r < rows; ++r) {
      float *restrict row = x + (member * rows + r) * o;
      const float *restrict t = target + r * target_stride;
      for (int64_t i = 0; i < o; ++i) row[i] -= t[i];
      total += dot(row, row, o);
      for (int64_t i = 0; i < o; ++i) {
        row[i] *= scale;
        sum[i] += row[i];
      }
    }
    squared[member] += total;
  }
}
