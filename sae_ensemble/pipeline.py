"""A sweep, callable in-process: validate -> store -> plan -> segments -> evaluation -> report.

`run(cfg, run_dir)` is everything `python sweep.py` does after Hydra composed the config, and returns
its exit code: 0 done, 1 a worker failed, 2 bad config or input (a corrupt store included), 3 done
but members froze (training.freeze_after; training.allow_frozen=true accepts it), 75 interrupted
after checkpointing (rerun into the same run dir to resume; the SLURM launchers requeue on it).
docs/reliability.md lists each fault with its code.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from enum import StrEnum
from pathlib import Path

from sae_ensemble import config, dispatch, execution, halving, html_report, report, segments
from sae_ensemble.activations.format import StoreError
from sae_ensemble.atomic import write_json_atomic
from sae_ensemble.config import ConfigError, LMData, NativeKernels, SweepConfig, SyntheticData, Training
from sae_ensemble.devices import resolve_devices
from sae_ensemble.eval_worker import Evaluation, LMEvaluation
from sae_ensemble.features import FeatureSettings
from sae_ensemble.grid import checked_members
from sae_ensemble.kernels import native
from sae_ensemble.member import Member
from sae_ensemble.memory import resolve_budget
from sae_ensemble.plan import PlanError, assign, format_plan, make_plan
from sae_ensemble.rundir import CheckpointError, RunDir, RunRecord
from sae_ensemble.sources import Stores, fingerprint, get_stores

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_FROZEN, EXIT_REQUEUE = 0, dispatch.EXIT_FAILED, 2, 3, dispatch.EXIT_REQUEUE
# Before an LM store exists its width is unknown. Member rules are checked first at this width, which
# no rule refuses for being too small (k <= dict size of a ratio), then again at the store's.
PROVISIONAL_D_IN = 1 << 16


def validate(cfg: SweepConfig) -> list[str]:
    """Every check that needs no store, in one pass: the config's own (config.validate), the grid's members'
    (Member), the execution's and the devices'. Raises ConfigError; returns the worker devices."""
    config.validate(cfg)
    members = checked_members(cfg.grid, provisional_widths(cfg))
    try:
        execution.check(
            cfg.training.execution,
            [m.variant for m in members],
            any(m.auxk_dead_tokens for m in members),
            cfg.training.autocast_bf16,
        )
        devices = resolve_devices(cfg.devices)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if cfg.training.native_kernels == NativeKernels.on and any(d.startswith("cpu") for d in devices):
        if not native.prerequisites():
            raise ConfigError(
                "training.native_kernels=on needs Linux, a C compiler (cc or gcc) and a torch that takes sqrt "
                "from MKL, and this machine lacks one: use auto or off"
            )
    if cfg.training.autocast_bf16 and any(d.startswith("cpu") for d in devices):
        raise ConfigError(f"training.autocast_bf16=true needs CUDA devices; devices={cfg.devices!r} gives {devices}")
    return devices


def provisional_widths(cfg: SweepConfig) -> dict[str | None, tuple[int, int]]:
    """Each member hook's (d_in, d_out) as far as the config knows them before any store exists (see
    PROVISIONAL_D_IN)."""
    if isinstance(cfg.data, SyntheticData):
        return {None: (cfg.data.d_in, cfg.data.d_out)}
    names = config.hooks(cfg)
    d_out = PROVISIONAL_D_IN if config.transcoders(cfg) else 0
    return {hook: (PROVISIONAL_D_IN, d_out) for hook in (names if len(names) > 1 else [None])}


def store_widths(stores: Stores) -> dict[str | None, tuple[int, int]]:
    """Each member hook's (d_in, d_out) from its store: a paired store's rows are [input | target]."""
    return {
        hook: (store.target_at, store.d_in - store.target_at) if store.target_at else (store.d_in, 0)
        for hook, store in stores.items()
    }


# -- the plan and the resume check -----------------------------------------------------------------


def plan_for(cfg: SweepConfig, devices: list[str], stores: Stores, run: RunDir) -> RunRecord:
    """The run's record, reusing the run dir's plan.json when resuming (same members, store and training).

    A resume keeps the planned ensembles (their checkpoints name them) and spreads them over
    whatever devices this run has: more devices than ensembles leave some idle, fewer run
    more stages on each.
    """
    members = checked_members(cfg.grid, store_widths(stores))
    budget = resolve_budget(cfg.training.memory_budget, devices)
    try:
        previous = run.read_run()
        if previous is None:
            record = RunRecord(
                make_plan(
                    members,
                    devices,
                    cfg.training.batch_size,
                    budget,
                    cfg.training.execution,
                    cfg.training.native_kernels,
                ),
                cfg.training,
                fingerprint(stores),
            )
        else:
            check_resume(previous, members, cfg.training, fingerprint(stores), run)
            record = dataclasses.replace(
                previous,
                plan=assign(previous.plan, devices, budget, cfg.training.execution, cfg.training.native_kernels),
            )
    except PlanError as error:
        raise ConfigError(str(error)) from None
    write_json_atomic(run.plan, record.to_json())
    return record


def check_resume(
    previous: RunRecord, members: list[Member], training: Training, stores_fingerprint: str, run: RunDir
) -> None:
    """Refuse a resume whose members, store or result-changing training settings (config.result_changing) differ."""
    now = {m.member_id: m.to_dict() for m in members}
    if sorted(previous.plan.members) != sorted(now):
        raise ConfigError(
            f"{run.path} already holds a sweep with other members; use a new run dir (hydra.run.dir=...) or the same "
            "grid to resume"
        )
    if previous.store_fingerprint != stores_fingerprint:
        raise ConfigError(
            f"{run.path} was trained on another store (fingerprint {previous.store_fingerprint}, now "
            f"{stores_fingerprint}); "
            "use the same data settings or a new run dir"
        )
    # Member fields that ids leave out (lr/l1 warmup, lr decay) change results too.
    for member_id, member in previous.plan.members.items():
        for name, before in member.to_dict().items():
            if now[member_id].get(name) != before:
                raise ConfigError(
                    f"{run.path} was started with grid.{name}={before}; resuming with {now[member_id].get(name)} "
                    "would mix "
                    f"two trainings: set grid.{name}={before} or use a new run dir"
                )
    for name in config.result_changing(Training):
        for key, before, after in _fields(
            f"training.{name}", getattr(previous.training, name), getattr(training, name)
        ):
            if before != after:
                raise ConfigError(
                    f"{run.path} was started with {key}={before}; resuming with {after} would mix two trainings: "
                    f"set {key}={before} or use a new run dir"
                )


def _fields(key: str, before, after) -> list[tuple]:
    """(dotted key, before, after) of a setting, a nested config (training.halving) field by field, as plain values."""
    if dataclasses.is_dataclass(before):
        return [
            item
            for f in dataclasses.fields(before)
            for item in _fields(f"{key}.{f.name}", getattr(before, f.name), getattr(after, f.name))
        ]
    plain = lambda value: str(value) if isinstance(value, StrEnum) else value  # noqa: E731
    return [(key, plain(before), plain(after))]


# -- the sweep -------------------------------------------------------------------------------------


def evaluation(cfg: SweepConfig) -> Evaluation:
    """What the evaluation stage computes beside MMCS: CE (lm_evaluation) and feature statistics (eval.features)."""
    e = cfg.eval
    settings = FeatureSettings(
        contexts=e.feature_contexts,
        window=e.feature_window,
        frequent=e.feature_latents // 4,
        rare=e.feature_latents // 4,
        sample=e.feature_latents - 2 * (e.feature_latents // 4),
        rows=e.feature_rows,
    )
    return Evaluation(lm_evaluation(cfg), settings if e.features else None)


def lm_evaluation(cfg: SweepConfig) -> LMEvaluation | None:
    """What the workers' CE evaluation needs (LM data with eval.ce_loss), else None."""
    if not isinstance(cfg.data, LMData) or not cfg.eval.ce_loss:
        return None
    data = cfg.data
    return LMEvaluation(
        model=cfg.model.name,
        revision=cfg.model.revision,
        hook=config.hooks(cfg)[0],
        dataset=data.dataset,
        split=data.split,
        dataset_config=data.dataset_config,
        text_field=data.text_field,
        context_length=data.context_length,
        n_tokens=data.n_tokens,
        drop_bos=data.drop_bos,
        n_contexts=cfg.eval.n_contexts,
    )


def sweep(cfg: SweepConfig, run_dir: Path) -> int:
    """The sweep's stages in order (the module doc); raises the errors `run` turns into exit code 2."""
    devices = validate(cfg)
    run, training = RunDir(run_dir), cfg.training
    if isinstance(cfg.data, SyntheticData) and not cfg.data.store and not run.plan.exists():
        try:  # refuse a grid that cannot fit before synthesising its data
            make_plan(
                checked_members(cfg.grid, provisional_widths(cfg)),
                devices,
                training.batch_size,
                resolve_budget(training.memory_budget, devices),
                training.execution,
                training.native_kernels,
            )
        except PlanError as error:
            raise ConfigError(str(error)) from None
    stores = get_stores(cfg, devices)
    for store in stores.values():
        store.verify(cfg.data.verify)  # a corrupt chunk stops the sweep here, before anything trains on it
        print(f"store: {store}")
        if training.batch_size > store.n_train_rows or store.heldout_rows < 1:
            raise ConfigError(
                f"training.batch_size={training.batch_size} needs at most the store's {store.n_train_rows} training "
                f"rows, and evaluation needs held-out rows (the store has {store.heldout_rows}); change the batch "
                "size or data.n_rows/n_tokens/heldout_rows"
            )
    record = plan_for(cfg, devices, stores, run)
    print(format_plan(record.plan), flush=True)
    if cfg.plan_only:
        return EXIT_OK
    if segments.finished(run, record.plan, training):
        print(f"{run_dir} holds a finished sweep (summary.csv and every ensemble done): nothing to do")
        return report_frozen(report.load_rows(run_dir), training)  # the same exit code as the run that finished it

    from sae_ensemble.tracking import Tracker

    base = {
        "sweep": cfg.name,
        "source": cfg.data.source,
        "store": ",".join(str(store.path) for store in stores.values()),
        "store_fingerprint": fingerprint(stores),
        **(
            {
                "model": cfg.model.name,
                "hook": ",".join(config.hooks(cfg)),
                **({"hook_out": ",".join(cfg.data.hooks_out)} if cfg.data.hooks_out else {}),
                "layer": cfg.layer,
            }
            if isinstance(cfg.data, LMData)
            else {}
        ),
        **{f"training.{k}": v for k, v in dataclasses.asdict(training).items()},
    }
    with Tracker(cfg.wandb.project, cfg.name, cfg.wandb.mode, cfg.wandb.entity, base, run_dir) as tracker:
        tracker.register(list(record.plan.members.values()))
        budget = resolve_budget(training.memory_budget, devices)
        paths = {hook: store.path for hook, store in stores.items()}
        code = segments.run(
            record.plan,
            stores,
            run,
            training,
            devices,
            budget,
            lambda segment: dispatch.train(
                segment, paths, run_dir, training, on_metrics=tracker.log, progress=cfg.progress
            ),
        )
        if code != EXIT_OK:
            return code
        # MMCS, CE scores and feature statistics, on the workers' devices; the report below only reads them.
        code = dispatch.evaluate(record.plan, paths, run_dir, training, evaluation(cfg), progress=cfg.progress)
        if code != EXIT_OK:
            return code
        rows = report.load_rows(run_dir)
        summary = report.write_summary(run_dir, rows)
        plots = report.write_plots(run_dir, rows)
        index = html_report.write_html_report(run_dir, report.by_hook(rows), report.pareto_front)
        for row in rows:
            tracker.finish(row["member_id"], {k: v for k, v in row.items() if isinstance(v, (int, float))})
        tracker.log_sweep_plots(plots)
    for hook, group in report.by_hook(rows).items():
        print(f"\nMembers on the L0-FVU Pareto front{f' of {hook}' if hook else ''}:")
        print(report.format_table(report.pareto_front(group)))
    if training.halving.rungs:
        print("\n" + halving.format_summary(halving.member_steps(rows, training.steps)))
    print(f"\nwrote {summary} and {len(plots)} plots in {run.plots}; open {index} in a browser")
    return report_frozen(rows, training)


def report_frozen(rows: list[dict], training: Training) -> int:
    """Name the members that froze, loudly; exit 3 for them unless training.allow_frozen."""
    frozen = sorted(r["member_id"] for r in rows if r.get("alive") is False)
    if not frozen:
        return EXIT_OK
    shown = ", ".join(frozen[:10]) + (f" and {len(frozen) - 10} more" if len(frozen) > 10 else "")
    what = (
        f"{len(frozen)} of {len(rows)} members FROZE after training.freeze_after={training.freeze_after} non-finite "
        "steps in a row "
        f"and hold their last finite weights (alive=False in summary.csv): {shown}"
    )
    if training.allow_frozen:
        print(f"\nwarning: {what}", file=sys.stderr)
        return EXIT_OK
    print(
        f"\nerror: {what}; lower their lr or set training.allow_frozen=true to accept (exit {EXIT_FROZEN})",
        file=sys.stderr,
    )
    return EXIT_FROZEN


class Interrupted(Exception):
    """SIGTERM/SIGINT outside the workers (harvest, report): every stage there resumes on a rerun."""


def _interrupt(signum, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def run(cfg: SweepConfig, run_dir: Path) -> int:
    """The sweep with its exit code: bad input as one line on stderr (2), a signal outside training as 75."""
    if not cfg.progress:  # libraries' bars too (the model's download and load): tqdm reads this, and workers inherit it
        os.environ["TQDM_DISABLE"] = "1"
    # During training the dispatcher takes these signals over (workers checkpoint first).
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return sweep(cfg, Path(run_dir))
    except (ConfigError, StoreError, CheckpointError, report.ReportError, halving.HalvingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Interrupted as signal_name:
        print(
            f"interrupted by {signal_name} outside training; rerun into {run_dir} to resume (exit {EXIT_REQUEUE})",
            file=sys.stderr,
        )
        return EXIT_REQUEUE
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
