"""Each library's own loader reads our exports (SAEs and transcoders), and its encode/decode equals ours (atol 1e-5).

SAELens pins transformer-lens < 4, so no library shares .venv: `make interop` builds one venv per
library under .interop/, and tests/interop/check.py runs inside it on files written here. Without
a venv these tests skip with the reason; set SAE_REQUIRE_INTEROP=1 (CI) to fail instead.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sae_ensemble.export import export_run
from tests.test_export import (
    D_IN,
    build_architecture_run,
    build_run,
    build_transcoder_run,
    inputs,
    make_store,
    reference_outputs,
    transcoders,
)

REPO = Path(__file__).resolve().parents[1]
INTEROP = REPO / ".interop"
ATOL = 1e-5


def library_python(lib: str) -> Path:
    python = INTEROP / lib / "bin" / "python"
    if not (INTEROP / lib / ".installed").is_file():
        reason = f"{INTEROP / lib} is not built (run `make interop`)"
        if os.environ.get("SAE_REQUIRE_INTEROP") == "1":
            pytest.fail(f"SAE_REQUIRE_INTEROP=1 but {reason}")
        pytest.skip(reason)
    return python


def check_in_library(
    python: Path, lib: str, run_dir: Path, written: list[Path], shift: torch.Tensor, scale: float, label: str
) -> dict:
    """Run tests/interop/check.py in `lib`'s venv on our exports `written`, hold its differences to ATOL and
    return its report."""
    io_dir = run_dir.parent / "io"
    io_dir.mkdir()
    x = inputs()
    for directory in written:
        expected = reference_outputs(run_dir / "members" / directory.name, x, shift, scale)
        save_file(
            {name: value.contiguous() for name, value in expected.items()}, io_dir / f"{directory.name}.safetensors"
        )
    result = subprocess.run(
        [str(python), str(REPO / "tests" / "interop" / "check.py"), lib, str(written[0].parent), str(io_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(k for k in report if not k.startswith("_")) == sorted(d.name for d in written)
    worst = max(max(diffs.values()) for member_id, diffs in report.items() if not member_id.startswith("_"))
    print(f"{lib} {report['_versions']} {label}: largest |difference| {worst:.2e}")  # shown with pytest -s
    for member_id, diffs in report.items():
        if member_id.startswith("_"):
            continue
        assert max(diffs.values()) <= ATOL, f"{lib} {report['_versions']} on {member_id}: {diffs}"
    return report


@pytest.mark.parametrize("normalize", ["none", "center_scale"])
@pytest.mark.parametrize("lib", ["saelens", "dictionary_learning", "sparsify"])
def test_library_loads_our_export_and_matches_our_forward(tmp_path, lib, normalize):
    python = library_python(lib)
    store = make_store(tmp_path / "store")
    run_dir = build_run(tmp_path / "run", store, normalize)
    if lib == "saelens":  # SAELens also takes jumprelu, batchtopk and matryoshka (as jumprelu) and gated members
        build_architecture_run(run_dir, store, normalize)
    written = export_run(run_dir, lib, members="topk-*" if lib == "sparsify" else "*", store_dir=store.path)
    check_in_library(python, lib, run_dir, written, *store.normalization(normalize), label=f"normalize={normalize}")


SAELENS_TRANSCODERS = {  # cfg.json's architecture -> the class SAELens' own loader must build
    "transcoder": "Transcoder",
    "skip_transcoder": "SkipTranscoder",
    "jumprelu_transcoder": "JumpReLUTranscoder",
    "jumprelu_skip_transcoder": "JumpReLUSkipTranscoder",
}


@pytest.mark.parametrize("lib", ["saelens", "sparsify"])
def test_library_loads_our_transcoder_export_and_matches_our_forward(tmp_path, lib):
    """SAELens: relu, jumprelu, batchtopk, matryoshka transcoders; sparsify: topk (SparseCoder, transcode); each
    with and without the skip path, which the libraries' forward adds (decode omits it)."""
    python = library_python(lib)
    run_dir = build_transcoder_run(tmp_path / "run", transcoders(lib))
    written = export_run(run_dir, lib)
    report = check_in_library(python, lib, run_dir, written, torch.zeros(D_IN), 1.0, "transcoders")
    for directory in written:
        architecture = json.loads((directory / "cfg.json").read_text()).get("architecture")
        assert report["_classes"][directory.name] == SAELENS_TRANSCODERS.get(architecture, "SparseCoder")


def test_a_missing_library_venv_skips_locally_and_fails_when_required(monkeypatch, tmp_path):
    monkeypatch.setitem(globals(), "INTEROP", tmp_path)  # an empty .interop
    monkeypatch.delenv("SAE_REQUIRE_INTEROP", raising=False)
    with pytest.raises(pytest.skip.Exception, match="is not built"):
        library_python("saelens")
    monkeypatch.setenv("SAE_REQUIRE_INTEROP", "1")
    with pytest.raises(pytest.fail.Exception, match="SAE_REQUIRE_INTEROP=1 but"):
        library_python("saelens")
