"""Adam's update in one pass over memory on CPU: `adam_cpu.c`, compiled on first use.

The torch ops of kernels/adam.py make nine passes over each chunk of params, gradients and
moments; on the small SAEs an ensemble exists for, those passes took as long as the GEMMs
(docs/benchmarks.md). The C kernel runs them in blocks that stay in L1, bit for bit the same
numbers (tests/test_kernels.py compares the two on random data), so it needs no tolerance of
its own. It is built with the machine's C compiler into a cache keyed by the source and the
CPU; without a compiler, or off x86-64/aarch64 Linux, `adam_step` is None and kernels/adam.py
runs the torch ops (a warning says so once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("adam_cpu.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC"]
# torch's sqrt calls MKL's vmsSqrt with this mode (ATen/cpu/vml.h): VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE.
VML_MODE = 0x00000002 | 0x00140000 | 0x00000100


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sae_ensemble"


def _cpu_key() -> str:
    """What -march=native compiled for: a shared home on a cluster of mixed nodes gets one build per CPU."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = platform.processor()
    return platform.machine() + flags


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_key().encode()).hexdigest()[:16]
    library = cache_dir() / f"adam_cpu-{key}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        # Workers of one sweep may build at once: each compiles to its own file, then renames it into place.
        fd, partial = tempfile.mkstemp(dir=library.parent, suffix=".so.partial")
        os.close(fd)
        try:
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", partial, "-lm", "-lpthread"],
                           check=True, capture_output=True, text=True, timeout=120)
            os.replace(partial, library)
        finally:
            Path(partial).unlink(missing_ok=True)
    return library


@functools.cache
def _kernel():
    """(the C function, MKL's vmsSqrt) or None where either is missing."""
    torch_lib = Path(torch.__file__).with_name("lib") / "libtorch_cpu.so"
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if not (torch.backends.mkl.is_available() and torch_lib.exists() and compiler and platform.system() == "Linux"):
        warnings.warn("Adam runs as torch ops: no C compiler, or this torch does not take sqrt from MKL", stacklevel=3)
        return None
    try:
        vsqrt = ctypes.cast(ctypes.CDLL(str(torch_lib)).vmsSqrt, ctypes.c_void_p)
        function = ctypes.CDLL(str(_build(compiler))).adam_step
    except (OSError, AttributeError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        warnings.warn(f"Adam runs as torch ops: the C kernel did not build ({str(detail).strip()[:300]})", stacklevel=3)
        return None
    function.restype = None
    function.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2 + [ctypes.c_float] * 7 + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    return function, vsqrt


def available() -> bool:
    return _kernel() is not None


def fits(*tensors: torch.Tensor) -> bool:
    """Whether the C kernel can update these: float32, contiguous, on the CPU."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def adam_(p, g, m, v, lr, betas: tuple[float, float], corrections: tuple[float, float], eps: float) -> None:
    """Update p, m and v ([M, ...], a chunk of members) in place with per-member learning rates lr [M]."""
    function, vsqrt = _kernel()
    (b1, b2), (c1, c2) = betas, corrections
    function(p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), lr.data_ptr(), p.shape[0], p[0].numel(),
             b1, 1 - b1, b2, 1 - b2, c1, c2, eps, vsqrt, VML_MODE, torch.get_num_threads())
