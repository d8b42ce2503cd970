"""The stores a sweep trains on: the one given (data.store), a synthetic one, or a harvest of one store per hook
(with data.hooks_out, a transcoder's paired store per input hook); each reused when present.

Stores are keyed as members name their hook (member.py): None for a run over one store, the hook name for
each store of a run over several hooks (data.hooks)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from sae_ensemble.activations.reader import ActivationStore
from sae_ensemble.config import ConfigError, LMData, SweepConfig, SyntheticData, TinyModel, hooks, hooks_out

Stores = dict[str | None, ActivationStore]


def get_stores(cfg: SweepConfig, devices: list[str]) -> Stores:
    """The stores this sweep trains on, keyed by member hook (the module doc)."""
    if len(hooks(cfg)) > 1:
        ensure_model(cfg)
        return dict(_harvest(cfg, devices, hooks(cfg)))
    return {None: get_store(cfg, devices)}


def fingerprint(stores: Stores) -> str:
    """The stores' content, as a run records it: one store's fingerprint, or a digest of every hook's."""
    if list(stores) == [None]:
        return stores[None].fingerprint
    joined = json.dumps({hook: store.fingerprint for hook, store in stores.items()}, sort_keys=True)
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def get_store(cfg: SweepConfig, devices: list[str]) -> ActivationStore:
    """The one store of a run over one store: given, synthesised, or harvested (each reused when it exists)."""
    data = cfg.data
    if isinstance(data, LMData):
        ensure_model(cfg)
    if data.store:
        store = ActivationStore.open(data.store)
        if isinstance(data, SyntheticData) and (store.target_at or store.d_in, store.d_in) != (
            data.d_in,
            data.d_in + data.d_out,
        ):
            raise ConfigError(
                f"data.store={data.store} has d_in={store.target_at or store.d_in} and d_out="
                f"{store.d_in - store.target_at if store.target_at else 0} but data.d_in={data.d_in} and "
                f"data.d_out={data.d_out}; set those or use another store"
            )
        if isinstance(data, LMData):
            source = store.manifest.get("source", {})
            stored = (store.manifest.get("hook"), source.get("hook_out"), source.get("model"))
            if stored != (hooks(cfg)[0], hooks_out(cfg)[0], cfg.model.name):
                raise ConfigError(
                    f"data.store={data.store} holds hook {stored[0]!r} (output hook {stored[1]!r}) of model "
                    f"{stored[2]!r}, not hook={hooks(cfg)[0]!r} (data.hooks_out: {hooks_out(cfg)[0]!r}) of "
                    f"model.name={cfg.model.name!r}; evaluation would splice it into the wrong place"
                )
        return store
    if isinstance(data, SyntheticData):
        from sae_ensemble.activations.synthetic import write_synthetic

        params = dict(
            d_in=data.d_in,
            n_features=data.n_features,
            n_active=data.n_active,
            feature_prob_decay=data.feature_prob_decay,
            n_rows=data.n_rows,
            seed=data.seed,
            correlated=data.correlated,
            noise_std=data.noise_std,
            dtype=str(data.dtype),
            **({"d_out": data.d_out, "skip_std": data.skip_std} if data.d_out else {}),  # other stores keep their key
            **({"world": world_params(data)} if data.world is not None else {}),  # the toy keeps its key
        )
        key = hashlib.sha256(
            json.dumps([params, data.rows_per_chunk, data.heldout_rows], sort_keys=True).encode()
        ).hexdigest()[:16]
        return write_synthetic(
            Path(data.store_root) / f"synthetic-{key}",
            rows_per_chunk=data.rows_per_chunk,
            heldout_rows=data.heldout_rows,
            **params,
        )
    (hook,) = hooks(cfg)
    return _harvest(cfg, devices, [hook])[hook]


def world_params(data: SyntheticData) -> dict:
    """data.world as the store records it: the parts that are on, each with all its settings."""
    return {part: value for part, value in dataclasses.asdict(data.world).items() if value is not None}


def _harvest(cfg: SweepConfig, devices: list[str], hook_names: list[str]) -> dict[str, ActivationStore]:
    """One store per hook (a transcoder's paired store per input hook with data.hooks_out), the missing ones
    harvested together in one pass of the model."""
    from sae_ensemble.activations.harvest import get_or_harvest

    data = cfg.data
    output_of = dict(zip(hooks(cfg), hooks_out(cfg)))
    return get_or_harvest(
        cfg.model.name,
        hook_names,
        data.dataset,
        cache_root=data.store_root,
        n_tokens=data.n_tokens,
        context_length=data.context_length,
        split=data.split,
        dataset_config=data.dataset_config,
        text_field=data.text_field,
        dtype=str(data.dtype),
        drop_bos=data.drop_bos,
        revision=cfg.model.revision,
        device=harvest_device(devices),
        batch_size=data.harvest_batch_size,
        rows_per_chunk=data.rows_per_chunk,
        heldout_rows=data.heldout_rows,
        progress=cfg.progress,
        hooks_out=[output_of[hook] for hook in hook_names],
    )


def ensure_model(cfg: SweepConfig) -> None:
    """With model.build_tiny, build the tiny GPT-2 under model.name on first use and point model.name at it.

    Everything after (the harvest's store key and manifest, evaluation, tracking) then names the
    model directory itself, whose name carries the fingerprint of its recipe.
    """
    if cfg.model.build_tiny:
        from sae_ensemble.activations.tiny_model import ensure_tiny_gpt2

        # Log lines, not bars: minutes of silence on first use would look like a hang even with progress=false.
        directory = ensure_tiny_gpt2(cfg.model.name, trained=cfg.model.build_tiny == TinyModel.trained)
        cfg.model.name = str(directory)


def harvest_device(devices: list[str]) -> str:
    """The model runs on the first worker device (workers are named cpu:N, torch wants cpu)."""
    return "cpu" if devices[0].startswith("cpu") else devices[0]
