"""Train an inner grid of SAEs as one ensemble per device: compose -> validate -> plan -> store -> dispatch -> report.

    python sweep.py                                     # the embedded default: synthetic ground truth on CPU
    python sweep.py grid=paper devices=cuda             # a bigger grid on every GPU
    python sweep.py -m data=lm model=tiny layer=0,1     # outer axes as Hydra multirun jobs

Exit codes: 0 done, 1 a worker failed, 2 bad config or input (a corrupt store included),
3 done but members froze (training.freeze_after; training.allow_frozen=true accepts it),
75 interrupted after checkpointing (rerun into the same run dir to resume; the SLURM
launchers requeue on it). docs/reliability.md lists each fault with its code.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sae_ensemble import config as config_module
from sae_ensemble import dispatch, report
from sae_ensemble.activations.store import ActivationStore, StoreError
from sae_ensemble.atomic import write_json_atomic
from sae_ensemble.checkpoint import CheckpointError, read_json
from sae_ensemble.config import ConfigError, SweepConfig
from sae_ensemble.member import Member
from sae_ensemble.plan import PlanError, assign, format_plan, make_plan, resolve_budget
from sae_ensemble.train import ensemble_dir

EXIT_BAD_INPUT = 2

config_module.register()


def get_store(cfg: SweepConfig, devices: list[str]) -> ActivationStore:
    """The store this sweep trains on: given, synthesised, or harvested (each reused when it exists)."""
    data = cfg.data
    if data.source == "lm":
        ensure_model(cfg)
    if data.store:
        store = ActivationStore.open(data.store)
        if data.source == "synthetic" and store.d_in != data.d_in:
            raise ConfigError(f"data.store={data.store} has d_in={store.d_in} but data.d_in={data.d_in}; set data.d_in={store.d_in} or use another store")
        if data.source == "lm":
            stored = (store.manifest.get("hook"), store.manifest.get("source", {}).get("model"))
            if stored != (cfg.hook, cfg.model.name):
                raise ConfigError(f"data.store={data.store} holds hook {stored[0]!r} of model {stored[1]!r}, "
                                  f"not hook={cfg.hook!r} of model.name={cfg.model.name!r}; evaluation would splice it into the wrong place")
        return store
    if data.source == "synthetic":
        from sae_ensemble.activations.synthetic import write_synthetic

        params = dict(d_in=data.d_in, n_features=data.n_features, n_active=data.n_active, feature_prob_decay=data.feature_prob_decay,
                      n_rows=data.n_rows, seed=data.seed, correlated=data.correlated, noise_std=data.noise_std, dtype=data.dtype)
        key = hashlib.sha256(json.dumps([params, data.rows_per_chunk, data.heldout_rows], sort_keys=True).encode()).hexdigest()[:16]
        return write_synthetic(Path(data.store_root) / f"synthetic-{key}", rows_per_chunk=data.rows_per_chunk,
                               heldout_rows=data.heldout_rows, **params)
    from sae_ensemble.activations.harvest import get_or_harvest

    stores = get_or_harvest(
        cfg.model.name, [cfg.hook], data.dataset, cache_root=data.store_root, n_tokens=data.n_tokens,
        context_length=data.context_length, split=data.split, dataset_config=data.dataset_config, text_field=data.text_field,
        dtype=data.dtype, drop_bos=data.drop_bos, revision=cfg.model.revision, device=harvest_device(devices),
        batch_size=data.harvest_batch_size, rows_per_chunk=data.rows_per_chunk, heldout_rows=data.heldout_rows, progress=cfg.progress,
    )
    return stores[cfg.hook]


def ensure_model(cfg: SweepConfig) -> None:
    """With model.build_tiny, build the tiny GPT-2 under model.name on first use and point model.name at it.

    Everything after (the harvest's store key and manifest, evaluation, tracking) then names the
    model directory itself, whose name carries the fingerprint of its recipe.
    """
    if cfg.model.build_tiny:
        from sae_ensemble.activations.tiny_model import ensure_tiny_gpt2

        # Log lines, not bars: minutes of silence on first use would look like a hang even with progress=false.
        directory = ensure_tiny_gpt2(cfg.model.name, trained=cfg.model.build_tiny == "trained")
        cfg.model.name = str(directory)


def harvest_device(devices: list[str]) -> str:
    """The model runs on the first worker device (workers are named cpu:N, torch wants cpu)."""
    return "cpu" if devices[0].startswith("cpu") else devices[0]


# Training settings that change results: a resume must use the values the run started with.
RESUME_FIXED = ("steps", "batch_size", "data_seed", "normalize", "dead_window_tokens", "eval_rows", "autocast_bf16", "shuffle_window_chunks")
# Not fixed: memory_budget (ensembles and micro-batches stay as planned; only their spread over devices changes),
# checkpoint_every and log_every.


def plan_for(cfg: SweepConfig, devices: list[str], store: ActivationStore, run_dir: Path) -> dict:
    """The plan, reusing the run dir's plan.json when resuming (same members, store and training).

    A resume keeps the planned ensembles (their checkpoints name them) and spreads them over
    whatever devices this run has: more devices than ensembles leave some idle, fewer run
    more stages on each.
    """
    config_module.check_grid_fits(cfg.grid, store.d_in)
    members = cfg.grid.members(store.d_in)
    budget = resolve_budget(cfg.training.memory_budget, devices)
    plan_path = run_dir / "plan.json"
    try:
        if not plan_path.exists():
            plan = make_plan(members, devices, cfg.training.batch_size, budget)
            plan["training"] = asdict(cfg.training)
            plan["store_fingerprint"] = store.fingerprint
        else:
            previous = read_json(plan_path)
            _check_resume(previous, {m.member_id: m.to_dict() for m in members}, cfg, store, run_dir)
            plan = assign(previous, devices, budget)
    except PlanError as error:
        raise ConfigError(str(error)) from None
    write_json_atomic(plan_path, plan)
    return plan


def _check_resume(previous: dict, members: dict, cfg: SweepConfig, store: ActivationStore, run_dir: Path) -> None:
    """Refuse a resume whose members, store or result-changing settings differ from the run's start."""
    if "workers" not in previous:
        raise ConfigError(f"{run_dir}/plan.json was written by an older version without memory planning; use a new run dir")
    if sorted(previous["members"]) != sorted(members):
        raise ConfigError(f"{run_dir} already holds a sweep with other members; use a new run dir (hydra.run.dir=...) or the same grid to resume")
    if previous.get("store_fingerprint") != store.fingerprint:
        raise ConfigError(f"{run_dir} was trained on another store (fingerprint {previous.get('store_fingerprint')}, now {store.fingerprint}); use the same data settings or a new run dir")
    # Member fields that ids leave out (lr/l1 warmup, lr decay) change results too.
    for member_id, now in members.items():
        for name, before in previous["members"][member_id].items():
            if now.get(name) != before:
                raise ConfigError(f"{run_dir} was started with grid.{name}={before}; resuming with {now.get(name)} would mix two trainings: "
                                  f"set grid.{name}={before} or use a new run dir")
    for name in RESUME_FIXED:
        before, now = previous["training"].get(name, getattr(dispatch.Training(), name)), getattr(cfg.training, name)  # absent: a run from before the field existed
        if before != now:
            raise ConfigError(f"{run_dir} was started with training.{name}={before}; resuming with {now} would mix two trainings: set training.{name}={before} or use a new run dir")


def finished(plan: dict, run_dir: Path) -> bool:
    """Every ensemble trained and the report written: a rerun has nothing to do."""
    return (run_dir / "summary.csv").exists() and all((ensemble_dir(run_dir, e["index"]) / "done.json").exists() for e in plan["ensembles"])


def evaluate_lm(cfg: SweepConfig, store: ActivationStore, run_dir: Path, devices: list[str]) -> None:
    """CE loss recovered and KL for every finished member, written into its cfg.json metrics."""
    from sae_ensemble.activations.harvest import boot_model, iter_contexts, iter_texts, rows_per_context
    from sae_ensemble.evaluate import evaluate_members

    import torch

    device = harvest_device(devices)
    bridge = boot_model(cfg.model.name, device=device, revision=cfg.model.revision)
    # Held-out text: contexts after the ones harvested for training.
    texts = iter_texts(cfg.data.dataset, cfg.data.split, cfg.data.dataset_config, cfg.data.text_field)
    skip = -(-cfg.data.n_tokens // rows_per_context(bridge.tokenizer, cfg.data.context_length, cfg.data.drop_bos))
    contexts = []
    for i, context in enumerate(iter_contexts(texts, bridge.tokenizer, cfg.data.context_length)):
        if i >= skip:
            contexts.append(context)
        if len(contexts) == cfg.eval.n_contexts:
            break
    if not contexts:
        print(f"warning: no held-out text left after the {skip} harvested contexts; CE evaluation skipped", file=sys.stderr)
        return
    tokens = torch.tensor(contexts, device=device)
    member_dirs = report.member_dirs(run_dir)
    normalization = store.normalization(cfg.training.normalize)
    results = evaluate_members(bridge, tokens, cfg.hook, member_dirs, normalization, progress=cfg.progress,
                               skip_first_position=cfg.data.drop_bos and bridge.tokenizer.bos_token_id is not None)
    for directory in member_dirs:
        member_cfg = read_json(directory / "cfg.json")
        member_cfg["metrics"].update(results[member_cfg["member_id"]])
        write_json_atomic(directory / "cfg.json", member_cfg)


def sweep(cfg: SweepConfig, run_dir: Path) -> int:
    devices = config_module.validate(cfg)
    if cfg.data.source == "synthetic" and not cfg.data.store and not (run_dir / "plan.json").exists():
        try:  # refuse a grid that cannot fit before synthesising its data
            make_plan(cfg.grid.members(cfg.data.d_in), devices, cfg.training.batch_size, resolve_budget(cfg.training.memory_budget, devices))
        except PlanError as error:
            raise ConfigError(str(error)) from None
        except ValueError:
            pass  # grid errors are reported with the store's d_in below
    store = get_store(cfg, devices)
    store.verify(cfg.data.verify)  # a corrupt chunk stops the sweep here, before anything trains on it
    print(f"store: {store}")
    if cfg.training.batch_size > store.n_train_rows or store.heldout_rows < 1:
        raise ConfigError(f"training.batch_size={cfg.training.batch_size} needs at most the store's {store.n_train_rows} training rows, "
                          f"and evaluation needs held-out rows (the store has {store.heldout_rows}); change the batch size or data.n_rows/n_tokens/heldout_rows")
    plan = plan_for(cfg, devices, store, run_dir)
    print(format_plan(plan), flush=True)
    if cfg.plan_only:
        return dispatch.EXIT_OK
    if finished(plan, run_dir):
        print(f"{run_dir} holds a finished sweep (summary.csv and every ensemble done): nothing to do")
        return report_frozen(report.load_rows(run_dir), cfg.training)  # the same exit code as the run that finished it

    from sae_ensemble.tracking import Tracker

    members = [Member.from_dict(values) for values in plan["members"].values()]
    base = {"sweep": cfg.name, "source": cfg.data.source, "store": str(store.path), "store_fingerprint": store.fingerprint,
            **({"model": cfg.model.name, "hook": cfg.hook, "layer": cfg.layer} if cfg.data.source == "lm" else {}),
            **{f"training.{k}": v for k, v in asdict(cfg.training).items()}}
    with Tracker(cfg.wandb.project, cfg.name, cfg.wandb.mode, cfg.wandb.entity, base, run_dir) as tracker:
        tracker.register(members)
        code = dispatch.run(plan, store.path, run_dir, cfg.training, on_metrics=tracker.log, progress=cfg.progress)
        if code != dispatch.EXIT_OK:
            return code
        if cfg.data.source == "lm" and cfg.eval.ce_loss:
            evaluate_lm(cfg, store, run_dir, devices)
        rows = report.load_rows(run_dir)
        summary = report.write_summary(run_dir, rows)
        plots = report.write_plots(run_dir, rows)
        for row in rows:
            tracker.finish(row["member_id"], {k: v for k, v in row.items() if isinstance(v, (int, float))})
        tracker.log_sweep_plots(plots)
    print("\nMembers on the L0-FVU Pareto front:")
    print(report.format_table(report.pareto_front(rows)))
    print(f"\nwrote {summary} and {len(plots)} plots in {run_dir / 'plots'}")
    return report_frozen(rows, cfg.training)


def report_frozen(rows: list[dict], training: dispatch.Training) -> int:
    """Name the members that froze, loudly; exit 3 for them unless training.allow_frozen."""
    frozen = sorted(r["member_id"] for r in rows if r.get("alive") is False)
    if not frozen:
        return dispatch.EXIT_OK
    shown = ", ".join(frozen[:10]) + (f" and {len(frozen) - 10} more" if len(frozen) > 10 else "")
    what = (f"{len(frozen)} of {len(rows)} members FROZE after training.freeze_after={training.freeze_after} non-finite steps in a row "
            f"and hold their last finite weights (alive=False in summary.csv): {shown}")
    if training.allow_frozen:
        print(f"\nwarning: {what}", file=sys.stderr)
        return dispatch.EXIT_OK
    print(f"\nerror: {what}; lower their lr or set training.allow_frozen=true to accept (exit {dispatch.EXIT_FROZEN})", file=sys.stderr)
    return dispatch.EXIT_FROZEN


class Interrupted(Exception):
    """SIGTERM/SIGINT outside training (harvest, evaluation): every stage there resumes on a rerun."""


def _interrupt(signum, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(raw: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    # During training the dispatcher takes these signals over (workers checkpoint first).
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        cfg: SweepConfig = OmegaConf.to_object(raw)
        code = sweep(cfg, run_dir)
    except (ConfigError, StoreError, CheckpointError, report.ReportError) as error:
        print(f"error: {error}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    except Interrupted as signal_name:
        print(f"interrupted by {signal_name} outside training; rerun into {run_dir} to resume (exit {dispatch.EXIT_REQUEUE})", file=sys.stderr)
        code = dispatch.EXIT_REQUEUE
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code != dispatch.EXIT_OK:
        sys.exit(code)


if __name__ == "__main__":
    main()
