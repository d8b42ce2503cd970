"""The report's HTML: page frame, members' table, the member page's sections, and the one shared stylesheet and
script (table sorting, a member's contexts). Charts are plotly's, embedded with `plotly.io.to_html`.

Every value that reaches a page goes through `escape` here (or `textContent` in the script): member ids,
hooks and tokens are data, never markup.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import Any
from urllib.parse import quote

Row = dict[str, Any]
# The index table's columns, those any row has; hyperparameters equal in every row are left out (the member
# page lists them all).
TABLE_COLUMNS = (
    "member_id", "variant", "dict_size", "l1", "k", "target_l0", "l0_coefficient", "lr", "seed", "bias_decay",
    "steps", "l0", "fvu", "mse", "dead_frac", "mmcs_truth", "mcc", "uniqueness", "f1", "precision", "recall",
    "absorption", "mmcs_next", "mmcs_seed", "ce_recovered", "explained_variance", "alive", "stopped_early",
)  # fmt: skip
METRICS_FROM = TABLE_COLUMNS.index("l0")  # columns from here on are results, shown even when constant


def member_href(member_id: str) -> str:
    return f"{quote(member_id)}.html"


def cell_text(value: Any) -> str:
    if value is None:
        return ""
    return format(value, ".4g") if isinstance(value, float) else str(value)


def page(title: str, body: str, root: str) -> str:
    """A complete page; `root` is the relative path from the page to report/ ('' or '../')."""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{escape(title)}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{root}report.css">
<script src="{root}plotly.min.js" defer></script>
<script src="{root}report.js" defer></script>
</head>
<body>
{body}
</body>
</html>
"""


def figure(fig, div_id: str, open_members: bool = False) -> str:
    """A plotly figure as an empty <div> and its `fig.to_json()`, which report.js hands to Plotly.newPlot once
    the page has painted (plotly.min.js loads deferred: the table and text show first)."""
    data = fig.to_json().replace("</", "<\\/")  # JSON's own escape: a value can never close the <script>
    members = ' data-open-members="1"' if open_members else ""
    return (
        f'<div class="chart" id="{div_id}"{members}></div>\n'
        f'<script type="application/json" id="{div_id}-figure">{data}</script>\n'
    )


def members_table(rows: Sequence[Row], on_front: set[str], table_id: str) -> str:
    """The sortable members' table: a click on a header sorts by it (report.js), ids link to member pages."""
    columns = [c for c in TABLE_COLUMNS if any(r.get(c) is not None for r in rows)]
    columns = [
        c for c in columns if c in ("member_id", "variant") or TABLE_COLUMNS.index(c) >= METRICS_FROM
        or len({cell_text(r.get(c)) for r in rows}) > 1
    ]  # fmt: skip
    head = "".join(f'<th title="click to sort">{escape(c)}</th>' for c in ["front", *columns])
    body = []
    for r in rows:
        star = "&#9733;" if r["member_id"] in on_front else ""
        cells = [f'<td data-value="{1 if star else 0}" title="on the L0-FVU Pareto front">{star}</td>']
        for c in columns:
            value = r.get(c)
            if c == "member_id":
                text = f'<a href="members/{member_href(value)}">{escape(value)}</a>'
            else:
                text = escape(cell_text(value))
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            cells.append(f'<td data-value="{value!r}">{text}</td>' if number else f"<td>{text}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f'<table class="members" id="{table_id}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
        + "\n".join(body)
        + "\n</tbody>\n</table>"
    )


def truth_section(charts: Sequence[str]) -> str:
    """The ground-truth scores against L0 (figures.truth_figure), or nothing when no member has one: a run on an
    LM store or on a world without true codes has no such section."""
    if not charts:
        return ""
    boxes = "".join(f"<div>{chart}</div>" for chart in charts)
    return f"""<h3>Ground truth against L0</h3>
<p class="note">Each member scored against the synthetic world's true features (docs/synthetic.md); a point opens
its member.</p>
<div class="charts truth">{boxes}</div>"""


def key_values(title: str, values: dict[str, Any], column_count: int = 1) -> str:
    items = "".join(
        f'<div><span class="key">{escape(k)}</span> {escape(cell_text(v))}</div>' for k, v in values.items()
    )
    kv = f'<div class="kv" style="columns: {column_count}">{items}</div>'
    return f'<div class="card"><h3>{escape(title)}</h3>{kv}</div>'


def density_section(binned: dict[str, Any] | None, chart: str) -> str:
    if binned is None:
        return '<section id="density"><h2>Latent density</h2><p class="note">This member has neither ' \
            "features.safetensors nor feature_freq.safetensors: no density histogram.</p></section>"  # fmt: skip
    return f"""<section id="density"><h2>Latent density</h2>
<p class="note">Firing rates on {escape(binned["counted_on"])}.</p>
<p class="counts"><span id="dead-count">dead (never fired): <b>{binned["dead"]}</b></span> of {binned["latents"]}
latents &middot; <span id="dense-count">ultra-dense (fired on more than 10% of rows):
<b>{binned["ultra_dense"]}</b></span></p>
{chart}
</section>"""


def contexts_section(features_script: str | None, problem: str | None) -> str:
    """Top-activating contexts: filled by report.js from members/<id>.features.js, or a note why there are none."""
    if features_script is None:
        why = problem or (
            "No feature statistics for this member: the run directory has no members/&lt;id&gt;/features.json "
            "(its evaluation ran with eval.features=false, or before the evaluation stage computed them)."
        )
        return f"""<section id="contexts" class="empty"><h2>Top-activating contexts</h2>
<p class="note" id="features-note">{why}</p>
</section>"""
    return f"""<section id="contexts"><h2>Top-activating contexts</h2>
<p class="note" id="features-note"></p>
<div id="latents"></div>
<button type="button" id="more-latents" hidden>show more</button>
<script src="{escape(features_script)}" defer></script>
</section>"""


STYLESHEET = """body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; } h3 { margin: 1.2em 0 .4em; }
a { color: #1f5fa8; } .note { color: #666; } .empty { border: 2px dashed #ccc; padding: 0 1em 1em; }
nav a { margin-right: 1em; }
table.members { border-collapse: collapse; font-size: 12px; }
table.members th { cursor: pointer; background: #f2f2f2; position: sticky; top: 0; white-space: nowrap; }
table.members th[data-dir=asc]::after { content: " \\25B2"; }
table.members th[data-dir=desc]::after { content: " \\25BC"; }
table.members td, table.members th { padding: 3px 7px; border-bottom: 1px solid #eee; text-align: right; }
table.members td:nth-child(2), table.members th:nth-child(2) { text-align: left; }
table.members tbody tr:hover { background: #f7f9ff; }
.cards { display: flex; gap: 3em; flex-wrap: wrap; } .card { min-width: 18em; }
.kv > div { break-inside: avoid; padding: 1px 0; } .kv .key { color: #666; display: inline-block; min-width: 11em; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; } .charts > div { flex: 1 1 560px; min-width: 0; }
.latent { margin: 1em 0; padding: .5em .8em; border: 1px solid #e3e3e3; border-radius: 4px; }
.latent h3 { margin: 0 0 .4em; font-size: 1em; } .latent .stats { color: #555; font-weight: normal; }
.context { font-family: ui-monospace, monospace; font-size: 12px; white-space: pre-wrap; margin: .2em 0;
  padding: .2em .3em; background: #fafafa; }
.split { margin-left: 2em; padding-left: .6em; border-left: 3px solid #e3e3e3; }
.token { border-radius: 2px; } .token.peak { outline: 1px solid #c03; }
"""

SCRIPT = """"use strict";
// The report's one hand-written script: sorting the members' tables, and rendering a member's latents from
// members/<id>.features.js (which calls saeFeatures). Every chart is plotly's.

function sortValue(row, column) {
  const cell = row.cells[column];
  if (cell.dataset.value !== undefined) return Number(cell.dataset.value);
  return cell.textContent.trim();
}

function sortTable(th) {
  const table = th.closest("table");
  const column = th.cellIndex;
  const direction = th.dataset.dir === "asc" ? "desc" : "asc";
  for (const other of table.tHead.rows[0].cells) delete other.dataset.dir;
  th.dataset.dir = direction;
  const sign = direction === "asc" ? 1 : -1;
  const rows = Array.from(table.tBodies[0].rows);
  rows.sort((a, b) => {
    const x = sortValue(a, column), y = sortValue(b, column);
    if (x === "" || y === "") return (x === "") - (y === "");  // empty cells last either way
    return (typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y))) * sign;
  });
  table.tBodies[0].append(...rows);
}

function drawChart(div) {  // a figure pages.py wrote with plotly's fig.to_json(), drawn by plotly
  const figure = JSON.parse(document.getElementById(div.id + "-figure").textContent);
  Plotly.newPlot(div, figure.data, figure.layout, {displaylogo: false, responsive: true}).then(() => {
    if (!div.dataset.openMembers) return;
    div.on("plotly_click", (event) => {  // a point opens its member's page
      const data = event.points[0].customdata;  // the member id, or a list starting with it
      const id = Array.isArray(data) ? data[0] : data;
      if (id) window.location.href = "members/" + encodeURIComponent(id) + ".html";
    });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  for (const th of document.querySelectorAll("table.members thead th")) {
    th.addEventListener("click", () => sortTable(th));
  }
  const charts = Array.from(document.querySelectorAll("div.chart"));
  const next = () => { if (charts.length) { drawChart(charts.shift()); setTimeout(next, 0); } };
  next();  // one chart per task: the page stays responsive while a large report draws
});

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function latentElement(latent) {
  const box = element("div", "latent");
  box.id = "latent-" + latent.index;
  const head = element("h3", null, "latent " + latent.index + " ");
  const stats = ["frequency " + Number(latent.frequency).toPrecision(3),
                 "mean activation " + Number(latent.mean_activation).toPrecision(3)];
  if (latent.max_activation !== undefined) stats.push("max " + Number(latent.max_activation).toPrecision(3));
  if (latent.why) stats.push(latent.why);
  if (latent.truth) stats.push("best true feature " + latent.truth.feature + " (cos " +
                               Number(latent.truth.cosine).toFixed(3) + ")");
  head.append(element("span", "stats", stats.join(" \\u00b7 ")));
  box.append(head);
  box.append(...contextElements(latent.contexts || []));
  if (latent.splits) box.append(splitElement(latent.splits));
  return box;
}

function splitElement(split) {  // the latent's closest latents in the next dictionary size (features.py)
  const box = element("div", "split");
  box.append(element("p", "stats", "in the next size, " + split.member_id + ":"));
  for (const match of split.matches || []) {
    const link = element("a", null, "latent " + match.index);
    link.href = encodeURIComponent(split.member_id) + ".html#latent-" + match.index;
    const line = element("p", "stats");
    line.append(link, " \\u00b7 cos " + Number(match.cosine).toFixed(3) + " \\u00b7 frequency " +
                Number(match.frequency).toPrecision(3));
    box.append(line, ...contextElements(match.contexts || []));
  }
  return box;
}

function contextElements(contexts) {
  const peak = Math.max(1e-12, ...contexts.flatMap((c) => c.activations));
  const lines = [];
  for (const context of contexts) {
    const line = element("div", "context");
    context.tokens.forEach((token, i) => {
      const activation = context.activations[i];
      const span = element("span", "token" + (i === context.max_at ? " peak" : ""), token);
      span.title = "activation " + activation.toPrecision(3);
      span.style.background = "rgba(255, 120, 0, " + Math.max(0, activation / peak).toFixed(3) + ")";
      line.append(span);
    });
    lines.push(line);
  }
  return lines;
}

const LATENTS_PER_CLICK = 20;  // a page with hundreds of latents builds its DOM in steps, on demand

function saeFeatures(data) {
  const list = document.getElementById("latents");
  const more = document.getElementById("more-latents");
  const note = document.getElementById("features-note");
  const latents = data.latents || [];
  const parts = [];
  if (data.rows !== undefined) parts.push("Statistics over " + data.rows + " held-out rows: " + data.dead +
                                          " dead, " + data.dense + " dense (firing on more than " +
                                          data.dense_rate + " of rows).");
  if (data.has_contexts === false) {
    parts.push("No contexts: " + (data.no_contexts || "this store keeps no tokens") + ". The latents below show " +
               "activation statistics only.");
  } else {
    parts.push(latents.length + " latents with their top-activating contexts (tokens shaded by the latent's " +
               "activation; outlined: the row it fires most on).");
  }
  note.textContent = data.note || parts.join(" ");
  let shown = 0;
  function showMore() {
    for (const latent of latents.slice(shown, shown + LATENTS_PER_CLICK)) list.append(latentElement(latent));
    shown = Math.min(latents.length, shown + LATENTS_PER_CLICK);
    more.hidden = shown >= latents.length;
    more.textContent = "show " + Math.min(LATENTS_PER_CLICK, latents.length - shown) + " more of " +
                       (latents.length - shown);
  }
  more.addEventListener("click", showMore);
  showMore();
}
"""
