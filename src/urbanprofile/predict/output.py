"""Writing predictions: GeoParquet or GeoPackage, a three-panel choropleth PNG and a standalone HTML map."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.data.io import write_atomic
from urbanprofile.errors import UrbanProfileError, require
from urbanprofile.report.maps import svg_paths

TABLE_FORMATS = (".parquet", ".gpkg")
MAP_FORMATS = (".png", ".html")
#: The map layers: column, title, colour map.
LAYERS = (
    ("prediction", "prediction", "viridis"),
    ("interval_width", "interval width", "magma_r"),
    ("applicable", "applicability (red: outside what the model saw)", "flag"),
)
#: Colours of the applicability layer: flagged, applicable.
FLAG_COLOURS = ("#d7301f", "#a6dba0")


def layer_cmap(name: str) -> Any:
    """The matplotlib colour map of a prediction layer (the flag layer: its two colours)."""
    if name == "flag":
        colors = require("matplotlib.colors", "maps")
        return colors.ListedColormap(list(FLAG_COLOURS))
    return require("matplotlib", "maps").colormaps[name]


def check_output_path(path: Path, formats: tuple[str, ...], what: str) -> None:
    """A known suffix and an existing folder, checked before any work is done."""
    if path.suffix.lower() not in formats:
        raise UrbanProfileError(f"{path}: {what} must end in {' or '.join(formats)}")
    if not path.parent.is_dir():
        raise UrbanProfileError(f"{path}: its folder {path.parent} does not exist")


def write_predictions(frame: Any, path: str | os.PathLike[str]) -> Path:
    """Write the GeoDataFrame as GeoParquet (``.parquet``) or GeoPackage (``.gpkg``), atomically."""
    target = Path(path)
    check_output_path(target, TABLE_FORMATS, "the predictions file")
    table = frame.reset_index()
    table["region_id"] = table["region_id"].astype(str)

    def write(tmp: Path) -> None:
        if target.suffix.lower() == ".parquet":
            table.to_parquet(tmp)
        else:
            tmp.unlink()  # GDAL will not open the empty placeholder as a GeoPackage
            table.to_file(tmp, driver="GPKG", layer="predictions")

    write_atomic(target, write)
    return target


def prediction_layer_values(frame: Any, column: str) -> np.ndarray:
    """A prediction column as floats to colour (the applicability flag as 0/1)."""
    values = frame[column]
    if column == "applicable":
        return values.astype(float).to_numpy()
    return np.asarray(values.to_numpy(dtype=float))


def render_png(city: CityData, frame: Any, title: str, path: Path, dpi: int = 110) -> None:
    """Prediction, interval width and applicability side by side; regions not predicted are light grey."""
    require("matplotlib", "maps")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    base = city.regions
    fig = Figure(figsize=(15.0, 5.4), layout="constrained")
    FigureCanvasAgg(fig)
    lat0 = float(np.nanmean(base["lat"])) if "lat" in base else 0.0
    polygons = bool(base.geometry.notna().any() and base.geometry.geom_type.isin(["Polygon", "MultiPolygon"]).any())
    for k, (column, label, cmap) in enumerate(LAYERS):
        ax = fig.add_subplot(1, 3, k + 1)
        values = pd.Series(prediction_layer_values(frame, column), index=frame.index)
        if polygons:
            base.plot(ax=ax, color="#eeeeee", edgecolor="white", linewidth=0.15)
            shown = frame.assign(_value=values.to_numpy())
            shown.plot(ax=ax, column="_value", cmap=layer_cmap(cmap), vmin=0 if column == "applicable" else None,
                       vmax=1 if column == "applicable" else None, edgecolor="white", linewidth=0.15,
                       legend=column != "applicable", legend_kwds={"shrink": 0.6})
        else:
            lonlat = base[["lon", "lat"]].to_numpy(dtype=float)
            ax.scatter(lonlat[:, 0], lonlat[:, 1], c="#eeeeee", s=10, linewidths=0)
            own = base.loc[frame.index, ["lon", "lat"]].to_numpy(dtype=float)
            flag = column == "applicable"  # a constant flag layer must not be rescaled onto one colour
            points = ax.scatter(own[:, 0], own[:, 1], c=values.to_numpy(), cmap=layer_cmap(cmap), s=10, linewidths=0,
                                vmin=0.0 if flag else None, vmax=1.0 if flag else None)
            if column != "applicable":
                fig.colorbar(points, ax=ax, shrink=0.6)
        ax.set_aspect(1 / max(np.cos(np.deg2rad(lat0)), 0.1))
        ax.set_axis_off()
        if column == "applicable":
            label = f"{label}: {int((~frame['applicable']).sum())} of {len(frame)} flagged"
        ax.set_title(label, fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=dpi, format="png")


_SCRIPT = """
(function () {
  var paths = document.querySelectorAll('#map path[data-region]'), info = document.getElementById('info');
  var legends = document.querySelectorAll('.legend');
  function show(k) {
    paths.forEach(function (p) { p.setAttribute('fill', p.getAttribute('data-c' + k)); });
    legends.forEach(function (l, j) { l.style.display = j === k ? 'block' : 'none'; });
  }
  document.querySelectorAll('button[data-layer]').forEach(function (b) {
    b.addEventListener('click', function () { show(parseInt(b.getAttribute('data-layer'), 10)); });
  });
  document.getElementById('map').addEventListener('mouseover', function (e) {
    var t = e.target.closest('path[data-region]');
    if (t) info.textContent = t.getAttribute('data-label');
  });
  show(0);
})();
"""


def _settings(settings: Any) -> str:
    """``{'alpha': 31.62, 'log_target': True}`` as ``alpha 31.6, log_target yes``."""
    if not isinstance(settings, dict):
        return str(settings or "-")

    def shown(value: Any) -> str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    return ", ".join(f"{key} {shown(value)}" for key, value in settings.items()) or "-"


def model_card(config: dict[str, Any]) -> str:
    """The model folder's facts as an HTML table: what was fit, on what, how it was checked."""
    m = config.get("oof_metrics", {})
    nan = float("nan")
    fingerprint = config.get("fingerprint", {})
    thresholds = config.get("thresholds", {})
    spatial = thresholds.get("spatial_km")
    checkpoint = config.get("checkpoint")
    rows = [
        ("method + head", f"{config.get('method')} + {config.get('head')}"),
        ("head settings", _settings(config.get("head_settings"))),
        ("task", f"{config.get('task')} (labels on the {config.get('task_scale')} scale)"),
        ("fit on", f"{fingerprint.get('dataset')}: {config.get('n_labelled')} labelled of "
                   f"{fingerprint.get('n_regions')} regions; views "
                   f"{', '.join(fingerprint.get('views', {})) or 'none'}; content sha256 "
                   f"{str(fingerprint.get('content_sha256', ''))[:12]}"),
        ("region ids", f"sha256 {str(fingerprint.get('region_ids_sha256', ''))[:12]}"),
        ("settings chosen by", f"{config.get('protocol_for_settings')} inner CV on the labelled regions; seed "
                               f"{config.get('random_state')}"),
        *([("embedding checkpoint", f"{checkpoint.get('chosen')}, chosen from "
                                    f"{', '.join(checkpoint.get('candidates', []))} (lowest inner-CV error)")]
          if isinstance(checkpoint, dict) else []),
        (f"out-of-fold ({config.get('calibration')})",
         f"R² {m.get('r2', nan):.3f}, MAE {m.get('mae', nan):.4g}, RMSE {m.get('rmse', nan):.4g}"),
        ("intervals", ("CV+ over the calibration folds' own heads, normalised, on the"
                       if config.get("interval") == "cv+" else "normalised conformal (crepes) on the")
                      + f" {config.get('calibration')} out-of-fold residuals"
                      + (f" (auto: {choice['why']})" if isinstance(choice := config.get("calibration_choice"), dict)
                         and choice.get("asked") == "auto" and "why" in choice else "")),
        ("widths", str(config.get("widths", "difficulty")) + (f" (auto: {widths['why']})" if isinstance(
            widths := config.get("widths_choice"), dict) and "why" in widths else "")),
        ("applicability", f"embedding distance > {thresholds.get('embedding', nan):.3g}"
                          + (f", or > {spatial:.3g} km from every labelled region" if spatial is not None else "")),
        ("urbanprofile", str(config.get("urbanprofile_version"))),
    ]
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f'<table class="card">{cells}</table>'


def render_html(city: CityData, frame: Any, title: str, width: float = 900.0,
                config: dict[str, Any] | None = None) -> str:
    """One standalone page (inline SVG and script; no CDN, no tiles) with the three layers behind buttons, and
    the model card when the model's configuration is given."""
    colors = require("matplotlib.colors", "maps")
    paths, height = svg_paths(city, width)
    esc = html.escape
    fills: list[list[str]] = []
    legends = []
    for k, (column, label, cmap_name) in enumerate(LAYERS):
        values = prediction_layer_values(frame, column)
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        norm = colors.Normalize(vmin=low, vmax=high if high > low else low + 1.0)
        cmap = layer_cmap(cmap_name)
        if column == "applicable":
            norm = colors.Normalize(vmin=0.0, vmax=1.0)
        fills.append([colors.to_hex(cmap(norm(v))) if np.isfinite(v) else "#d9d9d9" for v in values])
        if column == "applicable":
            legends.append(
                '<svg class="legend" width="360" height="44" xmlns="http://www.w3.org/2000/svg">'
                f'<rect x="10" y="4" width="14" height="14" fill="{FLAG_COLOURS[0]}"/>'
                '<text x="30" y="16" font-size="12">outside what the model saw</text>'
                f'<rect x="215" y="4" width="14" height="14" fill="{FLAG_COLOURS[1]}"/>'
                '<text x="235" y="16" font-size="12">applicable</text></svg>')
            continue
        stops = "".join(f'<stop offset="{j / 10:.1f}" stop-color="{colors.to_hex(cmap(j / 10))}"/>'
                        for j in range(11))
        legends.append(
            f'<svg class="legend" width="360" height="44" xmlns="http://www.w3.org/2000/svg">'
            f'<defs><linearGradient id="g{k}">{stops}</linearGradient></defs>'
            f'<rect x="10" y="4" width="300" height="14" fill="url(#g{k})"/>'
            f'<text x="10" y="34" font-size="12">{low:.4g}</text>'
            f'<text x="310" y="34" font-size="12" text-anchor="end">{high:.4g}</text>'
            f'<text x="160" y="34" font-size="12" text-anchor="middle">{esc(label)}</text></svg>')
    rows = {region: i for i, region in enumerate(frame.index)}
    shapes = []
    for region, d in zip(city.region_ids, paths, strict=True):
        if not d:
            continue
        i = rows.get(region)
        if i is None:
            attrs = " ".join(f'data-c{k}="#eeeeee"' for k in range(len(LAYERS)))
            label = f"region {region}: not predicted (labelled)"
        else:
            attrs = " ".join(f'data-c{k}="{fills[k][i]}"' for k in range(len(LAYERS)))
            row = frame.iloc[i]
            flag = "applicable" if row["applicable"] else f"outside: {row['applicability_reason']}"
            label = (f"region {region}: prediction {row['prediction']:.4g} [{row['lower']:.4g}, {row['upper']:.4g}] "
                     f"({row['level']:.0%} interval); {flag}")
        shapes.append(f'<path d="{d}" {attrs} data-region="{esc(str(region))}" data-label="{esc(label)}">'
                      f"<title>{esc(label)}</title></path>")
    buttons = "".join(f'<button data-layer="{k}">{esc(label.split(" (")[0])}</button> '
                      for k, (_, label, _) in enumerate(LAYERS))
    pad = 10
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1em; color: #222; }}
#map {{ width: 100%; max-width: {width + 2 * pad:.0f}px; border: 1px solid #ccc; background: #fafafa; }}
#map path[data-region] {{ stroke: #fff; stroke-width: 0.4; fill-rule: evenodd; }}
#map path[data-region]:hover {{ stroke: #000; stroke-width: 1.5; }}
#info {{ min-height: 1.4em; font-size: 0.95em; }}
table.card {{ border-collapse: collapse; font-size: 0.85em; margin-top: 1em; }}
table.card th, table.card td {{ text-align: left; padding: 2px 8px; border-bottom: 1px solid #eee; }}
</style></head>
<body>
<h1 style="font-size:1.1em">{esc(title)}</h1>
<p>{buttons}</p>
<p id="info">Hover over a region.</p>
<svg id="map" xmlns="http://www.w3.org/2000/svg" viewBox="{-pad} {-pad} {width + 2 * pad:.1f} {height + 2 * pad:.1f}">
{chr(10).join(shapes)}
</svg>
{"".join(legends)}
{model_card(config) if config else ""}
<p style="font-size:0.8em;color:#666">{len(frame)} regions predicted; light grey: labelled, not predicted.
Made by urbanprofile.</p>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_prediction_map(city: CityData, frame: Any, path: str | os.PathLike[str], title: str,
                         config: dict[str, Any] | None = None) -> Path:
    """Write the prediction map as ``.png`` or ``.html`` (by suffix), atomically."""
    target = Path(path)
    check_output_path(target, MAP_FORMATS, "a map")
    if target.suffix.lower() == ".png":
        write_atomic(target, lambda tmp: render_png(city, frame, title, tmp))
    else:
        page = render_html(city, frame, title, config=config)

        def write_page(tmp: Path) -> None:
            tmp.write_text(page, encoding="utf-8")

        write_atomic(target, write_page)
    return target


def summary(frame: Any) -> dict[str, Any]:
    """A few figures about a prediction table (printed by the CLI)."""
    return json.loads(json.dumps({
        "n_predicted": len(frame), "level": float(frame["level"].iloc[0]),
        "mean_interval_width": float(frame["interval_width"].mean()),
        "n_outside_applicability": int((~frame["applicable"]).sum()),
    }))
