"""How every ensemble trains: steps, batches, executions, memory, successive halving; and which of it changes results.

Fields that change a run's results carry RESULT_CHANGING metadata: a resume must use the values the run
started with, and the pipeline's resume check compares exactly those (`result_changing`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from enum import StrEnum

from sae_ensemble.config.choices import ExecutionKind, HalvingMetric, MatmulPrecision, NativeKernels, Normalize

RESULT_CHANGING = {"resume": "fixed"}


@dataclass
class Halving:
    """Successive halving (segments.py): at each rung the members are ranked and only the best go on."""

    rungs: list[float] = field(default_factory=list)
    """Fractions of training.steps at which members are ranked, increasing, each in (0, 1); [] = no halving."""
    eta: int = 3
    """Each rung keeps ceil(members / eta) of the members still training."""
    metric: HalvingMetric = HalvingMetric.auto
    """Ranking on held-out rows: pareto (Pareto rank on (L0, FVU), ties by FVU), mmcs_truth (highest first;
    synthetic stores), fvu (lowest first), or auto (mmcs_truth when the store has ground truth, else pareto)."""

    def steps_at(self, steps: int) -> list[int]:
        """The step of each rung: round(fraction x steps)."""
        return [round(f * steps) for f in self.rungs]

    def problem(self, steps: int) -> str | None:
        """One sentence on what is wrong with these settings for a run of `steps`, or None."""
        at = self.steps_at(steps)
        if any(not 0 < f < 1 for f in self.rungs):
            return (
                f"training.halving.rungs={list(self.rungs)} must hold fractions of training.steps strictly "
                "between 0 and 1"
            )
        if any(b <= a for a, b in zip(at, at[1:])) or (at and (at[0] < 1 or at[-1] >= steps)):
            return (
                f"training.halving.rungs={list(self.rungs)} fall on steps {at} of training.steps={steps}; "
                "they must be increasing, distinct whole steps between 1 and steps - 1"
            )
        if self.eta < 2:
            return f"training.halving.eta={self.eta} must be at least 2 (each rung keeps 1/eta of the members)"
        return None


@dataclass
class Training:
    """How every ensemble of a sweep trains (shared by all members)."""

    steps: int = field(default=3000, metadata=RESULT_CHANGING)
    """Optimizer steps per member."""
    batch_size: int = field(default=256, metadata=RESULT_CHANGING)
    """Rows per step."""
    data_seed: int = field(default=0, metadata=RESULT_CHANGING)
    """Seed of the store's shuffle: equal seeds give two sweeps the same batches."""
    normalize: Normalize = field(default=Normalize.none, metadata=RESULT_CHANGING)
    """Activation normalisation: none, center, or center_scale (centred, mean squared norm d_in)."""
    checkpoint_every: int = 500
    """Steps between checkpoints (and at the end, and on SIGTERM)."""
    log_every: int = 50
    """Steps between metric reports."""
    dead_window_tokens: int = field(default=1_000_000, metadata=RESULT_CHANGING)
    """A feature is dead if it never fired in this many most recent training rows."""
    eval_rows: int = field(default=8192, metadata=RESULT_CHANGING)
    """Held-out rows for the final metrics."""
    autocast_bf16: bool = field(default=False, metadata=RESULT_CHANGING)
    """bf16 autocast of the forward/backward pass (CUDA only)."""
    shuffle_window_chunks: int = field(default=4, metadata=RESULT_CHANGING)
    """Chunks whose rows are shuffled together: a batch mixes rows of this many chunks (more mixes
    more contexts and costs no memory: the window is a list of row indices into the mapped store)."""
    freeze_after: int = field(default=10, metadata=RESULT_CHANGING)
    """A member whose loss or gradient is non-finite skips that step; after this many such steps
    in a row it is frozen at its last finite weights for the rest of the run (1 = at the first)."""
    allow_frozen: bool = False
    """Exit 0 even when members froze (otherwise the sweep reports them and exits 3)."""
    execution: ExecutionKind = ExecutionKind.auto
    """How each ensemble computes its step (docs/kernels.md): auto (time the candidates when a worker
    starts and every 1000 steps, keep the fastest), reference (vmap(grad) of the loss: the definition),
    fused (the hand-written dense kernel) or sparse (active latents only). All are equal to 1e-5; auto
    may choose differently in two runs, so pin one for bitwise-reproducible reruns."""
    compile: bool = True
    """torch.compile the fused kernel and Adam on CUDA workers (docs/kernels.md): the generated code fuses
    the elementwise passes between the GEMMs; the first step of each ensemble shape compiles. CPU workers
    never compile (docs/benchmarks.md: slower there, and inductor's C++ build takes up to a minute)."""
    native_kernels: NativeKernels = NativeKernels.auto
    """CPU workers' C kernels (kernels/native.py: Adam and the fused step's passes, built with the machine's C
    compiler on first use): auto (where they build, else torch ops, with a warning), on (required: a worker
    where they do not build fails with one line), off (torch ops only). The same numbers either way but for the
    order of sums; the planner models the path that will run and never compiles them."""
    matmul_precision: MatmulPrecision = field(default=MatmulPrecision.high, metadata=RESULT_CHANGING)
    """float32 matmul precision on CUDA (torch.set_float32_matmul_precision): high (TF32), highest (full
    float32), or medium."""
    memory_budget: str = "auto"
    """Bytes one worker's ensembles may use (params, Adam moments, a step's temporaries): auto (90% of a
    GPU's free memory; on CPU, 90% of available RAM shared among the CPU workers, less 512MiB each for
    the runtime) or a size such as 8GiB or 512MiB. The plan splits members into ensembles, micro-batches
    and stages to fit it (on CPU its modelled peak stays 25% under, for heap fragmentation), and refuses
    a member that does not fit alone. A resume may change it: planned ensembles stay as they are."""
    halving: Halving = field(default_factory=Halving, metadata=RESULT_CHANGING)
    """Successive halving across the whole grid (segments.py, docs/steering.md)."""


def result_changing(config_class: type) -> list[str]:
    """The fields of a config dataclass that a resume may not change."""
    return [f.name for f in dataclasses.fields(config_class) if f.metadata.get("resume") == "fixed"]


def training_from_dict(values: dict) -> Training:
    """A Training from its JSON form (plan.json); fields a run from before they existed lacks take their defaults."""
    known = {f.name for f in dataclasses.fields(Training)}
    values = {k: v for k, v in values.items() if k in known}
    halving = Halving(**{**dataclasses.asdict(Halving()), **values.pop("halving", {})})
    halving.metric = HalvingMetric(halving.metric)
    training = Training(**values, halving=halving)
    for f in dataclasses.fields(Training):  # JSON gives plain strings; the closed choices are Enums
        if isinstance(f.default, StrEnum):
            setattr(training, f.name, type(f.default)(getattr(training, f.name)))
    return training


_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kb": 10**3,
    "kib": 2**10,
    "m": 2**20,
    "mb": 10**6,
    "mib": 2**20,
    "g": 2**30,
    "gb": 10**9,
    "gib": 2**30,
    "t": 2**40,
    "tb": 10**12,
    "tib": 2**40,
}


def parse_size(spec: str | int) -> int | None:
    """`auto` -> None; `8GiB`, `512MiB`, `4e9`, `1.5GB` -> bytes. Raises ValueError naming the value."""
    text = str(spec).strip().lower()
    if text == "auto":
        return None
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)", text)
    if not match or match.group(2) not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(
            f"training.memory_budget={spec!r} is not a size; allowed: auto, or a positive size such as 8GiB, 512MiB, "
            "4e9"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2)])
