/* Row-wise top-k of a float32 [rows, n] matrix for small k, called through kernels/native.py: the
 * sparse kernel's selection (kernels/patterns.py), which torch.topk made the largest op of a top-k
 * step on CPU (docs/benchmarks.md).
 *
 * Each row keeps its k largest so far in descending order; of each block of 8 values only those above
 * the current k-th (one AVX compare gives their bits) are looked at one by one, so most of a row costs
 * a compare per 8 values. NaN counts as larger than any number, as torch.topk's does. Of equal
 * values the earlier column ranks first; torch.topk breaks ties in no fixed order, so the two agree
 * on values always and on indices wherever the values differ. Rows are split over torch's OpenMP pool. */
#include <stdint.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

#define BLOCK 8

/* Bit t set where block[t] > kth or is NaN: one AVX compare (not-less-or-equal, unordered), else scalar. */
static inline unsigned above_mask(const float *block, float kth) {
#ifdef __AVX__
  __m256 v = _mm256_loadu_ps(block);
  return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(kth), _CMP_NLE_UQ));
#else
  unsigned mask = 0;
  for (int t = 0; t < BLOCK; ++t) mask |= (unsigned)!(block[t] <= kth) << t;
  return mask;
#endif
}

static inline int beats(float a, float b) { return a > b || (a != a && b == b); } /* NaN above numbers */

static inline void insert(float *vals, int64_t *idx, int64_t *count, int64_t k, float v, int64_t j) {
  int64_t at = *count < k ? *count : k - 1; /* the slot that frees up: the end, or the k-th (dropped) */
  if (*count < k) ++*count;
  while (at > 0 && beats(v, vals[at - 1])) { /* shift smaller ones down; equal ones stay ahead */
    vals[at] = vals[at - 1];
    idx[at] = idx[at - 1];
    --at;
  }
  vals[at] = v;
  idx[at] = j;
}

/* The k-th largest is at least the smallest of k group maxima (k values are at least that large): only values
 * at or above it (or NaN) are candidates, found 8 at a time. NaN is ignored by the maxima (AVX's max returns
 * its second operand when either is NaN) and kept by the filter. */
static int64_t candidates_bound(const float *row, int64_t n, int64_t k, float *bound) {
#ifdef __AVX__
  int64_t width = n / k / BLOCK * BLOCK; /* each group's columns, whole blocks */
  if (width == 0) return 0;
  float lowest = __builtin_inff();
  for (int64_t q = 0; q < k; ++q) {
    __m256 m = _mm256_set1_ps(-__builtin_inff());
    for (int64_t j = q * width; j < (q + 1) * width; j += BLOCK) m = _mm256_max_ps(_mm256_loadu_ps(row + j), m);
    float lanes[BLOCK];
    _mm256_storeu_ps(lanes, m);
    float top = lanes[0];
    for (int t = 1; t < BLOCK; ++t) top = lanes[t] > top ? lanes[t] : top;
    lowest = top < lowest ? top : lowest;
  }
  *bound = lowest;
  return 1;
#else
  (void)row, (void)n, (void)k, (void)bound;
  return 0;
#endif
}

void topk_rows(const float *x, float *values, int64_t *indices, int64_t rows, int64_t n, int64_t k, int threads) {
#pragma omp parallel for num_threads(rows * n < 65536 ? 1 : threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float *restrict row = x + r * n;
    float *restrict vals = values + r * k;
    int64_t *restrict idx = indices + r * k;
    int64_t count = 0, j = 0;
    float bound;
    if (candidates_bound(row, n, k, &bound)) {
#ifdef __AVX__
      for (; j + BLOCK <= n; j += BLOCK) {
        __m256 v = _mm256_loadu_ps(row + j);
        unsigned at_least = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(bound), _CMP_NLT_UQ));
        for (; at_least; at_least &= at_least - 1) {
          int t = __builtin_ctz(at_least);
          if (count < k || beats(row[j + t], vals[k - 1])) insert(vals, idx, &count, k, row[j + t], j + t);
        }
      }
#endif
      for (; j < n; ++j)
        if (!(row[j] < bound) && (count < k || beats(row[j], vals[k - 1]))) insert(vals, idx, &count, k, row[j], j);
      continue;
    }
    for (; j < n && count < k; ++j) insert(vals, idx, &count, k, row[j], j);
    for (; j < n && j % BLOCK; ++j)
      if (beats(row[j], vals[k - 1])) insert(vals, idx, &count, k, row[j], j);
    for (; j + BLOCK <= n; j += BLOCK) {
      unsigned above = above_mask(row + j, vals[k - 1]); /* one bit per value above the k-th, or NaN */
      while (above) {
        int t = __builtin_ctz(above);
        above &= above - 1;
        if (beats(row[j + t], vals[k - 1])) insert(vals, idx, &count, k, row[j + t], j + t); /* the k-th rose */
      }
    }
    for (; j < n; ++j)
      if (beats(row[j], vals[k - 1])) insert(vals, idx, &count, k, row[j], j);
  }
}
