/* A dot product the compiler vectorises, for the C kernels (relu_cpu.c, sparse_cpu.c). */
#ifndef SAE_ENSEMBLE_DOT_CPU_H
#define SAE_ENSEMBLE_DOT_CPU_H
#include <stdint.h>

#define LANES 16

/* a . b, in LANES running sums added pairwise at the end: a fixed order that the compiler can vectorise (one
 * running sum is a chain of dependent adds, one add's latency per element). */
static inline float dot(const float *restrict a, const float *restrict b, int64_t len) {
  float acc[LANES] = {0.0f};
  int64_t i = 0;
  for (; i + LANES <= len; i += LANES)
    for (int l = 0; l < LANES; ++l) acc[l] += a[i + l] * b[i + l];
  float tail = 0.0f;
  for (; i < len; ++i) tail += a[i] * b[i];
  for (int width = LANES / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  return acc[0] + tail;
}
#endif
