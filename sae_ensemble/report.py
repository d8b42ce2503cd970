"""Summarise a run directory: summary.csv, plots, and the end-of-run console table.

    python -m sae_ensemble.report RUN_DIR

reads `RUN_DIR/members/<member_id>/{cfg.json, sae.safetensors[, feature_freq.safetensors]}`
and (re)writes `RUN_DIR/summary.csv` and `RUN_DIR/plots/*.png`. Regenerating gives
byte-identical summary.csv: rows sorted by member_id, fixed columns, fixed number format.

Columns: the Member hyperparameters, steps/tokens/alive, the final metrics from cfg.json
(`metrics.l1`, the mean L1 norm of the codes, is renamed `l1_norm` so it cannot be
mistaken for the L1 coefficient `l1`), and the evaluation stage's results from eval.json
(`mmcs_next`, `mmcs_seed`, CE scores: eval_worker.py, run on the workers' devices). The
report only reads: it computes no metric. A value a member does not have is an empty cell. Metrics SAELens and SAEBench
also report carry their names (explained_variance, cossim, l2_ratio, relative_reconstruction_bias,
ce_loss_score, kl_div_score); docs/metrics.md lists where our names differ and why.
"""

from __future__ import annotations

import csv
import io
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from sae_ensemble.checkpoint import member_of, read_evaluation
from sae_ensemble.config import L1_VARIANTS
from sae_ensemble.html_report import write_html_report
from sae_ensemble.html_report.figures import mmcs_cells
from sae_ensemble.rundir import CheckpointError, RunDir, read_json

COLUMNS = (
    "member_id", "hook", "variant", "l1", "target_l0", "l1_final", "dict_size", "bias_decay", "lr", "seed", "k",
    "steps", "tokens", "alive", "stopped_early",
    "mse", "fvu", "l0", "dead_frac", "mmcs_truth", "mcc", "uniqueness", "f1", "precision", "recall", "absorption",
    "mmcs_truth_in", "skip_error", "ce_recovered",
    "mmcs_next", "mmcs_seed", "l1_norm", "kl", "ce_clean", "ce_zero_ablation", "ce_recon",
    # SAELens / SAEBench names (docs/metrics.md): their `l1` is our l1_norm, their `mse` is d_in x ours
    "explained_variance", "cossim", "l2_ratio", "relative_reconstruction_bias", "ce_loss_score", "kl_div_score",
    "kl_zero_ablation",
    "d_in", "use_b_dec", "encoder_init_norm", "learned_decoder_norm", "max_grad_norm", "d_out", "skip_connection",
    "lr_warmup_steps", "lr_decay_steps", "l1_warmup_steps",
    # the architectures' own hyperparameters (docs/architectures.md)
    "l0_coefficient", "threshold", "bandwidth", "topk_threshold_lr", "matryoshka_widths", "auxk_dead_tokens",
    "auxk_coefficient", "k_aux", "resample_every",
)  # fmt: skip
METRIC_RENAMES = {"l1": "l1_norm"}
Row = dict[str, Any]


class ReportError(ValueError):
    """A run directory that cannot be summarised."""


# -- rows ----------------------------------------------------------------------------------------


def load_rows(run_dir: str | Path) -> list[Row]:
    """One row per finished member, sorted by member_id: cfg.json's final metrics and eval.json's results."""
    run = RunDir(run_dir)
    dirs = run.finished_members()
    if not dirs:
        raise ReportError(f"{run_dir} has no members: expected {run.member('<member_id>').cfg}")
    rows = []
    for directory in dirs:
        cfg = read_json(directory.cfg)
        try:
            member = member_of(cfg)
        except (TypeError, ValueError) as error:
            raise ReportError(f"{directory.cfg} does not describe a member ({error})") from None
        row: Row = {**member.to_dict(), "member_id": member.member_id}
        row.update({key: cfg.get(key) for key in ("steps", "tokens", "alive", "l1_final")})
        row["stopped_early"] = bool(cfg.get("stopped_early", False))  # by successive halving, at `steps` (halving.py)
        evaluation = read_evaluation(directory.path) or {"metrics": {}}
        for name, value in {**(cfg.get("metrics") or {}), **evaluation["metrics"]}.items():
            row[METRIC_RENAMES.get(name, name)] = value
        rows.append(row)
    return sorted(rows, key=lambda row: row["member_id"])


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, ".6g")  # fixed precision: regenerating gives identical bytes
    return str(value)


def write_summary(run_dir: str | Path, rows: Sequence[Row] | None = None) -> Path:
    """Write RUN_DIR/summary.csv (one row per member, sorted by member_id) and return its path."""
    rows = load_rows(run_dir) if rows is None else rows
    extra = sorted({key for row in rows for key in row} - set(COLUMNS))  # metrics we have no fixed place for
    several_hooks = any(row.get("hook") for row in rows)  # else the run's one hook is in its config, not per member
    columns = [c for c in (*COLUMNS, *extra) if c != "hook" or several_hooks]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    for row in sorted(rows, key=lambda r: r["member_id"]):
        writer.writerow([_cell(row.get(c)) for c in columns])
    path = RunDir(run_dir).summary
    path.write_text(text.getvalue())
    return path


# -- Pareto front and console table --------------------------------------------------------------


def _number(row: Row, key: str) -> float | None:
    value = row.get(key)
    return (
        float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else None
    )


def pareto_front(rows: Sequence[Row], x: str = "l0", y: str = "fvu") -> list[Row]:
    """Rows no other row beats on both `x` and `y` (lower is better for both), sorted by x."""
    scored = sorted(
        (r for r in rows if _number(r, x) is not None and _number(r, y) is not None), key=lambda r: (r[x], r[y])
    )
    front, best_y = [], math.inf
    for row in scored:
        if row[y] < best_y:
            front.append(row)
            best_y = row[y]
    return front


def format_table(rows: Sequence[Row], columns: Sequence[str] | None = None) -> str:
    """Plain-text table of the main results; `*` marks members on the L0-FVU Pareto front."""
    if columns is None:
        optional = [c for c in ("mmcs_truth", "mmcs_next", "ce_recovered") if any(r.get(c) is not None for r in rows)]
        columns = ["member_id", "steps", "l0", "fvu", "mse", "dead_frac", *optional]
    on_front = {r["member_id"] for r in pareto_front(rows)}

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))

    table = [["", *columns]] + [
        ["*" if r["member_id"] in on_front else "", *(cell(r.get(c)) for c in columns)] for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))).rstrip()
        for line in table
    )


# -- plots ---------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


MARKERS = "os^Dv<>pPhX*"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    _pyplot().close(fig)
    return path


def plot_pareto(rows: Sequence[Row], path: Path) -> Path | None:
    """L0 vs FVU; colour = log10 l1 (topk members: black), marker = dict size, Pareto front drawn."""
    rows = [r for r in rows if _number(r, "l0") is not None and _number(r, "fvu") is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    sizes = sorted({r["dict_size"] for r in rows})
    l1_rows = [r for r in rows if r["variant"] in L1_VARIANTS and r["l1"] > 0]
    logs = [math.log10(r["l1"]) for r in l1_rows]
    norm = plt.Normalize(min(logs, default=0), max(logs, default=0) + (1e-9 if len(set(logs)) < 2 else 0))
    for index, size in enumerate(sizes):
        marker = MARKERS[index % len(MARKERS)]
        group = [r for r in rows if r["dict_size"] == size]
        coloured = [r for r in group if r in l1_rows]
        other = [r for r in group if r not in l1_rows]
        if coloured:
            ax.scatter([r["l0"] for r in coloured], [r["fvu"] for r in coloured],
                       c=[math.log10(r["l1"]) for r in coloured], cmap="viridis", norm=norm, marker=marker,
                       label=f"d={size}", edgecolors="none")  # fmt: skip
        if other:
            ax.scatter([r["l0"] for r in other], [r["fvu"] for r in other], c="black", marker=marker,
                       label=None if coloured else f"d={size}")  # fmt: skip
    if l1_rows:
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label="log10 l1")
    front = pareto_front(rows)
    ax.step(
        [r["l0"] for r in front], [r["fvu"] for r in front], where="post", color="crimson", lw=1, label="Pareto front"
    )
    if all(r["l0"] > 0 for r in rows):
        ax.set_xscale("log")
    ax.set(
        xlabel="L0 (active features per row)",
        ylabel="FVU (fraction of variance unexplained)",
        title="Sparsity vs reconstruction",
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_mmcs_heatmap(rows: Sequence[Row], path: Path) -> Path | None:
    """Mean MMCS per (sparsity, dict size), one panel per variant: vs truth when available, else vs next size."""
    metric = "mmcs_truth" if any(_number(r, "mmcs_truth") is not None for r in rows) else "mmcs_next"
    grids = mmcs_cells(rows, metric)  # the HTML report's heatmaps average the same way
    if not grids:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(grids), figsize=(1 + 4 * len(grids), 4), squeeze=False, layout="constrained")
    for ax, (variant, (sparsity, ys, xs, means)) in zip(axes[0], grids.items()):
        grid = torch.tensor([[math.nan if mean is None else mean for mean in line] for line in means])
        image = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="magma", origin="lower", aspect="auto")
        for i, line in enumerate(means):
            for j in (j for j, mean in enumerate(line) if mean is not None):  # a cell some member has
                color = "white" if grid[i, j] < 0.6 else "black"
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_yticks(range(len(ys)), [_cell(y) for y in ys])
        ax.set(xlabel="dict size", ylabel=sparsity, title=f"{variant}: {metric}")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9, label=f"{metric} (mean over the other hyperparameters)")
    fig.savefig(path, dpi=110, metadata={"Software": None})  # constrained layout already placed the shared colorbar
    plt.close(fig)
    return path


def plot_dead_vs_l1(rows: Sequence[Row], path: Path) -> Path | None:
    """Dead fraction vs l1, one line per (variant, dict size); topk members have no l1 and are left out."""
    rows = [r for r in rows if r["variant"] in L1_VARIANTS and r["l1"] > 0 and _number(r, "dead_frac") is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = sorted({(r["variant"], r["dict_size"]) for r in rows})
    for index, (variant, size) in enumerate(groups):
        by_l1: dict[float, list[float]] = defaultdict(list)
        for r in rows:
            if (r["variant"], r["dict_size"]) == (variant, size):
                by_l1[r["l1"]].append(r["dead_frac"])
        l1s = sorted(by_l1)
        ax.plot(
            l1s,
            [sum(by_l1[v]) / len(by_l1[v]) for v in l1s],
            marker=MARKERS[index % len(MARKERS)],
            label=f"{variant} d={size}",
        )
    ax.set_xscale("log")
    ax.set(
        xlabel="l1 coefficient",
        ylabel="dead fraction (never fired in the window)",
        ylim=(-0.02, 1.02),
        title="Dead features vs l1",
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_feature_frequencies(run_dir: Path, rows: Sequence[Row], path: Path) -> Path | None:
    """Histogram of log10 firing frequency per member (from feature_freq.safetensors); None when no member has one."""
    found = []
    for r in rows:
        file = RunDir(run_dir).member(r["member_id"]).frequency
        if file.is_file():
            with safe_open(str(file), framework="pt") as f:
                found.append((r["member_id"], f.get_tensor("frequency").float()))
    if not found:
        return None
    plt = _pyplot()
    cols = min(4, len(found))
    n_rows = -(-len(found) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.5 * cols, 2.4 * n_rows), squeeze=False)
    floor = -10.0  # never-firing features land in the leftmost bin
    bins = torch.linspace(floor, 0, 41).tolist()
    for ax, (member_id, freq) in zip(axes.flat, found):
        logs = freq.clamp(min=10**floor).log10().clamp(min=floor, max=0)
        ax.hist(logs.tolist(), bins=bins, color="steelblue")
        ax.set_title(f"{member_id}\ndead: {int((freq == 0).sum())}/{freq.numel()}", fontsize=7)
        ax.set_xlabel("log10 firing frequency", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(found) :]:
        ax.axis("off")
    return _save(fig, path)


def write_plots(run_dir: str | Path, rows: Sequence[Row] | None = None) -> list[Path]:
    """Write every plot the data allows into RUN_DIR/plots/; returns the paths written."""
    run_dir = Path(run_dir)
    rows = load_rows(run_dir) if rows is None else rows
    written = []
    for hook, group in by_hook(rows).items():  # several hooks: one set of plots per hook, in plots/<hook>/
        plots = RunDir(run_dir).plots if hook is None else RunDir(run_dir).plots / hook
        plots.mkdir(parents=True, exist_ok=True)
        written += [
            plot_pareto(group, plots / "pareto_l0_fvu.png"),
            plot_mmcs_heatmap(group, plots / "mmcs_heatmap.png"),
            plot_dead_vs_l1(group, plots / "dead_vs_l1.png"),
            plot_feature_frequencies(run_dir, group, plots / "feature_frequency.png"),
        ]
    return [p for p in written if p is not None]


def by_hook(rows: Sequence[Row]) -> dict[str | None, list[Row]]:
    """Rows by member hook, in order of first appearance (one group, None, in a run over one store)."""
    groups: dict[str | None, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.get("hook"), []).append(row)
    return groups


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m sae_ensemble.report RUN_DIR", file=sys.stderr)
        return 2
    try:
        rows = load_rows(argv[0])
    except (ReportError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = write_summary(argv[0], rows)
    plots = write_plots(argv[0], rows)
    html = write_html_report(argv[0], by_hook(rows), pareto_front)
    print(format_table(rows))
    print(f"wrote {summary}")
    for path in plots:
        print(f"wrote {path}")
    print(f"wrote {html} (open it in a browser) and a page per member in {html.parent / 'members'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
