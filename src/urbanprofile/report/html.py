"""A static, self-contained HTML report of a results store: leaderboards, published figures, bias, seeds, maps.

Everything is inline (CSS, SVG plots, no script, no network), so the page opens from a file, a CI artefact or
an e-mail. The first screen answers "what wins, by how much, and how sure are we": one line per dataset and
task with the best leak-free result, the best raw baseline, the spatial hold-out figure and the published one.
"""

from __future__ import annotations

import datetime as dt
import html
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from urbanprofile.benchmark.runner import format_mean_std, leaderboard
from urbanprofile.benchmark.store import ResultStore
from urbanprofile.data.io import write_atomic
from urbanprofile.data.registry import get_entry
from urbanprofile.errors import UrbanProfileError
from urbanprofile.evaluation.protocols import N_BIAS_BLOCKS, PROTOCOLS
from urbanprofile.evaluation.spatial import spatial_blocks
from urbanprofile.evaluation.suites import SUITES, suite_aggregate, wins_text
from urbanprofile.methods import get_method
from urbanprofile.report.maps import BLOCK_R2_BOUND, diverging_colour, svg_paths
from urbanprofile.report.tables import PUBLISHED_R2

#: Published figures whose authors picked the training epoch by the test-fold score (data README).
TEST_SELECTED = frozenset({"HAFusion"})
PROTOCOL_NOTES = {
    "nested": "leak-free: every choice made by inner CV on training folds",
    "spatial": "whole k-means blocks held out; inner CV grouped by block",
    "paper": "the peers' protocol (Ridge α = 1, their folds), for comparison with published figures only",
}
_PROTOCOL_ORDER = ("nested", "spatial", "paper")
_COLOURS = {"nested": "#1f6fb4", "spatial": "#d9730d", "paper": "#7a7a7a"}
esc = html.escape


@dataclass
class ReportResult:
    """What :func:`write_report` wrote."""

    path: Path
    n_rows: int
    n_datasets: int
    maps: int
    notes: list[str]


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _family(method: str) -> str:
    try:
        return get_method(method.split(" · ", 1)[0]).family
    except UrbanProfileError:
        return "unregistered"


def _with_head(row: dict[str, Any]) -> dict[str, Any]:
    """A row whose method name says its head when that is not the method's own (``pca · moe``)."""
    try:
        own = get_method(row["method"]).head
    except UrbanProfileError:
        own = "ridge"
    head = row.get("head") or own
    return row if head == own else {**row, "method": f"{row['method']} · {head}"}


def _is_baseline(method: str) -> bool:
    return _family(method) == "baseline"


# -- small inline SVG plots -----------------------------------------------------------------------------
def _r2_axis(values: Iterable[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    low = min([0.0, *finite]) if finite else 0.0
    return max(low, -0.5), 1.0


def _bar(mean: float, low: float, high: float, colour: str, width: int = 90) -> str:
    """A tiny horizontal bar for an R^2 cell, zero marked; values below ``low`` end in an arrow."""
    if mean is None or not math.isfinite(mean):
        return ""
    x0 = (0 - low) / (high - low) * width
    x = (min(max(mean, low), high) - low) / (high - low) * width
    left, right = sorted((x0, x))
    clipped = mean < low
    arrow = f'<path d="M0,5 L5,1 L5,9 Z" fill="{colour}"/>' if clipped else ""
    return (f'<svg class="bar" width="{width}" height="10" aria-hidden="true"><rect x="{left:.1f}" y="1" '
            f'width="{max(right - left, 1):.1f}" height="8" fill="{colour}" opacity="0.75"/>{arrow}'
            f'<line x1="{x0:.1f}" x2="{x0:.1f}" y1="0" y2="10" stroke="#333" stroke-width="0.8"/></svg>')


def seed_spread_svg(rows: pd.DataFrame, methods: list[str], protocols: list[str]) -> str:
    """R^2 of every seed (dots) and their mean (tick) per method, one colour per protocol."""
    low, high = _r2_axis(rows["r2"])
    row_h, left, width, right = 22, 130, 420, 16
    height = row_h * len(methods) + 46
    xs = lambda v: left + (min(max(v, low), high) - low) / (high - low) * width  # noqa: E731
    parts = [f'<svg class="plot" viewBox="0 0 {left + width + right} {height}" width="{left + width + right}" '
             f'height="{height}" role="img" aria-label="R² per seed">']
    for tick in np.arange(math.ceil(low * 4) / 4, high + 1e-9, 0.25):
        x = xs(float(tick))
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="8" y2="{height - 30}" stroke="#e3e3e3"/>'
                     f'<text x="{x:.1f}" y="{height - 16}" class="tick">{tick:.2f}</text>')
    parts.append(f'<line x1="{xs(0):.1f}" x2="{xs(0):.1f}" y1="8" y2="{height - 30}" stroke="#999"/>')
    offsets = {p: (i - (len(protocols) - 1) / 2) * 6 for i, p in enumerate(protocols)}
    for i, method in enumerate(methods):
        y = 18 + i * row_h
        parts.append(f'<text x="{left - 8}" y="{y + 4}" class="label">{esc(method)}</text>')
        for protocol in protocols:
            sub = rows[(rows["method"] == method) & (rows["protocol"] == protocol)]
            if sub.empty:
                continue
            colour, dy = _COLOURS[protocol], offsets[protocol]
            for seed, r2 in zip(sub["seed"], sub["r2"], strict=True):
                if r2 is None or not math.isfinite(r2):
                    continue
                tip = esc(f"{method}, {protocol}, seed {seed}: R² {r2:.3f}")
                if r2 < low:
                    parts.append(f'<path d="M{xs(low):.1f},{y + dy} l6,-4 l0,8 Z" fill="{colour}"><title>{tip}'
                                 "</title></path>")
                else:
                    parts.append(f'<circle cx="{xs(r2):.1f}" cy="{y + dy}" r="3.2" fill="{colour}" '
                                 f'fill-opacity="0.55"><title>{tip}</title></circle>')
            mean = float(np.nanmean(sub["r2"].to_numpy(dtype=float)))
            if math.isfinite(mean):
                parts.append(f'<line x1="{xs(mean):.1f}" x2="{xs(mean):.1f}" y1="{y + dy - 6}" y2="{y + dy + 6}" '
                             f'stroke="{colour}" stroke-width="2.2"><title>{esc(method)}, {protocol}: mean R² '
                             f"{mean:.3f}</title></line>")
    legend_x = left
    for protocol in protocols:
        parts.append(f'<circle cx="{legend_x}" cy="{height - 5}" r="4" fill="{_COLOURS[protocol]}"/>'
                     f'<text x="{legend_x + 8}" y="{height - 1}" class="legend">{protocol}</text>')
        legend_x += 80
    parts.append(f'<text x="{left + width}" y="{height - 1}" class="legend" text-anchor="end">R² (dots: seeds, '
                 f"bar: mean; ◂ below {low:.2f})</text></svg>")
    return "".join(parts)


def _block_colour(value: float) -> str:
    # The same scale as `urbanprofile map --layer bias:<task>`: fixed -1 .. 1, red below zero.
    return diverging_colour(value, BLOCK_R2_BOUND)


def block_map_svg(city: Any, block_r2: dict[str, float], title: str, width: float = 300.0) -> str:
    """Regions coloured by the R^2 of the spatial bias block they lie in (mean over seeds)."""
    paths, height = svg_paths(city, width)
    blocks = spatial_blocks(city, N_BIAS_BLOCKS)
    shapes = []
    for region, d, block in zip(city.region_ids, paths, blocks, strict=True):
        if not d:
            continue
        value = block_r2.get(str(int(block)), float("nan"))
        label = esc(f"region {region}: block {int(block)}, R² {_f(value)}")
        shapes.append(f'<path d="{d}" fill="{_block_colour(value)}"><title>{label}</title></path>')
    pad = 6
    return (f'<figure class="map"><svg viewBox="{-pad} {-pad} {width + 2 * pad:.0f} {height + 2 * pad:.0f}" '
            f'width="{width + 2 * pad:.0f}" height="{height + 2 * pad:.0f}" role="img" aria-label="{esc(title)}">'
            f'<g stroke="#fff" stroke-width="0.3">{"".join(shapes)}</g></svg><figcaption>{esc(title)}</figcaption>'
            "</figure>")


def _legend_svg() -> str:
    stops = "".join(f'<stop offset="{k / 10:.1f}" stop-color="{_block_colour(-1 + k / 5)}"/>' for k in range(11))
    return ('<svg width="230" height="34" role="img" aria-label="block R² colour scale"><defs>'
            f'<linearGradient id="r2scale">{stops}</linearGradient></defs><rect x="8" y="2" width="214" height="10" '
            'fill="url(#r2scale)"/><text x="2" y="26" class="tick" text-anchor="start">≤ −1</text>'
            '<text x="115" y="26" class="tick">block R² 0</text>'
            '<text x="222" y="26" class="tick" text-anchor="end">1</text></svg>')


# -- tables ---------------------------------------------------------------------------------------------
def _leaderboard_table(group: pd.DataFrame, protocol: str, published: dict[str, float] | None) -> str:
    sub = group[group["protocol"] == protocol].sort_values("r2_mean", ascending=False)
    low, high = _r2_axis(sub["r2_mean"])
    colour = _COLOURS[protocol]
    head = ("<tr><th>#</th><th>method</th><th>R² (mean ± std)</th><th></th><th>MAE</th><th>RMSE</th>"
            "<th>worst-block R²</th><th>R² gap</th><th>Moran's I</th><th>seeds</th><th>fit s</th></tr>")
    body = []
    for rank, r in enumerate(sub.to_dict("records"), start=1):
        kind = "baseline" if _is_baseline(r["method"]) else "learned"
        body.append(
            f'<tr class="{kind}"><td>{rank}</td><td class="method">{esc(r["method"])}'
            f'<span class="tag">{kind}</span></td>'
            f'<td class="num r2">{format_mean_std(r["r2_mean"], r["r2_std"])}</td>'
            f'<td>{_bar(r["r2_mean"], low, high, colour)}</td>'
            f'<td class="num">{format_mean_std(r["mae_mean"], r["mae_std"], 1)}</td>'
            f'<td class="num">{format_mean_std(r["rmse_mean"], r["rmse_std"], 1)}</td>'
            f'<td class="num">{_f(r["worst_block_r2_mean"])}</td><td class="num">{_f(r["r2_gap_mean"])}</td>'
            f'<td class="num">{_f(r["morans_i_mean"])}</td><td class="num">{int(r["n_seeds"])}</td>'
            f'<td class="num">{_f(r["fit_seconds_mean"], 2)}</td></tr>')
    if protocol == "paper" and published:
        for label, value in published.items():
            mark = ' <span class="warn" title="epoch chosen on the test folds">test-selected</span>' if (
                label in TEST_SELECTED) else ""
            body.append(f'<tr class="published"><td></td><td class="method">published: {esc(label)}{mark}</td>'
                        f'<td class="num r2">{value:.3f}</td><td>{_bar(value, low, high, "#999")}</td>'
                        '<td colspan="7" class="note">as reported by its authors</td></tr>')
    return (f'<table class="board" data-protocol="{protocol}"><caption><b style="color:{colour}">{protocol}</b> — '
            f"{esc(PROTOCOL_NOTES.get(protocol, ''))}</caption><thead>{head}</thead><tbody>{''.join(body)}"
            "</tbody></table>")


def _best(group: pd.DataFrame, protocol: str, baseline: bool | None = None) -> dict[str, Any] | None:
    sub = group[group["protocol"] == protocol]
    if baseline is not None:
        sub = sub[[_is_baseline(m) == baseline for m in sub["method"]]]
    sub = sub[np.isfinite(sub["r2_mean"].to_numpy(dtype=float))]
    if sub.empty:
        return None
    return dict(sub.loc[sub["r2_mean"].idxmax()])


def _cell(best: dict[str, Any] | None, extra: str = "") -> str:
    if best is None:
        return "<td>–</td>"
    return (f'<td><span class="num r2">{format_mean_std(best["r2_mean"], best["r2_std"])}</span><br>'
            f'<span class="who">{esc(best["method"])}</span>{extra}</td>')


def _glance(board: pd.DataFrame) -> tuple[str, str]:
    """The first-screen table and a one-sentence summary."""
    rows, wins, pairs = [], 0, 0
    for (dataset, task), group in board.groupby(["dataset", "task"], sort=True):
        main = "nested" if "nested" in set(group["protocol"]) else str(group["protocol"].iloc[0])
        best = _best(group, main)
        base = _best(group, main, baseline=True)
        learned = _best(group, main, baseline=False)
        spatial = _best(group, "spatial")
        paper = _best(group, "paper")
        published = PUBLISHED_R2.get((str(dataset), str(task))) or {}
        if learned is not None and base is not None:
            pairs += 1
            wins += learned["r2_mean"] > base["r2_mean"]
        gap = ""
        if learned is not None and base is not None:
            delta = learned["r2_mean"] - base["r2_mean"]
            gap = f'<td class="num {"pos" if delta > 0 else "neg"}">{delta:+.3f}</td>'
        else:
            gap = "<td>–</td>"
        pub = "<br>".join(f"<span>{esc(k)} {v:.3f}{'†' if k in TEST_SELECTED else ''}</span>"
                          for k, v in published.items()) or "–"
        worst = _f(spatial["worst_block_r2_mean"]) if spatial else "–"
        anchor = f"{dataset}-{task}"
        rows.append(
            f'<tr><td><a href="#{esc(anchor)}">{esc(str(dataset))} · {esc(str(task))}</a></td>'
            f'<td class="num">{int(group["n_regions"].iloc[0])}</td>{_cell(best)}{_cell(base)}{_cell(learned)}{gap}'
            f'{_cell(spatial)}<td class="num">{worst}</td>{_cell(paper)}<td class="pub">{pub}</td></tr>')
    head = ("<tr><th>dataset · task</th><th>n</th><th>best (nested)</th><th>best baseline (nested)</th>"
            "<th>best learned (nested)</th><th>learned − baseline</th><th>best (spatial)</th>"
            "<th>its worst-block R²</th><th>ours under peers' protocol</th><th>published (peers' protocol)</th></tr>")
    summary = (f"A learned method beats the best raw baseline on <b>{wins} of {pairs}</b> dataset · task pairs "
               "under the leak-free nested protocol." if pairs else
               "Only one kind of method (baselines or learned) is in the store; no comparison between them.")
    return (f'<table class="glance"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>', summary)


# -- the page -------------------------------------------------------------------------------------------
_CSS = """
:root { --ink: #1d1d1f; --muted: #666; --line: #e2e2e2; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink); margin: 0;
       background: #fbfbfa; }
header { background: #14324f; color: #fff; padding: 14px 28px 12px; }
header h1 { font-size: 20px; margin: 0 0 2px; font-weight: 600; }
header p { margin: 0; color: #cfdbe7; font-size: 13px; }
main { max-width: 1280px; margin: 0 auto; padding: 10px 28px 40px; }
h2 { font-size: 17px; margin: 26px 0 6px; border-bottom: 2px solid var(--ink); padding-bottom: 3px; }
h3 { font-size: 15px; margin: 22px 0 4px; }
p.lead { font-size: 15px; margin: 10px 0 8px; }
table { border-collapse: collapse; background: #fff; margin: 6px 0 12px; }
th, td { padding: 3px 8px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: middle; }
th { font-weight: 600; font-size: 12px; color: #333; background: #f1f1ef; white-space: nowrap; }
td.num, span.num { font-variant-numeric: tabular-nums; text-align: right; white-space: nowrap; }
table.glance td { white-space: nowrap; }
table.glance th { white-space: normal; vertical-align: bottom; }
table.glance .who { color: var(--muted); font-size: 12px; }
td.pos { color: #0a7d32; } td.neg { color: #b3261e; }
td.pub { font-style: italic; color: #444; }
caption { text-align: left; padding: 4px 0; font-size: 13px; color: #333; }
.tag { font-size: 10px; color: var(--muted); border: 1px solid var(--line); border-radius: 3px; padding: 0 3px;
       margin-left: 6px; }
tr.learned td.method { font-weight: 600; }
tr.published td { font-style: italic; color: #555; background: #fafafa; }
.warn { font-style: normal; font-size: 10px; background: #fde7c8; color: #7a4100; border-radius: 3px;
        padding: 0 4px; }
.note { color: var(--muted); font-size: 12px; }
.grid { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.boards { display: flex; flex-wrap: wrap; gap: 0 22px; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
svg text.label { text-anchor: end; }
svg text.tick { text-anchor: middle; fill: #777; font-size: 10px; }
svg text.legend { font-size: 11px; fill: #444; }
.maps { display: grid; grid-template-columns: repeat(2, 312px); gap: 14px; }
figure.map { margin: 0; } figure.map figcaption { font-size: 12px; color: #333; max-width: 310px; }
nav { font-size: 12.5px; margin: 8px 0; color: var(--muted); } nav a { margin-right: 10px; }
footer { color: var(--muted); font-size: 12px; margin-top: 30px; }
a { color: #1f5fa0; text-decoration: none; } a:hover { text-decoration: underline; }
"""


def _load_city(dataset: str, data_dir: str | os.PathLike[str] | None, notes: list[str]) -> Any:
    try:
        city = get_entry(dataset, data_dir).load()
    except UrbanProfileError as err:
        notes.append(f"{dataset}: no block maps ({' '.join(str(err).split())})")
        return None
    if not city.has_locations:
        notes.append(f"{dataset}: no block maps (no region locations)")
        return None
    return city


def _mean_blocks(rows: list[dict[str, Any]]) -> dict[str, float]:
    blocks: dict[str, list[float]] = {}
    for row in rows:
        for block, value in (row.get("block_r2") or {}).items():
            if value is not None and math.isfinite(value):
                blocks.setdefault(block, []).append(float(value))
    return {b: float(np.mean(v)) for b, v in blocks.items()}


def _suite_summary(ok: list[dict[str, Any]]) -> str:
    """Per suite and protocol, one line per method: the aggregate a researcher can cite, with the protocol named."""
    boards = {name: suite_aggregate(ok, suite) for name, suite in SUITES.items()}
    if boards["all"].empty or (boards["core"].empty or boards["socioeconomic"].empty):
        boards.pop("all")  # the same pairs as the one suite present
    parts = []
    for name, board in boards.items():
        if board.empty:
            continue
        for protocol, group in board.groupby("protocol", sort=False):
            if protocol == "paper":
                continue  # the peers' protocol is for comparison with their figures, not for a leaderboard
            body = "".join(
                f"<tr><td>{esc(r['method'])}</td><td>{esc(r['head'])}</td><td>{_f(r['mean_r2'])}</td>"
                f"<td>{r['mean_rank']:.2f} [{r['rank_low']:.2f}, {r['rank_high']:.2f}]</td>"
                f"<td>{wins_text(r)}</td><td>{r['n_pairs']}</td></tr>"
                for r in group.to_dict("records"))
            n_common = int(group["n_common"].iloc[0])
            caveats = "".join(f" {esc(c)}." for c in SUITES[str(name)].caveats)
            parts.append(
                f'<table><caption>suite <b>{esc(str(name))}</b> · protocol <b>{esc(str(protocol))}</b> '
                f'({esc(PROTOCOLS[str(protocol)])}) · {n_common} of {SUITES[str(name)].n_pairs} pairs, every '
                f'method scored on each.{caveats}</caption><thead><tr><th>method</th><th>head</th><th>mean R²</th>'
                f'<th>mean rank [95% bootstrap CI]</th><th>wins vs best raw</th><th>pairs run</th></tr></thead>'
                f'<tbody>{body}</tbody></table>')
    if not parts:
        return ""
    return ('<h2 id="suites">Suites</h2><p class="note">Over the pairs of a suite that every method ran on: mean R² '
            '(mean over seeds per pair), mean rank (1 = best), wins = pairs where the method beats the best raw-* '
            'baseline on the same folds.</p><div class="boards">' + "".join(parts) + "</div>")


#: The index's list of prediction pages sits between these markers, so a page written later can be added to it.
_MODELS_START, _MODELS_END = "<!-- prediction pages -->", "<!-- /prediction pages -->"
#: A prediction page names what it predicts in this meta tag; the index's list reads it.
MODEL_PAGE_META = "urbanprofile-model-page"


def model_pages_html(folder: Path) -> str:
    """The index's section linking the prediction pages (``model-*.html``, from ``report --model``) in ``folder``."""
    items = []
    for page in sorted(folder.glob("model-*.html")):
        head = page.read_text(encoding="utf-8", errors="replace")[:4000]
        found = re.search(rf'<meta name="{MODEL_PAGE_META}" content="([^"]*)">', head)
        label = html.unescape(found.group(1)) if found else page.stem
        items.append(f'<li><a href="{esc(page.name)}">{esc(label)}</a></li>')
    if not items:
        return _MODELS_START + _MODELS_END
    return (f'{_MODELS_START}<h2 id="models">Prediction pages ({len(items)})</h2><p class="note">Models fit with '
            '<code>urbanprofile fit</code>: predictions for regions without the label, intervals and their measured '
            f'coverage, applicability (<code>urbanprofile report --model</code>).</p><ul>{"".join(items)}</ul>'
            + _MODELS_END)


def refresh_model_links(folder: Path) -> bool:
    """Rewrite the prediction-page list of ``folder/index.html`` (when it has one); ``True`` if it was rewritten."""
    index = folder / "index.html"
    if not index.is_file():
        return False
    text = index.read_text(encoding="utf-8")
    start, end = text.find(_MODELS_START), text.find(_MODELS_END)
    if start < 0 or end < start:
        return False  # an index written before pages were listed, or not ours
    updated = text[:start] + model_pages_html(folder) + text[end + len(_MODELS_END):]

    def write_index(tmp: Path) -> None:
        tmp.write_text(updated, encoding="utf-8")

    write_atomic(index, write_index)
    return True


def render_report(rows: list[dict[str, Any]], source: str = "", data_dir: str | os.PathLike[str] | None = None,
                  with_maps: bool = True, models_html: str = "") -> tuple[str, int, list[str]]:
    """The report page for the stored ``rows``; ``models_html``: the list of prediction pages beside it.

    Returns:
        The HTML, the number of maps drawn and notes (what was left out and why).
    """
    ok = [r for r in rows if r.get("status") != "failed"]
    failed = [r for r in rows if r.get("status") == "failed"]
    if not ok and not failed:
        raise UrbanProfileError(f"{source or 'the store'}: no results to report (run `urbanprofile benchmark` first)")
    if not ok:
        return _failures_page(failed, source), 0, [f"every row in the store failed ({len(failed)} rows): the page "
                                                   "lists them and why"]
    board = leaderboard(ok)
    frame = pd.DataFrame(ok)
    notes: list[str] = []
    n_maps = 0
    glance, summary = _glance(board)
    datasets = sorted(set(board["dataset"]))
    nav = " ".join(f'<a href="#{esc(d)}-{esc(t)}">{esc(d)} · {esc(t)}</a>'
                   for d, t in board[["dataset", "task"]].drop_duplicates().itertuples(index=False))
    sections = []
    for dataset in datasets:
        city = _load_city(dataset, data_dir, notes) if with_maps else None
        sections.append(f'<h2 id="{esc(dataset)}">{esc(dataset)}</h2>')
        for task, group in board[board["dataset"] == dataset].groupby("task", sort=True):
            published = PUBLISHED_R2.get((dataset, str(task)))
            protocols = [p for p in _PROTOCOL_ORDER if p in set(group["protocol"])]
            tables = "".join(_leaderboard_table(group, p, published) for p in protocols)
            seeds = frame[(frame["dataset"] == dataset) & (frame["task"] == task)]
            main: list[str] = [p for p in ("nested", "spatial") if p in protocols] or protocols[:1]
            order = list(group[group["protocol"] == main[0]].sort_values("r2_mean", ascending=False)["method"])
            spread = seed_spread_svg(seeds[seeds["protocol"].isin(main)], order, main)
            maps = ""
            if city is not None:
                bias_protocol = "spatial" if "spatial" in protocols else main[0]
                best = _best(group, bias_protocol)
                other = None
                if best is not None:
                    other = _best(group, bias_protocol, baseline=not _is_baseline(best["method"]))
                figures = []
                for pick, role in ((best, "best method"), (other, "best baseline" if best is not None and not (
                        _is_baseline(best["method"])) else "best learned method")):
                    if pick is None:
                        continue
                    picked = [r for r in ok if r["dataset"] == dataset and r["task"] == task and r["method"] == pick[
                        "method"] and r["protocol"] == bias_protocol]
                    title = (f"{role}: {pick['method']} ({bias_protocol}, R² {pick['r2_mean']:.3f}, worst block "
                             f"{_f(pick['worst_block_r2_mean'])}; mean over {len(picked)} seed(s))")
                    figures.append(block_map_svg(city, _mean_blocks(picked), title))
                    n_maps += 1
                if figures:
                    maps = ('<div><h4 class="note">R² per spatial block (5 k-means blocks)</h4><div class="maps">'
                            + "".join(figures) + f"</div>{_legend_svg()}</div>")
            sections.append(
                f'<h3 id="{esc(dataset)}-{esc(str(task))}">{esc(dataset)} · {esc(str(task))} '
                f'<span class="note">n = {int(group["n_regions"].iloc[0])} regions</span></h3>'
                f'<div class="boards">{tables}</div>'
                f'<div class="grid"><div><h4 class="note">R² over seeds</h4>{spread}</div>{maps}</div>')
    failed_html = _failed_list(failed)
    seeds_used = sorted({int(r["seed"]) for r in ok})
    meta = (f"{len(ok)} results · {len(datasets)} datasets · {len(set(frame['method']))} methods · seeds "
            f"{', '.join(map(str, seeds_used))} · "
            f"generated {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}")
    notes_html = "".join(f"<li>{esc(n)}</li>" for n in notes)
    page = page_start(f"{esc(source)} · {esc(meta)}") + f"""<main>
<p class="lead">{summary} R² is pooled out-of-fold, mean ± std over seeds; <i>nested</i> is the honest figure,
<i>spatial</i> holds out whole areas, <i>paper</i> is the peers' protocol, shown only beside their published
figures († / <span class="warn">test-selected</span>: the authors chose the epoch on the test folds, so the figure
is optimistic).</p>
{glance}
{_suite_summary(ok)}
{models_html or _MODELS_START + _MODELS_END}
<nav>Jump to: {nav}</nav>
{"".join(sections)}
{failed_html}
<footer><p>Worst-block R²: the lowest R² over 5 k-means blocks of regions; R² gap: overall minus worst block;
Moran's I: spatial autocorrelation of the residuals on the region adjacency (0 = none left).</p>
<ul>{notes_html}</ul><p>Made by urbanprofile from {esc(source)}; a static page with no scripts and no network.</p>
</footer></main></body></html>
"""
    return page, n_maps, notes


def page_start(subtitle_html: str, title: str = "urbanprofile benchmark report") -> str:
    """The page's head (a strict CSP: no scripts, no network) and its header line; ``subtitle_html`` is escaped."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{html.escape(title)}</title>
<style>{_CSS}</style></head>
<body>
<header><h1>{html.escape(title)}</h1><p>{subtitle_html}</p></header>
"""


def _failed_list(failed: list[dict[str, Any]]) -> str:
    if not failed:
        return ""
    items = "".join(f"<li>{esc(str(r['dataset']))} · {esc(str(r['task']))} · {esc(str(r['method']))} · "
                    f"{esc(str(r['protocol']))} seed {r['seed']}: {esc(str(r.get('error')))}</li>" for r in failed)
    return f"<h2>Failed units ({len(failed)} rows)</h2><ul>{items}</ul>"


def _failures_page(failed: list[dict[str, Any]], source: str) -> str:
    """The page of a store whose every row failed: what failed and why, rather than "no results"."""
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return page_start(f"{esc(source)} · no successful results · generated {when}") + f"""<main>
<p class="lead">No result in this store succeeded: every one of its {len(failed)} rows failed. Their reasons follow;
fix the cause and run <code>urbanprofile benchmark</code> again (failed rows are retried).</p>
{_failed_list(failed)}
<footer><p>Made by urbanprofile from {esc(source)}; a static page with no scripts and no network.</p></footer>
</main></body></html>
"""


def write_report(store: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                 data_dir: str | os.PathLike[str] | None = None, with_maps: bool = True) -> ReportResult:
    """Read ``store`` (read-only) and write ``out_dir/index.html``, linking the prediction pages already in ``out_dir``.

    Raises:
        DataError: If the store is missing, locked, of another version, or holds no results.
    """
    with ResultStore(Path(store), read_only=True) as results:
        rows = [_with_head(r) for r in results.rows()]
    target = Path(out_dir)
    if target.exists() and not target.is_dir():
        raise UrbanProfileError(f"{target}: exists and is not a folder")
    page, n_maps, notes = render_report(rows, str(store), data_dir, with_maps,
                                        models_html=model_pages_html(target) if target.is_dir() else "")
    target.mkdir(parents=True, exist_ok=True)
    path = target / "index.html"
    def write_page(tmp: Path) -> None:
        tmp.write_text(page, encoding="utf-8")

    write_atomic(path, write_page)
    return ReportResult(path, len(rows), len({r["dataset"] for r in rows}), n_maps, notes)
