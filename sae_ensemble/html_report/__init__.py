"""The sweep report in a browser, RUN_DIR/report/ (docs/report.md), rebuilt by `python -m sae_ensemble.report RUN_DIR`
and at the end of every sweep:

    report/index.html                          members' table (sortable), Pareto charts, ground truth against L0
                                               (synthetic worlds), MMCS heatmaps; per hook
    report/members/<member_id>.html            settings, metrics, latent density histogram, top-activating contexts
    report/members/<member_id>.features.js     that member's members/<id>/features.json, when the run has one
    report/plotly.min.js, report.js, report.css   shared by every page, so each page carries only its own data

It reads what report.py reads (its rows) and computes no metric. report.py imports this package, so this package
takes report's grouping and Pareto front as arguments rather than importing them back (the import graph has no
cycles).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import fields
from html import escape
from pathlib import Path
from typing import Any

import plotly.offline
from safetensors import safe_open

from sae_ensemble.html_report import figures, pages
from sae_ensemble.member import Member
from sae_ensemble.rundir import RunDir

Row = dict[str, Any]
SETTINGS = {f.name for f in fields(Member)} | {"member_id", "steps", "tokens", "alive", "stopped_early", "l1_final"}


def write_html_report(
    run_dir: str | Path, rows_by_hook: dict[str | None, list[Row]], pareto_front: figures.Front
) -> Path:
    """Write RUN_DIR/report/ from report.load_rows' rows grouped by report.by_hook, with report.pareto_front;
    return the path of index.html. Member pages of members no longer in the run are removed."""
    run = RunDir(run_dir)
    report = run.report
    members = report / "members"
    if members.is_dir():
        shutil.rmtree(members)  # every file in it is ours and rebuilt below
    members.mkdir(parents=True)
    write_if_changed(report / "plotly.min.js", plotly.offline.get_plotlyjs())
    write_if_changed(report / "report.js", pages.SCRIPT)
    write_if_changed(report / "report.css", pages.STYLESHEET)
    on_front = set()
    for rows in rows_by_hook.values():
        on_front |= {r["member_id"] for r in pareto_front(rows, "l0", "fvu")}
    for rows in rows_by_hook.values():
        for row in rows:
            write_member_page(run, members, row, row["member_id"] in on_front)
    index = report / "index.html"
    index.write_text(index_page(run.path.name, rows_by_hook, pareto_front), encoding="utf-8")
    return index


def write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def slug(hook: str | None) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", hook).strip("-") if hook else "run"


def index_page(name: str, rows_by_hook: dict[str | None, list[Row]], pareto_front: figures.Front) -> str:
    total = sum(len(rows) for rows in rows_by_hook.values())
    several = len(rows_by_hook) > 1
    parts = [
        f"<h1>Sweep report: {escape(name)}</h1>",
        f'<p class="note">{total} members{f" on {len(rows_by_hook)} hooks" if several else ""} &middot; '
        '<a href="../summary.csv">summary.csv</a> &middot; static plots in <a href="../plots/">plots/</a> '
        "&middot; click a column to sort, a member to open its page, a point to open its member</p>",
    ]
    if several:
        links = "".join(f'<a href="#{slug(hook)}">{escape(str(hook))}</a>' for hook in rows_by_hook)
        parts.append(f"<nav>{links}</nav>")
    for hook, rows in rows_by_hook.items():
        parts.append(hook_section(hook, rows, pareto_front, several))
    return pages.page(f"Sweep report: {name}", "\n".join(parts), root="")


def hook_section(hook: str | None, rows: list[Row], pareto_front: figures.Front, titled: bool) -> str:
    """One hook's members: table, Pareto charts (L0-FVU; L0-CE recovered on LM runs), ground-truth scores against
    L0 (synthetic worlds), MMCS heatmaps."""
    key = slug(hook)
    on_front = {r["member_id"] for r in pareto_front(rows, "l0", "fvu")}
    charts = [
        pages.figure(fig, f"{key}-pareto-{y}", open_members=True)
        for y in ("fvu", "ce_recovered")
        if (fig := figures.pareto_figure(rows, pareto_front, y)) is not None
    ]
    truth = [
        pages.figure(fig, f"{key}-truth-{score}", open_members=True)
        for score in figures.TRUTH_SCORES
        if (fig := figures.truth_figure(rows, score)) is not None
    ]
    heatmaps = [
        pages.figure(fig, f"{key}-{metric}")
        for metric in figures.MMCS_METRICS
        if (fig := figures.mmcs_figure(rows, metric)) is not None
    ]
    no_chart = '<p class="note">No member has L0.</p>'
    no_heatmap = '<p class="note">No member has an MMCS score (the evaluation stage computes them).</p>'
    return f"""<section class="hook" id="{key}">
{f"<h2>{escape(str(hook))}</h2>" if titled else ""}
<h3>Members</h3>
<p class="note">&#9733;: on the L0-FVU Pareto front. Hyperparameters equal in every member are on the member pages.</p>
{pages.members_table(rows, on_front, f"members-{key}")}
<h3>Pareto fronts</h3>
<div class="charts">{"".join(f"<div>{chart}</div>" for chart in charts) or no_chart}</div>
{pages.truth_section(truth)}
<h3>MMCS</h3>
{"".join(heatmaps) or no_heatmap}
</section>"""


def read_frequency(run: RunDir, member_id: str) -> tuple[Any, str] | None:
    """(firing rate per latent, where it was counted): on the held-out rows (features.safetensors, the evaluation's,
    whose dead and dense counts features.json gives) when present, else over the training window
    (feature_freq.safetensors); None when neither exists."""
    member = run.member(member_id)
    for file, tensor, where in (
        (member.feature_stats, "firing_rate", "held-out rows"),
        (member.frequency, "frequency", "the last training window"),
    ):
        if file.is_file():
            with safe_open(str(file), framework="pt") as f:
                return f.get_tensor(tensor), where
    return None


def write_member_page(run: RunDir, members: Path, row: Row, on_front: bool) -> None:
    member_id = row["member_id"]
    frequency = read_frequency(run, member_id)
    binned = None if frequency is None else {**figures.frequency_counts(frequency[0]), "counted_on": frequency[1]}
    chart = "" if binned is None else pages.figure(figures.density_figure(binned), "density-histogram")
    features, problem = read_features(run.member(member_id).features)
    script = None
    if features is not None:
        script = f"{member_id}.features.js"
        (members / script).write_text(
            f"saeFeatures({json.dumps(features, separators=(',', ':'))});\n", encoding="utf-8"
        )
        script = pages.quote(script)
    settings = {k: v for k, v in row.items() if k in SETTINGS and k != "member_id" and v is not None}
    metrics = {k: v for k, v in row.items() if k not in SETTINGS and v is not None}
    body = f"""<nav><a href="../index.html">&larr; all members</a></nav>
<h1>{escape(member_id)}</h1>
<p class="note">{"&#9733; on the L0-FVU Pareto front of its hook" if on_front else "not on the L0-FVU Pareto front"}</p>
<div class="cards">{pages.key_values("Metrics", metrics)}{pages.key_values("Settings", settings, column_count=2)}</div>
{pages.density_section(binned, chart)}
{pages.contexts_section(script, problem)}"""
    (members / f"{member_id}.html").write_text(pages.page(member_id, body, root="../"), encoding="utf-8")


def read_features(path: Path) -> tuple[dict | None, str | None]:
    """members/<id>/features.json checked against the schema in docs/report.md: (content, None), or (None, a
    sentence saying what is wrong) for a file that is there but unusable; (None, None) when there is none."""
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return None, escape(f"{path} is not readable JSON ({error}); no contexts shown.")
    problem = features_problem(data)
    if problem:
        return None, escape(f"{path} does not follow the schema in docs/report.md: {problem}.")
    return data, None


def features_problem(data: Any) -> str | None:
    if not isinstance(data, dict) or not isinstance(data.get("latents"), list):
        return 'expected an object with a list "latents"'
    for n, latent in enumerate(data["latents"]):
        if not isinstance(latent, dict) or not isinstance(latent.get("index"), int):
            return f'latents[{n}] has no integer "index"'
        for key in ("frequency", "mean_activation"):
            if not is_number(latent.get(key)):
                return f'latents[{n}] has no number "{key}"'
        contexts = latent.get("contexts", [])
        if not isinstance(contexts, list):
            return f"latents[{n}].contexts is {type(contexts).__name__}, not a list"
        splits = latent.get("splits", {"matches": []})
        matches = splits.get("matches") if isinstance(splits, dict) else None
        if not isinstance(matches, list) or not all(isinstance(m, dict) and "index" in m for m in matches):
            return f'latents[{n}].splits has no list "matches" of objects with an "index"'
        located = [(f"latents[{n}].contexts[{m}]", c) for m, c in enumerate(contexts)]
        for j, match in enumerate(matches):
            located += [
                (f"latents[{n}].splits.matches[{j}].contexts[{m}]", c) for m, c in enumerate(match.get("contexts", []))
            ]
        for where, context in located:
            problem = context_problem(context)
            if problem:
                return f"{where} {problem}"
    return None


def context_problem(context: Any) -> str | None:
    tokens, activations = (context.get("tokens"), context.get("activations")) if isinstance(context, dict) else (0, 0)
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        return 'has no list of strings "tokens"'
    if not isinstance(activations, list) or not all(is_number(a) for a in activations):
        return 'has no list of numbers "activations"'
    if len(tokens) != len(activations):
        return f"has {len(tokens)} tokens but {len(activations)} activations"
    max_at = context.get("max_at")
    if not isinstance(max_at, int) or not 0 <= max_at < len(tokens):
        return f'has "max_at" {max_at!r}, not a token position in 0..{len(tokens) - 1}'
    return None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
