/* One pass of Adam over a chunk of stacked members (float32, contiguous, CPU): kernels/native.py.
 *
 * Bit for bit the same numbers as the torch ops it replaces (kernels/adam.py, themselves
 * torchopt's order of operations), so the fast path stays equal to the reference:
 *   m = fma(g, 1 - b1, m * b1)            m.mul_(b1).add_(g, alpha=1 - b1)
 *   v = fma((1 - b2) * g, g, v * b2)      v.mul_(b2).addcmul_(g, g, value=1 - b2)
 *   d = vsqrt(v / c2) + eps               torch.div(v, c2).sqrt_().add_(eps)
 *   p = fma(-lr, (m / c1) / d, p)         p.addcmul_(lr, torch.div(m, c1).div_(d), value=-1)
 * torch's CPU sqrt is MKL's vmsSqrt (high-accuracy mode), which is not always correctly rounded,
 * so the square root is the same MKL function, passed in from libtorch_cpu, on blocks that stay
 * in L1. Built with -ffp-contract=off: every fused multiply-add above is written out, no other. */
#include <math.h>
#include <pthread.h>
#include <stdint.h>

#define BLOCK 1024
typedef void (*vsqrt_fn)(int n, const float *in, float *out, int64_t mode);

typedef struct {
  float *p; const float *g; float *m, *v; const float *lr;
  int64_t per_member, begin, end;  /* elements [begin, end) of the flattened [M, per_member] chunk */
  float b1, a1, b2, a2, c1, c2, eps;
  vsqrt_fn vsqrt; int64_t mode;
} job_t;

static void *run(void *arg) {
  const job_t *j = (const job_t *)arg;
  float q[BLOCK];
  for (int64_t start = j->begin; start < j->end;) {
    int64_t member = start / j->per_member;
    int64_t stop = (member + 1) * j->per_member;  /* a block never spans two members' learning rates */
    if (stop > j->end) stop = j->end;
    if (stop > start + BLOCK) stop = start + BLOCK;
    int n = (int)(stop - start);
    float *p = j->p + start, *m = j->m + start, *v = j->v + start;
    const float *g = j->g + start;
    for (int i = 0; i < n; ++i) {
      m[i] = fmaf(g[i], j->a1, m[i] * j->b1);
      v[i] = fmaf(j->a2 * g[i], g[i], v[i] * j->b2);
      q[i] = v[i] / j->c2;
    }
    j->vsqrt(n, q, q, j->mode);
    float neg_lr = -j->lr[member];
    for (int i = 0; i < n; ++i) p[i] = fmaf(neg_lr, (m[i] / j->c1) / (q[i] + j->eps), p[i]);
    start = stop;
  }
  return 0;
}

void adam_step(float *p, const float *g, float *m, float *v, const float *lr, int64_t members, int64_t per_member,
               float b1, float a1, float b2, float a2, float c1, float c2, float eps,
               vsqrt_fn vsqrt, int64_t mode, int threads) {
  enum { MAX_THREADS = 256 };
  job_t jobs[MAX_THREADS];
  pthread_t tids[MAX_THREADS];
  int started[MAX_THREADS] = {0};
  int64_t total = members * per_member;
  if (threads < 1) threads = 1;
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  if (total < (int64_t)threads * 4 * BLOCK) threads = 1;  /* small updates: threads cost more than they save */
  int64_t share = (total + threads - 1) / threads;
  share = (share + BLOCK - 1) / BLOCK * BLOCK;
  for (int t = 0; t < threads; ++t) {
    int64_t begin = t * share < total ? t * share : total;
    int64_t end = begin + share < total ? begin + share : total;
    jobs[t] = (job_t){p, g, m, v, lr, per_member, begin, end, b1, a1, b2, a2, c1, c2, eps, vsqrt, mode};
  }
  for (int t = 1; t < threads; ++t)  /* a thread that cannot start leaves its share to this one */
    started[t] = jobs[t].begin < jobs[t].end && pthread_create(&tids[t], 0, run, &jobs[t]) == 0;
  run(&jobs[0]);
  for (int t = 1; t < threads; ++t) {
    if (started[t]) pthread_join(tids[t], 0);
    else run(&jobs[t]);
  }
}
