"""The browser report (RUN_DIR/report/, sae_ensemble/html_report) opened in a real headless Chromium.

Debian's `chromium` and `chromium-driver`, driven by Selenium through /usr/bin/chromium and /usr/bin/chromedriver;
Selenium Manager never downloads a browser (SE_OFFLINE). Without them these tests skip with the reason; set
SAE_REQUIRE_BROWSER=1 (CI) to fail instead. SAE_REPORT_SCREENSHOTS=DIR saves the pages' screenshots shown in the
README (docs/img/report_index.png, report_member.png) into DIR.
"""

import csv
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sae_ensemble import pipeline
from sae_ensemble.html_report import figures, write_html_report
from sae_ensemble.report import by_hook, load_rows, main, pareto_front
from sae_ensemble.rundir import RunDir
from tests.sweeps import compose_config

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
QUICK = [  # grid=quick (relu and topk at two sizes) on a small synthetic store, seconds on CPU
    "grid=quick",
    "data.n_rows=20000",
    "data.rows_per_chunk=10000",
    "data.heldout_rows=2000",
    "training.steps=30",
    "devices=cpu",
    "progress=false",
    "wandb=disabled",
]


def start_chromium():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        reason = f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("SAE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"SAE_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager: never download a browser or a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))


@pytest.fixture(scope="module")
def browser():
    driver = start_chromium()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished grid=quick sweep, run in this process: the pipeline wrote its report at the end."""
    root = tmp_path_factory.mktemp("html")
    code = pipeline.run(compose_config(*QUICK, f"data.store_root={root / 'stores'}"), root / "run")
    assert code == 0
    return root / "run"


DRAWN = "return [...document.querySelectorAll('div.chart')].every(c => c.querySelector('svg.main-svg'))"


def open_page(driver, path: Path) -> list[dict]:
    """Load `path`, wait until every plotly chart on it has drawn, and return the browser's SEVERE log entries."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser")  # drop what an earlier page logged
    driver.get(path.resolve().as_uri())
    WebDriverWait(driver, 20).until(lambda d: d.execute_script(DRAWN))
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def table_ids(driver, table: str = "table.members") -> list[str]:
    from selenium.webdriver.common.by import By

    return [
        row.find_elements(By.TAG_NAME, "td")[1].text
        for row in driver.find_elements(By.CSS_SELECTOR, f"{table} tbody tr")
    ]


def screenshot(driver, name: str) -> None:
    """Into $SAE_REPORT_SCREENSHOTS (docs/img for the README), only when asked: CI never rewrites them."""
    folder = os.environ.get("SAE_REPORT_SCREENSHOTS")
    if folder:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, min(max(height, 800), 2200))
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / name))
        driver.set_window_size(1400, 1000)


def test_the_sweep_writes_an_index_and_a_page_per_member(run_dir):
    report = run_dir / "report"
    members = {r["member_id"] for r in load_rows(run_dir)}
    assert (report / "index.html").is_file() and (report / "plotly.min.js").stat().st_size > 1_000_000
    assert {p.stem for p in (report / "members").glob("*.html")} == members
    assert 'src="plotly.min.js"' in (report / "index.html").read_text()  # the bundle is shared, never inlined
    assert all(p.stat().st_size < 200_000 for p in report.rglob("*.html"))


def test_index_shows_the_pareto_chart_and_one_table_row_per_member_with_no_console_errors(run_dir, browser):
    from selenium.webdriver.common.by import By

    assert open_page(browser, run_dir / "report" / "index.html") == []
    pareto = browser.find_element(By.ID, "run-pareto-fvu")
    assert "js-plotly-plot" in pareto.get_attribute("class") and pareto.find_elements(By.CSS_SELECTOR, "svg.main-svg")
    assert len(pareto.find_elements(By.CSS_SELECTOR, ".scatterlayer .point")) >= len(load_rows(run_dir))
    assert browser.find_elements(By.CSS_SELECTOR, "#run-mmcs_truth.js-plotly-plot")  # synthetic: MMCS vs truth
    for score in ("mcc", "f1", "uniqueness"):  # the toy world's ground-truth scores, drawn
        chart = browser.find_element(By.ID, f"run-truth-{score}")
        assert len(chart.find_elements(By.CSS_SELECTOR, ".scatterlayer .point")) == len(load_rows(run_dir))
    assert sorted(table_ids(browser)) == sorted(r["member_id"] for r in load_rows(run_dir))
    screenshot(browser, "report_index.png")


def test_clicking_a_column_header_sorts_the_members_by_it(run_dir, browser):
    from selenium.webdriver.common.by import By

    open_page(browser, run_dir / "report" / "index.html")
    headers = browser.find_elements(By.CSS_SELECTOR, "table.members thead th")
    fvu = [h.text for h in headers].index("fvu")
    by_fvu = {r["member_id"]: r["fvu"] for r in load_rows(run_dir)}
    headers[fvu].click()
    assert table_ids(browser) == sorted(by_fvu, key=by_fvu.get)
    headers[fvu].click()
    assert table_ids(browser) == sorted(by_fvu, key=by_fvu.get, reverse=True)


def test_a_member_page_shows_its_density_histogram_and_its_latents(run_dir, browser):
    from selenium.webdriver.common.by import By

    row = load_rows(run_dir)[0]
    features = json.loads((RunDir(run_dir).member(row["member_id"]).features).read_text())
    assert open_page(browser, run_dir / "report" / "members" / f"{row['member_id']}.html") == []
    histogram = browser.find_element(By.ID, "density-histogram")
    assert len(histogram.find_elements(By.CSS_SELECTOR, ".barlayer .point")) >= 1
    assert f"of {row['dict_size']}" in browser.find_element(By.ID, "density").text
    latents = browser.find_elements(By.CSS_SELECTOR, "#latents .latent")
    assert len(latents) == min(20, len(features["latents"])) >= 10
    assert "best true feature" in latents[0].text  # a synthetic store: no tokens, each latent's true feature
    assert "No contexts: the store's rows are synthetic" in browser.find_element(By.ID, "features-note").text
    screenshot(browser, "report_member.png")
    browser.find_element(By.LINK_TEXT, "\u2190 all members").click()
    assert browser.current_url.endswith("/report/index.html")


def test_a_member_without_features_json_says_why_in_its_contexts_section(run_dir, tmp_path):
    run = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    rows = load_rows(run)
    (RunDir(run).member(rows[0]["member_id"]).features).unlink()
    write_html_report(run, by_hook(rows), pareto_front)
    page = (run / "report" / "members" / f"{rows[0]['member_id']}.html").read_text()
    assert 'id="contexts" class="empty"' in page and "eval.features=false" in page
    assert not (run / "report" / "members" / f"{rows[0]['member_id']}.features.js").exists()


FEATURES_FIXTURE = {  # the schema of docs/report.md, as the evaluation stage writes it (sae_ensemble/features.py)
    "member_id": "",
    "rows": 2000,
    "dict_size": 64,
    "dead": 3,
    "dense": 1,
    "dense_rate": 0.1,
    "has_contexts": True,
    "latents": [
        {
            "index": index,
            "why": "sample",
            "frequency": 0.01 * (index + 1),
            "mean_activation": 1.5,
            "max_activation": 3.0,
            "contexts": [
                {
                    "tokens": ["The", " cat", " <sat>", " on", " a", " mat"],
                    "activations": [0, 0.5, 3.0, 1, 0, 0],
                    "max_at": 2,
                }
                for _ in range(5)
            ],
            "splits": {"member_id": "next-size", "matches": [{"index": 7, "cosine": 0.9, "frequency": 0.01}]},
        }
        for index in range(25)
    ],
}


def test_a_member_with_features_json_lists_its_latents_with_tokens_shaded_by_activation(run_dir, browser, tmp_path):
    from selenium.webdriver.common.by import By

    run = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    member_id = load_rows(run)[0]["member_id"]
    (RunDir(run).member(member_id).features).write_text(json.dumps({**FEATURES_FIXTURE, "member_id": member_id}))
    assert main([str(run)]) == 0  # `python -m sae_ensemble.report RUN_DIR` rebuilds the HTML report
    assert open_page(browser, run / "report" / "members" / f"{member_id}.html") == []
    latents = browser.find_elements(By.CSS_SELECTOR, "#latents .latent")
    assert len(latents) == 20  # the first 20; the rest on demand
    first = latents[0].find_elements(By.CSS_SELECTOR, ".context")
    assert len(first) == 5 and first[0].text == "The cat <sat> on a mat"  # text, never markup
    peak = first[0].find_element(By.CSS_SELECTOR, ".token.peak")
    assert peak.get_attribute("textContent") == " <sat>" and "rgb(255, 120, 0)" in peak.get_attribute("style")
    assert "next-size" in latents[0].find_element(By.CSS_SELECTOR, ".split").text
    browser.find_element(By.ID, "more-latents").click()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#latents .latent")) == 25
    assert "2000 held-out rows" in browser.find_element(By.ID, "features-note").text


def test_a_broken_features_json_gives_a_page_that_says_why(run_dir, tmp_path):
    run = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    rows = load_rows(run)
    broken = {"latents": [{"index": 0, "frequency": 0.1, "mean_activation": 1.0, "contexts": [{"tokens": ["a"]}]}]}
    (RunDir(run).member(rows[0]["member_id"]).features).write_text(json.dumps(broken))
    write_html_report(run, by_hook(rows), pareto_front)
    page = (run / "report" / "members" / f"{rows[0]['member_id']}.html").read_text()
    assert "does not follow the schema in docs/report.md: latents[0].contexts[0] has no list of numbers" in page


def test_a_rebuilt_report_is_byte_identical(run_dir):
    report = run_dir / "report"
    before = {p: p.read_bytes() for p in report.rglob("*") if p.is_file()}
    rows = load_rows(run_dir)
    write_html_report(run_dir, by_hook(rows), pareto_front)
    assert {p: p.read_bytes() for p in report.rglob("*") if p.is_file()} == before


def index_figures(index: Path) -> dict[str, dict]:
    """The figures an index page carries, by chart id: the JSON report.js hands to plotly."""
    scripts = re.findall(r'<script type="application/json" id="([^"]+)-figure">(.*?)</script>', index.read_text())
    return {chart: json.loads(data) for chart, data in scripts}


def test_a_synthetic_run_charts_its_ground_truth_scores_against_l0_as_summary_csv_has_them(run_dir):
    with open(run_dir / "summary.csv", newline="") as f:
        summary = {row["member_id"]: row for row in csv.DictReader(f)}
    charts = index_figures(run_dir / "report" / "index.html")
    assert "Ground truth against L0" in (run_dir / "report" / "index.html").read_text()
    assert {c for c in charts if "-truth-" in c} == {"run-truth-mcc", "run-truth-f1", "run-truth-uniqueness"}
    assert {row["absorption"] for row in summary.values()} == {""}  # the toy world has no hierarchy: no chart
    for score in ("mcc", "f1", "uniqueness"):
        traces = charts[f"run-truth-{score}"]["data"]
        assert [t["name"] for t in traces] == sorted({row["variant"] for row in summary.values()})  # one per variant
        shown = {}
        for trace in traces:
            for x, y, data in zip(trace["x"], trace["y"], trace["customdata"]):
                shown[data[0]] = (format(x, ".6g"), format(y, ".6g"), *(format(v, ".6g") for v in data[1:]))
                assert summary[data[0]]["variant"] == trace["name"]
        detail = ("precision", "recall") if score == "f1" else ()  # F1's hover: precision and recall
        assert shown == {m: (row["l0"], row[score], *(row[k] for k in detail)) for m, row in summary.items()}


def with_truth_scores(rows: list[dict]) -> list[dict]:
    """fake_rows with a hierarchical world's scores; the first member's are NaN (a score it could not compute)."""
    for i, row in enumerate(rows):
        row.update(mcc=0.4 + i / 50, uniqueness=0.9 - i / 100, precision=0.7, recall=0.5 + i / 100)
        row.update(f1=2 * 0.7 * row["recall"] / (0.7 + row["recall"]), absorption=0.2 - i / 100)
    rows[0].update(mcc=math.nan, f1=math.nan, uniqueness=math.nan, absorption=math.nan)
    return rows


def test_ground_truth_charts_have_one_trace_per_variant_with_the_finite_scores_only(tmp_path, browser):
    from selenium.webdriver.common.by import By

    rows = with_truth_scores(fake_rows([None], 8))
    index = write_html_report(tmp_path, by_hook(rows), pareto_front)
    charts = index_figures(index)
    for score in figures.TRUTH_SCORES:
        traces = charts[f"run-truth-{score}"]["data"]
        assert [t["name"] for t in traces] == ["relu", "topk"]
        for trace in traces:
            group = [r for r in rows[1:] if r["variant"] == trace["name"]]  # the NaN member left out
            assert trace["x"] == [r["l0"] for r in group] and trace["y"] == [r[score] for r in group]
            assert [d[0] for d in trace["customdata"]] == [r["member_id"] for r in group]
    assert open_page(browser, index) == []
    for score in figures.TRUTH_SCORES:
        assert len(browser.find_elements(By.CSS_SELECTOR, f"#run-truth-{score} .scatterlayer .point")) == 7


def test_a_run_without_ground_truth_scores_has_no_ground_truth_section(tmp_path):
    lm = write_html_report(tmp_path / "lm", by_hook(fake_rows([None], 6)), pareto_front)  # an LM store: no columns
    nan = [{**row, "mcc": math.nan, "absorption": None} for row in fake_rows([None], 6)]  # columns, no values
    world = write_html_report(tmp_path / "nan", by_hook(nan), pareto_front)
    for index in (lm, world):
        assert "Ground truth against L0" not in index.read_text()
        assert not [chart for chart in index_figures(index) if "-truth-" in chart]
        assert "run-pareto-fvu" in index_figures(index)


def test_the_html_mmcs_heatmaps_show_mmcs_cells_means(tmp_path):
    rows = fake_rows([None], 12)
    charts = index_figures(write_html_report(tmp_path, by_hook(rows), pareto_front))
    grids = figures.mmcs_cells(rows, "mmcs_next")
    assert [trace["z"] for trace in charts["run-mmcs_next"]["data"]] == [grid.means for grid in grids.values()]


def fake_rows(hooks: list[str | None], per_hook: int) -> list[dict]:
    """Summary rows as report.load_rows gives them, for a grid of `per_hook` members on each hook (no training)."""
    rows = []
    for hook in hooks:
        for i in range(per_hook):
            variant, size = ("relu", "topk")[i % 2], 2 ** (12 + i % 3)
            row = {"member_id": f"{hook + '-' if hook else ''}{variant}-d{size}-m{i}", "hook": hook, "variant": variant}
            row.update(dict_size=size, l1=10 ** -(1 + i % 4), k=8 * (1 + i % 4), seed=i // 24, lr=1e-3, steps=3000)
            row.update(l0=5.0 + i, fvu=1 / (2 + i), mse=0.01, dead_frac=0.01 * (i % 7), mmcs_next=0.5 + (i % 5) / 10)
            row.update(ce_recovered=0.9 - 1 / (3 + i), mmcs_seed=0.6, alive=True)
            rows.append(row)
    return rows


def test_several_hooks_give_one_section_each_with_the_ce_recovered_front(tmp_path, browser):
    from selenium.webdriver.common.by import By

    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    rows = fake_rows(hooks, 6)
    index = write_html_report(tmp_path, by_hook(rows), pareto_front)
    assert open_page(browser, index) == []
    sections = browser.find_elements(By.CSS_SELECTOR, "section.hook")
    assert [s.find_element(By.TAG_NAME, "h2").text for s in sections] == hooks
    for section, hook in zip(sections, hooks):
        key = hook.replace(".", "-").replace("_", "-")
        assert section.find_elements(By.CSS_SELECTOR, f"#{key}-pareto-ce_recovered svg.main-svg")
        assert section.find_elements(By.CSS_SELECTOR, f"#{key}-mmcs_next svg.main-svg")
        assert len(section.find_elements(By.CSS_SELECTOR, "table.members tbody tr")) == 6


@pytest.mark.timing
def test_a_64_member_grid_of_16k_latent_dictionaries_opens_in_a_few_seconds(tmp_path, browser):
    rows = fake_rows([None], 64)
    g = torch.Generator().manual_seed(0)
    for row in rows:
        frequency = torch.rand(16384, generator=g) ** 8 * (torch.rand(16384, generator=g) > 0.05)
        directory = RunDir(tmp_path).member(row["member_id"]).path
        directory.mkdir(parents=True)
        save_file({"frequency": frequency}, str(RunDir(tmp_path).member(row["member_id"]).frequency))
    start = time.perf_counter()
    index = write_html_report(tmp_path, by_hook(rows), pareto_front)
    written = time.perf_counter() - start
    pages = {"index": index, "member": index.parent / "members" / f"{rows[0]['member_id']}.html"}
    seconds = {}
    for name, page in pages.items():
        start = time.perf_counter()
        assert open_page(browser, page) == []
        seconds[name] = time.perf_counter() - start
    sizes = {name: page.stat().st_size for name, page in pages.items()}
    print(f"64 members x 16k latents: report written in {written:.1f} s; opened (drawn) in {seconds}; bytes {sizes}")
    # A loaded 2-core box draws each page in about a second (docs/report.md); 5 s leaves room for CI.
    assert max(seconds.values()) < 5 and max(sizes.values()) < 200_000


def test_a_missing_browser_skips_locally_and_fails_when_required(monkeypatch, tmp_path):
    monkeypatch.setitem(globals(), "CHROMIUM", tmp_path / "chromium")
    monkeypatch.delenv("SAE_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        start_chromium()
    monkeypatch.setenv("SAE_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="SAE_REQUIRE_BROWSER=1 but"):
        start_chromium()


def test_a_tiny_lm_member_page_shows_ten_latents_with_five_contexts_whose_text_is_the_stores_tokens(tmp_path, browser):
    """#35's acceptance on `data=lm model=tiny grid=quick` (the random tiny GPT-2, for speed; tests/test_tiny_model.py
    runs the trained one): every context shown is the store's tokens around the row, decoded by its tokenizer."""
    import numpy as np
    from selenium.webdriver.common.by import By

    from sae_ensemble.activations.reader import ActivationStore
    from sae_ensemble.features import load_tokenizer
    from tests.test_hooks import TINY_LM

    stores = tmp_path / "stores"
    overrides = ("eval.ce_loss=false", f"data.store_root={stores}", "progress=false", "wandb=disabled")
    cfg = compose_config(*TINY_LM, *overrides)
    assert pipeline.run(cfg, tmp_path / "run") == 0
    store = ActivationStore.open(next(stores.glob("*/manifest.json")).parent)
    tokenizer = load_tokenizer(store)
    member = "relu-d64-l1_0.001-bd0-lr0.001-s0"
    features = json.loads((tmp_path / "run" / "members" / member / "features.json").read_text())

    assert open_page(browser, tmp_path / "run" / "report" / "members" / f"{member}.html") == []
    boxes = browser.find_elements(By.CSS_SELECTOR, "#latents .latent")
    assert len(boxes) >= 10
    for box, latent in zip(boxes, features["latents"]):
        assert box.get_attribute("id") == f"latent-{latent['index']}"
        shown = browser.execute_script(
            "return [...arguments[0].querySelectorAll(':scope > .context')].map(c => c.textContent)", box
        )
        assert len(shown) >= 5, latent["index"]
        for text, context in zip(shown, latent["contexts"]):
            first = context["row"] - context["max_at"]
            ids = store.tokens().rows(np.arange(first, first + len(context["tokens"])))[:, 0]
            assert text == "".join(tokenizer.decode([int(i)]) for i in ids), (latent["index"], context["row"])
    screenshot(browser, "report_member_lm.png")
