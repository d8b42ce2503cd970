"""Hand-written ensemble gradients, each equal to the reference `vmap(grad(sae.loss))`.

    dense   fused forward and backward on the stacked tensors (every variant)
    sparse  topk ensembles: only the encoder GEMM is dense; the rest touches active latents only
"""

from sae_ensemble.kernels import adam, dense, sparse  # noqa: F401
