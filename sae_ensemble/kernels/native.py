"""C kernels for the CPU step, compiled on first use: passes the torch ops make several times.

- `adam_` (adam_cpu.c): Adam's update in one pass over memory. The torch ops of kernels/adam.py
  make nine passes over each chunk of params, gradients and moments; on the small SAEs an
  ensemble exists for, those passes took as long as the GEMMs (docs/benchmarks.md).
- `relu_count_` and `relu_backward_` (relu_cpu.c): kernels/dense.py's CPU passes over the code
  tiles. The first adds the encoder bias, applies ReLU and sums each feature's firings and codes;
  the second masks dL/dcodes by the codes, adds the L1 term and sums each feature's gradient. The
  torch ops made a pass for each of those steps, and the augmented GEMMs that fold the bias and
  the L1 term in instead run ~7% slower at d + 1 columns (docs/benchmarks.md).
- `error_pass_` (relu_cpu.c): the decoder output's pass, from the reconstruction to dL/dx_hat with the squared
  error and the decoder-bias gradient on the way, where the torch ops made five.
- `normalise_backward_` (relu_cpu.c): the gradient through the decoder's row normalisation, a
  row at a time, where the torch ops made three passes over [M, n, d].
- `topk_rows` (topk_cpu.c): each row's k largest, sorted, for the sparse kernel's small k: torch.topk
  was the largest op of its CPU step. Its values are torch.topk's; of tied values it may pick other
  indices (torch's own order among ties is unspecified).
- `keep_largest` (topk_cpu.c): AuxK's selection as a mask, k near the width (64 of ~110 dead latents),
  by selection of the k-th rather than torch.topk's sort: the same set, ties aside.
- `sparse_backward` (sparse_cpu.c): the sparse kernel's backward at its active entries in one pass over
  them, per member, where the torch ops took four sparse products (sampled_addmm, a transpose sorted by
  column, two CSR products that zero-fill and copy their outputs) and two index_adds: 17% of a top-k step.

Each gives bit for bit the elementwise numbers of the torch ops it replaces (tests/test_kernels.py
compares them on random data), so it needs no tolerance of its own; its sums (over rows, and the
normalisation's dot products) differ from torch's reductions only by the order of the additions.
They are built with the machine's C compiler into one library in a cache keyed by the sources and
the CPU; without a compiler, or off Linux, `available()` is False and the callers run the torch
ops (a warning says so once).
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

SOURCES = [Path(__file__).with_name(name) for name in ("adam_cpu.c", "relu_cpu.c", "topk_cpu.c", "sparse_cpu.c")]
HEADERS = [Path(__file__).with_name("dot_cpu.h")]  # in the build's key: a change rebuilds
# -fopenmp: the kernels' threads are torch's own OpenMP pool. The library needs libgomp.so.1, which
# resolves to the copy torch has loaded already; threads of its own (pthreads) ran against torch's
# still-spinning OpenMP workers on the same cores and were slower than the torch ops they replace.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
# What adam_cpu.c calls in torch's MKL: the square root torch's sqrt calls, and the per-thread MKL thread count.
MKL_FUNCTIONS = ("vmsSqrt", "MKL_Set_Num_Threads_Local")  # the C (by value) symbol; the lowercase one is Fortran's
# torch's sqrt calls MKL's vmsSqrt with this mode (ATen/cpu/vml.h): VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE.
VML_MODE = 0x00000002 | 0x00140000 | 0x00000100


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sae_ensemble"


def _cpu_key() -> str:
    """What -march=native compiled for: a shared home on a cluster of mixed nodes gets one build per CPU."""
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(("flags", "Features"))
        )
    except (OSError, StopIteration):
        flags = platform.processor()
    return platform.machine() + flags


def _build(compiler: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """The library's path, compiled into the cache unless there already (extra_flags: tests build the paths this
    CPU does not take, e.g. -mno-avx512f)."""
    flags = [*FLAGS, *extra_flags]
    sources = b"".join(source.read_bytes() for source in SOURCES + HEADERS)
    key = hashlib.sha256(sources + " ".join(flags).encode() + _cpu_key().encode()).hexdigest()[:16]
    library = cache_dir() / f"native_cpu-{key}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        # Workers of one sweep may build at once: each compiles to its own file, then renames it into place.
        fd, partial = tempfile.mkstemp(dir=library.parent, suffix=".so.partial")
        os.close(fd)
        try:
            subprocess.run(
                [compiler, *flags, *map(str, SOURCES), "-o", partial, "-lm"],
                check=True,
                capture_output=True,
                text=True,
                timeout=120,
            )
            os.replace(partial, library)
        finally:
            Path(partial).unlink(missing_ok=True)
    return library


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _torch_lib() -> Path:
    return Path(torch.__file__).with_name("lib") / "libtorch_cpu.so"


def _prerequisites() -> bool:
    return bool(
        torch.backends.mkl.is_available() and _torch_lib().exists() and _compiler() and platform.system() == "Linux"
    )


@functools.cache
def _kernel():
    """(the library, its MKL functions: MKL_FUNCTIONS) or None where either is missing."""
    torch_lib, compiler = _torch_lib(), _compiler()
    if not _prerequisites():
        warnings.warn(
            "Adam and the fused step's passes run as torch ops: no C compiler, or this torch does not take sqrt from "
            "MKL",
            stacklevel=3,
        )
        return None
    try:
        torch_cpu = ctypes.CDLL(str(torch_lib))
        mkl = tuple(ctypes.cast(getattr(torch_cpu, name), ctypes.c_void_p) for name in MKL_FUNCTIONS)
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, AttributeError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        warnings.warn(
            f"Adam and the fused step's passes run as torch ops: the C kernels did not build "
            f"({str(detail).strip()[:300]})",
            stacklevel=3,
        )
        return None
    return declared(library), mkl


def declared(library: ctypes.CDLL) -> ctypes.CDLL:
    """The library with its functions' argument types set (ctypes passes nothing right without them)."""
    library.adam_step.restype = library.relu_count.restype = library.relu_backward.restype = None
    library.adam_step.argtypes = (
        [ctypes.c_void_p] * 6
        + [ctypes.c_int64] * 2
        + [ctypes.c_float] * 7
        + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    )
    library.relu_count.argtypes = library.relu_backward.argtypes = (
        [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    )
    library.error_pass.argtypes = (
        [ctypes.c_void_p] * 2
        + [ctypes.c_int64, ctypes.c_float]
        + [ctypes.c_void_p] * 2
        + [ctypes.c_int64] * 3
        + [ctypes.c_int]
    )
    library.normalise_backward.restype = library.topk_rows.restype = library.error_pass.restype = None
    library.normalise_backward.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    library.topk_rows.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    library.keep_largest.restype = library.sparse_backward.restype = None
    library.sparse_backward.argtypes = (
        [ctypes.c_void_p] * 6 + [ctypes.c_int64] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 5 + [ctypes.c_int] * 2
    )
    library.keep_largest.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    return library


MODES = ("auto", "on", "off")  # config.NativeKernels: training.native_kernels
_mode = "auto"


def use(mode: str) -> None:
    """This process's choice (a worker sets it from training.native_kernels): auto = the C kernels where they
    build, else torch ops; on = required (`available` raises if they do not build); off = torch ops only."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"training.native_kernels={mode!r} is unknown; allowed: {', '.join(MODES)}")
    _mode = str(mode)


def available() -> bool:
    """Whether the C kernels run in this process (built on the first call under `auto` and `on`)."""
    if _mode == "off":
        return False
    if _kernel() is None and _mode == "on":
        raise RuntimeError(
            "training.native_kernels=on but the C kernels did not build here (the warning above says why); "
            "use auto or off"
        )
    return _kernel() is not None


def prerequisites() -> bool:
    """Whether what the build needs is here: Linux, a C compiler, a torch that takes sqrt from MKL."""
    return _prerequisites()


def expected(mode: str = "auto") -> bool:
    """Whether the C kernels will run under `mode`, without building them (the plan asks; it compiles nothing):
    on and off say so; auto: their result once built, else whether what the build needs is present."""
    if mode != "auto":
        return mode == "on"
    return _kernel() is not None if _kernel.cache_info().currsize else _prerequisites()


def fits(*tensors: torch.Tensor) -> bool:
    """Whether the C kernel can update these: float32, contiguous, on the CPU."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def adam_(p, g, m, v, lr, betas: tuple[float, float], corrections: tuple[float, float], eps: float, scale=None) -> None:
    """Update p, m and v ([M, ...], a chunk of members) in place with per-member learning rates lr [M]; `scale`
    [M] (or None): each member's gradient is g * scale (gradient clipping's factor)."""
    (b1, b2), (c1, c2) = betas, corrections
    _run(
        "adam_step",
        p,
        g,
        m,
        v,
        lr,
        scale,
        p.shape[0],
        p[0].numel(),
        b1,
        1 - b1,
        b2,
        1 - b2,
        c1,
        c2,
        eps,
        _kernel()[1][0],
        VML_MODE,
        _kernel()[1][1],
        torch.get_num_threads(),
    )


def relu_count_(
    x: torch.Tensor, fired: torch.Tensor, bias: torch.Tensor | None = None, total: torch.Tensor | None = None
) -> None:
    """x [M, rows, n] += bias [M, n], then ReLU in place; add each feature's firing count (codes > 0)
    over the rows to fired [M, n] and, given total [M, n], its codes' sum."""
    assert fits(x, fired, *(t for t in (bias, total) if t is not None)), (
        "relu_count_ needs contiguous float32 CPU tensors"
    )
    _run("relu_count", x, bias, fired, total, *x.shape, torch.get_num_threads())


def relu_backward_(g: torch.Tensor, codes: torch.Tensor, add: torch.Tensor, g_sum: torch.Tensor) -> None:
    """g [M, rows, n] = g + add [M] where codes > 0 (or NaN, as threshold_backward), else 0, in place;
    add each feature's sum over the rows to g_sum [M, n]."""
    assert fits(g, codes, add, g_sum) and g.shape == codes.shape, "relu_backward_ needs contiguous float32 CPU tensors"
    _run("relu_backward", g, codes, add, g_sum, *g.shape, torch.get_num_threads())


def error_pass_(
    x_hat: torch.Tensor, target: torch.Tensor, scale: float, squared: torch.Tensor, g_sum: torch.Tensor
) -> None:
    """x_hat [M, rows, o] = (x_hat - target [rows, o]) * scale in place (dL/dx_hat for scale = 2 / (B o)); add each
    member's squared error (before the scale) to squared [M] and the result's sum over the rows to g_sum [M, o]."""
    assert (
        fits(x_hat, squared, g_sum)
        and target.dtype == torch.float32
        and target.device.type == "cpu"
        and target.stride(-1) == 1
        and target.shape == x_hat.shape[1:]
    ), "error_pass_ needs float32 CPU tensors, contiguous but for the target's rows"
    _run("error_pass", x_hat, target, target.stride(0), scale, squared, g_sum, *x_hat.shape, torch.get_num_threads())


def normalise_backward_(g: torch.Tensor, D: torch.Tensor, norms: torch.Tensor) -> None:
    """g [..., d] = (g - D (g . D)) / norms [..., 1], in place: dL/drows from dL/dD, D = rows / norms."""
    assert fits(g, D, norms) and g.shape == D.shape and norms.numel() * g.shape[-1] == g.numel(), (
        "normalise_backward_ needs contiguous float32 CPU tensors of matching shapes"
    )
    _run("normalise_backward", g, D, norms, norms.numel(), g.shape[-1], torch.get_num_threads())


def topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [..., k] of the k largest along x's last dimension, largest first, as torch.topk's."""
    assert fits(x) and 0 < k <= x.shape[-1], "topk_rows needs a contiguous float32 CPU tensor and 0 < k <= its width"
    values = x.new_empty(*x.shape[:-1], k)
    indices = torch.empty(values.shape, dtype=torch.int64)
    n = x.shape[-1]
    _run("topk_rows", x, values, indices, x.numel() // n, n, k, torch.get_num_threads())
    return values, indices


def keep_largest(x: torch.Tensor, live: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, mask) [M, b, n]: of each row of member m's x [M, b, n], among the columns where live [M, n] is
    nonzero, the k[m] largest: mask 1.0 there, codes x there, both 0.0 elsewhere. A row keeps min(k[m], its live
    entries, not counting -inf); NaN ranks above every number (torch.topk's order); of values equal to the k-th,
    the earlier columns are kept."""
    k, live = k.to(torch.int64).contiguous(), live.to(x.dtype).contiguous()
    assert fits(x) and x.dim() == 3 and k.shape == x.shape[:1] and live.shape == (x.shape[0], x.shape[2]), (
        "keep_largest needs a contiguous float32 CPU x [M, b, n], live [M, n] and k [M]"
    )
    codes, mask = torch.empty_like(x), torch.empty_like(x)
    _run("keep_largest", x, live, k, codes, mask, *x.shape, torch.get_num_threads())
    return codes, mask


def sparse_backward(
    crow: torch.Tensor,
    columns: torch.Tensor,
    values: torch.Tensor,
    g_xhat: torch.Tensor,
    D: torch.Tensor,
    x: torch.Tensor,
    l1: torch.Tensor,
    g_pre_sum: torch.Tensor,
    fired: torch.Tensor,
    totals: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g_D [M·n, o], g_W [M·n, d]): the codes' CSR matrix [M·b, M·n] (crow, columns, values; member m's rows and
    columns in its own block) times dL/dx_hat [M·b, o] and, through dL/dpre = (dL/dx_hat . D[column] + l1[m]) where
    the code fired (else 0), times the centred input x [M, b, d] (rows may be strided: an augmented operand's
    first d columns). Adds each column's firings and dL/dpre to fired and g_pre_sum [M·n]; given `totals`
    (g_D, g_W), adds to them and returns them."""
    M, b, d = x.shape
    n, o = D.shape[0] // M, D.shape[1]
    assert (
        crow.dtype == columns.dtype == torch.int64
        and crow.is_contiguous()
        and columns.is_contiguous()
        and fits(values, g_xhat, D, l1, g_pre_sum, fired)
        and x.stride(-1) == 1
        and x.stride(0) == b * x.stride(1)
        and g_xhat.shape == (M * b, o)
        and crow.numel() == M * b + 1
        and l1.shape == (M,)
        and g_pre_sum.numel() == fired.numel() == M * n
    ), "sparse_backward needs contiguous float32 CPU tensors of the shapes its doc gives"
    g_D, g_W = totals if totals is not None else (D.new_empty(M * n, o), D.new_empty(M * n, d))
    assert fits(g_D, g_W) and g_D.shape == (M * n, o) and g_W.shape == (M * n, d)
    _run(
        "sparse_backward",
        crow,
        columns,
        values,
        g_xhat,
        D,
        x,
        x.stride(1),
        l1,
        g_D,
        g_W,
        g_pre_sum,
        fired,
        M,
        b,
        n,
        o,
        d,
        int(totals is None),
        torch.get_num_threads(),
    )
    return g_D, g_W


def _run(name: str, *args) -> None:
    """Call the library's `name` with `args`, tensors as their data pointers (None: NULL). Under a profiler label
    while torch.profiler records (its tables show the C kernels too); the label costs ~15 us a call otherwise, a
    tenth of a small ensemble's step overhead."""
    args = tuple(arg.data_ptr() if isinstance(arg, torch.Tensor) else arg for arg in args)
    if not torch.autograd.profiler._is_profiler_enabled:
        getattr(_kernel()[0], name)(*args)
        return
    with torch.profiler.record_function(f"native::{name}"):
        getattr(_kernel()[0], name)(*args)
