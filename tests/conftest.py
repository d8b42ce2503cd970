"""Test-session setup that must happen before any test module imports the package."""

import os

import torch

# Triton's interpreter runs kernels/epilogue.py's CUDA kernels on CPU tensors, so CI checks their
# arithmetic (tests/test_kernels.py). Triton decides when it is first imported whether it interprets.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
