"""Successive halving across the whole grid: rank at each rung, stop the worst, re-pack the rest.

`training.halving.rungs` cuts the run into segments. Each segment is an ordinary plan trained by
dispatch.run up to the segment's last step (`plan["until"]`); its workers then write every
member's held-out metrics (`rung_<step>.json` beside its checkpoints). Here, between segments,
the members still training are ranked together, across every worker: the grid's best member
must win whichever device its dict size was packed onto (ranking within one worker would keep
each worker's best instead, and the packing puts each dict size on its own worker). The best
ceil(n / eta) go on; the others stop where they are.

A rung's transition, all of it derived from files already on disk, so redoing it gives the same:
  1. dropped members get their final directory `members/<member_id>/` (weights at the rung,
     the rung's metrics, `stopped_early: true`); their ensembles' checkpoints stay as they are;
  2. the survivors are planned afresh (plan.make_plan: fewer or smaller ensembles), and each new
     ensemble gets a first checkpoint at the rung's step assembled from its members' saved
     states (weights, Adam moments, controller, firing counts), so training goes on exactly;
  3. all of it is built in `halving/.rung_<k>.tmp/` and committed by renaming it to
     `halving/rung_<k>/` (its `plan.json` and `checkpoints/`): a SIGTERM or kill at any point
     leaves either no transition (redone on the rerun) or a whole one.

Run-dir layout added:
    halving/rung_<k>/plan.json                 the segment after rung k (checkpoint_dir, until)
    halving/rung_<k>/checkpoints/ensemble_<i>/ its ensembles' checkpoints, seeded at the rung
    halving/rung_<k>/ranking.json              the ranking: metric, every member's value, survivors
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from sae_ensemble import dispatch
from sae_ensemble.atomic import atomic_write, fsync_dir, write_json_atomic
from sae_ensemble.checkpoint import CFG_FILE, SAE_FILE, read_json
from sae_ensemble.member import Member
from sae_ensemble.plan import assign, make_plan, plan_members
from sae_ensemble.train import Halving, Training, ensemble_dir, latest_checkpoint, rung_file, segment_end

HALVING_DIR = "halving"


class HalvingError(ValueError):
    """The run dir's halving record cannot be continued (the message names the file)."""


# -- rungs and ranking ---------------------------------------------------------------------------


def rung_steps(halving: Halving, steps: int) -> list[int]:
    return halving.steps_at(steps)


def survivors_count(n: int, eta: int) -> int:
    return max(1, math.ceil(n / eta))


def pareto_ranks(points: dict[str, tuple[float, float]]) -> dict[str, int]:
    """Non-dominated sorting, both coordinates lower is better: 0 = the front, 1 = the front without it, ..."""
    ranks, left, rank = {}, dict(points), 0
    while left:
        front = [k for k, (a, b) in left.items()
                 if not any(x <= a and y <= b and (x < a or y < b) for j, (x, y) in left.items() if j != k)]
        for k in front:
            ranks[k] = rank
            del left[k]
        rank += 1
    return ranks


def rank(metrics: dict[str, dict[str, float]], metric: str) -> list[str]:
    """Member ids best first by `metric` (pareto, mmcs_truth, fvu); every tie is broken by member id.

    A frozen or non-finite member ranks last (its values are not comparable)."""
    def finite(member_id: str, *names: str) -> bool:
        return all(math.isfinite(metrics[member_id].get(n, math.nan)) for n in names)

    if metric == "pareto":
        usable = [m for m in metrics if finite(m, "l0", "fvu")]
        ranks = pareto_ranks({m: (metrics[m]["l0"], metrics[m]["fvu"]) for m in usable})
        key = {m: (ranks[m], metrics[m]["fvu"]) for m in usable}
    elif metric == "mmcs_truth":
        usable = [m for m in metrics if finite(m, "mmcs_truth")]
        key = {m: (-metrics[m]["mmcs_truth"],) for m in usable}
    elif metric == "fvu":
        usable = [m for m in metrics if finite(m, "fvu")]
        key = {m: (metrics[m]["fvu"],) for m in usable}
    else:
        raise ValueError(f"training.halving.metric={metric!r} is unknown here; allowed: pareto, mmcs_truth, fvu")
    ordered = sorted(usable, key=lambda m: (*key[m], m))
    return ordered + sorted(m for m in metrics if m not in key)


def resolve_metric(halving: Halving, has_ground_truth: bool) -> str:
    if halving.metric == "auto":
        return "mmcs_truth" if has_ground_truth else "pareto"
    if halving.metric == "mmcs_truth" and not has_ground_truth:
        raise HalvingError("training.halving.metric=mmcs_truth needs a store with ground truth (a synthetic store); use pareto or fvu")
    return halving.metric


# -- the segments --------------------------------------------------------------------------------


def latest_segment(plan: dict, run_dir: Path) -> dict:
    """The plan of the newest committed segment (the root plan before any rung)."""
    committed = sorted(run_dir.glob(f"{HALVING_DIR}/rung_*/plan.json"), key=lambda p: int(p.parent.name.split("_")[1]))
    return read_json(committed[-1]) if committed else plan


def run(plan: dict, store, run_dir: Path, training: Training, devices: list[str], budget: int,
        on_metrics: Callable | None = None, progress: bool = True) -> int:
    """Train `plan` with successive halving (see the module doc); an exit code as dispatch.run's.

    Resumes wherever the run dir stands: committed rungs are taken as they are, a segment's
    ensembles resume from their checkpoints, an uncommitted transition is redone."""
    metric = resolve_metric(training.halving, store.ground_truth() is not None)
    segment = plan
    for number, step in enumerate(rung_steps(training.halving, training.steps), 1):
        committed = run_dir / HALVING_DIR / f"rung_{number}"
        if not committed.exists():
            code = _train_segment({**segment, "until": step}, store, run_dir, training, on_metrics, progress)
            if code != dispatch.EXIT_OK:
                return code
            _transition(segment, number, step, metric, store, run_dir, training, devices, budget)
        segment = assign(read_json(committed / "plan.json"), devices, budget, training.execution)
    return _train_segment(segment, store, run_dir, training, on_metrics, progress)


def _train_segment(segment: dict, store, run_dir: Path, training: Training, on_metrics, progress: bool) -> int:
    until = segment_end(segment, training)
    ended = [rung_file(ensemble_dir(run_dir, e["index"], segment), until) if until < training.steps
             else ensemble_dir(run_dir, e["index"], segment) / "done.json" for e in segment["ensembles"]]
    if all(path.exists() for path in ended):  # nothing left to train (a rerun after the segment ended)
        return dispatch.EXIT_OK
    return dispatch.run(segment, store.path, run_dir, training, on_metrics=on_metrics, progress=progress)


def _transition(segment: dict, number: int, step: int, metric: str, store, run_dir: Path, training: Training,
                devices: list[str], budget: int) -> None:
    """Rank, stop the dropped members, seed the survivors' new ensembles, commit (module doc, steps 1-3)."""
    tmp = run_dir / HALVING_DIR / f".rung_{number}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a transition killed before its commit: start it again
    sources, records, resumes = {}, {}, []
    for e in segment["ensembles"]:
        directory = ensemble_dir(run_dir, e["index"], segment)
        step_dir = directory / f"step_{step:09d}"
        if latest_checkpoint(directory) != step_dir or not rung_file(directory, step).exists():
            raise HalvingError(f"ensemble {e['index']} in {directory} has no complete checkpoint and metrics at rung step {step}; "
                               "its segment did not end there: use a new run dir")
        rung_record = read_json(rung_file(directory, step))
        resumes.append(read_json(step_dir / "resume.json"))
        for row, member_id in enumerate(e["members"]):
            sources[member_id] = (step_dir, row)
            records[member_id] = rung_record[member_id]
    if any(r["position"] != resumes[0]["position"] or r["tokens"] != resumes[0]["tokens"] for r in resumes):
        raise HalvingError(f"the ensembles of {run_dir} stand at different store positions at step {step}; use a new run dir")
    order = rank({m: r["metrics"] for m, r in records.items()}, metric)
    keep = order[: survivors_count(len(order), training.halving.eta)]
    firing = _FiringRows()
    for member_id in order[len(keep):]:
        _stop_member(member_id, sources[member_id], records[member_id], firing, step, store, run_dir, training)

    members = [Member.from_dict(segment["members"][m]) for m in sorted(keep)]
    new = make_plan(members, devices, training.batch_size, budget, training.execution)
    new.update({"checkpoint_dir": f"{HALVING_DIR}/rung_{number}/checkpoints", "rung": number, "start_step": step})
    for e in new["ensembles"]:
        _seed_ensemble(tmp / "checkpoints" / f"ensemble_{e['index']}" / f"step_{step:09d}", plan_members(new, e["index"]),
                       sources, firing, resumes[0], step)
    write_json_atomic(tmp / "ranking.json", {"step": step, "metric": metric, "order": order, "survivors": sorted(keep),
                                             "metrics": {m: records[m]["metrics"] for m in order}})
    write_json_atomic(tmp / "plan.json", new)
    os.rename(tmp, run_dir / HALVING_DIR / f"rung_{number}")  # the commit
    fsync_dir(run_dir / HALVING_DIR)


class _FiringRows:
    """Firing counts of single members out of their ensembles' saved counters (each file read once)."""

    def __init__(self) -> None:
        self.states: dict[Path, dict[str, torch.Tensor]] = {}

    def state(self, step_dir: Path) -> dict[str, torch.Tensor]:
        if step_dir not in self.states:
            self.states[step_dir] = load_file(step_dir / "firing.safetensors")
        return self.states[step_dir]

    def frequencies(self, step_dir: Path, row: int, dict_size: int) -> torch.Tensor:
        """One member's firing frequency [dict_size] over the window, as FiringCounter.frequencies."""
        state = self.state(step_dir)
        counts = state["blocks"][:, row, :dict_size].sum(0) + state["current"][row, :dict_size]
        tokens = int(state["block_token_counts"].sum()) + int(state["scalars"][0])
        return counts.double().div(max(tokens, 1)).float().contiguous()


def _stop_member(member_id: str, source: tuple[Path, int], record: dict, firing: _FiringRows, step: int, store,
                 run_dir: Path, training: Training) -> None:
    """A dropped member's final directory: its weights at the rung, the rung's metrics, stopped_early."""
    step_dir, row = source
    saved = step_dir / "members" / member_id
    cfg = read_json(saved / CFG_FILE)
    member = Member.from_dict({k: v for k, v in cfg.items() if k in Member.__dataclass_fields__})
    out = run_dir / "members" / member_id
    atomic_write(out / SAE_FILE, lambda tmp: shutil.copyfile(saved / SAE_FILE, tmp))
    frequency = {"frequency": firing.frequencies(step_dir, row, member.dict_size)}
    atomic_write(out / "feature_freq.safetensors", lambda tmp: save_file(frequency, tmp))
    final = {**member.to_dict(), "member_id": member_id, "steps": cfg["steps"], "tokens": cfg["tokens"],
             "store_fingerprint": store.fingerprint, "normalize": training.normalize, "data_seed": training.data_seed,
             "alive": record["alive"], "l1_final": record["l1_final"], "stopped_early": True, "metrics": record["metrics"]}
    write_json_atomic(out / CFG_FILE, final)  # last: the directory is complete


def _seed_ensemble(step_dir: Path, members: list[Member], sources: dict, firing: _FiringRows, resume: dict, step: int) -> None:
    """A new ensemble's first checkpoint at `step`: its members' saved states, their firing rows re-stacked."""
    n = max(m.dict_size for m in members)
    blocks = counts = None
    for new_row, member in enumerate(members):
        source_dir, row = sources[member.member_id]
        shutil.copytree(source_dir / "members" / member.member_id, step_dir / "members" / member.member_id)
        state = firing.state(source_dir)
        if blocks is None:
            blocks = torch.zeros(state["blocks"].shape[0], len(members), n, dtype=torch.int64)
            counts = {"block_token_counts": state["block_token_counts"], "scalars": state["scalars"]}
            current = torch.zeros(len(members), n, dtype=torch.int64)
        blocks[:, new_row, : member.dict_size] = state["blocks"][:, row, : member.dict_size]
        current[new_row, : member.dict_size] = state["current"][row, : member.dict_size]
    save_file({"blocks": blocks, "current": current, **counts}, step_dir / "firing.safetensors")
    write_json_atomic(step_dir / "resume.json", {"steps": step, "tokens": resume["tokens"], "position": resume["position"],
                                                 "members": [m.member_id for m in members]})


# -- the summary ---------------------------------------------------------------------------------


def member_steps(rows: list[dict], steps: int) -> dict:
    """Member-steps trained against the full grid's (every member to `steps`), and the best mmcs_truth."""
    done = sum(int(r["steps"]) for r in rows)
    scored = [r for r in rows if isinstance(r.get("mmcs_truth"), float) and math.isfinite(r["mmcs_truth"])]
    best = max(scored, key=lambda r: (r["mmcs_truth"], r["member_id"]), default=None)
    return {"member_steps": done, "full_grid_member_steps": len(rows) * steps, "fraction": done / max(1, len(rows) * steps),
            "stopped_early": sum(bool(r.get("stopped_early")) for r in rows),
            "best_mmcs_truth": best["mmcs_truth"] if best else None, "best_member": best["member_id"] if best else None}


def format_summary(summary: dict) -> str:
    line = (f"halving: {summary['member_steps']} member-steps of the full grid's {summary['full_grid_member_steps']} "
            f"({summary['fraction']:.1%}); {summary['stopped_early']} members stopped early")
    if summary["best_mmcs_truth"] is not None:
        line += f"; best mmcs_truth {summary['best_mmcs_truth']:.4f} ({summary['best_member']})"
    return line
