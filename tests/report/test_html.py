"""The HTML report: self-contained, right numbers, and it loads in a real (headless Chromium) browser."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_user_error
from helpers import run_cli_process as run_cli

from urbanprofile.benchmark.runner import BenchmarkPlan, format_mean_std, leaderboard, run_benchmark
from urbanprofile.benchmark.store import ResultStore
from urbanprofile.errors import DataError
from urbanprofile.report.html import render_report, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from conftest import write_hafusion_city

    root = tmp_path_factory.mktemp("report")
    write_hafusion_city(root, n=40)
    path = root / "results.duckdb"
    plan = BenchmarkPlan(datasets=["hafusion-testcity"], methods=["raw-poi", "raw-all"],
                         tasks=["crime", "checkin"], protocols=["nested", "spatial"], seeds=[0])
    with ResultStore(path) as results:
        run_benchmark(plan, data_dir=root, store=results, progress=False)
    return path, root


def test_report_is_self_contained_and_matches_the_store(store: tuple[Path, Path], tmp_path: Path) -> None:
    path, data = store
    written = write_report(path, tmp_path / "report", data_dir=data)
    page = written.path.read_text()
    assert written.maps == 2  # per task: the best method (no learned method to set beside it here)
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "<script" not in page  # nothing fetched or run
    with ResultStore(path, read_only=True) as results:
        rows = results.rows()
    board = leaderboard(rows)
    for _, group in board.groupby(["task", "protocol"]):
        top = group.sort_values("r2_mean", ascending=False).iloc[0]
        assert format_mean_std(top["r2_mean"], top["r2_std"]) in page
    with pytest.raises(Exception, match="no results to report"):
        render_report([], "empty.duckdb")


def test_index_and_prediction_pages_link_each_other_in_either_order(store: tuple[Path, Path], tmp_path: Path) -> None:
    from urbanprofile.data.registry import load_dataset
    from urbanprofile.predict import fit_model
    from urbanprofile.predict.page import write_model_page

    path, data = store
    city = load_dataset("hafusion-testcity", data)
    for name in ("first", "second"):
        fit_model(city, "raw-poi", "crime", tmp_path / name)
    out = tmp_path / "report"
    write_model_page(tmp_path / "first", out, data_dir=data)  # a page before the index ...
    index = write_report(path, out, data_dir=data, with_maps=False).path
    assert 'href="model-first.html"' in index.read_text() and "Prediction pages (1)" in index.read_text()
    second = write_model_page(tmp_path / "second", out, data_dir=data)  # ... and one after it
    text = index.read_text()
    assert 'href="model-first.html"' in text and 'href="model-second.html"' in text
    assert "Prediction pages (2)" in text and "crime on hafusion-testcity by raw-poi + ridge (second)" in text
    assert any("now links this page" in n for n in second.notes)
    assert 'href="index.html"' in second.path.read_text()
    assert 'href="index.html"' not in (out / "model-first.html").read_text()  # no index existed when it was written
    assert text.count("Prediction pages") == 1


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_in_headless_chromium(store: tuple[Path, Path], tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    path, data = store
    written = write_report(path, tmp_path / "report", data_dir=data)
    errors: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(written.path.as_uri())
            boards: list[dict[str, Any]] = page.eval_on_selector_all(
                "h3", """hs => hs.map(h => {
                    let el = h.nextElementSibling; const tables = el.querySelectorAll('table.board');
                    return Array.from(tables).map(t => ({title: h.id, protocol: t.dataset.protocol,
                        method: t.querySelector('tbody tr td.method').firstChild.textContent.trim(),
                        r2: t.querySelector('tbody tr td.r2').textContent.trim()}));
                }).flat()""")
            page.screenshot(path=str(tmp_path / "report.png"))
            assert page.locator("svg.plot").count() == 2 and page.locator("figure.map").count() == 2
        finally:
            browser.close()
    assert errors == []
    assert (tmp_path / "report.png").stat().st_size > 10_000
    with ResultStore(path, read_only=True) as results:
        board = leaderboard(results.rows())
    expected = {}
    for (task, protocol), group in board.groupby(["task", "protocol"]):
        top = group.sort_values("r2_mean", ascending=False).iloc[0]
        expected[(f"hafusion-testcity-{task}", protocol)] = (top["method"], format_mean_std(top["r2_mean"], 0.0))
    shown = {(b["title"], b["protocol"]): (b["method"], b["r2"]) for b in boards}
    assert shown == expected


def test_cli_report_bad_input(tmp_path: Path) -> None:
    ResultStore(tmp_path / "empty.duckdb").close()
    result = run_cli("report", "--store", str(tmp_path / "empty.duckdb"), "--out", str(tmp_path / "rep"))
    assert_user_error(result, "empty.duckdb", "no results to report")
    assert not (tmp_path / "rep").exists()
    with pytest.raises(DataError, match=r"nope\.duckdb: no results store there"):
        write_report(tmp_path / "nope.duckdb", tmp_path / "rep")
    assert not (tmp_path / "nope.duckdb").exists()
