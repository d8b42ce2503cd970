"""Structured sweep config: dataclasses registered with Hydra's ConfigStore, every field documented.

`conf/config.yaml` fills these in; `validate()` rejects impossible values with one sentence
naming the field, the value and what is allowed. Grid axes accept lists or
`${logspace:START,STOP,N}` (N values from 10^START to 10^STOP); `${repo_path:FILE}` names
a file shipped in this repository.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from sae_ensemble.activations.store import NORMALIZE_MODES, VERIFY_MODES
from sae_ensemble.dispatch import Training, resolve_devices
from sae_ensemble.ensemble import EXECUTIONS
from sae_ensemble.grid import Grid
from sae_ensemble.plan import parse_size
from sae_ensemble.architectures import VARIANTS
from sae_ensemble.member import K_VARIANTS, L1_VARIANTS
from sae_ensemble.steering import STEERABLE

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("synthetic", "lm")
MATMUL_PRECISIONS = ("highest", "high", "medium")
TINY_MODEL_KINDS = ("trained", "random")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and what is allowed."""


@dataclass
class DataConfig:
    """Where activations come from."""

    source: str = "synthetic"
    """synthetic (ground-truth toy data) or lm (harvested from a language model)."""
    store: str | None = None
    """Use this existing store directory as is (skips synthesis and harvesting)."""
    verify: str = "once"
    """Before training, check the store beyond chunk sizes: once = sha256 and finiteness of every row,
    recorded in its manifest and skipped later while the chunk files are unchanged; checksum = every
    time; size = sizes and headers only (the worker still skips any batch holding nan or inf)."""
    store_root: str = "stores"
    """Cache directory of content-addressed stores (relative to where you launch)."""
    rows_per_chunk: int = 65536
    """Rows per chunk file."""
    heldout_rows: int = 8192
    """Rows at the end of the store kept out of training, for evaluation (LM stores: not part of the
    cache key, so a changed value reuses a cached store's split; use another store_root)."""
    dtype: str = "float32"
    """Stored dtype: float32, float16 or bfloat16 (batches are always float32)."""
    # synthetic
    d_in: int = 256
    """Synthetic: activation width."""
    n_features: int = 512
    """Synthetic: number of ground-truth features."""
    n_active: float = 5.0
    """Synthetic: mean number of active features per row."""
    feature_prob_decay: float = 0.99
    """Synthetic: feature i fires with probability proportional to decay^i."""
    n_rows: int = 1_000_000
    """Synthetic: rows to generate (training + held out)."""
    correlated: bool = False
    """Synthetic: correlate feature activations."""
    noise_std: float = 0.0
    """Synthetic: standard deviation of added Gaussian noise."""
    seed: int = 0
    """Synthetic: seed of the features and rows."""
    # lm
    dataset: str = "NeelNanda/pile-10k"
    """LM: Hugging Face dataset name (streamed) or a local .txt/.jsonl file or directory."""
    split: str = "train"
    """LM: dataset split."""
    dataset_config: str | None = None
    """LM: dataset configuration name."""
    text_field: str = "text"
    """LM: text field of dataset records."""
    context_length: int = 128
    """LM: tokens per context."""
    n_tokens: int = 1_000_000
    """LM: rows (token positions) to harvest."""
    drop_bos: bool = True
    """LM: skip the BOS position of every context."""
    harvest_batch_size: int = 16
    """LM: contexts per forward pass while harvesting."""


@dataclass
class ModelConfig:
    """The language model (LM data only)."""

    name: str = "gpt2"
    """Hugging Face model name or local directory, as TransformerBridge.boot_transformers takes it."""
    revision: str | None = None
    """Model revision (HF branch, tag or commit)."""
    build_tiny: str | None = None
    """trained, random or null. Set: `name` is a cache directory and the sweep uses the tiny local GPT-2
    built under it on first use (`name/<kind>-<recipe fingerprint>`): trained (model=tiny: a few CPU
    minutes once, then reused; see activations/tiny_model.py) or random (instant; for fast tests).
    null: `name` is the model itself."""


@dataclass
class EvalConfig:
    """Model-level evaluation (LM data only)."""

    ce_loss: bool = True
    """Splice each SAE into the model and measure CE loss recovered and KL on held-out text."""
    n_contexts: int = 32
    """Held-out contexts for CE evaluation."""


@dataclass
class WandbConfig:
    """Weights & Biases tracking: one run per member, grouped by sweep."""

    mode: str | None = None
    """online, offline, disabled; null = online if WANDB_API_KEY is set, else offline."""
    project: str = "sae_ensemble"
    """wandb project."""
    entity: str | None = None
    """wandb entity (team or user)."""


@dataclass
class SweepConfig:
    """One outer-grid point: one store, one inner grid trained as ensembles across local devices."""

    name: str = "sweep"
    """Sweep name: the wandb group and the label of this run."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    layer: int = 0
    """LM: layer used by the default hook name."""
    hook: str = "blocks.${layer}.hook_resid_post"
    """LM: TransformerLens hook name whose activations are harvested."""
    grid: Grid = field(default_factory=Grid)
    training: Training = field(default_factory=Training)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    devices: str = "auto"
    """auto (all GPUs, else CPU), cpu, cpu:N (N CPU workers), cuda, or cuda:0,1,..."""
    plan_only: bool = False
    """Print the plan and exit without training."""
    progress: bool = True
    """Show progress bars."""


def register() -> None:
    """Register the schema and the `logspace` resolver (idempotent)."""
    if not OmegaConf.has_resolver("logspace"):
        OmegaConf.register_new_resolver(
            "logspace", lambda start, stop, n: [float(f"{v:.6g}") for v in np.logspace(float(start), float(stop), int(n))]
        )
    if not OmegaConf.has_resolver("repo_path"):
        # Files shipped in the repo (the tiny model's corpus) resolve wherever sweep.py is launched from.
        OmegaConf.register_new_resolver("repo_path", lambda relative: str(REPO / relative))
    ConfigStore.instance().store(name="sweep_schema", node=SweepConfig)


def validate(cfg: SweepConfig) -> list[str]:
    """Raise ConfigError on the first impossible value; return the resolved device list."""
    data, grid, training = cfg.data, cfg.grid, cfg.training
    checks = [
        (data.source in SOURCES, f"data.source={data.source!r} is unknown; allowed: {', '.join(SOURCES)}"),
        (all(v in VARIANTS for v in grid.variants), f"grid.variants={list(grid.variants)} has an unknown variant; allowed: {', '.join(VARIANTS)}"),
        (all(v > 0 for v in grid.l1) or not set(grid.variants) & set(L1_VARIANTS), f"grid.l1={list(grid.l1)} must hold positive values (use variant topk for no L1 term)"),
        (all(s >= 1 for s in grid.dict_sizes), f"grid.dict_sizes={list(grid.dict_sizes)} must all be at least 1"),
        (all(r > 0 for r in grid.dict_ratios), f"grid.dict_ratios={list(grid.dict_ratios)} must all be positive"),
        (bool(grid.dict_sizes or grid.dict_ratios), "the grid has no dictionary size: set grid.dict_sizes or grid.dict_ratios"),
        (all(b >= 0 for b in grid.bias_decay), f"grid.bias_decay={list(grid.bias_decay)} must be non-negative"),
        (all(lr > 0 for lr in grid.lr), f"grid.lr={list(grid.lr)} must hold positive learning rates"),
        (all(k >= 1 for k in grid.k) or not set(grid.variants) & set(K_VARIANTS), f"grid.k={list(grid.k)} must hold counts of at least 1"),
        (all(t > 0 for t in grid.target_l0), f"grid.target_l0={list(grid.target_l0)} must hold positive L0 targets (active features per row)"),
        (all(round(t) >= 1 for t in grid.target_l0) or "topk" not in grid.variants, f"grid.target_l0={list(grid.target_l0)} gives topk members k = round(target) < 1; use targets of at least 0.5"),
        (not grid.target_l0 or all(v in STEERABLE or v == "topk" for v in grid.variants),
         f"grid.target_l0 steers variants {', '.join(STEERABLE)} and sets k of topk; grid.variants={list(grid.variants)} has another"),
        (grid.l1_start > 0, f"grid.l1_start={grid.l1_start} must be positive (the starting coefficient of target-L0 members)"),
        (all(c >= 0 for c in grid.l0_coefficient), f"grid.l0_coefficient={list(grid.l0_coefficient)} must be non-negative"),
        (grid.threshold > 0 and grid.bandwidth > 0, f"grid.threshold={grid.threshold} and grid.bandwidth={grid.bandwidth} must be positive"),
        (0 < grid.topk_threshold_lr <= 1, f"grid.topk_threshold_lr={grid.topk_threshold_lr} must be in (0, 1]"),
        (all(0 < f < 1 for f in grid.matryoshka_fractions) and (grid.matryoshka_fractions or "matryoshka" not in grid.variants),
         f"grid.matryoshka_fractions={list(grid.matryoshka_fractions)} must be fractions in (0, 1), at least one for matryoshka"),
        (grid.auxk_dead_tokens >= 0 and grid.auxk_coefficient >= 0 and grid.k_aux >= 0,
         f"grid.auxk_dead_tokens={grid.auxk_dead_tokens}, grid.auxk_coefficient={grid.auxk_coefficient} and grid.k_aux={grid.k_aux} must be non-negative (auxk_dead_tokens=0: no AuxK)"),
        (grid.resample_every >= 0, f"grid.resample_every={grid.resample_every} must be non-negative (0: never resample)"),
        (not (grid.auxk_dead_tokens and training.execution in ("fused", "sparse") and set(grid.variants) & set(K_VARIANTS)),
         f"training.execution={training.execution} has no AuxK; with grid.auxk_dead_tokens > 0 use auto or reference"),
        (training.execution in ("auto", "reference") or set(grid.variants) <= {"relu", "tied", "topk"},
         f"training.execution={training.execution} implements relu, tied and topk only; grid.variants={list(grid.variants)} needs auto or reference"),
        (training.steps >= 1, f"training.steps={training.steps} must be at least 1"),
        (training.batch_size >= 1, f"training.batch_size={training.batch_size} must be at least 1"),
        (training.checkpoint_every >= 1, f"training.checkpoint_every={training.checkpoint_every} must be at least 1"),
        (training.log_every >= 1, f"training.log_every={training.log_every} must be at least 1"),
        (training.normalize in NORMALIZE_MODES, f"training.normalize={training.normalize!r} is unknown; allowed: {', '.join(NORMALIZE_MODES)}"),
        (training.dead_window_tokens >= 1, f"training.dead_window_tokens={training.dead_window_tokens} must be at least 1"),
        (training.eval_rows >= 1, f"training.eval_rows={training.eval_rows} must be at least 1"),
        (training.shuffle_window_chunks >= 1, f"training.shuffle_window_chunks={training.shuffle_window_chunks} must be at least 1"),
        (training.freeze_after >= 1, f"training.freeze_after={training.freeze_after} must be at least 1 (non-finite steps in a row before a member freezes)"),
        (training.execution in EXECUTIONS, f"training.execution={training.execution!r} is unknown; allowed: {', '.join(EXECUTIONS)}"),
        (training.matmul_precision in MATMUL_PRECISIONS, f"training.matmul_precision={training.matmul_precision!r} is unknown; allowed: {', '.join(MATMUL_PRECISIONS)}"),
        (not (training.autocast_bf16 and training.execution == "sparse"), "training.execution=sparse runs in float32; with training.autocast_bf16=true use auto, fused or reference"),
        (training.halving.problem(training.steps) is None, str(training.halving.problem(training.steps))),
        (data.verify in VERIFY_MODES, f"data.verify={data.verify!r} is unknown; allowed: {', '.join(VERIFY_MODES)}"),
        (data.heldout_rows >= 1, f"data.heldout_rows={data.heldout_rows} must be at least 1: the final metrics need held-out rows"),
        (cfg.model.build_tiny in (None, *TINY_MODEL_KINDS), f"model.build_tiny={cfg.model.build_tiny!r} is unknown; allowed: {', '.join(TINY_MODEL_KINDS)}, or null"),
        (cfg.eval.n_contexts >= 1, f"eval.n_contexts={cfg.eval.n_contexts} must be at least 1"),
        (cfg.wandb.mode in (None, "online", "offline", "disabled"), f"wandb.mode={cfg.wandb.mode!r} is unknown; allowed: online, offline, disabled, or null"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        parse_size(training.memory_budget)
        devices = resolve_devices(cfg.devices)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if training.autocast_bf16 and any(d.startswith("cpu") for d in devices):
        raise ConfigError(f"training.autocast_bf16=true needs CUDA devices; devices={cfg.devices!r} gives {devices}")
    return devices


def check_grid_fits(grid: Grid, d_in: int) -> None:
    """Grid checks that need the store's d_in: k within every dict size, no empty axis."""
    try:
        grid.members(d_in)
    except ValueError as error:
        raise ConfigError(str(error)) from None
