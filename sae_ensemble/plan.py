"""The plan: members -> ensembles that fit a memory budget -> workers, one per device.

A plan is a typed record (rundir.Plan; `plan.json` in the run dir):
    ensembles  the unit of training and of checkpoints: members of one dict size (so
               nothing is padded) and one architecture family (architectures.family: the
               variants of one architecture module share its parameter set and its vmapped
               loss; others cannot share an ensemble), stepped together, each with its
               micro-batch count
    workers    one per device: its ensembles in stages; a stage's ensembles are stepped
               on the same batch, stages run one after another over the whole run

Ensembles never change once planned (their checkpoints name them); a resume with
another device count only reassigns them to workers (`assign`).

Memory model, per ensemble of M members, padded dict size n, width d, micro-batch b rows:
    P = 4 M (2 n d + n + d)   bytes of params (float32); Adam keeps two more of these
    A = 4 M b n               bytes of one [M, b, n] activation tensor
    X = 4 M b d               bytes of one [M, b, d] tensor (centred input, reconstruction, their grads)
    state = 3 P + hparams + firing counts                           held for the whole run
    step  = c_P P + c_A A + c_X X (+ c_M P with micro-batches)   transient, one ensemble at a time; the c's
            are the execution's (training.execution; auto: the largest of its candidates)
A worker's peak in a stage = sum of its ensembles' states + the largest step + its batch
+ the runtime's own memory (CPU workers: allocator arenas, thread pools, store buffers).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping, Sequence

from sae_ensemble.architectures import family
from sae_ensemble.kernels import native as kernels_native
from sae_ensemble.member import Member
from sae_ensemble.memory import format_size
from sae_ensemble.rundir import EnsembleSpec, Plan, WorkerSpec

BYTES = 4  # float32 state and activations
FIRING_BLOCKS = 9  # FiringCounter: 8 ring blocks + the current one, int64 [M, n] each
# Transient bytes of one step beyond the state, in units of (P, A, X), per execution path and
# variant; a mixed ensemble takes the largest. Fitted to the peak RSS of one CPU ensemble over
# its state (glibc heap with no trimming, as the worker runs) on shapes where each term
# dominates: `python -m benchmarks.scale --calibrate --execution E` measures and prints the fit
# (the fits and their history: docs/benchmarks.md, "Memory-aware plans"). The sparse path's c_A is
# fitted at init, where half of a relu or tied member's latents are active (its CSR codes then
# cost 3 bytes per element for each one of a dense tensor): the worst case of `sparse` pinned.
# The architectures/ variants beyond sae.py's are not fitted: they take the largest fitted cost of
# each term plus the [b, n] tensors their losses hold beyond topk's (jumprelu: its step's saved
# pre-activations; gated: the gate path's two; batchtopk: the flattened top-k's indices and scatter;
# matryoshka: one masked copy of the codes per level, counted for three levels); they run the reference.
STEP_COST = {
    "reference": {
        "relu": (6.4, 5.1, 10.4),
        "tied": (5.2, 5.9, 9.5),
        "topk": (5.8, 10.1, 11.4),
        "jumprelu": (6.6, 12.1, 11.4),
        "gated": (6.6, 13.1, 12.4),
        "batchtopk": (6.6, 13.1, 11.4),
        "matryoshka": (6.6, 16.1, 14.4),
    },
    "fused": {"relu": (1.7, 2.8, 3.5), "tied": (1.8, 2.8, 4.0), "topk": (1.4, 3.6, 3.6)},
    "sparse": {"relu": (2.3, 8.2, 6.0), "tied": (3.2, 8.1, 7.4), "topk": (2.0, 1.1, 6.5)},
}
# Without kernels/native.py's C passes (CUDA; a CPU without a C compiler): the fused step's augmented operands and
# gradient copy (kernels/augmented.py), ~2 P; the sparse backward's four products, two with param-sized outputs.
TORCH_OPS_COST = {
    "fused": {"relu": (3.5, 2.0, 4.5), "tied": (4.3, 2.8, 5.0), "topk": (3.6, 3.8, 4.5)},
    "sparse": {"relu": (3.0, 14.5, 6.3), "tied": (4.2, 13.1, 5.7), "topk": (3.5, 1.2, 5.3)},
}
# What `auto` may run: every candidate its autotuner times (ensemble.autotune), so the plan takes the
# largest cost of them. The sparse kernel is timed for relu and tied members only once at most
# autotune.SPARSE_DENSITY (5%) of their latents fire, where its CSR codes are small (architectures/: reference only).
AUTO_CANDIDATES = {
    "relu": ("reference", "fused"),
    "tied": ("reference", "fused"),
    "topk": ("reference", "fused", "sparse"),
}
# AuxK (sae.auxk_loss) beyond a top-k step, in units of A: the reference's masked pre-activations, their scatter
# and their gradients; the sparse kernel's [M, b, dead columns] tensors, freed before its peak (measured on d=512,
# n=8192 with most latents dead: 0.2 A; docs/benchmarks.md).
AUXK_COST = {"reference": 11.5, "sparse": 0.25}
# Micro-batches of the reference add more than their gradient accumulator (P): each part's gradients
# land in new blocks of the untrimmed heap, so on CPU they pay off only when A dominates P. The kernels
# accumulate over row chunks in place: fused needs no such term, sparse 1 P (docs/benchmarks.md).
MICRO_BATCH_COST = {"reference": 5.0, "fused": 0.0, "sparse": 1.0}
MIN_MICRO_ROWS = 256  # below this a micro-batch's GEMMs lose efficiency: split members first
# A CPU worker's own peak beyond the model (thread pools, store buffers), fitted with STEP_COST.
CPU_RUNTIME_BYTES = 86 * 2**20
# A CPU worker's heap is never trimmed (memory.reuse_freed_memory), so its peak also depends on
# fragmentation, which varies between identical runs (docs/benchmarks.md). CPU plans keep the modelled
# peak this far under the budget; CUDA's caching allocator reports live bytes, which the model counts.
CPU_HEADROOM = 0.25


class PlanError(ValueError):
    """The grid cannot be planned within the budget; the message names the member and the budget."""


# -- the memory model ----------------------------------------------------------------------------


def step_costs(
    execution: str, variant: str, device: str = "cpu", native: str = "auto", auxk: bool = False
) -> tuple[float, float, float, float]:
    """(c_P, c_A, c_X, c_M) of one member's step by `execution` on `device`, with the C kernels per `native`
    (training.native_kernels), with AuxK or not: auto takes the largest over what it may run."""
    if execution != "auto" and execution not in STEP_COST:
        raise ValueError(f"execution={execution!r} has no memory model; known: auto, {', '.join(STEP_COST)}")
    paths = AUTO_CANDIDATES.get(variant, ("reference",)) if execution == "auto" else (execution,)
    paths = [path for path in paths if not (auxk and path not in AUXK_COST)]  # the fused kernel runs no AuxK
    # never builds them: a plan compiles nothing
    c_passes = device.startswith("cpu") and kernels_native.expected(native)

    def costs(path: str) -> tuple[float, ...]:
        table = TORCH_OPS_COST[path] if path in TORCH_OPS_COST and not c_passes else STEP_COST[path]
        c_params, c_activations, c_wide = table[variant]
        return c_params, c_activations + (AUXK_COST[path] if auxk else 0.0), c_wide, MICRO_BATCH_COST[path]

    return tuple(max(values) for values in zip(*(costs(path) for path in paths)))


def ensemble_memory(
    members: Sequence[Member],
    batch_size: int,
    micro_batches: int = 1,
    execution: str = "reference",
    device: str = "cpu",
    native: str = "auto",
) -> dict:
    """state_bytes (held all run) and step_bytes (transient) of one ensemble stepped by `execution` on `device`; see the
    module doc."""
    m, n, d = len(members), max(x.dict_size for x in members), members[0].d_in
    o = members[0].d_out or d  # transcoders decode to d_out (and a skip adds [d_out, d_in])
    params = BYTES * m * (n * (d + o) + n + o + (o * d if members[0].skip_connection else 0))
    activations = BYTES * m * (batch_size // micro_batches) * n
    wide = BYTES * m * (batch_size // micro_batches) * max(d, o)
    state = 3 * params + BYTES * m * (n + 8) + 8 * FIRING_BLOCKS * m * n
    c_params, c_activations, c_wide, c_micro = (
        max(c)
        for c in zip(*(step_costs(execution, x.variant, device, native, x.auxk_dead_tokens > 0) for x in members))
    )
    step = (
        c_params * params + c_activations * activations + c_wide * wide + (c_micro * params if micro_batches > 1 else 0)
    )
    return {"state_bytes": int(state), "step_bytes": int(step)}


def batch_bytes(batch_size: int, d_in: int) -> int:
    """The batch, its gather buffer and its normalised copy."""
    return 3 * BYTES * batch_size * d_in


def runtime_bytes(device: str) -> int:
    """A worker's own memory outside the model: counted on CPU (it shares RSS), not on CUDA (not allocated there)."""
    return CPU_RUNTIME_BYTES if device.startswith("cpu") else 0


def usable(budget: int, device: str) -> int:
    """The part of a worker's budget its modelled peak may fill (see CPU_HEADROOM)."""
    return int(budget / (1 + CPU_HEADROOM)) if device.startswith("cpu") else budget


def _headroom_note(device: str) -> str:
    return f" (a CPU worker keeps {CPU_HEADROOM:.0%} of it as headroom)" if device.startswith("cpu") else ""


def stage_bytes(ensembles: Sequence[EnsembleSpec | dict], batch_size: int, d_in: int, device: str) -> int:
    """Peak of a worker on `device` stepping these planned ensembles (or their ensemble_memory) on one batch, one after
    another."""
    if not ensembles:
        return 0
    memory = [e if isinstance(e, dict) else dataclasses.asdict(e) for e in ensembles]
    steps = max(e["step_bytes"] for e in memory) + batch_bytes(batch_size, d_in) + runtime_bytes(device)
    return sum(e["state_bytes"] for e in memory) + steps


# -- packing -------------------------------------------------------------------------------------


def cost(members: Sequence[Member]) -> int:
    """Work of one step per batch row, up to a constant: sum of dict_size x d_in (ensembles never pad)."""
    return sum(m.dict_size * m.d_in for m in members)


def pack(members: Sequence[Member], n_devices: int) -> list[list[Member]]:
    """Split members into at most `n_devices` groups with balanced cost.

    Members sorted by dict size (largest first) are cut into contiguous groups, so each
    device gets few dict sizes (few ensembles); the cuts come from the smallest capacity
    for which greedy filling needs no more than `n_devices` groups (binary search; greedy
    is optimal for contiguous cuts because a group's cost only grows as it gets longer).
    """
    if n_devices < 1:
        raise ValueError(f"n_devices={n_devices} must be at least 1")
    ordered = sorted(members, key=lambda m: (-m.dict_size, m.member_id))
    if not ordered:
        return []

    def greedy(capacity: int) -> list[list[Member]]:
        groups: list[list[Member]] = [[]]
        for member in ordered:
            if groups[-1] and cost(groups[-1] + [member]) > capacity:
                groups.append([])
            groups[-1].append(member)
        return groups

    low, high = max(cost([m]) for m in ordered), cost(ordered)
    while low < high:
        middle = (low + high) // 2
        if len(greedy(middle)) <= n_devices:
            high = middle
        else:
            low = middle + 1
    return greedy(low)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def fit_ensembles(
    members: Sequence[Member],
    batch_size: int,
    budget: int,
    device: str,
    execution: str = "reference",
    native: str = "auto",
) -> list[tuple[list[Member], int]]:
    """Members of one dict size -> [(members, micro_batches)], each fitting the budget alone.

    Prefers the fewest pieces, then the fewest micro-batches of at least MIN_MICRO_ROWS rows;
    a single member may use smaller micro-batches. Raises PlanError if one member cannot fit.
    """
    d = members[0].row_width
    for pieces in range(1, len(members) + 1):
        size = -(-len(members) // pieces)
        chunks = [list(members[i : i + size]) for i in range(0, len(members), size)]
        micro = [k for k in _divisors(batch_size) if batch_size // k >= min(MIN_MICRO_ROWS, batch_size) or size == 1]
        for k in micro:
            if all(
                stage_bytes([ensemble_memory(c, batch_size, k, execution, device, native)], batch_size, d, device)
                <= usable(budget, device)
                for c in chunks
            ):
                return [(c, k) for c in chunks]
    least, member = max(
        (
            stage_bytes(
                [ensemble_memory([m], batch_size, batch_size, execution, device, native)], batch_size, d, device
            ),
            m.member_id,
        )
        for m in members
    )
    raise PlanError(
        f"member {member} needs {format_size(least)} even alone with micro-batches of one row, more than fits "
        f"training.memory_budget={format_size(budget)}{_headroom_note(device)}; raise the budget, or use fewer "
        "features or a smaller d_in"
    )


def stages(ensembles: Sequence[EnsembleSpec], budget: int, batch_size: int, d_in: int, device: str) -> list[list[int]]:
    """Group one worker's ensembles into stages that fit the budget together (first fit, largest first)."""
    result: list[list[EnsembleSpec]] = []
    for e in sorted(ensembles, key=lambda e: (-(e.state_bytes + e.step_bytes), e.index)):
        for stage in result:
            if stage_bytes(stage + [e], batch_size, d_in, device) <= usable(budget, device):
                stage.append(e)
                break
        else:
            result.append([e])
    return [sorted(e.index for e in stage) for stage in result]


def _worker(
    device: str, ensembles: Sequence[EnsembleSpec], members: Mapping[str, Member], budget: int, batch_size: int
) -> WorkerSpec:
    """A worker's stages: never two hooks in one (a stage's ensembles step on one batch, and each hook has its
    own), hook by hook in the order of their first ensemble."""
    by_index, by_hook = {e.index: e for e in ensembles}, defaultdict(list)
    for e in ensembles:
        by_hook[members[e.members[0]].hook].append(e)
    plan_stages, peak = [], 0
    for group in by_hook.values():
        d_in = members[group[0].members[0]].row_width
        for stage in stages(group, budget, batch_size, d_in, device):
            plan_stages.append(stage)
            peak = max(peak, stage_bytes([by_index[i] for i in stage], batch_size, d_in, device))
    return WorkerSpec(device, plan_stages, peak)


def make_plan(
    members: Sequence[Member],
    devices: Sequence[str],
    batch_size: int,
    budget: int,
    execution: str = "reference",
    native: str = "auto",
) -> Plan:
    """The plan (see the module doc), for `execution` with the C kernels per `native`; raises PlanError if a member
    cannot fit the budget."""
    ensembles, workers, by_id = [], [], {m.member_id: m for m in members}
    for device, group in zip(devices, pack(members, len(devices))):
        mine = []
        keys = sorted({_ensemble_key(m) for m in group}, key=lambda key: (-key[0], key[1], key[2] or "", *key[3:]))
        for key in keys:
            same = [m for m in group if _ensemble_key(m) == key]
            for chunk, micro_batches in fit_ensembles(same, batch_size, budget, device, execution, native):
                index = len(ensembles) + len(mine)
                mine.append(_ensemble(index, chunk, batch_size, micro_batches, execution, device, native))
        ensembles += mine
        workers.append(_worker(device, mine, by_id, budget, batch_size))
    return Plan(batch_size, str(execution), budget, by_id, ensembles, workers)


def _ensemble_key(member: Member) -> tuple[int, str, str | None, int, bool]:
    """Members that may share an ensemble: one dict size, one step family (architectures/), one hook (one batch),
    and SAEs or transcoders of one output width and skip setting (one parameter set)."""
    return member.dict_size, family(member.variant), member.hook, member.d_out, member.skip_connection


def _ensemble(
    index: int, members: list[Member], batch_size: int, micro_batches: int, execution: str, device: str, native: str
) -> EnsembleSpec:
    n, d = max(m.dict_size for m in members), members[0].d_in
    return EnsembleSpec(
        index,
        [m.member_id for m in members],
        sorted({m.dict_size for m in members}),
        micro_batches,
        round(1 - cost(members) / (len(members) * n * d), 4),
        12 * batch_size * d * n * len(members),
        **ensemble_memory(members, batch_size, micro_batches, execution, device, native),
    )


def assign(plan: Plan, devices: Sequence[str], budget: int, execution: str, native: str = "auto") -> Plan:
    """The plan's ensembles spread over `devices` (a resume on another device count), stepped by `execution`.

    Ensembles keep their members and micro-batches; their memory is modelled again for `execution`
    (a resume may change it), and each must fit the budget alone. The same device count keeps
    the old assignment; otherwise the costliest ensemble goes to the least-loaded worker.
    """
    batch_size = plan.batch_size
    ensembles = [
        dataclasses.replace(
            e,
            **ensemble_memory(
                plan.ensemble_members(e.index), batch_size, e.micro_batches, execution, devices[0], native
            ),
        )
        for e in plan.ensembles
    ]
    for e in ensembles:
        d_in = plan.members[e.members[0]].row_width
        needed = max(stage_bytes([e], batch_size, d_in, device) for device in devices)
        if any(stage_bytes([e], batch_size, d_in, device) > usable(budget, device) for device in devices):
            raise PlanError(
                f"ensemble {e.index} ({len(e.members)} members of dict size {e.dict_sizes}) was planned for "
                f"{format_size(needed)}, more than fits "
                f"training.memory_budget={format_size(budget)}{_headroom_note(devices[0])}; "
                "resume with a budget that holds it or use a new run dir"
            )
    if len(plan.workers) == len(devices):
        groups = [[ensembles[i] for i in w.ensembles] for w in plan.workers]
    else:
        groups, loads = [[] for _ in devices], [0] * len(devices)
        for e in sorted(ensembles, key=lambda e: (-e.flops_per_step, e.index)):
            target = loads.index(min(loads))
            groups[target].append(e)
            loads[target] += e.flops_per_step
    workers = [
        _worker(device, group, plan.members, budget, batch_size) for device, group in zip(devices, groups) if group
    ]
    return dataclasses.replace(
        plan, execution=str(execution), budget_bytes=budget, ensembles=ensembles, workers=workers
    )


def format_plan(plan: Plan) -> str:
    """The plan as a table: one row per ensemble, by worker and stage."""
    lines = [
        f"{len(plan.members)} members in {len(plan.ensembles)} ensembles on {len(plan.workers)} workers "
        f"(batch {plan.batch_size}, budget {format_size(plan.budget_bytes)} per worker)"
    ]
    lines.append(
        f"{'device':<10} {'stage':>5} {'ens':>4} {'members':>7} {'dict size':>9} {'micro':>5} {'GFLOP/step':>10} "
        f"{'state':>9} {'step':>9}"
    )
    for worker in plan.workers:
        for number, stage in enumerate(worker.stages):
            for i in stage:
                e = plan.ensembles[i]
                lines.append(
                    f"{worker.device:<10} {number:>5} {i:>4} {len(e.members):>7} {','.join(map(str, e.dict_sizes)):>9} "
                    f"{e.micro_batches:>5} {e.flops_per_step / 1e9:>10.2f} {format_size(e.state_bytes):>9} "
                    f"{format_size(e.step_bytes):>9}"
                )
        lines.append(f"{worker.device:<10} planned peak {format_size(worker.planned_bytes)}")
    return "\n".join(lines)
