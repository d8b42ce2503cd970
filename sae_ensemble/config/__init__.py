"""The sweep's config: every dataclass and default, each written once, in this package. A leaf: it imports
neither torch nor any module of ours outside it. choices.py holds the closed choices (Hydra checks them
itself), data.py the data sources, grid.py the inner grid's axes, training.py how members train.

`conf/config.yaml` and its groups fill these dataclasses in. `validate()` rejects the remaining impossible
values, one sentence each; a member's own rules (l1, k, lr, ...) are Member's, applied by grid.members().
Fields that change a run's results carry RESULT_CHANGING metadata: the resume check compares exactly those.
Grid axes take lists or `${logspace:START,STOP,N}`; `${repo_path:FILE}` names a file shipped in this repository.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The package's public names: every config dataclass and closed choice is importable from sae_ensemble.config.
from sae_ensemble.config.choices import (  # noqa: F401
    K_VARIANTS,
    KERNEL_VARIANTS,
    L1_VARIANTS,
    STEERABLE,
    TRANSCODER_VARIANTS,
    ExecutionKind,
    HalvingMetric,
    MatmulPrecision,
    NativeKernels,
    Normalize,
    StoreDtype,
    TinyModel,
    Variant,
    Verify,
    WandbMode,
)
from sae_ensemble.config.data import (  # noqa: F401
    Correlation,
    Geometry,
    Hierarchy,
    LMData,
    Magnitudes,
    ModelConfig,
    StoreConfig,
    SyntheticData,
    World,
    Zipf,
)
from sae_ensemble.config.grid import Grid
from sae_ensemble.config.training import (  # noqa: F401
    RESULT_CHANGING,
    Halving,
    Training,
    parse_size,
    result_changing,
    training_from_dict,
)

REPO = Path(__file__).resolve().parents[2]
MISSING = "???"  # omegaconf.MISSING, spelled out so this module needs no Hydra: the data group fills it


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and what is allowed."""


@dataclass
class EvalConfig:
    """The evaluation stage beside MMCS: CE in the language model (LM data only) and feature statistics."""

    ce_loss: bool = True
    """Splice each SAE into the model and measure CE loss recovered and KL on held-out text."""
    n_contexts: int = 32
    """Held-out contexts for CE evaluation."""
    features: bool = True
    """Each member's latent statistics and top-activating contexts on held-out rows (features.py; the report's
    member pages show them)."""
    feature_rows: int = 16_384
    """Held-out rows the feature statistics scan (at most the store's)."""
    feature_latents: int = 20
    """Latents shown per member: a quarter the most frequent, a quarter the rarest alive, the rest a sample."""
    feature_contexts: int = 10
    """Top-activating contexts kept per latent."""
    feature_window: int = 8
    """Tokens shown on each side of a context's top token (LM stores)."""


@dataclass
class WandbConfig:
    """Weights & Biases tracking: one run per member, grouped by sweep."""

    mode: WandbMode | None = None
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
    data: Any = MISSING
    """SyntheticData (data=synthetic) or LMData (data=lm)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The language model (LM data only; model=gpt2|pythia-70m|tiny)."""
    layer: int = 0
    """LM: layer used by the default hook name."""
    hook: str = "blocks.${layer}.hook_resid_post"
    """LM: TransformerLens hook name whose activations are harvested (data.hooks, when given, replaces it)."""
    grid: Grid = field(default_factory=Grid)
    """The inner grid: every combination of its axes is one member (grid=default|quick|paper|architectures)."""
    training: Training = field(default_factory=Training)
    """How every member trains."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Model-level evaluation (LM data)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Tracking (wandb=auto|offline|disabled)."""
    devices: str = "auto"
    """auto (all GPUs, else CPU), cpu, cpu:N (N CPU workers), cuda, or cuda:0,1,..."""
    plan_only: bool = False
    """Print the plan and exit without training."""
    progress: bool = True
    """Show progress bars."""


# -- checks that need nothing but the config -------------------------------------------------------


def validate(cfg: SweepConfig) -> None:
    """Raise ConfigError on the first value no member, store or device needs to be seen to refuse.

    Member rules (grid.members), the execution's (execution.check) and the devices' (devices.resolve)
    are applied by pipeline.validate, which calls this first."""
    data, grid, training = cfg.data, cfg.grid, cfg.training
    if not isinstance(data, StoreConfig):
        raise ConfigError(f"data={data!r} is not a data config; choose a group: data=synthetic or data=lm")
    checks = [
        (
            bool(grid.dict_sizes or grid.dict_ratios),
            "the grid has no dictionary size: set grid.dict_sizes or grid.dict_ratios",
        ),
        (all(r > 0 for r in grid.dict_ratios), f"grid.dict_ratios={list(grid.dict_ratios)} must all be positive"),
        (
            all(t > 0 for t in grid.target_l0),
            f"grid.target_l0={list(grid.target_l0)} must hold positive L0 targets (active features per row)",
        ),
        (
            all(round(t) >= 1 for t in grid.target_l0) or Variant.topk not in grid.variants,
            f"grid.target_l0={list(grid.target_l0)} gives topk members k = round(target) < 1; "
            "use targets of at least 0.5",
        ),
        (
            not grid.target_l0 or all(v in STEERABLE or v == Variant.topk for v in grid.variants),
            f"grid.target_l0 steers variants {', '.join(STEERABLE)} and sets k of topk; "
            f"grid.variants={[str(v) for v in grid.variants]} has another",
        ),
        (
            grid.l1_start > 0,
            f"grid.l1_start={grid.l1_start} must be positive (the starting coefficient of target-L0 members)",
        ),
        (
            all(0 < f < 1 for f in grid.matryoshka_fractions)
            and (grid.matryoshka_fractions or Variant.matryoshka not in grid.variants),
            f"grid.matryoshka_fractions={list(grid.matryoshka_fractions)} must be fractions in (0, 1), at least one "
            "for matryoshka",
        ),
        *(
            (getattr(training, name) >= 1, f"training.{name}={getattr(training, name)} must be at least 1")
            for name in (
                "steps",
                "batch_size",
                "checkpoint_every",
                "log_every",
                "dead_window_tokens",
                "eval_rows",
                "shuffle_window_chunks",
                "freeze_after",
            )
        ),
        (training.halving.problem(training.steps) is None, str(training.halving.problem(training.steps))),
        (
            data.heldout_rows >= 1,
            f"data.heldout_rows={data.heldout_rows} must be at least 1: the final metrics need held-out rows",
        ),
        (data.rows_per_chunk >= 1, f"data.rows_per_chunk={data.rows_per_chunk} must be at least 1"),
        (
            d_out(cfg) >= 0
            and getattr(data, "skip_std", 0.0) >= 0
            and (d_out(cfg) > 0 or not getattr(data, "skip_std", 0.0)),
            f"data.d_out={d_out(cfg)} and data.skip_std={getattr(data, 'skip_std', 0.0)} must be non-negative, and a "
            "true skip needs a paired store (data.d_out > 0)",
        ),
        (cfg.eval.n_contexts >= 1, f"eval.n_contexts={cfg.eval.n_contexts} must be at least 1"),
        *(
            (getattr(cfg.eval, name) >= 1, f"eval.{name}={getattr(cfg.eval, name)} must be at least 1")
            for name in ("feature_rows", "feature_latents", "feature_contexts")
        ),
        (cfg.eval.feature_window >= 0, f"eval.feature_window={cfg.eval.feature_window} must be non-negative"),
        *_hook_checks(cfg),
        *_world_checks(cfg),
        (
            transcoders(cfg) or grid.skip_connection == [False],
            f"grid.skip_connection={list(grid.skip_connection)} is for transcoders: a paired store (data=synthetic "
            "with data.d_out > 0, or data=lm with data.hooks_out)",
        ),
        (
            not transcoders(cfg) or str(training.normalize) == "none",
            f"training.normalize={training.normalize} is for SAEs; this run trains transcoders (data.d_out or "
            "data.hooks_out), which take training.normalize=none",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        parse_size(training.memory_budget)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def d_out(cfg: SweepConfig) -> int:
    """The members' output width as the config gives it: data.d_out of a paired synthetic store (transcoders),
    else 0 (SAEs, and LM transcoders, whose width only their harvested store knows)."""
    return getattr(cfg.data, "d_out", 0) if isinstance(cfg.data, SyntheticData) else 0


def transcoders(cfg: SweepConfig) -> bool:
    """True when the run trains transcoders: a paired synthetic store, or LM data with data.hooks_out."""
    return d_out(cfg) > 0 or bool(isinstance(cfg.data, LMData) and cfg.data.hooks_out)


def hooks_out(cfg: SweepConfig) -> list[str | None]:
    """The output hook of each of hooks(cfg), aligned with them: data.hooks_out, else None each (SAEs)."""
    if isinstance(cfg.data, LMData) and cfg.data.hooks_out:
        return list(cfg.data.hooks_out)
    return [None] * len(hooks(cfg))


def hooks(cfg: SweepConfig) -> list[str | None]:
    """The hooks a run trains on: data.hooks, else the one `hook` (LM data); [None] for a synthetic store."""
    if not isinstance(cfg.data, LMData):
        return [None]
    return list(cfg.data.hooks) or [cfg.hook]


def _hook_checks(cfg: SweepConfig) -> list[tuple[bool, str]]:
    data = cfg.data
    if not isinstance(data, LMData):
        return []
    given = list(data.hooks)
    return [
        (
            len(set(given)) == len(given) and all(isinstance(h, str) and h for h in given),
            f"data.hooks={given} must be distinct TransformerLens hook names (e.g. blocks.0.hook_resid_post)",
        ),
        (
            not (given and data.store),
            f"data.hooks={given} harvests one store per hook, and data.store={data.store} names one store: "
            "give one of them",
        ),
        (
            not data.hooks_out or len(data.hooks_out) == len(hooks(cfg)),
            f"data.hooks_out={list(data.hooks_out)} must name one output hook per input hook "
            f"({len(hooks(cfg))}: {hooks(cfg)}), in the same order",
        ),
        (
            all(isinstance(h, str) and h for h in data.hooks_out),
            f"data.hooks_out={list(data.hooks_out)} must be TransformerLens hook names (e.g. blocks.0.hook_mlp_out)",
        ),
    ]


def hierarchy_size(roots: int, branching: int, depth: int) -> int:
    """Features a forest of `roots` full trees of `branching` children per node and `depth` levels below uses."""
    return roots * sum(branching**level for level in range(depth + 1))


def welch_bound(n_features: int, d: int) -> float:
    """sqrt((N - D) / (D (N - 1))): no N unit vectors in D dimensions have a root-mean-square of each one's max
    |cos| below it (0 when N <= D: they can be orthogonal)."""
    return ((n_features - d) / (d * (n_features - 1))) ** 0.5 if n_features > d else 0.0


def _world_checks(cfg: SweepConfig) -> list[tuple[bool, str]]:
    data = cfg.data
    world = getattr(data, "world", None) if isinstance(data, SyntheticData) else None
    if world is None:
        return []
    n = data.n_features
    checks = [
        (
            data.d_out == 0,
            f"data.world describes SAEs' ground truth; data.d_out={data.d_out} (paired mode) uses the toy",
        ),
        (
            not (data.correlated and world.correlation),
            "data.correlated=true and data.world.correlation are two correlations; keep one",
        ),
    ]
    if (z := world.zipf) is not None:
        checks += [
            (z.exponent > 0, f"data.world.zipf.exponent={z.exponent} must be positive"),
            (
                0 < z.p_min < z.p_max <= 1,
                f"data.world.zipf.p_min={z.p_min} and p_max={z.p_max} must satisfy 0 < p_min < p_max <= 1",
            ),
        ]
    if (m := world.magnitudes) is not None:
        checks += [
            (
                m.mean_first > 0 and m.mean_last > 0,
                f"data.world.magnitudes.mean_first={m.mean_first} and mean_last={m.mean_last} must be positive",
            ),
            (
                m.std_mean >= 0 and m.std_spread >= 0,
                f"data.world.magnitudes.std_mean={m.std_mean} and std_spread={m.std_spread} must be non-negative",
            ),
        ]
    if (h := world.hierarchy) is not None:
        sizes_ok = h.roots >= 1 and h.branching >= 2 and h.depth >= 1
        checks += [
            (
                sizes_ok,
                f"data.world.hierarchy: roots={h.roots} must be at least 1, branching={h.branching} at least 2 "
                f"and depth={h.depth} at least 1",
            ),
            (
                not sizes_ok or hierarchy_size(h.roots, h.branching, h.depth) <= n,
                f"data.world.hierarchy: roots={h.roots}, branching={h.branching} and depth={h.depth} need "
                f"{hierarchy_size(h.roots, h.branching, h.depth) if sizes_ok else 0} features but "
                f"data.n_features={n}",
            ),
        ]
    if (c := world.correlation) is not None:
        checks += [
            (
                c.rank >= 1 and c.scale > 0,
                f"data.world.correlation.rank={c.rank} must be at least 1 and scale={c.scale} positive",
            ),
            (
                c.rank * c.scale**2 < 0.99,
                f"data.world.correlation: rank * scale^2 = {c.rank * c.scale**2:.3g} must stay below 0.99 (each "
                "feature keeps at least 1% independent variance); lower rank or scale",
            ),
        ]
    if (g := world.geometry) is not None:
        bound = welch_bound(n, data.d_in)
        checks += [
            (
                bound < g.target_mean_max_cos < 1,
                f"data.world.geometry.target_mean_max_cos={g.target_mean_max_cos} cannot be met by {n} features in "
                f"d_in={data.d_in} dimensions: it must lie in (the Welch bound {bound:.4f}, 1)",
            ),
            (
                g.max_steps >= 1 and g.lr > 0,
                f"data.world.geometry.max_steps={g.max_steps} must be at least 1 and lr={g.lr} positive",
            ),
        ]
    return checks


def register() -> None:
    """Register the schema with Hydra and the `logspace` and `repo_path` resolvers (idempotent)."""
    from hydra.core.config_store import ConfigStore  # here, not at the top: the engine never needs Hydra
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("logspace"):

        def logspace(start: str, stop: str, n: str) -> list[float]:
            import numpy as np

            return [float(f"{v:.6g}") for v in np.logspace(float(start), float(stop), int(n))]

        OmegaConf.register_new_resolver("logspace", logspace)
    if not OmegaConf.has_resolver("repo_path"):
        # Files shipped in the repo (the tiny model's corpus) resolve wherever sweep.py is launched from.
        OmegaConf.register_new_resolver("repo_path", lambda relative: str(REPO / relative))
    store = ConfigStore.instance()
    store.store(name="sweep_schema", node=SweepConfig)
    store.store(group="data", name="synthetic_schema", node=SyntheticData)
    store.store(group="data", name="lm_schema", node=LMData)
