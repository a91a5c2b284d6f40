"""Map colour scales on real-looking data: a long tail does not wash the map out, dense grids drop outlines."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from urbanprofile.data import make_synthetic_city
from urbanprofile.report.maps import TAIL_QUANTILE, MapLayer, _colours, map_figure, render_html

pytest.importorskip("matplotlib")


def _layer(values: np.ndarray) -> MapLayer:
    return MapLayer(values=pd.Series(values, index=pd.RangeIndex(len(values), name="region_id")), title="t")


def test_long_tail_ends_the_scale_at_its_quantile() -> None:
    """One region with a hundred times the others' value (one lot holding a whole estate) must not paint every
    other region the bottom colour: the scale ends at the 99th percentile and the rest take the end colour."""
    rng = np.random.default_rng(0)
    values = np.append(rng.uniform(0, 100, 999), 10_000.0)
    hexes, cmap, norm = _colours(_layer(values))
    assert norm.vmax == pytest.approx(np.quantile(values, TAIL_QUANTILE))
    assert norm.vmin == pytest.approx(values.min())
    assert len(set(hexes[:-1])) > 50  # the bulk is spread over the colours
    from matplotlib.colors import to_hex

    assert hexes[-1] == to_hex(cmap(1.0))  # the outlier takes the end colour


def test_no_tail_keeps_the_whole_range() -> None:
    values = np.linspace(0, 100, 500)
    _, _, norm = _colours(_layer(values))
    assert (norm.vmin, norm.vmax) == (0.0, 100.0)


def test_legends_say_values_lie_beyond_the_scale() -> None:
    city = make_synthetic_city(n_regions=120, random_state=0)
    values = np.append(np.arange(119, dtype=float), 1e6)
    layer = MapLayer(values=pd.Series(values, index=city.region_ids), title="population")
    assert "≥ " in render_html(city, layer)
    bar = map_figure(city, layer).axes[-1]
    assert bar.get_ylim()[1] < 1e6  # the colour bar ends at the quantile (drawn with an arrow: extend="max")
    plain = MapLayer(values=pd.Series(np.arange(120, dtype=float), index=city.region_ids), title="rank")
    assert "≥ " not in render_html(city, plain)
