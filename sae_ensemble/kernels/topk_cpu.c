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
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

#define BLOCK 8
#define WIDE 16 /* AVX-512 floats */

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
#ifdef __AVX512F__
#define INSERT(top, v, levels, max, min)                                                                               \
  for (int l = 0; l < (levels); ++l) { /* v into the lane's descending top[0..levels) */                          \
    __typeof__(v) larger = max(top[l], v);                                                                             \
    v = min(top[l], v);                                                                                                \
    top[l] = larger;                                                                                                   \
  }

/* The same bound by AVX-512, for a constant `levels` (the cascade stays in registers): 16 lanes in two independent
 * cascades over 32 columns a step, merged, then lanes t and t + 8 (the same columns mod 8) merged into the 8 lanes
 * above. Merging by inserting one cascade's values into the other keeps each lane's `levels` largest of both, so
 * the bound is the AVX one's exactly; the AVX loop waited on its one cascade's max latency each 8 values. */
static inline __attribute__((always_inline)) void bound_wide(const float *row, int64_t n, const int levels,
                                                             float *bound) {
  const __m512 lowest = _mm512_set1_ps(-__builtin_inff());
  __m512 a[MAX_LEVELS], b[MAX_LEVELS];
  for (int l = 0; l < levels; ++l) a[l] = b[l] = lowest;
  int64_t j = 0;
  for (; j + 2 * WIDE <= n; j += 2 * WIDE) {
    __m512 u = _mm512_max_ps(_mm512_loadu_ps(row + j), lowest); /* NaN -> -inf, as below */
    __m512 w = _mm512_max_ps(_mm512_loadu_ps(row + j + WIDE), lowest);
    INSERT(a, u, levels, _mm512_max_ps, _mm512_min_ps)
    INSERT(b, w, levels, _mm512_max_ps, _mm512_min_ps)
  }
  if (j + WIDE <= n) {
    __m512 u = _mm512_max_ps(_mm512_loadu_ps(row + j), lowest);
    INSERT(a, u, levels, _mm512_max_ps, _mm512_min_ps)
    j += WIDE;
  }
  for (int m = 0; m < levels; ++m) {
    __m512 u = b[m];
    INSERT(a, u, levels, _mm512_max_ps, _mm512_min_ps)
  }
  __m256 top[MAX_LEVELS];
  for (int l = 0; l < levels; ++l) top[l] = _mm512_castps512_ps256(a[l]);
  for (int m = 0; m < levels; ++m) {
    __m256 u = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[m]), 1));
    INSERT(top, u, levels, _mm256_max_ps, _mm256_min_ps)
  }
  if (j + BLOCK <= n) {
    __m256 u = _mm256_max_ps(_mm256_loadu_ps(row + j), _mm512_castps512_ps256(lowest));
    INSERT(top, u, levels, _mm256_max_ps, _mm256_min_ps)
  }
  float lanes[BLOCK];
  _mm256_storeu_ps(lanes, top[levels - 1]);
  float least = lanes[0];
  for (int t = 1; t < BLOCK; ++t) least = lanes[t] < least ? lanes[t] : least;
  *bound = least;
}
#endif

static int64_t candidates_bound(const float *row, int64_t n, int64_t k, float *bound) {
#ifdef __AVX__
  int64_t levels = (k + BLOCK - 1) / BLOCK;
  if (levels > MAX_LEVELS || n / BLOCK < levels) return 0;
#ifdef __AVX512F__
  switch (levels) { /* a constant each: the cascades in registers */
    case 1: bound_wide(row, n, 1, bound); return 1;
    case 2: bound_wide(row, n, 2, bound); return 1;
    case 3: bound_wide(row, n, 3, bound); return 1;
    case 4: bound_wide(row, n, 4, bound); return 1;
    case 5: bound_wide(row, n, 5, bound); return 1;
    case 6: bound_wide(row, n, 6, bound); return 1;
    case 7: bound_wide(row, n, 7, bound); return 1;
    default: bound_wide(row, n, 8, bound); return 1;
  }
#endif
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

/* Order-preserving integer key of a float: larger float, larger key; every NaN above +inf (torch.topk's order). */
static inline uint32_t order_key(float v) {
  uint32_t u;
  memcpy(&u, &v, sizeof u);
  uint32_t key = (u & 0x80000000u) ? ~u : u | 0x80000000u;
  return v != v ? UINT32_MAX : key; /* selects, no branches: the loops over a row vectorise (10x on a row's keys) */
}

#ifdef __AVX512F__
#define MAX_CANDIDATES 512 /* more (rows of many equal values): the insertion below, whose cost grows with k */

/* A candidate's rank key: order_key with -0.0 as 0.0 (beats()'s order: they are equal). */
static inline uint32_t rank_key(float v) { return order_key(v == 0.0f ? 0.0f : v); }

/* The k largest of a row by AVX-512, with no branch per candidate: the values at or above `bound` (or NaN) are
 * compressed into a buffer in column order, then each one's rank (how many beat it, plus the equal ones before
 * it) is counted 16 at a time and it is written to its rank's slot. The order is topk_rows's own (largest first,
 * ties by column). Inserting the candidates one by one into the sorted k cost ~100 cycles each in mispredicted
 * branches, most of the row's time (docs/kernels.md). Returns 0 (nothing written) past MAX_CANDIDATES. */
static int select_candidates(const float *row, int64_t n, int64_t k, float bound, float *vals, int64_t *idx) {
  float value[MAX_CANDIDATES + WIDE];
  int32_t column[MAX_CANDIDATES + WIDE];
  uint32_t key[MAX_CANDIDATES + WIDE];
  const __m512 floor = _mm512_set1_ps(bound);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t m = 0;
  for (int64_t j = 0; j < n; j += WIDE) {
    __mmask16 in = n - j >= WIDE ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(in, row + j);
    __mmask16 keep = _mm512_mask_cmp_ps_mask(in, v, floor, _CMP_NLT_UQ);
    if (m > MAX_CANDIDATES - WIDE) return 0;
    _mm512_mask_compressstoreu_ps(value + m, keep, v);
    _mm512_mask_compressstoreu_epi32(column + m, keep, _mm512_add_epi32(lane, _mm512_set1_epi32((int32_t)j)));
    m += __builtin_popcount(keep);
  }
  int64_t padded = (m + WIDE - 1) / WIDE * WIDE;
  for (int64_t i = 0; i < m; ++i) key[i] = rank_key(value[i]);
  for (int64_t i = m; i < padded; ++i) key[i] = 0; /* below every value's key: never beats, never equal */
  float slot_value[k + 1];
  int64_t slot_column[k + 1]; /* slot k takes the ranks past k */
  for (int64_t i = 0; i < m; ++i) {
    __m512i mine = _mm512_set1_epi32((int32_t)key[i]);
    int64_t rank = 0;
    for (int64_t j = 0; j < padded; j += WIDE) {
      __m512i keys = _mm512_loadu_si512(key + j);
      __mmask16 before = i - j >= WIDE ? 0xFFFF : i <= j ? 0 : (__mmask16)((1u << (i - j)) - 1);
      rank += __builtin_popcount(_mm512_cmpgt_epu32_mask(keys, mine));
      rank += __builtin_popcount(_mm512_mask_cmpeq_epu32_mask(before, keys, mine));
    }
    rank = rank < k ? rank : k;
    slot_value[rank] = value[i];
    slot_column[rank] = column[i];
  }
  memcpy(vals, slot_value, sizeof(float) * (size_t)k);
  memcpy(idx, slot_column, sizeof(int64_t) * (size_t)k);
  return 1;
}
#endif

void topk_rows(const float *x, float *values, int64_t *indices, int64_t rows, int64_t n, int64_t k, int threads) {
#pragma omp parallel for num_threads(rows * n < 65536 ? 1 : threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float *restrict row = x + r * n;
    float *restrict vals = values + r * k;
    int64_t *restrict idx = indices + r * k;
    int64_t count = 0, j = 0;
    float bound;
    if (candidates_bound(row, n, k, &bound)) {
#ifdef __AVX512F__
      if (select_candidates(row, n, k, bound, vals, idx)) continue;
#endif
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
        uint32_t key = alive[j] != 0.0f ? order_key(row[j]) : floor_key;
        keys[j] = key;
        finite += key > floor_key;
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
