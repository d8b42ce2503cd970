"""Memory-aware plans: the memory model against measured peaks, budgets, micro-batches, sub-ensembles, reassignment."""

import pytest
import torch

from benchmarks.scale import measure_step_peak
from sae_ensemble.config import Grid, Training, parse_size
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.grid import members as grid_members
from sae_ensemble.kernels import native
from sae_ensemble.member import Member
from sae_ensemble.plan import (
    PlanError,
    assign,
    ensemble_memory,
    format_plan,
    make_plan,
    pack,
    runtime_bytes,
    stage_bytes,
)

D_IN = 24
MIXED = [
    Member("relu", D_IN, 48, l1=1e-3, seed=0, lr_warmup_steps=3),
    Member("relu", D_IN, 32, l1=3e-3, bias_decay=0.05, seed=1),
    Member("tied", D_IN, 48, l1=3e-3, seed=3),
    Member("topk", D_IN, 32, k=8, lr=2e-3, seed=6, lr_decay_steps=4),
]


def batches(n: int, rows: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(40, D_IN, generator=g), dim=-1)
    return [
        ((torch.rand(rows, 40, generator=g) < 0.08).float() * torch.rand(rows, 40, generator=g)) @ features + 0.3
        for _ in range(n)
    ]


def unpadded(ensemble: Ensemble) -> dict[str, dict[str, torch.Tensor]]:
    return {m.member_id: ensemble.member_state(i)[0] for i, m in enumerate(ensemble.members)}


def assert_same(left: dict, right: dict, atol: float) -> None:
    assert sorted(left) == sorted(right)
    for member_id in left:
        for name in left[member_id]:
            torch.testing.assert_close(
                left[member_id][name], right[member_id][name], atol=atol, rtol=0, msg=f"{member_id} {name}"
            )


def test_micro_batches_equal_the_full_batch():
    whole, parts = Ensemble(MIXED, 10), Ensemble(MIXED, 10, micro_batches=4)
    for batch in batches(10):
        stats_whole, stats_parts = whole.step(batch), parts.step(batch)
    assert_same(unpadded(whole), unpadded(parts), atol=1e-5)
    for name in ("loss", "mse", "l0", "fired"):
        torch.testing.assert_close(stats_whole[name], stats_parts[name], atol=1e-4, rtol=1e-5)


def test_sub_ensembles_equal_one_ensemble():
    """One padded ensemble of every member vs one ensemble per dict size, stepped on the same batches."""
    one = Ensemble(MIXED, 10)
    subs = [Ensemble([m for m in MIXED if m.dict_size == size], 10) for size in (48, 32)]
    for batch in batches(10):
        one.step(batch)
        for sub in subs:
            sub.step(batch)
    assert_same(unpadded(one), {k: v for sub in subs for k, v in unpadded(sub).items()}, atol=1e-5)


# Shapes unlike the calibration ones (benchmarks/scale.py): one per variant and kernel, two with micro-batches.
# The kernels' shapes are larger: the runtime term (a CPU worker's, for the final metrics' vmapped forward
# too) is a smaller share of them; a kernel's step alone does not need it.
MODEL_SHAPES = [
    ("relu", 384, 3072, 2, 512, 1, "reference"),
    ("tied", 256, 4096, 3, 1024, 1, "reference"),
    ("topk", 512, 2048, 2, 1024, 2, "reference"),
    ("tied", 640, 5120, 2, 1024, 2, "fused"),
    ("topk", 512, 8192, 2, 1024, 1, "sparse"),
]


@pytest.mark.memory
@pytest.mark.parametrize(
    "variant,d,n,m,batch,micro,execution", MODEL_SHAPES, ids=[f"{s[0]}-{s[-1]}" for s in MODEL_SHAPES]
)
def test_memory_model_holds_within_25_percent(variant, d, n, m, batch, micro, execution):
    members = [Member(variant, d, n, l1=1e-3, k=32, seed=i) for i in range(m)]
    model = ensemble_memory(members, batch, micro, execution)
    planned = model["state_bytes"] + model["step_bytes"] + runtime_bytes("cpu")
    measured = measure_step_peak(members, batch, micro, execution=execution)
    print(
        f"{variant} {execution} d={d} n={n} M={m} B={batch}/{micro}: "
        f"planned {planned / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB ({measured / planned:.2f})"
    )
    assert 0.75 <= measured / planned <= 1.25, (measured, planned)


# The new cases' bound: never above the plan by more than the 25% the CPU headroom absorbs (what keeps a worker
# inside its budget); below it, the top-k kernels' fits are conservative (0.70-0.87 of the plan measured across
# runs, lower under load), so the test allows down to 0.6 where the fitted shapes hold 0.75.
CONSERVATIVE = 0.6


@pytest.mark.memory
@pytest.mark.parametrize("execution", ["reference", "sparse"])
def test_memory_model_holds_for_a_skip_transcoder_with_a_wider_output(execution):
    members = [Member("topk", 256, 4096, k=32, seed=i, d_out=1024, skip_connection=True) for i in range(2)]
    model = ensemble_memory(members, 1024, 1, execution)
    sae = ensemble_memory([Member("topk", 256, 4096, k=32, seed=i) for i in range(2)], 1024, 1, execution)
    assert model["state_bytes"] > 2 * sae["state_bytes"]  # W_dec at d_out and W_skip are counted
    planned = model["state_bytes"] + model["step_bytes"] + runtime_bytes("cpu")
    measured = measure_step_peak(members, 1024, 1, execution=execution)
    assert CONSERVATIVE <= measured / planned <= 1.25, (measured, planned)


@pytest.mark.memory
@pytest.mark.parametrize("execution", ["reference", "sparse"])
def test_memory_model_holds_for_topk_members_with_auxk(execution):
    # dead after 1024 rows unfired: AuxK's loss runs in the second step
    members = [Member("topk", 512, 8192, k=32, seed=i, auxk_dead_tokens=1024) for i in range(2)]
    model = ensemble_memory(members, 1024, 1, execution)
    planned = model["state_bytes"] + model["step_bytes"] + runtime_bytes("cpu")
    measured = measure_step_peak(members, 1024, 1, steps=2, execution=execution)
    assert CONSERVATIVE <= measured / planned <= 1.25, (measured, planned)


BIG = grid_members(Grid(dict_sizes=[6144, 12288], l1=[1e-4, 2e-4, 4e-4, 8e-4]), 768)


def test_the_plan_models_the_execution_that_will_run():
    """Each path its own costs; auto the largest of what its autotuner may pick; a resume models its execution anew."""
    members = BIG[:4]
    step = {e: ensemble_memory(members, 2048, 1, e)["step_bytes"] for e in ("reference", "fused", "sparse", "auto")}
    assert step["fused"] < step["reference"] and step["auto"] == max(step["reference"], step["fused"])
    topk = [Member("topk", 768, 6144, k=32, seed=i) for i in range(2)]
    assert ensemble_memory(topk, 2048, 1, "auto")["step_bytes"] == max(
        ensemble_memory(topk, 2048, 1, e)["step_bytes"] for e in ("reference", "fused", "sparse")
    )
    fused = make_plan(BIG, ["cpu:0"], 2048, 4 * 2**30, "fused")
    reference = make_plan(BIG, ["cpu:0"], 2048, 4 * 2**30, "reference")
    assert fused.execution == "fused" and len(fused.ensembles) < len(
        reference.ensembles
    )  # fewer temporaries: fewer pieces
    resumed = assign(fused, ["cpu:0"], 64 * 2**30, "reference")
    assert [e.members for e in resumed.ensembles] == [e.members for e in fused.ensembles]
    assert all(
        e.step_bytes
        == ensemble_memory([fused.members[i] for i in e.members], 2048, e.micro_batches, "reference")["step_bytes"]
        for e in resumed.ensembles
    )
    with pytest.raises(PlanError, match="more than fits training.memory_budget=4.00GiB"):
        assign(fused, ["cpu:0"], 4 * 2**30, "reference")  # its pieces were cut for the fused path's smaller steps
    with pytest.raises(ValueError, match="execution='jit' has no memory model; known: auto, reference, fused, sparse"):
        ensemble_memory(members, 2048, 1, "jit")


def test_the_fused_step_is_modelled_for_the_path_that_runs_on_its_device(monkeypatch):
    """CPU workers run the fused step's C passes; CUDA workers, and CPUs without a C compiler, its
    torch-ops path, which builds augmented operands: more memory per step. The sparse step likewise (its
    backward's sparse products)."""
    topk = [Member("topk", 512, 8192, k=32, seed=seed) for seed in range(2)]
    sparse_cpu, sparse_cuda = (
        ensemble_memory(topk, 1024, 1, "sparse", device)["step_bytes"] for device in ("cpu", "cuda")
    )
    assert sparse_cpu < sparse_cuda == ensemble_memory(topk, 1024, 1, "sparse", "cpu", native="off")["step_bytes"]
    members = BIG[:4]
    cpu, cuda = (ensemble_memory(members, 2048, 1, "fused", device)["step_bytes"] for device in ("cpu:0", "cuda:0"))
    assert cpu < cuda
    assert ensemble_memory(members, 2048, 1, "reference", "cpu:0") == ensemble_memory(
        members, 2048, 1, "reference", "cuda:0"
    )
    # training.native_kernels=off: CPU workers run the torch-ops path too, and the plan models it
    assert ensemble_memory(members, 2048, 1, "fused", "cpu:0", native="off")["step_bytes"] == cuda
    assert make_plan(members, ["cpu:0"], 2048, 64 * 2**30, "fused", native="off").ensembles[0].step_bytes == cuda
    assert ensemble_memory(members, 2048, 1, "fused", "cpu:0", native="on")["step_bytes"] == cpu
    # auto without a C compiler: what the plan asks, which never builds the C kernels
    monkeypatch.setattr(native, "_prerequisites", lambda: False)
    monkeypatch.setattr(native._kernel, "cache_info", lambda: type("Info", (), {"currsize": 0})())
    assert ensemble_memory(members, 2048, 1, "fused", "cpu:0")["step_bytes"] == cuda


def test_planning_never_builds_the_c_kernels(monkeypatch, tmp_path):
    """plan_only=true and every plan ask `native.expected`, which reads what the build needs, never builds."""
    monkeypatch.setattr(native, "_build", lambda compiler: pytest.fail("the plan compiled the C kernels"))
    native._kernel.cache_clear()
    try:
        make_plan(BIG[:4], ["cpu:0"], 2048, 64 * 2**30, "auto")
    finally:
        native._kernel.cache_clear()  # the next caller builds (or finds) them as usual


def test_a_plan_splits_to_fit_its_budget_and_shows_how():
    roomy = make_plan(BIG, ["cpu:0"], 2048, 64 * 2**30)
    assert [len(e.members) for e in roomy.ensembles] == [4, 4] and roomy.workers[0].stages == [[0, 1]]
    tight = make_plan(BIG, ["cpu:0"], 2048, 4 * 2**30)
    assert all(w.planned_bytes <= 4 * 2**30 for w in tight.workers)
    assert len(tight.workers[0].stages) > 1 or any(e.micro_batches > 1 for e in tight.ensembles)
    assert sorted(m for e in tight.ensembles for m in e.members) == sorted(m.member_id for m in BIG)
    assert all(len(e.dict_sizes) == 1 and e.padding_waste == 0 for e in tight.ensembles)  # one device, no padding
    table = format_plan(tight)
    assert "micro" in table and "stage" in table and "budget 4.00GiB" in table


def test_a_member_too_large_for_the_budget_is_refused_by_name():
    with pytest.raises(
        PlanError,
        match=r"member relu-d12288-l1_0.0008-bd0-lr0.001-s0 needs .* more than fits training.memory_budget=256.00MiB",
    ):
        make_plan(BIG, ["cpu:0"], 2048, 256 * 2**20)


def test_ensembles_spread_over_any_device_count():
    plan = make_plan(BIG, ["cpu:0", "cpu:1"], 2048, 16 * 2**30)
    indices = sorted(e.index for e in plan.ensembles)
    for devices in (["cpu:0"], ["cpu:0", "cpu:1"], [f"cpu:{i}" for i in range(8)]):
        spread = assign(plan, devices, 16 * 2**30, "reference")
        assert spread.ensembles == plan.ensembles  # checkpoints name ensembles: they never change
        assert sorted(i for w in spread.workers for s in w.stages for i in s) == indices
        assert len(spread.workers) == min(len(devices), len(indices))
        assert all(w.planned_bytes <= 16 * 2**30 for w in spread.workers)
    with pytest.raises(PlanError, match="more than fits training.memory_budget=1.00GiB"):
        assign(plan, ["cpu:0"], 2**30, "reference")


def test_packing_balances_cost_across_devices():
    members = [Member("relu", 512, size, l1=1e-4 * 2**i) for size in (512, 1024, 2048, 4096) for i in range(8)]
    plan = make_plan(members, [f"cuda:{i}" for i in range(8)], 1024, 2**40)
    loads = [sum(plan.ensembles[i].flops_per_step for s in w.stages for i in s) for w in plan.workers]
    assert len(pack(members, 8)) == 8 and max(loads) / (sum(loads) / len(loads)) <= 1.25
    assert all(e.padding_waste == 0 for e in plan.ensembles)
    assert stage_bytes([], 1024, 512, "cpu:0") == 0


@pytest.mark.parametrize(
    "spec,expected",
    [("8GiB", 8 * 2**30), ("512MiB", 512 * 2**20), ("4e9", 4 * 10**9), ("1.5GB", 1.5e9), ("auto", None)],
)
def test_budget_sizes_parse_to_bytes(spec, expected):
    assert parse_size(spec) == expected


def test_a_bad_budget_names_the_value_and_the_allowed_forms():
    with pytest.raises(
        ValueError, match=r"training.memory_budget='lots' is not a size; allowed: auto, or a positive size such as 8GiB"
    ):
        parse_size("lots")


# -- lean host memory: init and resume fill the stacked state member by member -----------------

LEAN_CHILD = """
import json, sys
import torch
from sae_ensemble.checkpoint import load_ensemble
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.member import Member
from sae_ensemble.memory import peak_bytes, resident_bytes, reuse_freed_memory

torch.set_num_threads(1)
reuse_freed_memory()  # as a worker runs
members = [Member.from_dict(m) for m in json.loads(sys.argv[2])]
Ensemble(members[:1], 1)  # the runtime's one-off allocations (RNG, allocator pools) land before the baseline
baseline = resident_bytes()
if sys.argv[1] == "init":
    ensemble = Ensemble(members, 10)
else:
    ensemble = load_ensemble([f"{sys.argv[3]}/{m.member_id}" for m in members], 10)
trees = (ensemble.params, ensemble.opt_state.mu, ensemble.opt_state.nu, ensemble.hparams)
stacked = sum(t.numel() * t.element_size() for tree in trees for t in tree.values())
print(json.dumps({"peak": peak_bytes(torch.device("cpu"), baseline), "stacked": stacked}))
"""


@pytest.mark.memory
@pytest.mark.parametrize("how", ["init", "resume"])
def test_host_memory_peaks_at_one_member_beyond_the_stacked_state(how, tmp_path):
    """On CPU the stacked state is host memory itself; beyond it, building or resuming an ensemble may hold
    one member's params and moments plus 10% of the stacked size (issue #11 item 3). Stacking members built
    whole (or loading them all first) would hold a second copy of the params: 2.6x that allowance here."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from sae_ensemble.checkpoint import save_member

    members = [Member("relu", 256, 2048, l1=1e-3, seed=i) for i in range(8)]
    if how == "resume":
        ensemble = Ensemble(members, 10)
        for i, member in enumerate(members):
            params, moments = ensemble.member_state(i)
            save_member(tmp_path / member.member_id, member, params, moments, {"steps": 3, "tokens": 96})
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", LEAN_CHILD, how, json.dumps([m.to_dict() for m in members]), str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=repo,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.split("\n")[-2])
    one_member = 3 * 4 * (2 * 2048 * 256 + 2048 + 256)  # params and two Adam moments, float32
    allowed = measured["stacked"] + one_member + 0.1 * measured["stacked"]
    print(
        f"{how}: peak {measured['peak'] / 2**20:.1f} MiB, stacked {measured['stacked'] / 2**20:.1f} MiB, "
        f"allowed {allowed / 2**20:.1f} MiB"
    )
    assert measured["peak"] <= allowed


REUSE_CHILD = """
import resource, torch
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.member import Member
from sae_ensemble.memory import reuse_freed_memory
reuse_freed_memory()
ensemble = Ensemble([Member("relu", 128, 512, seed=i) for i in range(32)], 100, execution="fused")
batch = torch.randn(256, 128)
for _ in range(3):
    ensemble.step(batch)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    ensemble.step(batch)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.memory
def test_a_cpu_step_reuses_freed_memory_instead_of_faulting_its_pages_in_again():
    """reuse_freed_memory keeps freed blocks for the next step: measured 0-200 minor page faults per
    step here, against 15.8k (all of its large tensors) when the heap was trimmed at every free, as a
    C-int overflow in mallopt's argument once made it."""
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        [sys.executable, "-c", REUSE_CHILD],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    faults = float(result.stdout.split()[-1])
    print(f"{faults:.0f} minor page faults per step")
    assert faults < 2000


def test_final_metrics_run_in_pieces_no_larger_than_the_planned_micro_batch(tmp_path):
    """The plan counts a step's [M, b, n] tensors for micro-batches of b rows; the final metrics must not take more."""
    from sae_ensemble.activations.synthetic import write_synthetic
    from sae_ensemble.metrics import FiringCounter
    from sae_ensemble.train import _final_metrics

    store = write_synthetic(
        tmp_path / "store",
        d_in=D_IN,
        n_features=40,
        n_active=3,
        n_rows=2000,
        rows_per_chunk=1000,
        heldout_rows=500,
        seed=0,
    )
    training = Training(batch_size=64, eval_rows=256)
    results = {}
    for micro in (1, 4):
        ensemble, rows = Ensemble(MIXED, 10, micro_batches=micro), []
        forward = ensemble.forward
        ensemble.forward = lambda x, forward=forward, rows=rows: (rows.append(x.shape[0]), forward(x))[1]
        counter = FiringCounter(len(MIXED), ensemble.n_padded, 1000)
        results[micro] = _final_metrics(ensemble, store, counter, training, torch.device("cpu"))
        assert max(rows) == 64 // micro and sum(rows) == 256
    for name, value in results[1].items():
        torch.testing.assert_close(results[4][name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_final_metrics_of_a_wide_ensemble_run_in_pieces_of_a_whole_training_batch(tmp_path):
    """Pieces once held at most 2**22 elements of [M, rows, n] codes: one or two rows per forward on large ensembles."""
    from sae_ensemble.activations.synthetic import write_synthetic
    from sae_ensemble.metrics import FiringCounter
    from sae_ensemble.train import _final_metrics

    store = write_synthetic(
        tmp_path / "s", d_in=4, n_features=8, n_active=2, n_rows=3000, rows_per_chunk=1000, heldout_rows=1024
    )
    ensemble, pieces = Ensemble(grid_members(Grid(variants=["relu"], dict_sizes=[4096], l1=[1e-3, 1e-2]), 4), 10), []
    forward = ensemble.forward
    ensemble.forward = lambda rows: pieces.append(len(rows)) or forward(rows)
    result = _final_metrics(
        ensemble, store, FiringCounter(2, 4096, 100), Training(batch_size=1024, eval_rows=1024), torch.device("cpu")
    )
    assert pieces == [1024], f"pieces of {pieces} rows: 2**22 elements would give 512"
    assert torch.isfinite(result["mse"]).all()


def test_every_architecture_is_planned_for_the_executions_it_can_run():
    """`auto` plans an architecture with the costs of what its autotuner may pick: the reference alone
    beyond sae.py's variants (a missing entry once crashed `python sweep.py grid=architectures`)."""
    from sae_ensemble.architectures import VARIANTS

    members = grid_members(Grid(variants=list(VARIANTS), dict_ratios=[4], matryoshka_fractions=[0.25]), 16)
    assert {m.variant for m in members} == set(VARIANTS)
    for execution in ("auto", "reference"):
        plan = make_plan(members, ["cpu:0"], 64, 2**34, execution)
        planned = [member for e in plan.ensembles for member in e.members]
        assert sorted(planned) == sorted(m.member_id for m in members)
