"""summary.csv, plots and the report CLI on run directories built by a tiny trained ensemble."""

import csv
import runpy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_ensemble.checkpoint import save_member
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.eval_worker import evaluate_members_of_run
from sae_ensemble.html_report.figures import mmcs_cells
from sae_ensemble.member import Member
from sae_ensemble.metrics import FiringCounter, mmcs, mmcs_truth, reconstruction_metrics
from sae_ensemble.report import COLUMNS, format_table, load_rows, pareto_front, write_plots, write_summary

D_IN = 6
MEMBERS = [
    Member("relu", D_IN, size, l1=l1, seed=seed, lr=1e-2) for size in (8, 16) for l1 in (1e-3, 1e-1) for seed in (0, 1)
] + [Member("topk", D_IN, 16, k=2, lr=1e-2), Member("tied", D_IN, 8, l1=1e-2, lr=1e-2)]


def build_run_dir(run_dir: Path, with_frequencies: bool) -> Path:
    """Train a tiny ensemble on sparse combinations of 4 true features and save every member."""
    g = torch.Generator().manual_seed(0)
    truth = torch.nn.functional.normalize(torch.randn(4, D_IN, generator=g), dim=-1)
    ensemble = Ensemble(MEMBERS, total_steps=20)
    counter = FiringCounter(len(MEMBERS), ensemble.n_padded, window_tokens=10_000)
    for _ in range(20):
        batch = (torch.rand(64, 4, generator=g) * (torch.rand(64, 4, generator=g) < 0.3)) @ truth
        stats = ensemble.step(batch)
        counter.update(stats["fired"], batch.shape[0])
    mask = ensemble.hparams["feature_mask"]
    codes, x_hat = ensemble.forward(batch)
    metrics = reconstruction_metrics(batch, x_hat, codes, mask)
    pad = [(0, 0, 0, ensemble.n_padded - m.dict_size) for m in MEMBERS]
    decoders = torch.stack(
        [torch.nn.functional.pad(ensemble.member_state(i)[0]["W_dec"], pad[i]) for i in range(len(MEMBERS))]
    )
    truth_scores = mmcs_truth(decoders, mask, truth)
    dead = counter.dead_fraction(mask)
    frequencies = counter.frequencies()
    for index, member in enumerate(MEMBERS):
        params, moments = ensemble.member_state(index)
        member_metrics = {name: float(value[index]) for name, value in metrics.items()}
        member_metrics.update(dead_frac=float(dead[index]), mmcs_truth=float(truth_scores[index]))
        info = {"steps": 20, "tokens": 20 * 64, "alive": bool(ensemble.alive[index]), "metrics": member_metrics}
        frequency = frequencies[index, : member.dict_size] if with_frequencies else None
        save_member(run_dir / "members" / member.member_id, member, params, moments, info=info, frequency=frequency)
    # The evaluation stage (eval_worker.py; a sweep runs it in its workers): MMCS between dictionaries into eval.json.
    assert evaluate_members_of_run(run_dir, [m.member_id for m in MEMBERS], MEMBERS, torch.device("cpu"))
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return build_run_dir(tmp_path_factory.mktemp("run"), with_frequencies=True)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_summary_has_one_sorted_row_per_member_with_metrics_and_mmcs(run_dir):
    rows = read_csv(write_summary(run_dir))
    assert [r["member_id"] for r in rows] == sorted(m.member_id for m in MEMBERS)
    columns = [c for c in COLUMNS if c != "hook"]  # a run over one store: the hook is the run's, not a column
    assert list(rows[0])[: len(columns)] == columns
    by_id = {r["member_id"]: r for r in rows}
    for member in MEMBERS:
        row = by_id[member.member_id]
        assert (
            float(row["l1"]) == member.l1
            and int(row["dict_size"]) == member.dict_size
            and int(row["seed"]) == member.seed
        )
        assert row["ce_recovered"] == ""  # never evaluated on an LM
        assert 0 <= float(row["fvu"]) and 0 <= float(row["dead_frac"]) <= 1 and 0 < float(row["mmcs_truth"]) <= 1 + 1e-6
        # SAELens names sit in their own columns; explained_variance is 1 - fvu by definition
        assert float(row["explained_variance"]) == pytest.approx(1 - float(row["fvu"]), abs=2e-6)
        assert all(row[c] != "" for c in ("cossim", "l2_ratio", "relative_reconstruction_bias"))

    def decoder(member):
        return load_file(run_dir / "members" / member.member_id / "sae.safetensors")["W_dec"]

    small, large, other_seed = MEMBERS[0], MEMBERS[4], MEMBERS[1]  # d8 l1=1e-3 s0, d16 l1=1e-3 s0, d8 l1=1e-3 s1
    assert float(by_id[small.member_id]["mmcs_next"]) == pytest.approx(mmcs(decoder(small), decoder(large)), abs=1e-6)
    assert by_id[large.member_id]["mmcs_next"] == ""  # no larger dict
    assert float(by_id[small.member_id]["mmcs_seed"]) == pytest.approx(
        mmcs(decoder(small), decoder(other_seed)), abs=1e-6
    )
    assert by_id[MEMBERS[-1].member_id]["mmcs_seed"] == ""  # the tied member has no seed partner


def test_plots_are_written_and_non_empty(run_dir):
    paths = write_plots(run_dir)
    assert {p.name for p in paths} == {
        "pareto_l0_fvu.png",
        "mmcs_heatmap.png",
        "dead_vs_l1.png",
        "feature_frequency.png",
    }
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_mmcs_cells_average_each_sparsity_and_size_over_the_other_hyperparameters(run_dir):
    rows = load_rows(run_dir)
    grids = mmcs_cells(rows, "mmcs_truth")  # what plots/mmcs_heatmap.png and the HTML report's heatmap show
    assert list(grids) == ["relu", "tied", "topk"]
    relu = grids["relu"]
    assert (relu.knob, relu.knob_values, relu.dict_sizes) == ("l1", [1e-3, 1e-1], [8, 16])
    for i, l1 in enumerate(relu.knob_values):
        for j, size in enumerate(relu.dict_sizes):
            seeds = [r["mmcs_truth"] for r in rows if (r["variant"], r["l1"], r["dict_size"]) == ("relu", l1, size)]
            assert len(seeds) == 2 and relu.means[i][j] == pytest.approx(sum(seeds) / 2, rel=1e-12)
    assert (grids["topk"].knob, grids["topk"].knob_values, grids["topk"].means[0][0] is not None) == ("k", [2], True)
    assert mmcs_cells(rows, "no_such_metric") == {}


def test_frequency_plot_is_skipped_cleanly_without_frequency_files(tmp_path):
    run = build_run_dir(tmp_path / "run", with_frequencies=False)
    names = {p.name for p in write_plots(run)}
    assert "feature_frequency.png" not in names and "pareto_l0_fvu.png" in names


def run_report_cli(monkeypatch, *args: str) -> int:
    """`python -m sae_ensemble.report ARGS` in this process (its `__main__` block included); its exit code."""
    monkeypatch.setattr(sys, "argv", ["sae_ensemble.report", *args])
    with pytest.raises(SystemExit) as exited, warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "'sae_ensemble.report' found in sys.modules", RuntimeWarning
        )  # runpy re-runs an imported module
        runpy.run_module("sae_ensemble.report", run_name="__main__")
    return exited.value.code


def test_cli_regenerates_a_byte_identical_summary(run_dir, monkeypatch, capsys):
    first = write_summary(run_dir).read_bytes()
    (run_dir / "summary.csv").unlink()
    code = run_report_cli(monkeypatch, str(run_dir))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert (run_dir / "summary.csv").read_bytes() == first
    assert MEMBERS[0].member_id in out  # the console table


def test_cli_on_a_directory_without_members_fails_with_one_line(tmp_path, monkeypatch, capsys):
    assert run_report_cli(monkeypatch, str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no members" in err


def test_pareto_front_keeps_only_undominated_rows():
    rows = [
        {"member_id": "a", "l0": 1.0, "fvu": 0.9},
        {"member_id": "b", "l0": 2.0, "fvu": 0.5},
        {"member_id": "c", "l0": 3.0, "fvu": 0.6},  # dominated by b
        {"member_id": "d", "l0": 5.0, "fvu": 0.1},
        {"member_id": "e", "l0": 2.5, "fvu": None},  # not evaluated
    ]
    assert [r["member_id"] for r in pareto_front(rows)] == ["a", "b", "d"]
    table = format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 6 and lines[0].split()[:2] == ["member_id", "steps"]
    assert lines[3].lstrip().startswith("c") and lines[2].startswith("*")


def test_rows_carry_steps_alive_and_rename_the_l1_metric(run_dir):
    row = load_rows(run_dir)[0]
    assert row["steps"] == 20 and row["alive"] is True
    assert "l1_norm" in row and row["l1"] in (1e-3, 1e-1, 1e-2)
