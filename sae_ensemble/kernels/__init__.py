"""Hand-written ensemble gradients, each equal to the reference `vmap(grad(sae.loss))`.

    dense     fused forward and backward on the stacked tensors (every variant)
    epilogue  CUDA (Triton): dense's two passes inside the GEMMs that produce the code tiles
    sparse    topk ensembles: only the encoder GEMM is dense; the rest touches active latents only
    adam      Adam on the stacked tensors in cache-sized member chunks (torchopt's numbers)
    native    CPU C kernels built on first use: adam_cpu.c (one-pass Adam), relu_cpu.c (dense's
              passes over the code tiles and the decoder normalisation's backward)
"""

from sae_ensemble.kernels import adam, dense, epilogue, native, sparse  # noqa: F401
