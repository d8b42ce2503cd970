"""export.py: every format's files, read back with a plain re-implementation of that library's forward pass.

The real libraries load the same files in tests/test_interop.py; these tests run everywhere and
pin the layout (names, shapes, transposes, the normalisation fold) without them.
"""

import json
import re
import runpy
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sae_ensemble import architectures
from sae_ensemble.checkpoint import load_member, save_member
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.export import ExportError, export_run, main
from sae_ensemble.member import Member

D_IN, N = 12, 40
MEMBERS = [
    Member("relu", D_IN, N, l1=1e-3, seed=0),
    Member("tied", D_IN, N, l1=1e-3, seed=1),
    Member("topk", D_IN, N, k=5, seed=2),
    Member("relu", D_IN, N, l1=1e-3, seed=3, use_b_dec=False),
]  # its saved b_dec must not leak into the export
SHIFT_SCALE = 0.25  # the test store's rows are 0.25 * z + offset: a scale far from 1 shows a missed fold, values of
# order 1 keep float32 rounding (about 1e-7 relative) well inside the interop tests' atol of 1e-5


def random_params(member: Member, seed: int) -> dict[str, torch.Tensor]:
    """Params as a trained member saves them: unit-norm W_dec (the normalised encoder if tied), nonzero biases."""
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(member.dict_size, member.d_in, generator=g) / member.d_in**0.5
    W_dec = F.normalize(
        W_enc if member.variant == "tied" else torch.randn(member.dict_size, member.d_in, generator=g), dim=-1
    )
    return {
        "W_enc": W_enc,
        "b_enc": 0.3 * torch.randn(member.dict_size, generator=g),
        "W_dec": W_dec,
        "b_dec": torch.randn(member.d_in, generator=g),
    }


def build_run(run_dir: Path, store=None, normalize: str = "none") -> Path:
    """A run directory holding MEMBERS with random params, trained (on paper) with `normalize` on `store`."""
    for i, member in enumerate(MEMBERS):
        info = {"steps": 1, "tokens": 1, "normalize": normalize, "metrics": {}}
        if store is not None:
            info["store_fingerprint"] = store.fingerprint
        save_member(run_dir / "members" / member.member_id, member, random_params(member, i), None, info)
    return run_dir


def make_store(path: Path):
    """A store with nonzero mean and a scale far from 1, so normalisation matters."""
    from tests.test_store import write_store

    g = torch.Generator().manual_seed(7)
    return write_store(
        path, SHIFT_SCALE * torch.randn(256, D_IN, generator=g) + torch.linspace(-0.5, 0.5, D_IN), heldout_rows=32
    )


def reference_outputs(member_dir: Path, x: torch.Tensor, shift: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """What an export must compute on raw rows x [B, d], from our own encode/decode in the normalised space.

    Codes are scaled by `scale` (export.py folds the scale into them); reconstructions are in raw units.
    """
    member, params, _, _ = load_member(member_dir)
    module = architectures.module_of(member.variant)
    hp, layout = architectures.make_hparams(member), module.layout([member])
    codes = module.encode(params, hp, (x - shift) / scale, layout)
    if member.d_out:  # a transcoder (never normalised): y_hat adds the skip path x W_skip^T; decoded = without it
        recon = module.decode(params, hp, codes, layout, x)
        skip = x @ params["W_skip"].T if member.skip_connection else 0.0
        return {"x": x, "codes": codes, "recon": recon, "decoded": recon - skip}
    return {"x": x, "codes": scale * codes, "recon": scale * module.decode(params, hp, codes, layout) + shift}


def inputs(seed: int = 3, rows: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return SHIFT_SCALE * torch.randn(rows, D_IN, generator=g) + 0.1


def topk_dense(pre: torch.Tensor, k: int) -> torch.Tensor:
    values, indices = F.relu(pre).topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values)


# Plain forward passes in each library's conventions (their code: tests/interop/check.py runs it).
def saelens_forward(directory: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cfg, w = json.loads((directory / "cfg.json").read_text()), load_file(directory / "sae_weights.safetensors")
    assert w["W_enc"].shape == (cfg["d_in"], cfg["d_sae"]) and w["W_dec"].shape == (cfg["d_sae"], cfg["d_in"])
    pre = (x - w["b_dec"] * cfg["apply_b_dec_to_input"]) @ w["W_enc"] + w["b_enc"]
    codes = topk_dense(pre, cfg["k"]) if cfg["architecture"] == "topk" else F.relu(pre)
    return codes, codes @ w["W_dec"] + w["b_dec"]


def dictionary_learning_forward(directory: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = json.loads((directory / "config.json").read_text())["trainer"]
    state = torch.load(directory / "ae.pt", weights_only=True)  # a file this test just wrote
    b_dec = state["b_dec" if cfg["dict_class"] == "AutoEncoderTopK" else "bias"]
    pre = (x - b_dec) @ state["encoder.weight"].T + state["encoder.bias"]
    codes = topk_dense(pre, int(state["k"])) if cfg["dict_class"] == "AutoEncoderTopK" else F.relu(pre)
    return codes, codes @ state["decoder.weight"].T + b_dec


def sparsify_forward(directory: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cfg, w = json.loads((directory / "cfg.json").read_text()), load_file(directory / "sae.safetensors")
    assert cfg["num_latents"] == w["W_dec"].shape[0] and cfg["d_in"] == w["W_dec"].shape[1]
    assert cfg["skip_connection"] == ("W_skip" in w) and (not cfg["skip_connection"] or cfg["transcode"])
    codes = topk_dense((x - w["b_dec"] * (not cfg["transcode"])) @ w["encoder.weight"].T + w["encoder.bias"], cfg["k"])
    skip = x @ w["W_skip"].T if cfg["skip_connection"] else 0.0  # SparseCoder.forward: x @ W_skip.mT
    return codes, codes @ w["W_dec"] + w["b_dec"] + skip


FORWARD = {"saelens": saelens_forward, "dictionary_learning": dictionary_learning_forward, "sparsify": sparsify_forward}


@pytest.mark.parametrize("normalize", ["none", "center_scale"])
@pytest.mark.parametrize("fmt", ["saelens", "dictionary_learning", "sparsify"])
def test_export_reproduces_our_codes_and_reconstructions(tmp_path, fmt, normalize):
    store = make_store(tmp_path / "store")
    run_dir = build_run(tmp_path / "run", store, normalize)
    selection = "topk-*" if fmt == "sparsify" else "*"
    written = export_run(run_dir, fmt, members=selection, store_dir=store.path)
    assert len(written) == (1 if fmt == "sparsify" else len(MEMBERS))
    shift, scale = store.normalization(normalize)
    assert normalize == "none" or abs(scale - 1.0) > 0.5  # the fold is exercised
    x = inputs()
    for directory in written:
        expected = reference_outputs(run_dir / "members" / directory.name, x, shift, scale)
        codes, recon = FORWARD[fmt](directory, x)
        assert (codes > 0).any()
        torch.testing.assert_close(codes, expected["codes"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(recon, expected["recon"], atol=1e-5, rtol=1e-5)


def test_saelens_config_declares_what_the_loader_needs(tmp_path):
    run_dir = build_run(tmp_path / "run")
    (directory,) = export_run(run_dir, "saelens", members="topk-*")
    cfg = json.loads((directory / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 5 and cfg["d_sae"] == N and cfg["d_in"] == D_IN
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6
    assert {"model_name", "hook_name", "context_size", "prepend_bos"} <= set(cfg["metadata"])


@pytest.mark.parametrize(
    "data",
    [
        "  source: lm\n",
        "  dataset: ${repo_path:data/tiny_corpus.txt}\n",
    ],  # LMData has no `source` field: it has a dataset
    ids=["before-the-data-split", "lm-data"],
)
def test_saelens_metadata_comes_from_the_runs_hydra_config(tmp_path, data):
    run_dir = build_run(tmp_path / "run")
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text(
        f"data:\n{data}  context_length: 32\n  store_root: stores\n"
        "model:\n  name: ${data.store_root}/models/tiny-gpt2\nlayer: 1\nhook: blocks.${layer}.hook_resid_post\n"
    )
    (directory,) = export_run(run_dir, "saelens", members="relu-*-s0")
    metadata = json.loads((directory / "cfg.json").read_text())["metadata"]
    assert metadata["model_name"] == "stores/models/tiny-gpt2" and metadata["hook_name"] == "blocks.1.hook_resid_post"
    assert metadata["context_size"] == 32 and metadata["prepend_bos"] is True


def test_sparsify_refuses_relu_members_and_writes_nothing(tmp_path):
    run_dir = build_run(tmp_path / "run")
    with pytest.raises(ExportError, match="sparsify cannot express variant.*relu.*select those with --members"):
        export_run(run_dir, "sparsify")
    assert not (run_dir / "export").exists()


def test_normalised_member_without_store_is_refused(tmp_path):
    store = make_store(tmp_path / "store")
    run_dir = build_run(tmp_path / "run", store, "center")
    with pytest.raises(ExportError, match="normalize='center'; pass --store"):
        export_run(run_dir, "saelens")


def test_cli_refuses_with_a_one_line_error_and_exit_2_and_exports_the_selected_members(tmp_path, capsys):
    run_dir = build_run(tmp_path / "run")
    assert main([str(run_dir), "--format", "sparsify"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: sparsify cannot express")
    assert main([str(run_dir), "--format", "saelens", "--members", "nothing-*"]) == 2
    assert "matches --members 'nothing-*'" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main([str(run_dir), "--format", "dictionary_learning", "--members", "relu-*-s0", "--out", str(out)]) == 0
    assert [p.name for p in out.iterdir()] == [MEMBERS[0].member_id]


def test_module_runs_as_a_script(tmp_path, monkeypatch, capsys):
    """`python -m sae_ensemble.export ...`, its `__main__` block included, in this process."""
    run_dir = build_run(tmp_path / "run")
    monkeypatch.setattr(sys, "argv", ["sae_ensemble.export", str(run_dir), "--format", "saelens"])
    with pytest.raises(SystemExit) as exited, warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "'sae_ensemble.export' found in sys.modules", RuntimeWarning
        )  # runpy re-runs an imported module
        runpy.run_module("sae_ensemble.export", run_name="__main__")
    out, err = capsys.readouterr()
    assert exited.value.code == 0, err
    assert len(out.split()) == len(MEMBERS)
    assert all((Path(p) / "sae_weights.safetensors").is_file() for p in out.split())


ARCHITECTURE_MEMBERS = [
    Member("jumprelu", D_IN, N, l0_coefficient=1e-3, seed=0),
    Member("batchtopk", D_IN, N, k=5, seed=1),
    Member("matryoshka", D_IN, N, k=5, seed=2, matryoshka_widths=(8,)),
    Member("gated", D_IN, N, l1=1e-3, seed=3),
]


def architecture_params(member: Member, seed: int) -> dict[str, torch.Tensor]:
    """Params as a trained member of another architecture saves them: thresholds where codes are, nonzero biases."""
    g = torch.Generator().manual_seed(seed)
    params = {
        name: 0.3 * torch.randn(value.shape, generator=g) for name, value in architectures.init_params(member).items()
    }
    params["W_enc"] = torch.randn(N, D_IN, generator=g) / D_IN**0.5
    params["W_dec"] = F.normalize(torch.randn(N, D_IN, generator=g), dim=-1)
    if "log_threshold" in params:
        params["log_threshold"] = torch.log(0.1 + 0.2 * torch.rand(N, generator=g))
    if "threshold" in params:
        params["threshold"] = torch.tensor(0.15)
    return params


def saelens_architecture_forward(directory: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens' JumpReLUSAE.encode and GatedSAE.encode, written out."""
    cfg, w = json.loads((directory / "cfg.json").read_text()), load_file(directory / "sae_weights.safetensors")
    centred = x - w["b_dec"] * cfg["apply_b_dec_to_input"]
    if cfg["architecture"] == "gated":
        gate = (centred @ w["W_enc"] + w["b_gate"] > 0).float()
        codes = gate * F.relu(centred @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
    else:
        assert cfg["architecture"] == "jumprelu" and w["threshold"].shape == (cfg["d_sae"],)
        pre = centred @ w["W_enc"] + w["b_enc"]
        codes = F.relu(pre) * (pre > F.relu(w["threshold"])).float()
    return codes, codes @ w["W_dec"] + w["b_dec"]


def build_architecture_run(run_dir: Path, store, normalize: str) -> Path:
    """A run directory holding ARCHITECTURE_MEMBERS with random params, trained (on paper) with `normalize` on
    `store`."""
    for i, member in enumerate(ARCHITECTURE_MEMBERS):
        save_member(
            run_dir / "members" / member.member_id,
            member,
            architecture_params(member, i),
            None,
            {"steps": 1, "tokens": 1, "normalize": normalize, "metrics": {}, "store_fingerprint": store.fingerprint},
        )
    return run_dir


@pytest.mark.parametrize("normalize", ["none", "center_scale"])
def test_saelens_export_of_every_architecture_reproduces_our_inference(tmp_path, normalize):
    store = make_store(tmp_path / "store")
    run_dir = build_architecture_run(tmp_path / "run", store, normalize)
    written = export_run(run_dir, "saelens", store_dir=store.path)
    assert len(written) == len(ARCHITECTURE_MEMBERS)
    shift, scale = store.normalization(normalize)
    x = inputs()
    for directory in written:
        expected = reference_outputs(run_dir / "members" / directory.name, x, shift, scale)
        codes, recon = saelens_architecture_forward(directory, x)
        assert (codes > 0).any() and (codes == 0).any()
        torch.testing.assert_close(codes, expected["codes"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(recon, expected["recon"], atol=1e-5, rtol=1e-5)


def test_dictionary_learning_refuses_the_architectures_it_does_not_take_yet(tmp_path):
    run_dir = tmp_path / "run"
    member = ARCHITECTURE_MEMBERS[0]
    save_member(
        run_dir / "members" / member.member_id, member, architecture_params(member, 0), None, {"steps": 1, "tokens": 1}
    )
    with pytest.raises(ExportError, match=r"dictionary_learning cannot express variant\(s\) \['jumprelu'\]"):
        export_run(run_dir, "dictionary_learning")
    assert not (run_dir / "export").exists()


D_OUT = 8  # a transcoder's output width (sparsify's transcoders have one width: d_out = d_in)


def transcoders(fmt: str) -> list[Member]:
    """Transcoders `fmt` holds, each with and without the skip path: SAELens relu, jumprelu, batchtopk and
    matryoshka (d_out 8 of d_in 12), sparsify topk."""
    if fmt == "sparsify":
        return [Member("topk", D_IN, N, k=5, lr=1e-2, d_out=D_IN, skip_connection=s, seed=s) for s in (0, 1)]
    kinds = [{"variant": "relu"}, {"variant": "jumprelu"}, {"variant": "batchtopk", "k": 5}]
    kinds += [{"variant": "matryoshka", "k": 5, "matryoshka_widths": (8,)}]
    return [
        Member(d_in=D_IN, dict_size=N, lr=1e-2, d_out=D_OUT, skip_connection=s, **kind)
        for kind in kinds
        for s in (0, 1)
    ]


def build_transcoder_run(run_dir: Path, members: list[Member], normalize: str = "none") -> Path:
    """A run directory holding `members` trained 20 steps on random [x | y] rows (lr 1e-2: W_skip leaves zero)."""
    g = torch.Generator().manual_seed(5)
    for member in members:
        ensemble = Ensemble([member], 20, execution="reference")
        for _ in range(20):
            ensemble.step(torch.randn(64, member.d_in + member.d_out, generator=g))
        params, _ = ensemble.member_state(0)
        info = {"steps": 20, "tokens": 1280, "normalize": normalize, "metrics": {}}
        save_member(run_dir / "members" / member.member_id, member, params, None, info)
    return run_dir


def saelens_transcoder_forward(directory: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens' (JumpReLU)Transcoder.encode and (JumpReLU)SkipTranscoder.forward (decode + x @ W_skip.T)."""
    cfg, w = json.loads((directory / "cfg.json").read_text()), load_file(directory / "sae_weights.safetensors")
    assert cfg["apply_b_dec_to_input"] is False and w["W_dec"].shape == (cfg["d_sae"], cfg["d_out"])
    pre = x @ w["W_enc"] + w["b_enc"]
    codes = F.relu(pre) * (pre > w["threshold"]) if "jumprelu" in cfg["architecture"] else F.relu(pre)
    skip = x @ w["W_skip"].T if "skip" in cfg["architecture"] else 0.0
    return codes, codes @ w["W_dec"] + w["b_dec"] + skip


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_transcoder_export_reproduces_our_codes_and_outputs(tmp_path, fmt):
    run_dir = build_transcoder_run(tmp_path / "run", transcoders(fmt))
    written = export_run(run_dir, fmt)
    x = inputs()
    for directory in written:
        member = load_member(run_dir / "members" / directory.name)[0]
        cfg = json.loads((directory / "cfg.json").read_text())
        if fmt == "saelens":
            name = "transcoder" if member.variant == "relu" else "jumprelu_transcoder"
            assert cfg["architecture"] == name.replace("transcoder", "skip_" * member.skip_connection + "transcoder")
            assert cfg["d_out"] == D_OUT and cfg["metadata"]["hook_name_out"] == "unknown"  # a run without .hydra
        else:
            assert cfg["transcode"] is True and cfg["skip_connection"] == member.skip_connection
        expected = reference_outputs(run_dir / "members" / directory.name, x, torch.zeros(D_IN), 1.0)
        codes, recon = (saelens_transcoder_forward if fmt == "saelens" else sparsify_forward)(directory, x)
        assert (codes > 0).any() and (codes == 0).any()
        assert ((expected["recon"] - expected["decoded"]).abs().max() > 1e-2) == member.skip_connection
        torch.testing.assert_close(codes, expected["codes"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(recon, expected["recon"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "hooks, several, hook_out",  # several: the member names its input hook (Member.hook), one of data.hooks
    [
        ("  hooks_out: [blocks.1.hook_mlp_out]\n", False, "blocks.1.hook_mlp_out"),
        ("  hooks: [blocks.0.ln2.hook_normalized, HOOK]\n  hooks_out: [a, b]\n", True, "b"),
        ("", False, "unknown"),  # an LM run without data.hooks_out: the placeholder SAEs get
    ],
    ids=["one-hook", "several-hooks", "no-hooks-out"],
)
def test_saelens_transcoder_names_its_output_hook_from_the_runs_config(tmp_path, hooks, several, hook_out):
    hook_in = "blocks.1.ln2.hook_normalized"
    member = Member("relu", D_IN, N, d_out=D_OUT, hook=hook_in if several else None)
    run_dir = build_transcoder_run(tmp_path / "run", [member])
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text(
        f"data:\n  dataset: corpus.txt\n{hooks.replace('HOOK', hook_in)}model:\n  name: tiny\nhook: {hook_in}\n"
    )
    (directory,) = export_run(run_dir, "saelens")
    metadata = json.loads((directory / "cfg.json").read_text())["metadata"]
    assert metadata["hook_name"] == hook_in and metadata["hook_name_out"] == hook_out


@pytest.mark.parametrize(
    "member, fmt, normalize, message",
    [
        (Member("topk", D_IN, N, k=5, d_out=D_IN), "saelens", "none", "SAELens has no topk transcoder .*; its"),
        (Member("relu", D_IN, N, d_out=D_IN), "sparsify", "none", r"sparsify cannot express variant\(s\) \['relu'\]"),
        (Member("topk", D_IN, N, k=5, d_out=D_OUT), "sparsify", "none", "has d_in=12, d_out=8; export it to saelens"),
        (Member("topk", D_IN, N, k=5, d_out=D_IN), "dictionary_learning", "none", "dictionary_learning has no transc"),
        (Member("relu", D_IN, N, d_out=D_OUT), "saelens", "center", "trained with normalize='center'; transcoders"),
    ],
    ids=["topk-to-saelens", "relu-to-sparsify", "two-widths-to-sparsify", "to-dictionary_learning", "normalised"],
)
def test_an_inexpressible_transcoder_is_refused_with_one_line_and_exit_2(
    tmp_path, capsys, member, fmt, normalize, message
):
    run_dir = build_transcoder_run(tmp_path / "run", [member], normalize)
    assert main([str(run_dir), "--format", fmt]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and re.search(message, err), err
    assert not (run_dir / "export").exists()
