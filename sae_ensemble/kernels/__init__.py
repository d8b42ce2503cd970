"""Hand-written ensemble gradients, each equal to the reference `vmap(grad(sae.loss))`, for SAEs and for relu and
topk transcoders with or without the skip path (common.py says how a transcoder's batch is read).

dense     fused forward and backward on the stacked tensors (every variant)
augmented dense's step with the bias and the L1 term inside augmented GEMMs (eager, off the C path)
common    what the three share: top-k codes, the row loop's sums, the gradients made of them
sparse    topk ensembles: only the encoder GEMM is dense; the rest touches active latents only
patterns  the sparse kernel's code patterns: a chunk's active entries in CSR order, and their transpose
auxk      AuxK inside the sparse kernel: dense over the dead latents' columns (CPU), a second pattern (CUDA)
adam      Adam on the stacked tensors in cache-sized member chunks (torchopt's numbers)
native    CPU C kernels built on first use: adam_cpu.c (one-pass Adam), relu_cpu.c (dense's
          passes over the code tiles and the decoder normalisation's backward), topk_cpu.c (row top-k)
"""

from sae_ensemble.kernels import adam, augmented, auxk, common, dense, native, patterns, sparse  # noqa: F401
