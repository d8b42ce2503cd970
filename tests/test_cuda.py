"""The CUDA paths: each test runs code that only runs on a GPU, and skips without one.

`make gpu-check` runs them (with `-s`, so the `gpu-figure` lines reach its report).
Tolerances, all absolute on weights of size ~0.2 after tens of Adam steps (lr 1e-3):
    FP32_ATOL   1e-4  same device, TF32 off: ensemble vs solo, 3 vs 4 members (cuBLAS picks
                      other kernels for bmm than for mm, so rounding differs; CPU tests use 1e-5)
    DEVICE_ATOL 1e-3  CUDA vs CPU: two libraries' rounding, amplified where a ReLU flips
    TF32_ATOL   2e-2  TF32 matmuls (10-bit mantissa) on both sides of a comparison; top-k members
                      swap near-tied latents when rounding differs (H100: 9e-3 for the vmapped
                      reference, whose batched and solo GEMMs differ; 3e-6 for the fused kernel)
A broken path (members mixed, a frozen member stepped, a batch corrupted) moves weights by
~1e-1, at least five times every tolerance.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from sae_ensemble import autotune, dispatch, segments
from sae_ensemble.activations.stream import train_batches
from sae_ensemble.activations.synthetic import write_synthetic
from sae_ensemble.activations.writer import ChunkWriter
from sae_ensemble.checkpoint import load_ensemble, load_member, save_member
from sae_ensemble.config import ExecutionKind, Grid, Training
from sae_ensemble.devices import resolve_devices
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.execution import Execution
from sae_ensemble.grid import members as grid_members
from sae_ensemble.member import Member
from sae_ensemble.plan import make_plan

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = "cuda"
FP32_ATOL, DEVICE_ATOL, TF32_ATOL = 1e-4, 1e-3, 2e-2
D_IN, STEPS = 24, 40

MIXED = [
    Member("relu", D_IN, 48, l1=1e-3, seed=0, lr_warmup_steps=10),
    Member("relu", D_IN, 32, l1=3e-3, bias_decay=0.05, seed=1, l1_warmup_steps=20),
    Member("tied", D_IN, 48, l1=3e-3, seed=3),
    Member("tied", D_IN, 16, l1=1e-3, bias_decay=0.1, seed=4, use_b_dec=False),
    Member("topk", D_IN, 64, k=4, seed=5),
    Member("topk", D_IN, 32, k=8, lr=2e-3, seed=6, lr_decay_steps=15),
]


def figure(name: str, value: float) -> None:
    """A measured figure for the gpu-check report (parsed from pytest's output)."""
    print(f"gpu-figure {name} {value:.3g}")


def sparse_batches(n_batches: int, batch: int = 64, seed: int = 0, device: str = DEVICE) -> list[torch.Tensor]:
    """Sparse mixtures of random directions (as in test_ensemble.py), made on the CPU so every device sees the same."""
    g = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(40, D_IN, generator=g), dim=-1)
    out = []
    for _ in range(n_batches):
        active = (torch.rand(batch, 40, generator=g) < 0.08).float() * torch.rand(batch, 40, generator=g)
        out.append((active @ features + 0.3).to(device))
    return out


# The dense step implementations, each pinned: the reference (vmap of the loss's gradient) and the fused kernel.
EXECUTIONS = [str(e) for e in ExecutionKind if e not in (ExecutionKind.auto, ExecutionKind.sparse)]


def make(members, device=DEVICE, execution="reference", **kwargs) -> Ensemble:
    return Ensemble(members, total_steps=STEPS, device=device, execution=execution, **kwargs)


def train(members, batches, device=DEVICE, execution="reference") -> Ensemble:
    ensemble = make(members, device, execution)
    for batch in batches:
        ensemble.step(batch.to(device))
    return ensemble


@contextlib.contextmanager
def tf32(enabled: bool):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def max_difference(a: Ensemble, i: int, b: Ensemble, j: int) -> float:
    """Largest absolute difference between member i of `a` and member j of `b` (params, unpadded)."""
    left, right = a.member_state(i)[0], b.member_state(j)[0]
    return max(float((left[name] - right[name]).abs().max()) for name in left)


# -- the step -------------------------------------------------------------------------------------


@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize("allow_tf32,atol", [(False, FP32_ATOL), (True, TF32_ATOL)], ids=["fp32", "tf32"])
def test_member_in_cuda_ensemble_matches_solo_training(execution, allow_tf32, atol):
    batches = sparse_batches(STEPS)
    with tf32(allow_tf32):
        together = train(MIXED, batches, execution=execution)
        alone = [train([member], batches, execution=execution) for member in MIXED]
    worst = max(max_difference(together, i, solo, 0) for i, solo in enumerate(alone))
    figure(f"ensemble_vs_solo_max_abs_{execution}_{'tf32' if allow_tf32 else 'fp32'}", worst)
    assert worst <= atol, f"a member trained in the ensemble differs from its solo run by {worst:.3g} > {atol}"
    assert together.params["W_enc"].device.type == torch.device(DEVICE).type and bool(together.alive.all())
    moved = float(
        (together.member_state(0)[0]["W_enc"] - make([MIXED[0]], "cpu").member_state(0)[0]["W_enc"]).abs().max()
    )
    assert moved > 1e-2, "the members did not train"


def test_cuda_training_matches_cpu_training():
    batches = sparse_batches(STEPS, device="cpu")
    with tf32(False):
        on_gpu = train(MIXED, batches)
    on_cpu = train(MIXED, batches, device="cpu")
    worst = max(max_difference(on_gpu, i, on_cpu, i) for i in range(len(MIXED)))
    figure("cuda_vs_cpu_max_abs", worst)
    assert worst <= DEVICE_ATOL, f"CUDA and CPU training differ by {worst:.3g} > {DEVICE_ATOL}"


@pytest.mark.parametrize("retune", [False, True], ids=["steady", "recaptured"])
def test_graphed_ensembles_stepped_one_after_another_train_as_each_alone(retune, monkeypatch):
    """A worker's stage steps its ensembles one after another, each replaying its own CUDA graph (cuda_graph.py);
    together they equal each trained alone. `recaptured`: every 10 steps each re-tunes, keeps its choice, drops its
    graph and captures it again while the other's graph lives and replays: captures sharing a stream's cuBLAS
    workspace broke that (pytorch#193402), so each ensemble captures on a stream of its own."""
    tunes = []

    def keeps_the_fused_step(grads, shape, features):
        tunes.append(shape)
        return Execution("fused"), {"fused": 1.0}

    monkeypatch.setattr(autotune, "RETUNE_EVERY", 10)
    monkeypatch.setattr(autotune, "tune", keeps_the_fused_step)
    groups, batches = [MIXED[:2], MIXED[4:]], sparse_batches(STEPS)

    def fresh(group):  # an auto ensemble re-tunes every RETUNE_EVERY steps; a pinned one never does
        return make(group, execution="auto" if retune else "fused")

    with tf32(False):
        alone = [fresh(group) for group in groups]
        for ensemble in alone:
            for batch in batches:
                ensemble.step(batch)
        tunes.clear()
        ensembles, replayed = [fresh(group) for group in groups], 0
        for batch in batches:
            replayed += all(e.graph_captured for e in ensembles)  # a graph of this batch shape: the step replays it
            for ensemble in ensembles:
                ensemble.step(batch)
    assert len(tunes) == (2 * STEPS // 10 if retune else 0), "each ensemble re-tunes (and re-captures) every 10 steps"
    assert replayed >= STEPS - (10 if retune else 4), f"the ensembles replayed only {replayed} of {STEPS} steps"
    worst = max(max_difference(e, i, solo, i) for e, solo in zip(ensembles, alone) for i in range(len(e.members)))
    figure(f"graphed_one_after_another_{'recaptured' if retune else 'steady'}_vs_alone_max_abs", worst)
    assert worst <= 1e-5, f"graphed ensembles stepped one after another differ from each alone by {worst:.3g}"


def test_diverging_member_is_frozen_on_cuda_and_the_others_are_unchanged():
    # On CUDA the step always selects with torch.where (no host check of `alive`): this is that path.
    healthy = MIXED[:3]
    diverging = Member("relu", D_IN, 32, l1=1e-3, lr=1e30, seed=7)
    batches = sparse_batches(20)
    with tf32(False):
        with_bad = make([*healthy, diverging])
        frozen_at, last = None, None
        for step, batch in enumerate(batches):
            before = {name: p[3].clone() for name, p in with_bad.params.items()}
            alive = with_bad.step(batch)["alive"]
            if frozen_at is None and not bool(alive[3]):
                frozen_at, last = step, before
        without = train(healthy, batches)
    assert with_bad.alive.tolist() == [True, True, True, False] and frozen_at is not None
    for name, tensor in with_bad.params.items():
        assert torch.isfinite(tensor[3]).all(), f"the frozen member's {name} must stay finite"
        assert torch.equal(tensor[3], last[name]), f"the frozen member's {name} moved after step {frozen_at}"
    worst = max(max_difference(with_bad, i, without, i) for i in range(3))
    figure("nan_isolation_max_abs", worst)
    assert worst <= FP32_ATOL, f"a diverging member changed the others by {worst:.3g}"


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_cuda_step_never_waits_for_the_gpu(execution):
    # The step's one data-dependent choice (is every member alive?) is made on the GPU, so
    # the host can queue step after step; any synchronising call raises in this mode.
    ensemble = make(MIXED, execution=execution)
    batches = sparse_batches(4)
    ensemble.step(batches[0])  # first call: lazy initialisation may synchronise
    with host_syncs_raise(DEVICE):
        for batch in batches[1:]:
            ensemble.step(batch)
    assert ensemble.step_count == 4


@contextlib.contextmanager
def host_syncs_raise(device):
    """Inside, a call making the host wait for the GPU raises (torch.cuda.set_sync_debug_mode); off CUDA, nothing."""
    if torch.device(device).type != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bf16_topk_keeps_exactly_k_even_where_values_tie():
    d, n, batch = 64, 4096, 256
    members = [Member("topk", d, n, k=k, lr=1e-4, seed=i) for i, k in enumerate((8, 32, 5))]
    ensemble = Ensemble(members, total_steps=10, device=DEVICE, autocast_bf16=True)
    x = torch.randn(batch, d, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    # In bf16 the k-th and (k+1)-th largest pre-activations are often equal: the case to get right.
    with torch.autocast("cuda", dtype=torch.bfloat16):
        pre = x @ ensemble.params["W_enc"][1].T  # [B, n], member with k=32
    top = pre.topk(33, dim=-1).values
    ties = int((top[:, 31] == top[:, 32]).sum())
    figure("bf16_rows_with_tie_at_k", ties)
    assert ties > 0, "no tie at the k-th value: this data does not test the bf16 case"
    for _ in range(3):
        stats = ensemble.step(x)
        assert stats["l0"].tolist() == [8.0, 32.0, 5.0], f"bf16 training step kept {stats['l0'].tolist()} per row"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        codes, _ = ensemble.forward(x)
    for index, member in enumerate(members):
        per_row = (codes[index] != 0).sum(-1)
        assert (per_row == member.k).all(), f"k={member.k}: rows keep {per_row.min()}..{per_row.max()} features"


# -- checkpoints, store, dispatcher ---------------------------------------------------------------


def test_checkpoint_round_trip_from_gpu_resumes_exactly(tmp_path):
    batches = sparse_batches(20)
    first = make(MIXED)
    for batch in batches[:10]:
        first.step(batch)
    dirs = []
    for index, member in enumerate(MIXED):
        params, moments = first.member_state(index)
        assert params["W_enc"].device.type == "cpu"
        dirs.append(save_member(tmp_path / member.member_id, member, params, moments, {"steps": 10, "tokens": 640}))
    resumed = load_ensemble(dirs, total_steps=STEPS, device=DEVICE)
    assert resumed.params["W_enc"].device.type == torch.device(DEVICE).type and resumed.step_count == 10
    for index, member in enumerate(MIXED):  # params and Adam moments, bit for bit
        for saved, loaded in zip(first.member_state(index), resumed.member_state(index)):
            for name in saved:
                assert torch.equal(loaded[name], saved[name]), f"{member.member_id} {name}"
    for batch in batches[10:]:
        first.step(batch)
        resumed.step(batch)
    for index in range(len(MIXED)):
        assert max_difference(first, index, resumed, index) <= 1e-6, MIXED[index].member_id


@pytest.mark.parametrize("dtype,normalize", [("float32", "none"), ("bfloat16", "center_scale")])
def test_store_feeds_pinned_batches_to_cuda_equal_to_cpu(tmp_path, dtype, normalize):
    x = torch.randn(3000, 32, generator=torch.Generator().manual_seed(0)) * 3 + 1
    writer = ChunkWriter(tmp_path / "s", 32, dtype, 512, heldout_rows=200)
    writer.write(x)
    store = writer.close()
    on_cpu = train_batches(store, 128, seed=3, normalize=normalize)
    on_gpu = train_batches(store, 128, seed=3, device=DEVICE, normalize=normalize)
    # Hold 40 batches without synchronising: a copy from a reused host buffer would show up here.
    gpu_batches = [next(on_gpu) for _ in range(40)]
    for gpu_batch, position in gpu_batches:
        cpu_batch, cpu_position = next(on_cpu)
        assert gpu_batch.device.type == torch.device(DEVICE).type and position == cpu_position
        torch.testing.assert_close(gpu_batch.cpu(), cpu_batch, rtol=1e-6, atol=1e-6)
    heldout = store.heldout(device=DEVICE, normalize=normalize)
    torch.testing.assert_close(heldout.cpu(), store.heldout(normalize=normalize), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "synthetic"
    write_synthetic(path, d_in=16, n_features=24, n_active=3, n_rows=6000, rows_per_chunk=1000, seed=0)
    return path


GRID = Grid(variants=["relu", "tied"], dict_sizes=[32, 64], l1=[1e-3, 1e-2])
# Full float32 matmuls on both sides (training.matmul_precision's default, TF32, is not what a CPU computes).
TRAINING = Training(
    steps=40,
    batch_size=64,
    checkpoint_every=15,
    log_every=10,
    eval_rows=256,
    dead_window_tokens=2000,
    matmul_precision="highest",
)


def trained_members(run_dir) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_member(p)[1] for p in sorted((run_dir / "members").iterdir())}


def train_grid(devices: str, store, run_dir) -> int:
    """The dispatcher's exit code after training GRID on `devices` (one segment: no halving)."""
    plan = make_plan(grid_members(GRID, 16), resolve_devices(devices), TRAINING.batch_size, 2**34)
    return dispatch.train(segments.first(plan, TRAINING), store, run_dir, TRAINING, progress=False)


@pytest.fixture(scope="module")
def cpu_run(synthetic_store, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cpu_run")
    assert train_grid("cpu:1", synthetic_store, run_dir) == 0
    return trained_members(run_dir)


@pytest.mark.parametrize("devices", ["cuda:0", "cuda:0,1"])
def test_dispatcher_on_cuda_trains_the_members_cpu_trains(devices, synthetic_store, cpu_run, tmp_path):
    if len(devices.split(",")) > torch.cuda.device_count():
        pytest.skip(f"{devices} needs {len(devices.split(','))} GPUs; {torch.cuda.device_count()} visible")
    assert train_grid(devices, synthetic_store, tmp_path) == 0
    on_gpu = trained_members(tmp_path)
    assert sorted(on_gpu) == sorted(cpu_run)
    worst = max(float((on_gpu[m][name] - cpu_run[m][name]).abs().max()) for m in cpu_run for name in cpu_run[m])
    figure(f"dispatcher_{devices.replace(',', '_')}_vs_cpu_max_abs", worst)
    assert worst <= DEVICE_ATOL, f"members trained on {devices} differ from CPU training by {worst:.3g}"
    cfg = load_member(next((tmp_path / "members").iterdir()))[3]
    assert cfg["steps"] == 40 and cfg["metrics"]["mmcs_truth"] > 0 and np.isfinite(cfg["metrics"]["fvu"])


# -- evaluation -----------------------------------------------------------------------------------


def test_ce_evaluation_on_gpu_matches_cpu(tmp_path):
    from transformer_lens import TransformerBridge

    from sae_ensemble.activations.tiny_model import build_tiny_gpt2
    from sae_ensemble.evaluate import evaluate_members

    hook = "blocks.1.hook_resid_pre"
    model_dir = build_tiny_gpt2(tmp_path / "tiny_gpt2", n_layer=2, d_model=64)
    members = [Member("relu", 64, 128, l1=1e-3, seed=0), Member("topk", 64, 96, k=8, seed=1)]
    ensemble = Ensemble(members, total_steps=5)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        ensemble.step(torch.randn(64, 64, generator=g))
    dirs = [
        save_member(tmp_path / m.member_id, m, *ensemble.member_state(i), {"steps": 5, "tokens": 320})
        for i, m in enumerate(members)
    ]
    tokens = torch.randint(0, 300, (6, 16), generator=g)
    normalization = (torch.randn(64, generator=g) * 0.1, 2.0)
    results = {}
    for device in ("cpu", DEVICE):
        bridge = TransformerBridge.boot_transformers(str(model_dir), device=device)
        assert next(bridge.parameters()).device.type == torch.device(device).type
        results[device] = evaluate_members(
            bridge, tokens.to(device), hook, dirs, normalization, batch_size=4, progress=False, min_ce_gap=-math.inf
        )  # score even the random model's tiny CE gap: CPU and GPU must agree on it
    # CE and KL are means of float32 log-probabilities: 2e-5 apart at most. ce_recovered divides by
    # the small CE gap of a random model, so it gets 1e-2; a broken splice moves it by ~1.
    for member_id, on_cpu in results["cpu"].items():
        on_gpu = results[DEVICE][member_id]
        for key, value in on_cpu.items():
            atol = 1e-2 if key in ("ce_recovered", "ce_loss_score", "kl_div_score") else 2e-5
            assert abs(on_gpu[key] - value) <= atol, f"{member_id} {key}: GPU {on_gpu[key]} vs CPU {value}"
    figure("ce_recovered_gpu_first_member", results[DEVICE][members[0].member_id]["ce_recovered"])
