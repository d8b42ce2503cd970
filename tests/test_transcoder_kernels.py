"""The hand-written kernels train transcoders (Member.d_out) and skip transcoders equal to the reference
vmap(grad(sae.loss)): every kernel path, relu and topk, mixed in one ensemble and alone, after STEPS steps."""

import dataclasses

import pytest
import torch
from test_kernels import assert_same_members, cuda, relative_error
from test_transcoders import D_IN, D_OUT, paired_batches

from sae_ensemble.ensemble import Ensemble
from sae_ensemble.execution import REFERENCE, Execution
from sae_ensemble.kernels import dense, native
from sae_ensemble.member import Member

STEPS = 30
ROWS = 48  # rows per kernel call: 128-row batches split unevenly (48, 48, 32)
SKIP = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(1)) * 0.2  # the data's true skip path

# Per-member l1, k, lr, bias decay, warmups, decay, dict sizes and no b_dec; relu and topk alone take other
# code paths than mixed (no top-k at all; codes straight from top-k, the sparse kernel's embedding_bag).
ENSEMBLES = {
    "mixed": [
        {"variant": "relu", "dict_size": 48, "l1": 1e-3, "seed": 0, "lr_warmup_steps": 10},
        {"variant": "topk", "dict_size": 32, "k": 4, "seed": 1, "lr": 3e-3, "use_b_dec": False},
        {"variant": "relu", "dict_size": 32, "l1": 3e-3, "seed": 2, "bias_decay": 0.05, "l1_warmup_steps": 10},
        {"variant": "topk", "dict_size": 40, "k": 6, "seed": 3, "bias_decay": 0.1, "lr_decay_steps": 15},
    ],
    "relu": [
        {"variant": "relu", "dict_size": 48, "l1": 1e-3, "seed": 0, "use_b_dec": False},
        {"variant": "relu", "dict_size": 32, "l1": 3e-3, "seed": 2, "bias_decay": 0.05, "lr": 3e-3},
    ],
    "topk": [
        {"variant": "topk", "dict_size": 32, "k": 4, "seed": 1, "lr": 3e-3},
        {"variant": "topk", "dict_size": 40, "k": 6, "seed": 3, "bias_decay": 0.1, "use_b_dec": False},
    ],
}

# (execution, passes, training.native_kernels): every path a CPU runs, and the torch ops CUDA runs.
PATHS = {
    "fused-c": ("fused", "c", "auto"),  # kernels/native.py's C passes
    "fused-torch-ops": ("fused", None, "off"),  # no C: the augmented GEMMs (eager CUDA's default)
    "fused-at-d-columns": ("fused", "torch", "off"),  # the passes torch.compile fuses (compiled CUDA's)
    "fused-feature-major": ("fused", "transposed", "off"),  # K-major weight-gradient GEMMs (Hopper)
    "sparse-c": ("sparse", None, "auto"),  # the C normalisation backward and Adam
    "sparse-torch-ops": ("sparse", None, "off"),
}


def transcoders(ensemble: str, skip: bool) -> list[Member]:
    return [Member(d_in=D_IN, d_out=D_OUT, skip_connection=skip, **fields) for fields in ENSEMBLES[ensemble]]


def batches(skip: bool) -> list[torch.Tensor]:
    return paired_batches(STEPS, skip=SKIP if skip else None)[0]


def train(members, execution, skip: bool, device: str = "cpu", **options) -> Ensemble:
    ensemble = Ensemble(members, STEPS, device=device, execution=execution, **options)
    for batch in batches(skip):
        ensemble.step(batch.to(device))
    return ensemble


@pytest.fixture(scope="module")
def reference():
    """{(ensemble, skip): the reference execution's trained ensemble}, each trained once."""
    runs: dict[tuple[str, bool], Ensemble] = {}

    def trained(ensemble: str, skip: bool) -> Ensemble:
        if (ensemble, skip) not in runs:
            runs[ensemble, skip] = train(transcoders(ensemble, skip), REFERENCE, skip)
        return runs[ensemble, skip]

    return trained


@pytest.fixture
def native_mode():
    """Set training.native_kernels for one test (a worker calls native.use), restored after it."""
    yield native.use
    native.use("auto")


@pytest.mark.parametrize("skip", [False, True], ids=["transcoder", "skip-transcoder"])
@pytest.mark.parametrize("ensemble", list(ENSEMBLES))
@pytest.mark.parametrize("path", list(PATHS))
def test_kernel_training_of_transcoders_equals_reference(reference, native_mode, path, ensemble, skip):
    kind, passes, mode = PATHS[path]
    if passes == "c" and not native.available():
        pytest.skip("the C kernels do not build here")
    native_mode(mode)
    trained = train(transcoders(ensemble, skip), Execution(kind, ROWS, passes), skip)
    want = reference(ensemble, skip)
    if skip:  # W_skip starts at zero: equal params mean the kernel trained it as the reference did
        assert want.params["W_skip"].abs().amax((1, 2)).min() > 1e-2
    assert_same_members(trained, want)


@pytest.mark.parametrize("skip", [False, True], ids=["transcoder", "skip-transcoder"])
def test_sparse_training_of_topk_transcoders_with_auxk_equals_reference(skip):
    # AuxK's residual is the target's: the dead latents' decoder rows learn to write the output's error.
    fields = [
        {"variant": "topk", "dict_size": 64, "k": 2, "seed": 1, "lr": 3e-3},
        {"variant": "topk", "dict_size": 40, "k": 3, "seed": 3, "bias_decay": 0.1, "use_b_dec": False},
    ]
    members = [Member(d_in=D_IN, d_out=D_OUT, skip_connection=skip, **f) for f in fields]
    with_auxk = [dataclasses.replace(m, auxk_dead_tokens=128, k_aux=6) for m in members]
    want = train(with_auxk, REFERENCE, skip)
    without = train(members, REFERENCE, skip)
    assert (want.params["W_dec"] - without.params["W_dec"]).abs().amax() > 1e-3  # AuxK revived latents
    assert_same_members(train(with_auxk, Execution("sparse", ROWS), skip), want)


def test_auto_on_transcoders_times_the_kernels_and_trains_like_the_reference(reference):
    """`auto` tunes transcoders too: fused and (all-topk) sparse are candidates, the reference is not (a kernel
    implements every member), and whichever it picks trains like the reference."""
    for ensemble in ("mixed", "topk"):
        tuned = Ensemble(transcoders(ensemble, True), STEPS, execution="auto")
        for batch in batches(True):
            tuned.step(batch)
        candidates = {c.split("(")[0] for c in tuned.autotune_report}
        assert "fused" in candidates and "reference" not in candidates, candidates
        assert ("sparse" in candidates) == (ensemble == "topk"), candidates
        assert tuned.choice in tuned.autotune_report
        assert_same_members(tuned, reference(ensemble, True))


def test_bf16_kernels_on_transcoders_stay_within_bf16_rounding_of_the_float32_reference(reference):
    """CUDA's autocast path (the kernels' GEMM operands in bf16) runs on CPU too, so CI checks its arithmetic."""
    for skip in (False, True):
        ensemble = train(transcoders("mixed", skip), REFERENCE, skip)
        batch = paired_batches(1, skip=SKIP if skip else None, seed=3)[0][0]
        hparams = {**ensemble.hparams, "l1": ensemble.schedules(STEPS)[1]}
        want_grads, want_aux = ensemble._reference(batch, hparams)
        for passes in ("augmented", "torch", "transposed"):
            grads, aux = dense.grads(
                ensemble.params, hparams, batch, ensemble.layout, ROWS, dtype=torch.bfloat16, passes=passes
            )
            assert set(grads) == set(want_grads)
            for name in want_grads:  # bf16 keeps 8 mantissa bits: ~0.4% per rounding
                assert relative_error(grads[name], want_grads[name]) < 3e-2, (skip, passes, name)
            for name in ("loss", "mse", "l1_norm"):
                assert relative_error(aux[name], want_aux[name]) < 1e-2, (skip, passes, name)


@pytest.mark.parametrize("passes", [None, "transposed"], ids=["at-d-columns", "feature-major"])
def test_compiled_kernels_train_transcoders_like_the_reference(reference, passes):
    """torch.compile (training.compile, CUDA workers) on the skip transcoders' passes; inductor compiles on CPU."""
    compiled = train(transcoders("mixed", True), Execution("fused", passes=passes), True, compile=True)
    assert_same_members(compiled, reference("mixed", True))


@cuda
@pytest.mark.parametrize("skip", [False, True], ids=["transcoder", "skip-transcoder"])
@pytest.mark.parametrize("kind", ["fused", "sparse"])
def test_cuda_kernels_train_transcoders_like_the_cpu_reference(reference, kind, skip):
    """On CUDA in full fp32 (TF32 off): eager fused runs the augmented GEMMs, sparse cuSPARSE's CSR products."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        on_gpu = train(transcoders("mixed", skip), Execution(kind, ROWS), skip, device="cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert_same_members(on_gpu, reference("mixed", skip), atol=1e-4)
