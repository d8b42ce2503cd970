/* Row-wise selections of the k largest, called through kernels/native.py: `topk_rows`, for small k, is
 * the sparse kernel's selection (kernels/patterns.py), which torch.topk made the largest op of a top-k
 * step on CPU; `keep_largest`, for k near the width, is AuxK's over the dead latents (docs/benchmarks.md).
 *
 * topk_rows:
 * Each row keeps its k largest so far in descending order; of each block of 8 values only those above
 * the current k-th (one AVX compare gives their bits) are looked at one by one, so most of a row costs
 * a compare per 8 values. NaN counts as larger than any number, as torch.topk's does. Of equal
 * values the earlier column ranks first; torch.topk breaks ties in no fixed order, so the two agree
 * on values always and on indices wherever the values differ. Rows are split over torch's OpenMP pool. */
#include <stdint.h>
#include <stdlib.h>
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

#define MAX_LEVELS 8 /* k up to 64 */

/* A lower bound on the k-th largest. Each of the 8 lanes (columns j = t mod 8) keeps its L = ceil(k / 8)
 * largest values in L vectors, updated per block by a cascade of max / min (no branches); then every lane
 * has L values at or above its L-th largest, so at least 8L >= k values are at or above the smallest of
 * those: the bound. Only values at or above it (or NaN) are candidates, found 8 at a time. NaN enters the
 * cascade as -inf (ignored by the bound) and is kept by the filter. One pass, about 2L + 1 vector ops per
 * 8 values: choosing the k-th of 4k group maxima, or even k group maxima' horizontal reductions, cost
 * more than the filter they saved (docs/kernels.md). */
static int64_t candidates_bound(const float *row, int64_t n, int64_t k, float *bound) {
#ifdef __AVX__
  int64_t levels = (k + BLOCK - 1) / BLOCK;
  if (levels > MAX_LEVELS || n / BLOCK < levels) return 0;
  const __m256 lowest = _mm256_set1_ps(-__builtin_inff());
  __m256 top[MAX_LEVELS];
  for (int64_t l = 0; l < levels; ++l) top[l] = lowest;
  for (int64_t j = 0; j + BLOCK <= n; j += BLOCK) {
    __m256 v = _mm256_max_ps(_mm256_loadu_ps(row + j), lowest); /* NaN -> -inf (max returns its 2nd operand) */
    for (int64_t l = 0; l < levels; ++l) { /* insert v into the lane's descending top[0..levels) */
      __m256 larger = _mm256_max_ps(top[l], v);
      v = _mm256_min_ps(top[l], v);
      top[l] = larger;
    }
  }
  float lanes[BLOCK];
  _mm256_storeu_ps(lanes, top[levels - 1]);
  float least = lanes[0];
  for (int t = 1; t < BLOCK; ++t) least = lanes[t] < least ? lanes[t] : least;
  *bound = least;
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

/* Order-preserving integer key of a float: larger float, larger key; every NaN above +inf (torch.topk's order). */
static inline uint32_t order_key(float v) {
  union { float f; uint32_t u; } bits = {v};
  if (v != v) return UINT32_MAX;
  return (bits.u & 0x80000000u) ? ~bits.u : bits.u | 0x80000000u;
}

/* The k-th largest of keys[0..n) (1 <= k <= n), reordering them: quickselect with branch-free partitions
 * (a branch per element mispredicts about half the time on these unordered rows and cost most of the time). */
static uint32_t kth_largest(uint32_t *restrict keys, int64_t n, int64_t k) {
  int64_t lo = 0, hi = n, want = k - 1; /* keys[lo..hi) hold the want-th largest (0-based) */
  while (hi - lo > 1) {
    uint32_t a = keys[lo], b = keys[lo + (hi - lo) / 2], c = keys[hi - 1];
    uint32_t low = a < b ? a : b, high = a < b ? b : a;
    uint32_t pivot = c < low ? low : c > high ? high : c; /* median of three */
    int64_t p = lo;
    for (int64_t j = lo; j < hi; ++j) { /* the larger ones first: [lo, p) > pivot */
      uint32_t v = keys[j];
      keys[j] = keys[p];
      keys[p] = v;
      p += v > pivot;
    }
    if (want < p) {
      hi = p;
      continue;
    }
    int64_t q = p;
    for (int64_t j = p; j < hi; ++j) { /* then the pivot's equals: [p, q) == pivot (at least the pivot itself) */
      uint32_t v = keys[j];
      keys[j] = keys[q];
      keys[q] = v;
      q += v == pivot;
    }
    if (want < q) return pivot;
    lo = q;
  }
  return keys[want];
}

/* AuxK's selection (kernels/auxk.py): of each row of member m's x [M, b, n], among the columns where
 * live [M, n] is nonzero, the k[m] largest: mask [M, b, n] = 1.0 there, else 0.0, and codes = x there, else
 * 0.0. The k-th is found by selection, not a sort (torch.topk with k near n sorted most of each row). A row
 * keeps min(k[m], its live entries); of values equal to the k-th, the earlier columns are kept. */
void keep_largest(const float *x, const float *live, const int64_t *k, float *codes, float *mask, int64_t M, int64_t b,
                  int64_t n, int threads) {
#pragma omp parallel num_threads(M * b * n < 65536 ? 1 : threads)
  {
    uint32_t *keys = malloc(sizeof(uint32_t) * 2 * (size_t)(n > 0 ? n : 1)), *work = keys + n;
    const uint32_t floor_key = order_key(-__builtin_inff());
#pragma omp for schedule(static)
    for (int64_t r = 0; r < M * b; ++r) {
      const float *restrict row = x + r * n, *restrict alive = live + (r / b) * n;
      float *restrict out = mask + r * n, *restrict code = codes + r * n;
      int64_t finite = 0;
      for (int64_t j = 0; j < n; ++j) { /* dead columns and -inf share the lowest key: never kept */
        keys[j] = alive[j] != 0.0f ? order_key(row[j]) : floor_key;
        finite += keys[j] > floor_key;
      }
      int64_t want = k[r / b] < finite ? k[r / b] : finite;
      uint32_t kth = floor_key + 1; /* keeps every entry above -inf */
      if (want < finite) {
        if (want <= 0) {
          for (int64_t j = 0; j < n; ++j) out[j] = code[j] = 0.0f;
          continue;
        }
        for (int64_t j = 0; j < n; ++j) work[j] = keys[j];
        kth = kth_largest(work, n, want);
      }
      int64_t kept = 0;
      for (int64_t j = 0; j < n; ++j) kept += keys[j] >= kth;
      if (kept == want) {
        for (int64_t j = 0; j < n; ++j) {
          out[j] = keys[j] >= kth ? 1.0f : 0.0f;
          code[j] = keys[j] >= kth ? row[j] : 0.0f;
        }
        continue;
      }
      int64_t ties = want; /* more values equal the k-th than are kept: the earliest columns of them */
      for (int64_t j = 0; j < n; ++j) ties -= keys[j] > kth;
      for (int64_t j = 0; j < n; ++j) {
        int keep = keys[j] > kth || (keys[j] == kth && ties-- > 0);
        out[j] = keep ? 1.0f : 0.0f;
        code[j] = keep ? row[j] : 0.0f;
      }
    }
    free(keys);
  }
}

/* The sparse kernel's transpose (kernels/patterns.py): a stable counting sort of the entries' columns
 * [nnz] (each in [0, n_columns)): order [nnz] lists the entries column by column, and crow [n_columns + 1]
 * points at each column's first. torch.sort's comparison sort of the same keys was 5% of a top-k step. */
void column_order(const int64_t *columns, int64_t nnz, int64_t n_columns, int64_t *order, int64_t *crow) {
  for (int64_t c = 0; c <= n_columns; ++c) crow[c] = 0;
  for (int64_t e = 0; e < nnz; ++e) ++crow[columns[e] + 1];
  for (int64_t c = 0; c < n_columns; ++c) crow[c + 1] += crow[c];
  int64_t *next = malloc(sizeof(int64_t) * (size_t)(n_columns > 0 ? n_columns : 1));
  for (int64_t c = 0; c < n_columns; ++c) next[c] = crow[c];
  for (int64_t e = 0; e < nnz; ++e) order[next[columns[e]]++] = e;
  free(next);
}
