/* ReLU in place and each feature's firing count, in one pass over [M, rows, n] (float32, CPU):
 * kernels/native.py, called by kernels/dense.py.
 *
 * The torch ops it replaces make five passes over the code tile: clamp_min_ (ReLU), gt into a
 * float tile, and that tile's sum over rows. Same numbers: the ReLU is torch's (a NaN stays NaN,
 * -0.0 stays -0.0), and a count is a sum of 0s and 1s, exact in float32 below 2^24 rows. Work is
 * split over (member, block of columns), so a thread's counts stay in L1 while it walks the rows;
 * the threads are torch's own OpenMP pool (kernels/native.py). */
#include <stdint.h>

#define COLUMNS 512

void relu_count(float *x, float *fired, int64_t members, int64_t rows, int64_t n, int threads) {
  int64_t blocks = (n + COLUMNS - 1) / COLUMNS, units = members * blocks;
  if (members * rows * n < (int64_t)65536 * threads) threads = 1;  /* small tiles: threads cost more than they save */
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t unit = 0; unit < units; ++unit) {
    int64_t member = unit / blocks, first = unit % blocks * COLUMNS;
    int64_t width = n - first < COLUMNS ? n - first : COLUMNS;
    float *restrict count = fired + member * n + first;
    for (int64_t r = 0; r < rows; ++r) {
      float *restrict row = x + (member * rows + r) * n + first;
      for (int64_t i = 0; i < width; ++i) {
        float v = row[i] < 0.0f ? 0.0f : row[i];
        row[i] = v;
        count[i] += v > 0.0f ? 1.0f : 0.0f;
      }
    }
  }
}
