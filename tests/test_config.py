"""The sweep's config in-process: Hydra refuses a closed choice's unknown value while composing, the pipeline
refuses every other impossible value with one sentence before any work, and the config is a documented leaf."""

import ast
import dataclasses
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

from sae_ensemble import pipeline
from sae_ensemble.config import ConfigError, Grid, Training, result_changing
from sae_ensemble.grid import members
from tests.sweeps import compose_config

REPO = Path(__file__).resolve().parents[1]


# -- closed choices: Hydra's own check, at compose time ---------------------------------------------


@pytest.mark.parametrize(
    "override,key,allowed",
    [
        (
            "grid.variants=[relu,crosscoder]",
            "grid.variants[1]",
            "[relu, tied, topk, batchtopk, matryoshka, jumprelu, gated]",
        ),
        ("data.dtype=int8", "data.dtype", "[float32, float16, bfloat16]"),
        ("data.verify=never", "data.verify", "[size, once, checksum]"),
        ("training.normalize=zscore", "training.normalize", "[none, center, center_scale]"),
        ("training.execution=bogus", "training.execution", "[auto, reference, fused, sparse]"),
        ("training.matmul_precision=fast", "training.matmul_precision", "[highest, high, medium]"),
        ("training.halving.metric=loss", "training.halving.metric", "[auto, pareto, mmcs_truth, fvu]"),
        ("model.build_tiny=trianed", "model.build_tiny", "[trained, random]"),
        ("wandb.mode=cloud", "wandb.mode", "[online, offline, disabled]"),
    ],
    ids=[
        "variant",
        "store-dtype",
        "verify",
        "normalize",
        "execution",
        "matmul-precision",
        "halving-metric",
        "build-tiny",
        "wandb-mode",
    ],
)
def test_an_unknown_closed_choice_is_hydras_error_naming_the_key_and_the_allowed_values(override, key, allowed):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(override)
    value = override.split("=")[1].strip("[]").split(",")[-1]
    assert f"Error merging override {override}" in str(error.value)
    cause = str(error.value.__cause__)  # what Hydra prints below its first line
    assert f"Invalid value '{value}', expected one of {allowed}" in cause and f"full_key: {key}" in cause, cause


def test_an_unknown_data_group_is_hydras_error_listing_the_groups_options():
    with pytest.raises(MissingConfigException, match=r"Could not find 'data/images'") as error:
        compose_config("data=images")
    assert {"synthetic", "lm"} <= set(error.value.options)


def test_a_malformed_override_and_a_mistyped_value_are_hydras_errors():
    with pytest.raises(OverrideParseException, match=re.escape("no viable alternative at input '[abc'")):
        compose_config("grid.l1=[abc")
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("training.steps=many")
    assert "Value 'many' of type 'str' could not be converted to Integer" in str(error.value.__cause__)


# -- every other impossible value: pipeline.validate, one sentence ----------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["grid.l1=[-0.001]"], "grid: l1=-0.001 of a relu member must be positive (variant topk has no L1 term)"),
        (["grid.dict_sizes=[0]"], "grid: d_in=256 and dict_size=0 must both be at least 1"),
        (
            ["grid.variants=[topk]", "grid.k=[999]", "grid.dict_sizes=[64]", "grid.dict_ratios=[]"],
            "grid: k=999 must be between 1 and dict_size=64 for a topk member",
        ),
        (["grid.seeds=[]"], "grid: the grid axis seeds is empty"),
        (["grid.target_l0=[8,-2]"], "grid.target_l0=[8.0, -2.0] must hold positive L0 targets"),
        (["grid.dict_ratios=[]"], "the grid has no dictionary size: set grid.dict_sizes or grid.dict_ratios"),
        (["devices=tpu"], "devices='tpu' is unknown; allowed: auto, cpu, cpu:N"),
        (["devices=cuda:3"], "devices='cuda:3' asks for GPU(s)"),
        (["training.halving.rungs=[0.5,0.25]"], "training.halving.rungs=[0.5, 0.25] fall on steps [1500, 750]"),
        (["training.memory_budget=lots"], "training.memory_budget='lots' is not a size"),
        (["data.d_out=-4"], "data.d_out=-4 and data.skip_std=0.0 must be non-negative"),
        (["data.skip_std=0.1"], "a true skip needs a paired store (data.d_out > 0)"),
        (
            ["grid.variants=[jumprelu]", "training.execution=fused"],
            "training.execution=fused implements relu, tied, topk without AuxK only; "
            "variants ['jumprelu'] (AuxK off) need",
        ),
        (["training.autocast_bf16=true", "devices=cpu"], "training.autocast_bf16=true needs CUDA devices"),
    ],
    ids=[
        "negative-l1",
        "dict-size",
        "k-too-big",
        "empty-grid",
        "target-l0",
        "no-dict-size",
        "device",
        "too-many-gpus",
        "halving-rungs",
        "memory-budget",
        "negative-d-out",
        "skip-without-pairs",
        "execution-variant",
        "bf16-on-cpu",
    ],
)
def test_a_bad_value_is_one_sentence_naming_it_before_any_work(overrides, message):
    cfg = compose_config(*overrides)
    with pytest.raises(ConfigError) as error:
        pipeline.validate(cfg)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_the_default_config_is_valid():
    assert pipeline.validate(compose_config("devices=cpu:2")) == ["cpu:0", "cpu:1"]


# -- the grid ---------------------------------------------------------------------------------------


def test_the_grid_expands_into_every_combination_with_stable_readable_ids():
    grid = Grid(
        variants=["relu", "tied", "topk"],
        dict_sizes=[512],
        dict_ratios=[4],
        l1=[1e-3, 3e-4],
        k=[16],
        bias_decay=[0.0, 0.05],
        seeds=[0, 1],
    )
    expanded = members(grid, d_in=256)
    # relu and tied: 2 sizes x 2 l1 x 2 bias decays x 2 seeds; topk: 2 sizes x 1 k x 2 x 2.
    assert len(expanded) == 2 * 16 + 8
    ids = [m.member_id for m in expanded]
    assert len(set(ids)) == len(ids) and ids == [m.member_id for m in members(grid, d_in=256)]
    assert "relu-d512-l1_0.001-bd0.05-lr0.001-s0" in ids and "topk-d1024-k16-bd0-lr0.001-s1" in ids


def test_learned_decoder_norm_applies_to_the_grids_topk_saes_only():
    grid = Grid(variants=["relu", "topk"], dict_sizes=[64], dict_ratios=[], l1=[1e-3], k=[4], learned_decoder_norm=True)
    expanded = {m.variant: m for m in members(grid, d_in=16)}
    assert expanded["topk"].learned_decoder_norm and expanded["topk"].member_id == "topk-d64-k4-ldn-bd0-lr0.001-s0"
    assert not expanded["relu"].learned_decoder_norm
    assert not any(m.learned_decoder_norm for m in members(grid, d_in=16, d_out=8))  # transcoders keep unit rows


# -- the config module itself -----------------------------------------------------------------------


def test_loading_the_config_imports_no_torch():
    code = "import sys, sae_ensemble.config; assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def config_sources() -> list[Path]:
    """The files of sae_ensemble.config, found without importing it (a module or a package)."""
    spec = importlib.util.find_spec("sae_ensemble.config")
    if spec.submodule_search_locations:
        return sorted(p for location in spec.submodule_search_locations for p in Path(location).rglob("*.py"))
    return [Path(spec.origin)]


def config_fields(path: Path) -> dict[str, bool]:
    """{`Class.field`: whether a docstring stands right under it} for every dataclass field in `path`."""
    fields = {}
    for node in ast.walk(ast.parse(path.read_text())):
        decorators = [d.func if isinstance(d, ast.Call) else d for d in getattr(node, "decorator_list", [])]
        if not isinstance(node, ast.ClassDef) or not any(
            getattr(d, "id", getattr(d, "attr", None)) == "dataclass" for d in decorators
        ):
            continue
        for statement, following in zip(node.body, [*node.body[1:], None]):
            if isinstance(statement, ast.AnnAssign):
                docstring = (
                    isinstance(following, ast.Expr)
                    and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)
                )
                fields[f"{node.name}.{statement.target.id}"] = docstring
    return fields


def test_every_config_dataclass_field_has_a_docstring():
    fields = {name: documented for path in config_sources() for name, documented in config_fields(path).items()}
    assert {"Training.matmul_precision", "SyntheticData.d_in", "Grid.variants", "SweepConfig.devices"} <= set(
        fields
    )  # all found
    missing = sorted(name for name, documented in fields.items() if not documented)
    assert not missing, f"config fields without a docstring: {missing}"


def test_every_training_field_is_fixed_on_resume_or_known_not_to_change_results():
    fixed = set(result_changing(Training))
    before_the_restructure = {
        "steps",
        "batch_size",
        "data_seed",
        "normalize",
        "dead_window_tokens",
        "eval_rows",
        "autocast_bf16",
        "shuffle_window_chunks",
        "halving",
    }  # sweep.py's old hand list, RESUME_FIXED
    assert before_the_restructure | {"matmul_precision", "freeze_after"} <= fixed  # and the two it forgot
    # A new field must be classified: these alone may change on a resume (logging, checkpoint spacing, the exit
    # policy, executions equal to 1e-5 and the C kernels equal bit for bit but the order of sums, the memory budget:
    # planned ensembles stay as they are).
    free = {f.name for f in dataclasses.fields(Training)} - fixed
    expected = {
        "checkpoint_every",
        "log_every",
        "allow_frozen",
        "execution",
        "compile",
        "native_kernels",
        "memory_budget",
    }
    assert free == expected, free


# -- synthetic worlds: a bad description stops before any work --------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["data=synthetic_hier", "data.n_features=1000"],
            "data.world.hierarchy: roots=32, branching=4 and depth=3 need 2720 features but data.n_features=1000",
        ),
        (
            ["data=synthetic_hier", "data.world.zipf.p_min=0.5"],
            "data.world.zipf.p_min=0.5 and p_max=0.4 must satisfy 0 < p_min < p_max <= 1",
        ),
        (
            ["data=synthetic_hier", "data.world.geometry.target_mean_max_cos=0.05"],
            "data.world.geometry.target_mean_max_cos=0.05 cannot be met by 4096 features in d_in=256 dimensions: it "
            "must lie in (the Welch bound 0.0605, 1)",
        ),
        (["data=synthetic_hier", "data.world.hierarchy.branching=0"], "branching=0 at least 2"),
        (["data=synthetic_hier", "data.world.correlation.scale=0.3"], "rank * scale^2 = 2.25 must stay below 0.99"),
        (["data=synthetic_hier", "data.world.magnitudes.mean_first=0"], "data.world.magnitudes.mean_first=0.0"),
        (["data=synthetic_hier", "data.d_out=8"], "data.world describes SAEs' ground truth"),
    ],
    ids=[
        "forest-too-big",
        "p-min-above-p-max",
        "overlap-below-welch",
        "branching",
        "correlation",
        "magnitude",
        "paired",
    ],
)
def test_a_bad_world_is_one_sentence_naming_its_field(overrides, message):
    with pytest.raises(ConfigError) as error:
        pipeline.validate(compose_config(*overrides))
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


@pytest.mark.parametrize("preset", ["synthetic_hier", "synthsaebench16k"])
def test_the_world_presets_are_valid(preset):
    cfg = compose_config(f"data={preset}", "devices=cpu")
    pipeline.validate(cfg)
    assert cfg.data.world.hierarchy.exclusive and cfg.data.world.zipf.exponent == 0.5


def test_a_bad_world_exits_2_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, "sweep.py", "data=synthetic_hier", "data.world.zipf.p_min=0.5", f"data.store_root={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "data.world.zipf.p_min=0.5" in result.stderr + result.stdout
    assert not list(tmp_path.iterdir())  # no store written
