/* One pass of Adam over a chunk of stacked members (float32, contiguous, CPU): kernels/native.py.
 *
 * Bit for bit the same numbers as the torch ops it replaces (kernels/adam.py, themselves
 * torchopt's order of operations), so the fast path stays equal to the reference:
 *   g = g * s                             g * clip factor (s: 1, or the member's gradient clipping factor)
 *   m = fma(g, 1 - b1, m * b1)            m.mul_(b1).add_(g, alpha=1 - b1)
 *   v = fma((1 - b2) * g, g, v * b2)      v.mul_(b2).addcmul_(g, g, value=1 - b2)
 *   d = vsqrt(v / c2) + eps               torch.div(v, c2).sqrt_().add_(eps)
 *   p = fma(-lr, (m / c1) / d, p)         p.addcmul_(lr, torch.div(m, c1).div_(d), value=-1)
 * torch's CPU sqrt is MKL's vmsSqrt (high-accuracy mode), which is not always correctly rounded,
 * so the square root is the same MKL function, passed in from libtorch_cpu, on blocks that stay
 * in L1. Built with -ffp-contract=off: every fused multiply-add above is written out, no other.
 * The threads are torch's own OpenMP pool (kernels/native.py); in them MKL runs single-threaded
 * (MKL_Set_Num_Threads_Local, also passed in): left to torch's setting, vsqrt inside our threads made
 * the update slower on 2 threads than on 1 (0.86 against 0.76 ms for 524288 elements; 0.47 with it). */
#include <math.h>
#include <stdint.h>

#define BLOCK 1024
typedef void (*vsqrt_fn)(int n, const float *in, float *out, int64_t mode);
typedef int (*local_threads_fn)(int threads);

void adam_step(float *p, const float *g, float *m, float *v, const float *lr, const float *scale, int64_t members,
               int64_t per_member,
               float b1, float a1, float b2, float a2, float c1, float c2, float eps,
               vsqrt_fn vsqrt, int64_t mode, local_threads_fn mkl_threads, int threads) {
  int64_t blocks_per_member = (per_member + BLOCK - 1) / BLOCK, blocks = members * blocks_per_member;
  if (blocks < 4 * (int64_t)threads) threads = 1;  /* small updates: threads cost more than they save */
  /* A block never spans two members' learning rates. */
#pragma omp parallel num_threads(threads)
  {
    int previous = mkl_threads(1);
#pragma omp for schedule(static)
    for (int64_t block = 0; block < blocks; ++block) {
      int64_t member = block / blocks_per_member, first = block % blocks_per_member * BLOCK;
      int n = (int)(per_member - first < BLOCK ? per_member - first : BLOCK);
      int64_t start = member * per_member + first;
      float *restrict pb = p + start, *restrict mb = m + start, *restrict vb = v + start;
      const float *restrict gb = g + start;
      float q[BLOCK], s = scale ? scale[member] : 1.0f;  /* g * 1.0f is g exactly: no branch in the loop */
      for (int i = 0; i < n; ++i) {
        float gi = gb[i] * s;
        mb[i] = fmaf(gi, a1, mb[i] * b1);
        vb[i] = fmaf(a2 * gi, gi, vb[i] * b2);
        q[i] = vb[i] / c2;
      }
      vsqrt(n, q, q, mode);
      float neg_lr = -lr[member];
      for (int i = 0; i < n; ++i) pb[i] = fmaf(neg_lr, (mb[i] / c1) / (q[i] + eps), pb[i]);
    }
    mkl_threads(previous);
  }
}
