"""The report's charts as plotly figures, built from summary rows and frequency tensors; no page markup here.

Each function returns a `plotly.graph_objects.Figure` (or None when the rows have nothing to draw); pages.py
embeds them with plotly's own `to_html`. Rows are report.load_rows' rows; nothing here computes a metric.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from sae_ensemble.config import K_VARIANTS

Row = dict[str, Any]
Front = Callable[[Sequence[Row], str, str], list[Row]]  # report.pareto_front: lower is better on both axes
TEMPLATE = "plotly_white"
MMCS_METRICS = {
    "mmcs_truth": "vs the ground-truth features",
    "mmcs_next": "vs the next larger dictionary",
    "mmcs_seed": "vs the same member with another seed",
}
TRUTH_SCORES = {  # summary.csv's ground-truth columns on synthetic worlds (truth_metrics.py), as chart titles
    "mcc": "MCC: matched mean |cos| to the true features (higher is better)",
    "f1": "F1 of each latent as a detector of its true feature (higher is better)",
    "uniqueness": "Uniqueness: distinct true features / latents (higher is better)",
    "absorption": "Absorption: parents' latents silenced by their children's (lower is better)",
}
FREQUENCY_FLOOR = -10.0  # log10 firing frequency of the leftmost bin, as report.plot_feature_frequencies
FREQUENCY_BINS = 40
ULTRA_DENSE = 0.1  # a latent firing on more than this fraction of rows is counted as ultra-dense


def finite(row: Row, key: str) -> float | None:
    value = row.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _cell(value: Any) -> str:
    return format(value, ".6g") if isinstance(value, float) else str(value)


def pareto_figure(rows: Sequence[Row], pareto_front: Front, y: str = "fvu") -> go.Figure | None:
    """L0 against `y` (fvu, lower is better, or ce_recovered, higher is better), one colour per variant, the
    Pareto front drawn as a step line with its members ringed. Hover shows the member id; `customdata` holds
    it for the click that opens the member's page."""
    rows = [r for r in rows if finite(r, "l0") is not None and finite(r, y) is not None]
    if not rows:
        return None
    if y == "ce_recovered":  # higher is better: the front of its negation, which pareto_front minimises
        by_id = {r["member_id"]: r for r in rows}
        flipped = [{"member_id": r["member_id"], "l0": r["l0"], "minus": -r[y]} for r in rows]
        front = [by_id[r["member_id"]] for r in pareto_front(flipped, "l0", "minus")]
        y_title = "CE loss recovered (higher is better)"
    else:
        front = pareto_front(rows, "l0", y)
        y_title = "FVU (fraction of variance unexplained)"
    fig = go.Figure()
    hover = "%{customdata}<br>L0 %{x:.4g}<br>" + y + " %{y:.4g}<extra>%{fullData.name}</extra>"
    for variant in sorted({r["variant"] for r in rows}):
        group = [r for r in rows if r["variant"] == variant]
        fig.add_trace(
            go.Scatter(
                x=[r["l0"] for r in group],
                y=[r[y] for r in group],
                customdata=[r["member_id"] for r in group],
                mode="markers",
                name=variant,
                marker={"size": 9, "opacity": 0.85},
                hovertemplate=hover,
            )
        )
    fig.add_trace(
        go.Scatter(
            x=[r["l0"] for r in front],
            y=[r[y] for r in front],
            customdata=[r["member_id"] for r in front],
            mode="lines+markers",
            line={"shape": "hv", "color": "crimson", "width": 1},
            marker={"symbol": "circle-open", "size": 15, "color": "crimson", "line": {"width": 2}},
            name="Pareto front",
            hovertemplate=hover,
        )
    )
    log_x = all(r["l0"] > 0 for r in rows)
    fig.update_layout(
        template=TEMPLATE,
        title=f"Sparsity vs {'CE loss recovered' if y == 'ce_recovered' else 'reconstruction'}",
        xaxis={"title": {"text": "L0 (active latents per row)"}, "type": "log" if log_x else "linear"},
        yaxis={"title": {"text": y_title}},
        legend={"title": {"text": "variant"}},
        height=460,
        margin={"t": 50, "b": 50, "l": 60, "r": 20},
    )
    return fig


def truth_figure(rows: Sequence[Row], score: str) -> go.Figure | None:
    """L0 against a ground-truth `score` of TRUTH_SCORES, one colour per variant; None when no row has both
    finite. Hover shows the member id (F1's also its precision and recall); `customdata` starts with the id for
    the click that opens the member's page."""
    rows = [r for r in rows if finite(r, "l0") is not None and finite(r, score) is not None]
    if not rows:
        return None
    fig = go.Figure()
    detail = "<br>precision %{customdata[1]:.4g}<br>recall %{customdata[2]:.4g}" if score == "f1" else ""
    hover = "%{customdata[0]}<br>L0 %{x:.4g}<br>" + score + " %{y:.4g}" + detail + "<extra>%{fullData.name}</extra>"
    for variant in sorted({r["variant"] for r in rows}):
        group = [r for r in rows if r["variant"] == variant]
        fig.add_trace(
            go.Scatter(
                x=[r["l0"] for r in group],
                y=[r[score] for r in group],
                customdata=[
                    [r["member_id"], finite(r, "precision"), finite(r, "recall")] if detail else [r["member_id"]]
                    for r in group
                ],
                mode="markers",
                name=variant,
                marker={"size": 9, "opacity": 0.85},
                hovertemplate=hover,
            )
        )
    log_x = all(r["l0"] > 0 for r in rows)
    fig.update_layout(
        template=TEMPLATE,
        title=TRUTH_SCORES[score],
        xaxis={"title": {"text": "L0 (active latents per row)"}, "type": "log" if log_x else "linear"},
        yaxis={"title": {"text": score}, "range": [0, 1.02]},  # every score is in [0, 1]
        legend={"title": {"text": "variant"}},
        height=400,
        margin={"t": 50, "b": 50, "l": 60, "r": 20},
    )
    return fig


def sparsity_knob(variant: str) -> str:
    """The hyperparameter that sets a variant's sparsity (the heatmaps' y axis)."""
    return "k" if variant in K_VARIANTS else "l0_coefficient" if variant == "jumprelu" else "l1"


class MeanGrid(NamedTuple):
    """One variant's heatmap: the mean of a metric per (sparsity, dict size) over the other hyperparameters."""

    knob: str  # the variant's sparsity hyperparameter (sparsity_knob): the y axis
    knob_values: list  # ascending: the rows
    dict_sizes: list[int]  # ascending: the columns
    means: list[list[float | None]]  # [knob value, dict size]; None where no member has both


def mmcs_cells(rows: Sequence[Row], metric: str) -> dict[str, MeanGrid]:
    """Each variant's mean `metric` per (sparsity, dict size), over the rows where it is finite, by variant in
    sorted order; the other hyperparameters (seed, lr, bias decay) are averaged. The MMCS heatmaps of both
    reports: report.plot_mmcs_heatmap and mmcs_figure."""
    rows = [r for r in rows if finite(r, metric) is not None]
    grids = {}
    for variant in sorted({r["variant"] for r in rows}):
        knob = sparsity_knob(variant)
        group = [r for r in rows if r["variant"] == variant]
        ys, xs = sorted({r[knob] for r in group}), sorted({r["dict_size"] for r in group})
        cells: dict[tuple[int, int], list[float]] = defaultdict(list)
        for r in group:
            cells[(ys.index(r[knob]), xs.index(r["dict_size"]))].append(r[metric])
        means: list[list[float | None]] = [[None] * len(xs) for _ in ys]
        for (i, j), values in cells.items():
            means[i][j] = sum(values) / len(values)
        grids[variant] = MeanGrid(knob, ys, xs, means)
    return grids


def mmcs_figure(rows: Sequence[Row], metric: str) -> go.Figure | None:
    """Mean `metric` per (sparsity, dict size), one panel per variant (mmcs_cells, as report.plot_mmcs_heatmap
    draws it); None when no row has the metric."""
    grids = mmcs_cells(rows, metric)
    if not grids:
        return None
    variants = list(grids)
    fig = make_subplots(rows=1, cols=len(variants), subplot_titles=variants, horizontal_spacing=0.08)
    for column, (variant, (knob, ys, xs, means)) in enumerate(grids.items(), start=1):
        fig.add_trace(
            go.Heatmap(
                z=means,
                x=[str(x) for x in xs],
                y=[_cell(v) for v in ys],
                coloraxis="coloraxis",
                texttemplate="%{z:.2f}",
                hovertemplate=f"dict size %{{x}}<br>{knob} %{{y}}<br>{metric} %{{z:.3f}}<extra>{variant}</extra>",
            ),
            row=1,
            col=column,
        )
        fig.update_xaxes(title_text="dict size", type="category", row=1, col=column)
        fig.update_yaxes(title_text=knob, type="category", row=1, col=column)
    fig.update_layout(
        template=TEMPLATE,
        title=f"{metric}: {MMCS_METRICS[metric]} (mean over the other hyperparameters)",
        coloraxis={"colorscale": "Magma", "cmin": 0, "cmax": 1, "colorbar": {"title": {"text": metric}}},
        height=380,
        width=max(520, 60 + 400 * len(variants)),
        margin={"t": 70, "b": 50, "l": 70, "r": 20},
    )
    return fig


def frequency_counts(frequency: torch.Tensor) -> dict[str, Any]:
    """A member's latent firing rates binned here, in Python (a page never carries one point per latent):
    the log10-frequency histogram of the latents that fired, and the dead and ultra-dense counts."""
    frequency = frequency.double().flatten()
    fired = frequency[frequency > 0]
    logs = fired.log10().clamp(min=FREQUENCY_FLOOR, max=0)
    counts = torch.histc(logs, bins=FREQUENCY_BINS, min=FREQUENCY_FLOOR, max=0) if fired.numel() else None
    width = -FREQUENCY_FLOOR / FREQUENCY_BINS
    return {
        "latents": frequency.numel(),
        "dead": int((frequency == 0).sum()),
        "ultra_dense": int((frequency > ULTRA_DENSE).sum()),
        "centers": [FREQUENCY_FLOOR + width * (i + 0.5) for i in range(FREQUENCY_BINS)],
        "counts": [0] * FREQUENCY_BINS if counts is None else [int(c) for c in counts.tolist()],
        "width": width,
    }


def density_figure(binned: dict[str, Any]) -> go.Figure:
    """The histogram of frequency_counts, with the ultra-dense threshold marked; the x axis starts a decade below
    the rarest latent that fired."""
    first = next((i for i, count in enumerate(binned["counts"]) if count), 0)
    left = max(FREQUENCY_FLOOR, math.floor(binned["centers"][first] - 1))
    fig = go.Figure(
        go.Bar(
            x=binned["centers"],
            y=binned["counts"],
            width=binned["width"] * 0.95,
            marker={"color": "steelblue"},
            hovertemplate="log10 frequency %{x:.2f}<br>%{y} latents<extra></extra>",
            name="latents",
        )
    )
    fig.add_vline(
        x=math.log10(ULTRA_DENSE),
        line={"dash": "dash", "color": "crimson", "width": 1},
        annotation_text="ultra-dense",
        annotation_position="top left",
    )
    fig.update_layout(
        template=TEMPLATE,
        title=f"Latent density: {binned['latents'] - binned['dead']} of {binned['latents']} latents fired",
        xaxis={"title": {"text": "log10 firing frequency (fraction of rows)"}, "range": [left, 0]},
        yaxis={"title": {"text": "latents"}},
        bargap=0,
        height=360,
        margin={"t": 50, "b": 50, "l": 60, "r": 20},
    )
    return fig
