"""Choropleth maps of a city: any view, label, prediction, residual or per-block bias, as PNG or HTML.

PNGs are drawn with matplotlib (no basemap, nothing downloaded); the HTML page is standalone: inline
SVG, a few lines of inline script for zoom, pan and a hover panel, and every region id, name and title
escaped.
"""

from __future__ import annotations

import dataclasses
import html
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.data.io import write_atomic
from urbanprofile.errors import UrbanProfileError, require, unknown_name
from urbanprofile.evaluation.protocols import N_BIAS_BLOCKS, evaluate_embedding
from urbanprofile.evaluation.spatial import spatial_blocks
from urbanprofile.methods import get_method

#: Layer kinds: ``view:<view>[:<column>]``, ``label:<task>``, and ``<kind>:<task>`` for the model layers.
LAYER_KINDS = ("view", "label", "prediction", "residual", "bias")
MAP_FORMATS = (".png", ".html")
_MISSING = "#d9d9d9"
#: The one diverging scale of every signed layer (block R², residuals), in these maps and in the HTML report:
#: red below zero (a block predicted worse than by its own mean; an over-prediction), white at zero, blue above.
DIVERGING_CMAP = "RdBu"
#: Block R² is drawn on the fixed range -1 .. 1 (lower values in the end colour), so that blocks that differ
#: little (all within ±0.06, say) stay pale, instead of the scale stretching to make them look opposite.
BLOCK_R2_BOUND = 1.0
#: Residuals are drawn on ± this many standard deviations of the label (rounded up to a round number).
RESIDUAL_BOUND_STD = 2.0
#: A sequential scale ends at this quantile of the values when the largest value is more than
#: :data:`TAIL_FACTOR` times it: one Stuyvesant Town (17,222 people on one tax lot) would otherwise paint every
#: other cell of New York the bottom colour. The regions beyond get the end colour, and the legend says so.
TAIL_QUANTILE = 0.99
TAIL_FACTOR = 2.0
#: Above this many regions polygons are drawn without outlines: at New York's 54,730 resolution-10 cells the
#: white outlines cover more of the map than the cells' colours do.
OUTLINE_MAX_REGIONS = 5_000


@dataclasses.dataclass
class MapLayer:
    """Values to colour regions by.

    Attributes:
        values: One value per region, indexed by ``region_id``; NaN draws the region grey.
        title: What the values are.
        diverging: Centre the colour scale on zero (residuals, R^2).
        legend: How the value is described in the hover panel.
        bound: Fixed half-range of a diverging scale (values beyond it get the end colours); ``None``: the
            data's largest absolute value, rounded up.
    """

    values: pd.Series
    title: str
    diverging: bool = False
    legend: str = "value"
    bound: float | None = None


def layer_values(
    city: CityData, layer: str, method: str = "raw-poi", protocol: str = "nested", seed: int = 0
) -> MapLayer:
    """Resolve a layer name to values per region.

    Args:
        city: The city.
        layer: ``view:<view>`` (row totals; ``od_flows``: trips leaving), ``view:<view>:<column>``,
            ``label:<task>``, ``prediction:<task>``, ``residual:<task>`` (label minus out-of-fold
            prediction) or ``bias:<task>`` (R^2 of the spatial block each region lies in).
        method: Method whose embedding is probed for the model layers.
        protocol: Evaluation protocol of the model layers.
        seed: Seed of the method and the protocol.
    """
    kind, _, rest = layer.partition(":")
    if kind not in LAYER_KINDS or not rest:
        raise UrbanProfileError(
            f"layer {layer!r} must be view:<view>[:<column>], label:<task>, prediction:<task>, residual:<task> "
            "or bias:<task>"
        )
    if kind == "view":
        view_name, _, column = rest.partition(":")
        frame = city.view(view_name)
        if not column:
            what = "trips leaving" if view_name == "od_flows" else "total"
            return MapLayer(frame.sum(axis=1).astype(float), f"{view_name}: {what} per region", legend=what)
        names = {str(c): c for c in frame.columns}
        if column not in names:
            raise unknown_name(f"column of view {view_name!r}", column, names)
        return MapLayer(frame[names[column]].astype(float), f"{view_name}: {column}", legend=column)
    if rest not in city.targets.columns:
        raise unknown_name(f"task for dataset {city.name!r}", rest, city.targets.columns)
    if kind == "label":
        return MapLayer(city.targets[rest].astype(float), f"{rest} (label)", legend=rest)
    return _model_layer(city, kind, rest, method, protocol, seed)


def _model_layer(city: CityData, kind: str, task: str, method: str, protocol: str, seed: int) -> MapLayer:
    spec = get_method(method).for_city(city)  # the views the city has
    embedding = spec.build(random_state=seed).fit_transform(city)
    result = evaluate_embedding(city, embedding, task, protocol=protocol, head=spec.head, random_state=seed)
    frame = result.predictions().reindex(city.region_ids)
    r2 = result.metrics["r2"]
    where = f"{method}, {protocol} protocol, R² {r2:.3f}"
    if kind == "prediction":
        return MapLayer(frame["pred"], f"{task}: out-of-fold prediction ({where})", legend="prediction")
    if kind == "residual":
        spread = float(np.nanstd(frame["y"].to_numpy(dtype=float)))
        bound = nice_bound(RESIDUAL_BOUND_STD * spread) if spread > 0 else None
        return MapLayer(frame["residual"], f"{task}: label − prediction ({where})", diverging=True,
                        legend=f"residual (scale ±{RESIDUAL_BOUND_STD:g} std of the label)", bound=bound)
    if not city.has_locations:
        raise UrbanProfileError(f"per-block bias needs region locations; {city.name!r} has none")
    blocks = pd.Series(spatial_blocks(city, N_BIAS_BLOCKS), index=city.region_ids)
    block_r2 = {int(k): v for k, v in result.bias["block_r2"].items()}
    values = blocks.map(block_r2).where(frame["y"].notna())
    return MapLayer(values.astype(float), f"{task}: R² per spatial block ({where})", diverging=True,
                    legend="block R² (fixed scale)", bound=BLOCK_R2_BOUND)


# -- colours -----------------------------------------------------------------------------------------
def nice_bound(value: float) -> float:
    """The smallest round number (1, 2, 2.5 or 5 times a power of ten) at or above ``value`` (> 0)."""
    if not np.isfinite(value) or value <= 0:
        return 1.0
    power = 10.0 ** np.floor(np.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if step * power >= value * (1 - 1e-9):
            return float(step * power)
    return float(10 * power)


def diverging_colour(value: float, bound: float = BLOCK_R2_BOUND) -> str:
    """Hex colour of ``value`` on the shared diverging scale ``-bound .. bound`` (grey when missing)."""
    colors = require("matplotlib.colors", "maps")
    cm = require("matplotlib", "maps")
    if value is None or not np.isfinite(value):
        return _MISSING
    return str(colors.to_hex(cm.colormaps[DIVERGING_CMAP]((min(max(value / bound, -1.0), 1.0) + 1) / 2)))


def _colours(layer: MapLayer) -> tuple[list[str], Any, Any]:
    """Hex colour per region (grey where missing), the colormap and the norm."""
    colors = require("matplotlib.colors", "maps")
    cm = require("matplotlib", "maps")
    values = layer.values.to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if layer.diverging:
        bound = layer.bound or nice_bound(max(abs(low), abs(high)))
        norm = colors.Normalize(vmin=-bound, vmax=bound, clip=True)
        cmap = cm.colormaps[DIVERGING_CMAP]
    else:
        top = float(np.quantile(finite, TAIL_QUANTILE)) if finite.size else high
        if top > low and high - low > TAIL_FACTOR * (top - low):  # a long tail: the bulk keeps the colours
            high = top
        norm = colors.Normalize(vmin=low, vmax=high if high > low else low + 1.0)
        cmap = cm.colormaps["viridis"]
    hexes = [colors.to_hex(cmap(norm(v))) if np.isfinite(v) else _MISSING for v in values]
    return hexes, cmap, norm


def _check_layer(city: CityData, layer: MapLayer) -> pd.Series:
    values = layer.values.reindex(city.region_ids)
    if not np.isfinite(values.to_numpy(dtype=float)).any():
        raise UrbanProfileError(f"nothing to map: {layer.title} has no value for any region of {city.name!r}")
    return values


def _has_polygons(city: CityData) -> bool:
    geoms = city.regions.geometry
    return bool(geoms.notna().any() and geoms.geom_type.isin(["Polygon", "MultiPolygon"]).any())


# -- PNG ---------------------------------------------------------------------------------------------
def map_figure(city: CityData, layer: MapLayer) -> Any:
    """The choropleth as a matplotlib Figure (polygons, or centroid dots when a city has none)."""
    require("matplotlib", "maps")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

    layer = dataclasses.replace(layer, values=_check_layer(city, layer))
    hexes, cmap, norm = _colours(layer)
    fig = Figure(figsize=(7.0, 6.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if _has_polygons(city):
        outline = len(city.regions) <= OUTLINE_MAX_REGIONS
        city.regions.plot(ax=ax, color=hexes, edgecolor="white" if outline else "face",
                          linewidth=0.15 if outline else 0.05)
    else:
        lonlat = city.coordinates()
        ax.scatter(lonlat[:, 0], lonlat[:, 1], c=hexes, s=12, linewidths=0)
    lat0 = float(np.nanmean(city.regions["lat"])) if "lat" in city.regions else 0.0
    ax.set_aspect(1 / max(np.cos(np.deg2rad(lat0)), 0.1))
    ax.set_axis_off()
    ax.set_title(f"{city.name}: {layer.title}", fontsize=9, wrap=True)
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    finite = layer.values.to_numpy(dtype=float)
    finite = finite[np.isfinite(finite)]
    # Say when values lie beyond the scale (a fixed diverging range, or a sequential one cut at its tail).
    below, above = bool((finite < norm.vmin).any()), bool((finite > norm.vmax).any())
    extend = {(True, True): "both", (True, False): "min", (False, True): "max"}.get((below, above), "neither")
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.7, label=layer.legend, extend=extend)
    ticks = MaxNLocator(nbins=4 if layer.diverging else 6, steps=[1, 2, 2.5, 5, 10],
                        symmetric=layer.diverging).tick_values(norm.vmin, norm.vmax)
    ticks = ticks[(ticks >= norm.vmin - 1e-12) & (ticks <= norm.vmax + 1e-12)]
    bar.set_ticks(ticks)
    bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    return fig


def render_png(city: CityData, layer: MapLayer, path: Path, dpi: int = 110) -> None:
    """Draw the choropleth with matplotlib (polygons, or centroid dots when a city has none)."""
    map_figure(city, layer).savefig(path, dpi=dpi, format="png")


# -- HTML --------------------------------------------------------------------------------------------
def svg_paths(city: CityData, width: float) -> tuple[list[str], float]:
    """SVG path data per region in a local equirectangular projection, and the drawing's height."""
    import shapely

    regions = city.regions
    polygons = _has_polygons(city)
    if polygons:
        geoms = regions.geometry
        minx, miny, maxx, maxy = geoms.total_bounds
    else:
        lonlat = city.coordinates()
        minx, miny = lonlat.min(axis=0)
        maxx, maxy = lonlat.max(axis=0)
    kx = float(np.cos(np.deg2rad((miny + maxy) / 2)))
    span_x = max((maxx - minx) * kx, 1e-9)
    span_y = max(maxy - miny, 1e-9)
    scale = width / max(span_x, span_y * width / 700.0)
    height = span_y * scale

    def xy(coords: np.ndarray) -> str:
        x = (coords[:, 0] - minx) * kx * scale
        y = (maxy - coords[:, 1]) * scale
        return " L".join(f"{a:.1f},{b:.1f}" for a, b in zip(x, y, strict=True))

    paths = []
    if polygons:
        tolerance = max(maxx - minx, maxy - miny) / 3000
        for geom in regions.geometry:
            if geom is None or geom.is_empty:
                paths.append("")
                continue
            simple = shapely.simplify(geom, tolerance, preserve_topology=True)
            rings = []
            for part in shapely.get_parts(simple):
                if part.geom_type != "Polygon":
                    continue
                for ring in [part.exterior, *part.interiors]:
                    rings.append("M" + xy(np.asarray(ring.coords)) + " Z")
            paths.append(" ".join(rings))
    else:
        for lon, lat in city.coordinates():
            x, y = (lon - minx) * kx * scale, (maxy - lat) * scale
            paths.append(f"M{x - 3:.1f},{y:.1f} a3,3 0 1,0 6,0 a3,3 0 1,0 -6,0")
    return paths, height


_SCRIPT = """
(function () {
  var svg = document.getElementById('map'), info = document.getElementById('info');
  var vb = svg.viewBox.baseVal, drag = null;
  svg.addEventListener('wheel', function (e) {
    e.preventDefault();
    var f = e.deltaY < 0 ? 0.8 : 1.25, r = svg.getBoundingClientRect();
    var mx = vb.x + (e.clientX - r.left) / r.width * vb.width, my = vb.y + (e.clientY - r.top) / r.height * vb.height;
    vb.x = mx - (mx - vb.x) * f; vb.y = my - (my - vb.y) * f; vb.width *= f; vb.height *= f;
  }, {passive: false});
  svg.addEventListener('mousedown', function (e) { drag = [e.clientX, e.clientY]; });
  window.addEventListener('mouseup', function () { drag = null; });
  window.addEventListener('mousemove', function (e) {
    if (!drag) return;
    var r = svg.getBoundingClientRect();
    vb.x -= (e.clientX - drag[0]) / r.width * vb.width; vb.y -= (e.clientY - drag[1]) / r.height * vb.height;
    drag = [e.clientX, e.clientY];
  });
  svg.addEventListener('mouseover', function (e) {
    var t = e.target.closest('path[data-region]');
    if (t) info.textContent = t.getAttribute('data-label');
  });
})();
"""


def render_html(city: CityData, layer: MapLayer, width: float = 900.0) -> str:
    """A standalone HTML page with the choropleth as inline SVG (no external script, style or tiles)."""
    values = _check_layer(city, layer)
    layer = dataclasses.replace(layer, values=values)
    hexes, cmap, norm = _colours(layer)
    colors = require("matplotlib.colors", "maps")
    paths, height = svg_paths(city, width)
    names = city.regions["name"] if "name" in city.regions.columns else None
    esc = html.escape
    shapes = []
    for i, (region, d) in enumerate(zip(city.region_ids, paths, strict=True)):
        if not d:
            continue
        value = values.iloc[i]
        shown = "no value" if not np.isfinite(value) else f"{value:.4g}"
        name = f" ({names.iloc[i]})" if names is not None and pd.notna(names.iloc[i]) else ""
        label = f"region {region}{name}: {layer.legend} = {shown}"
        shapes.append(
            f'<path d="{d}" fill="{hexes[i]}" data-region="{esc(str(region))}" data-label="{esc(label)}">'
            f"<title>{esc(label)}</title></path>"
        )
    low, high = f"{float(norm.vmin):.3g}", f"{float(norm.vmax):.3g}"
    finite = values.to_numpy(dtype=float)[np.isfinite(values.to_numpy(dtype=float))]
    if (finite < norm.vmin).any():
        low = f"≤ {low}"
    if (finite > norm.vmax).any():
        high = f"≥ {high}"
    stops = "".join(
        f'<stop offset="{k / 10:.1f}" stop-color="{colors.to_hex(cmap(k / 10))}"/>' for k in range(11)
    )
    title = esc(f"{city.name}: {layer.title}")
    pad = 10
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1em; color: #222; }}
#map {{ width: 100%; max-width: {width + 2 * pad:.0f}px; border: 1px solid #ccc; cursor: grab; background: #fafafa; }}
#map path[data-region] {{ stroke: #fff; stroke-width: 0.4; fill-rule: evenodd; }}
#map path[data-region]:hover {{ stroke: #000; stroke-width: 1.5; }}
#info {{ min-height: 1.4em; font-size: 0.95em; }}
</style></head>
<body>
<h1 style="font-size:1.1em">{title}</h1>
<p id="info">Hover over a region; scroll to zoom, drag to pan.</p>
<svg id="map" xmlns="http://www.w3.org/2000/svg" viewBox="{-pad} {-pad} {width + 2 * pad:.1f} {height + 2 * pad:.1f}">
{chr(10).join(shapes)}
</svg>
<svg width="320" height="44" xmlns="http://www.w3.org/2000/svg" aria-label="legend">
<defs><linearGradient id="legend">{stops}</linearGradient></defs>
<rect x="10" y="4" width="300" height="14" fill="url(#legend)"/>
<text x="10" y="34" font-size="12">{low}</text>
<text x="310" y="34" font-size="12" text-anchor="end">{high}</text>
<text x="160" y="34" font-size="12" text-anchor="middle">{esc(layer.legend)}</text>
</svg>
<p style="font-size:0.8em;color:#666">{len(shapes)} regions; grey: no value. Made by urbanprofile.</p>
<script>{_SCRIPT}</script>
</body></html>
"""


# -- writing -----------------------------------------------------------------------------------------
def check_map_path(path: Path) -> None:
    if path.suffix.lower() not in MAP_FORMATS:
        raise UrbanProfileError(f"{path}: a map must end in {' or '.join(MAP_FORMATS)}")


def write_map(city: CityData, layer: MapLayer, path: str | os.PathLike[str]) -> Path:
    """Write the choropleth as ``.png`` or ``.html`` (chosen by the suffix)."""
    target = Path(path)
    check_map_path(target)
    if target.suffix.lower() == ".png":
        write_atomic(target, lambda tmp: render_png(city, layer, tmp))
    else:
        page = render_html(city, layer)

        def write_page(tmp: Path) -> None:
            tmp.write_text(page, encoding="utf-8")

        write_atomic(target, write_page)
    return target


def map_city(
    city: CityData, layer: str, out: str | os.PathLike[str] | list[str | os.PathLike[str]],
    method: str = "raw-poi", protocol: str = "nested", seed: int = 0,
) -> list[Path]:
    """Resolve ``layer`` on ``city`` and write it to one or more ``.png``/``.html`` files.

    Example:
        >>> city = load_dataset("data/built/helsinki")  # doctest: +SKIP
        >>> map_city(city, "view:poi_counts:food", ["food.png", "food.html"])  # doctest: +SKIP
    """
    targets = [Path(p) for p in (out if isinstance(out, list) else [out])]
    for target in targets:
        check_map_path(target)
    resolved = layer_values(city, layer, method=method, protocol=protocol, seed=seed)
    return [write_map(city, resolved, target) for target in targets]
