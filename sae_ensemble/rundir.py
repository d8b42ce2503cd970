"""A run directory: every path and file name of a run, and the typed records its JSON files hold.

    plan.json                                  RunRecord: the plan, the training settings, the store fingerprint
    checkpoints/ensemble_<i>/step_<N>/         an ensemble's checkpoint (checkpoint.py): members/<id>/,
                                               firing.safetensors, resume.json (a CheckpointRecord, written last)
    checkpoints/ensemble_<i>/done.json         EnsembleEnd: the ensemble reached its segment's end step
    halving/rung_<k>/                          the segment after halving rung k (segments.py): plan.json (a
                                               Segment), ranking.json (a Ranking), checkpoints/ensemble_<i>/...
    members/<member_id>/                       a finished member: sae.safetensors, cfg.json (written last),
                                               feature_freq.safetensors, eval.json (the evaluation stage's)
    summary.csv, plots/                        the report (report.py)

No other module spells these names. The JSON forms are those of earlier versions, so a run directory
written before these records existed resumes (tests/test_sweep.py holds one).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_ensemble.activations.stream import Position
from sae_ensemble.config import Training, training_from_dict
from sae_ensemble.member import Member


class CheckpointError(ValueError):
    """A run directory's file (a checkpoint, a member, a record) is missing, incomplete or unreadable; the message names
    it."""


def read_json(path: str | Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None


# -- records ---------------------------------------------------------------------------------------


@dataclass
class EnsembleSpec:
    """One planned ensemble: the unit of training and of checkpoints (plan.py)."""

    index: int
    members: list[str]
    dict_sizes: list[int]
    micro_batches: int
    padding_waste: float
    flops_per_step: int
    state_bytes: int
    """Held all run: params, Adam moments, hparams, firing counts."""
    step_bytes: int
    """A step's transient peak."""


@dataclass
class WorkerSpec:
    """One device's share of a plan: stages of ensemble indices, each stage's ensembles stepped on shared batches."""

    device: str
    stages: list[list[int]]
    planned_bytes: int

    @property
    def ensembles(self) -> list[int]:
        return [i for stage in self.stages for i in stage]


@dataclass
class Plan:
    """Members packed into ensembles, ensembles spread over workers (plan.py)."""

    batch_size: int
    execution: str
    budget_bytes: int
    members: dict[str, Member]
    ensembles: list[EnsembleSpec]
    workers: list[WorkerSpec]

    def ensemble_members(self, index: int) -> list[Member]:
        return [self.members[member_id] for member_id in self.ensembles[index].members]

    def to_json(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "execution": str(self.execution),
            "budget_bytes": self.budget_bytes,
            "members": {k: m.to_dict() for k, m in self.members.items()},
            "ensembles": [dataclasses.asdict(e) for e in self.ensembles],
            "workers": [dataclasses.asdict(w) for w in self.workers],
        }

    @classmethod
    def from_json(cls, values: dict) -> Plan:
        return cls(
            values["batch_size"],
            values["execution"],
            values["budget_bytes"],
            {k: Member.from_dict(m) for k, m in values["members"].items()},
            [EnsembleSpec(**e) for e in values["ensembles"]],
            [WorkerSpec(**w) for w in values["workers"]],
        )


@dataclass
class Segment:
    """A stretch of training with one plan, steps (start_step, end_step]: the whole run, or the part between
    two halving rungs (segments.py). Its ensembles checkpoint under `checkpoint_dir`."""

    number: int
    """0 from the start; k after halving rung k."""
    start_step: int
    end_step: int
    checkpoint_dir: str
    plan: Plan

    def to_json(self) -> dict:  # end_step follows from the training settings (segments.py), as in older runs
        return {
            **self.plan.to_json(),
            "checkpoint_dir": self.checkpoint_dir,
            "rung": self.number,
            "start_step": self.start_step,
        }

    @classmethod
    def from_json(cls, values: dict, end_step: int) -> Segment:
        return cls(values["rung"], values["start_step"], end_step, values["checkpoint_dir"], Plan.from_json(values))


@dataclass
class RunRecord:
    """plan.json: what a run started with, which a resume must match (the pipeline's resume check)."""

    plan: Plan
    training: Training
    store_fingerprint: str

    def to_json(self) -> dict:
        return {
            **self.plan.to_json(),
            "training": dataclasses.asdict(self.training),
            "store_fingerprint": self.store_fingerprint,
        }

    @classmethod
    def from_json(cls, values: dict, path: Path) -> RunRecord:
        if "workers" not in values or "training" not in values:
            raise CheckpointError(f"{path} was written by an older version without memory planning; use a new run dir")
        return cls(Plan.from_json(values), training_from_dict(values["training"]), values.get("store_fingerprint", ""))


@dataclass
class CheckpointRecord:
    """resume.json: where an ensemble's checkpoint stands. Written last, so it marks the step dir complete."""

    steps: int
    tokens: int
    position: Position
    members: list[str]

    def to_json(self) -> dict:
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "position": self.position.to_dict(),
            "members": self.members,
        }

    @classmethod
    def from_json(cls, values: dict) -> CheckpointRecord:
        return cls(values["steps"], values["tokens"], Position.from_dict(values["position"]), values["members"])


@dataclass
class MemberEnd:
    """One member where its ensemble's segment ended: held-out metrics, sparsity coefficient, whether it froze."""

    alive: bool
    l1_final: float
    metrics: dict[str, float]


@dataclass
class EnsembleEnd:
    """done.json: the ensemble reached its segment's end step. `peak_bytes`: the worker's measured peak so far."""

    steps: int
    members: list[str]
    peak_bytes: int
    ends: dict[str, MemberEnd] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "steps": self.steps,
            "members": self.members,
            "peak_bytes": self.peak_bytes,
            "metrics": {k: dataclasses.asdict(v) for k, v in self.ends.items()},
        }

    @classmethod
    def from_json(cls, values: dict) -> EnsembleEnd:  # runs from before this record have no per-member ends
        return cls(
            values["steps"],
            values["members"],
            values.get("peak_bytes", 0),
            {k: MemberEnd(**v) for k, v in values.get("metrics", {}).items()},
        )


@dataclass
class Ranking:
    """ranking.json: a halving rung's ranking of every member still training, best first."""

    step: int
    metric: str
    order: list[str]
    survivors: list[str]
    metrics: dict[str, dict[str, float]]


# -- directories -----------------------------------------------------------------------------------


class MemberDir:
    """members/<member_id>/, or a member inside a checkpoint's step dir."""

    SAE, OPTIM, CFG, EVAL, FREQUENCY, FEATURES, FEATURE_STATS = (
        "sae.safetensors",
        "optim.safetensors",
        "cfg.json",
        "eval.json",
        "feature_freq.safetensors",
        "features.json",  # features.py: chosen latents, their contexts and splits (docs/features.md)
        "features.safetensors",  # features.py: every latent's held-out firing rate, mean, top values and rows
    )

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.sae, self.optim, self.cfg = self.path / self.SAE, self.path / self.OPTIM, self.path / self.CFG
        self.eval, self.frequency = self.path / self.EVAL, self.path / self.FREQUENCY
        self.features, self.feature_stats = self.path / self.FEATURES, self.path / self.FEATURE_STATS

    def complete(self) -> bool:
        """cfg.json is written last: a directory with it is complete."""
        return self.cfg.exists()


class EnsembleDir:
    """An ensemble's checkpoints in one segment: step_<N>/ dirs, done.json."""

    STEP_PREFIX, RESUME, FIRING, DONE, MEMBERS = "step_", "resume.json", "firing.safetensors", "done.json", "members"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.done = self.path / self.DONE

    def step_dir(self, step: int) -> Path:
        return self.path / f"{self.STEP_PREFIX}{step:09d}"

    @staticmethod
    def saved_member(step_dir: Path, member_id: str) -> Path:
        """A member's directory inside a checkpoint's step dir."""
        return step_dir / EnsembleDir.MEMBERS / member_id

    def temporary_step_dir(self, step: int, pid: int) -> Path:
        """Where a checkpoint is assembled before the rename that commits it."""
        return self.path / f".{self.step_dir(step).name}.{pid}.tmp"

    def stale_temporary_dirs(self) -> list[Path]:
        return list(self.path.glob(f".{self.STEP_PREFIX}*.tmp"))

    def checkpoints(self) -> list[Path]:
        """Complete step dirs (those with resume.json), newest first."""
        records = self.path.glob(f"{self.STEP_PREFIX}*/{self.RESUME}")
        return sorted((p.parent for p in records), key=step_of, reverse=True)

    def latest(self) -> Path | None:
        steps = self.checkpoints()
        return steps[0] if steps else None

    def is_done(self) -> bool:
        return self.done.exists()

    def read_done(self) -> EnsembleEnd:
        return EnsembleEnd.from_json(read_json(self.done))

    def steps_done(self, total: int) -> int:
        """Steps behind the ensemble: `total` when done, else its newest checkpoint's (for progress bars)."""
        if self.is_done():
            return total
        newest = self.latest()
        return step_of(newest) if newest else 0


def step_of(step_dir: Path) -> int:
    return int(step_dir.name.split("_")[1])


class RunDir:
    """Every path of a run (the module doc draws them)."""

    PLAN, SUMMARY, RANKING = "plan.json", "summary.csv", "ranking.json"
    CHECKPOINTS, MEMBERS, HALVING, PLOTS, REPORT = "checkpoints", "members", "halving", "plots", "report"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.plan = self.path / self.PLAN
        self.summary = self.path / self.SUMMARY
        self.plots = self.path / self.PLOTS
        self.report = self.path / self.REPORT  # html_report: index.html, members/<id>.html
        self.members = self.path / self.MEMBERS
        self.halving = self.path / self.HALVING

    def member(self, member_id: str) -> MemberDir:
        return MemberDir(self.members / member_id)

    def finished_members(self) -> list[MemberDir]:
        """Complete member directories, sorted by name."""
        return [MemberDir(p.parent) for p in sorted(self.members.glob(f"*/{MemberDir.CFG}"))]

    def ensemble(self, segment: Segment, index: int) -> EnsembleDir:
        return EnsembleDir(self.path / segment.checkpoint_dir / self.ensemble_name(index))

    @staticmethod
    def ensemble_name(index: int) -> str:
        return f"ensemble_{index}"

    def rung(self, number: int) -> Path:
        """The committed segment after halving rung `number`."""
        return self.halving / f"rung_{number}"

    def rung_in_progress(self, number: int) -> Path:
        """Where a rung's transition is assembled; renaming it to `rung(number)` commits it."""
        return self.halving / f".rung_{number}.tmp"

    def rung_checkpoint_dir(self, number: int) -> str:
        """A rung's segment's checkpoint_dir, relative to the run dir (as Segment records it)."""
        return f"{self.HALVING}/rung_{number}/{self.CHECKPOINTS}"

    def read_run(self) -> RunRecord | None:
        return RunRecord.from_json(read_json(self.plan), self.plan) if self.plan.exists() else None
