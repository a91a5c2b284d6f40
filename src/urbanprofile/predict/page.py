"""The report's prediction page for a model folder: model card, measured coverage, three maps, the flagged regions.

A static page like the results report (``urbanprofile report``): inline CSS and SVG, no script, no network, the
same strict Content-Security-Policy, so it opens from a file or an e-mail and cannot fetch anything. The
interactive map with buttons is ``predict --map page.html``; this page is the one to keep beside a results
report and to hand to whoever asked for the estimates.
"""

from __future__ import annotations

import datetime as dt
import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.data.io import write_atomic
from urbanprofile.errors import UrbanProfileError, require
from urbanprofile.predict.conformal import held_out_fold_coverage
from urbanprofile.predict.model import FittedModel, load_model, predict_regions
from urbanprofile.predict.output import FLAG_COLOURS, LAYERS, layer_cmap, model_card, prediction_layer_values
from urbanprofile.report.html import MODEL_PAGE_META, page_start, refresh_model_links
from urbanprofile.report.maps import svg_paths

esc = html.escape
#: Regions the model was not asked about (they have the label): drawn, not coloured.
LABELLED_FILL = "#e4e4e4"
#: The flagged-regions table lists at most this many rows (the GeoParquet from ``predict`` has them all).
MAX_FLAGGED_ROWS = 500
MAP_WIDTH = 380.0
#: Tall cities (Manhattan) are drawn no taller than this, so the three maps sit side by side on a laptop screen.
MAP_MAX_HEIGHT = 460.0
_PAGE_CSS = """
.maps3 { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.maps3 figure.map svg { display: block; }
.maps3 figure.map figcaption { max-width: 380px; }
svg text.start { text-anchor: start; } svg text.end { text-anchor: end; }
figure.map svg path.flagged { stroke: #7a0000; stroke-width: 1.1; }
table.card th { white-space: normal; max-width: 220px; }
td.reason { max-width: 520px; font-size: 12px; }
"""


@dataclass
class ModelPage:
    """What :func:`write_model_page` wrote."""

    path: Path
    n_predicted: int
    n_flagged: int
    notes: list[str]


def _fills(frame: Any, column: str, cmap_name: str) -> tuple[list[str], float, float]:
    colors = require("matplotlib.colors", "maps")
    values = prediction_layer_values(frame, column)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if column == "applicable":
        low, high = 0.0, 1.0
    norm = colors.Normalize(vmin=low, vmax=high if high > low else low + 1.0)
    cmap = layer_cmap(cmap_name)
    return [colors.to_hex(cmap(norm(v))) if np.isfinite(v) else LABELLED_FILL for v in values], low, high


def _legend(k: int, column: str, cmap_name: str, label: str, low: float, high: float) -> str:
    if column == "applicable":
        return ('<svg width="360" height="22" role="img" aria-label="applicability colours">'
                f'<rect x="2" y="4" width="14" height="14" fill="{FLAG_COLOURS[0]}"/>'
                '<text x="20" y="16">outside what the model saw</text>'
                f'<rect x="190" y="4" width="14" height="14" fill="{FLAG_COLOURS[1]}"/>'
                '<text x="208" y="16">applicable</text></svg>')
    colors = require("matplotlib.colors", "maps")
    cmap = layer_cmap(cmap_name)
    stops = "".join(f'<stop offset="{j / 10:.1f}" stop-color="{colors.to_hex(cmap(j / 10))}"/>' for j in range(11))
    return (f'<svg width="{MAP_WIDTH:.0f}" height="36" role="img" aria-label="{esc(label)} colour scale">'
            f'<defs><linearGradient id="scale{k}">{stops}</linearGradient></defs>'
            f'<rect x="2" y="2" width="{MAP_WIDTH - 4:.0f}" height="10" fill="url(#scale{k})"/>'
            f'<text x="2" y="28" class="tick start">{low:.4g}</text>'
            f'<text x="{MAP_WIDTH / 2:.0f}" y="28" class="tick">{esc(label)}</text>'
            f'<text x="{MAP_WIDTH - 2:.0f}" y="28" class="tick end">{high:.4g}</text></svg>')


def maps_svg(city: CityData, frame: Any) -> str:
    """Prediction, interval width and applicability as three static maps; flagged regions outlined on each."""
    paths, height = svg_paths(city, MAP_WIDTH)
    rows = {region: i for i, region in enumerate(frame.index)}
    names = city.regions["name"] if "name" in city.regions.columns else None
    figures = []
    for k, (column, label, cmap_name) in enumerate(LAYERS):
        fills, low, high = _fills(frame, column, cmap_name)
        shapes = []
        for j, (region, d) in enumerate(zip(city.region_ids, paths, strict=True)):
            if not d:
                continue
            name = f" ({names.iloc[j]})" if names is not None and pd.notna(names.iloc[j]) else ""
            i = rows.get(region)
            if i is None:
                tip = f"region {region}{name}: labelled, not predicted"
                shapes.append(f'<path d="{d}" fill="{LABELLED_FILL}"><title>{esc(tip)}</title></path>')
                continue
            row = frame.iloc[i]
            flag = "applicable" if row["applicable"] else f"outside: {row['applicability_reason']}"
            tip = (f"region {region}{name}: prediction {row['prediction']:.4g} [{row['lower']:.4g}, "
                   f"{row['upper']:.4g}], width {row['interval_width']:.4g}; {flag}")
            outline = "" if row["applicable"] else ' class="flagged"'
            shapes.append(f'<path d="{d}" fill="{fills[i]}"{outline}><title>{esc(tip)}</title></path>')
        pad = 6
        title = label.split(" (")[0]
        # The drawing keeps its coordinates (viewBox); only its displayed size shrinks for a tall city.
        shrink = min(1.0, MAP_MAX_HEIGHT / (height + 2 * pad))
        figures.append(
            f'<figure class="map"><svg viewBox="{-pad} {-pad} {MAP_WIDTH + 2 * pad:.0f} {height + 2 * pad:.0f}" '
            f'width="{(MAP_WIDTH + 2 * pad) * shrink:.0f}" height="{(height + 2 * pad) * shrink:.0f}" role="img" '
            f'aria-label="{esc(title)}">'
            f'<g stroke="#fff" stroke-width="0.3" fill-rule="evenodd">{"".join(shapes)}</g></svg>'
            f"{_legend(k, column, cmap_name, label, low, high)}<figcaption>{esc(label)}</figcaption></figure>")
    return f'<div class="maps3">{"".join(figures)}</div>'


def _coverage_html(model: FittedModel, level: float, notes: list[str]) -> str:
    training = model.training
    y = training["y"].to_numpy(dtype=float)
    y_min = 0.0 if model.config.get("labels_non_negative") else -np.inf
    try:
        check = held_out_fold_coverage(y, training["oof_pred"].to_numpy(dtype=float), model.arrays["cal_sigmas"],
                                       training["fold"].to_numpy(), level, y_min=y_min)
    except UrbanProfileError as err:
        notes.append(f"no measured coverage: {err}")
        return f'<p class="note">No measured coverage: {esc(str(err))}</p>'
    body = "".join(f'<tr><td class="num">{f["fold"]}</td><td class="num">{f["n"]}</td>'
                   f'<td class="num">{f["coverage"]:.3f}</td><td class="num">{f["mean_width"]:.4g}</td></tr>'
                   for f in check["per_fold"])  # type: ignore[attr-defined]
    calibration = model.config.get("calibration")
    cv_plus = (" Measured for the normalised construction: CV+ would need heads fit without two folds (CV+ on "
               "held-out development cases: benchmarks/results/predict_variants.md)."
               if model.config.get("interval") == "cv+" else "")
    return (f'<p class="lead">Measured coverage of {level:.0%} intervals: <b>{check["coverage"]:.3f}</b> '
            f'(mean width {check["mean_width"]:.4g}) over the {len(y)} labelled regions, each '
            f"{calibration} fold scored with intervals calibrated on the other folds only.{cv_plus}</p>"
            '<table><thead><tr><th>fold</th><th>regions</th><th>coverage</th><th>mean width</th></tr></thead>'
            f"<tbody>{body}</tbody></table>")


def _flagged_html(frame: Any, city: CityData) -> str:
    flagged = frame[~frame["applicable"].astype(bool)]
    if flagged.empty:
        return "<p>No region is flagged: every predicted region lies within what the model saw.</p>"
    names = city.regions["name"] if "name" in city.regions.columns else None
    head = ("<tr><th>region</th>" + ("<th>name</th>" if names is not None else "") +
            "<th>prediction</th><th>interval</th><th>embedding distance</th><th>km to nearest labelled</th>"
            "<th>why flagged</th></tr>")
    rows = []
    for region, row in flagged.head(MAX_FLAGGED_ROWS).iterrows():
        name = f"<td>{esc(str(names.loc[region]))}</td>" if names is not None else ""
        km = row["spatial_distance_km"]
        rows.append(f"<tr><td>{esc(str(region))}</td>{name}<td class=\"num\">{row['prediction']:.4g}</td>"
                    f"<td class=\"num\">[{row['lower']:.4g}, {row['upper']:.4g}]</td>"
                    f"<td class=\"num\">{row['embedding_distance']:.3g}</td>"
                    f"<td class=\"num\">{'–' if not np.isfinite(km) else f'{km:.3g}'}</td>"
                    f"<td class=\"reason\">{esc(str(row['applicability_reason']))}</td></tr>")
    more = (f'<p class="note">The first {MAX_FLAGGED_ROWS} of {len(flagged)} flagged regions; the predictions '
            "file has every one (column applicability_reason).</p>" if len(flagged) > MAX_FLAGGED_ROWS else "")
    return f'<table class="flagged"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>{more}'


def render_model_page(model: FittedModel, city: CityData, frame: Any, level: float,
                      notes: list[str] | None = None, index_link: bool = False) -> str:
    """The page for ``model``'s predictions ``frame`` on ``city`` (from :func:`predict_regions`); ``index_link``:
    link back to the results report (``index.html``) written in the same folder."""
    notes = [] if notes is None else notes
    back = '<p class="note"><a href="index.html">← the results report</a></p>' if index_link else ""
    config = model.config
    n_flagged = int((~frame["applicable"].astype(bool)).sum())
    scale = str(frame["label_scale"].iloc[0]) if "label_scale" in frame else "raw"
    scale_note = (" Values are on the log1p scale the model was fit on (log(1 + count))." if scale == "log1p" else "")
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = (f"{config['task']} on {city.name} by {config['method']} + {config['head']} · model folder "
                f"{model.folder} · generated {when}")
    label = f"{config['task']} on {city.name} by {config['method']} + {config['head']} ({model.folder.resolve().name})"
    start = page_start(esc(subtitle), title="urbanprofile prediction report").replace(
        "</style>", f"{_PAGE_CSS}</style>", 1).replace(
        "<title>", f'<meta name="{MODEL_PAGE_META}" content="{esc(label)}">\n<title>', 1)
    coverage = _coverage_html(model, level, notes)
    flagged_line = (f"<b>{n_flagged}</b> of them lie outside what the model saw and are listed below with the reason"
                    if n_flagged else "none lies outside what the model saw")
    notes_html = "".join(f'<p class="note">Note: {esc(n)}.</p>' for n in notes)
    return start + f"""<main>
{back}
<p class="lead">{len(frame)} regions of {esc(city.name)} predicted with {level:.0%} conformal intervals (mean width
{float(frame["interval_width"].mean()):.4g}); {flagged_line}.{scale_note}</p>
{notes_html}
<h2 id="card">Model card</h2>
{model_card(config)}
<h2 id="coverage">Coverage, measured</h2>
{coverage}
<h2 id="maps">Maps</h2>
<p class="note">Grey: regions that have the label (not predicted). Dark outline: flagged regions. Hover over a
region for its prediction, interval and flag.</p>
{maps_svg(city, frame)}
<h2 id="flagged">Flagged regions ({n_flagged})</h2>
{_flagged_html(frame, city)}
<footer><p>Intervals: normalised conformal on out-of-fold residuals (docs/predict.md); applicability: farther from
every labelled region, in embedding space or on the map, than 99% of the labelled regions are from their nearest
labelled neighbour.</p>
<p>Made by urbanprofile; a static page with no scripts and no network.</p></footer>
</main></body></html>
"""


def write_model_page(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], dataset: str | None = None,
                     data_dir: str | os.PathLike[str] | None = None, level: float = 0.9,
                     all_regions: bool = False) -> ModelPage:
    """Predict with the model folder on its dataset (or ``dataset``) and write ``out_dir/model-<folder>.html``.

    Raises:
        UrbanProfileError: A model folder that is missing, edited or of another version; a dataset it cannot
            predict on; a level outside (0, 1); ``out_dir`` that is a file.
    """
    from urbanprofile.data.registry import load_dataset

    model = load_model(Path(model_dir))
    city = load_dataset(dataset or model.config["dataset_source"], data_dir)
    notes: list[str] = []
    task = model.task
    if not all_regions and (task not in city.targets.columns or not city.targets[task].isna().any()):
        # A page of nothing helps no one: show how the model does on the regions it knows, and say so.
        all_regions = True
        notes.append(f"every region of {city.name!r} has a {task!r} label: the page shows the model's predictions "
                     "for all of them (in-sample: the maps are not held-out estimates)")
    frame = predict_regions(model, city, level=level, all_regions=all_regions)
    target = Path(out_dir)
    if target.exists() and not target.is_dir():
        raise UrbanProfileError(f"{target}: exists and is not a folder")
    page = render_model_page(model, city, frame, level, notes, index_link=(target / "index.html").is_file())
    path = target / f"model-{model.folder.resolve().name}.html"

    def write_page(tmp: Path) -> None:
        tmp.write_text(page, encoding="utf-8")

    write_atomic(path, write_page)
    if refresh_model_links(target):  # the results report in this folder lists the page now
        notes.append(f"{target / 'index.html'} now links this page")
    return ModelPage(path, len(frame), int((~frame["applicable"].astype(bool)).sum()), notes)

