"""H3 cell polygons and centres for millions of cells, built in bulk.

Making one shapely ``Polygon`` per cell from a Python list of vertices costs about 50 µs a cell (most of the time of
cutting a country into cells); here h3 gives each cell's vertices and shapely builds all the rings in one call, with
the same coordinates, so the polygons are the same, vertex for vertex, as ``Polygon([(lng, lat) for lat, lng in
h3.cell_to_boundary(cell)])``.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np

from urbanprofile.errors import require

#: Cells per batch: keeps the temporary vertex lists near 100 MB whatever the number of cells.
BATCH_CELLS = 250_000


def cell_boundaries(cells: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The vertices of H3 cells, as h3 gives them, in (lon, lat) order.

    Args:
        cells: H3 cell ids (strings).

    Returns:
        The vertices of every cell one after the other, shape ``(M, 2)`` (lon, lat), and the number of vertices
        of each cell (6 for a hexagon, 5 for a pentagon, up to 10 for a cell cut by an icosahedron edge).
    """
    h3 = require("h3", "build")
    boundaries = [h3.cell_to_boundary(cell) for cell in cells]
    counts = np.fromiter(map(len, boundaries), dtype=np.int64, count=len(boundaries))
    flat = np.fromiter(chain.from_iterable(chain.from_iterable(boundaries)), dtype=float, count=2 * int(counts.sum()))
    return flat.reshape(-1, 2)[:, ::-1].copy(), counts


def cell_polygons(cells: Sequence[str]) -> np.ndarray:
    """Shapely polygons of H3 cells, vertex for vertex those of ``Polygon([(lng, lat) for lat, lng in
    h3.cell_to_boundary(cell)])``, built in batches of :data:`BATCH_CELLS`.

    Returns:
        An object array of polygons, in the order of ``cells``.
    """
    import shapely

    out = np.empty(len(cells), dtype=object)
    for start in range(0, len(cells), BATCH_CELLS):
        batch = cells[start:start + BATCH_CELLS]
        coords, counts = cell_boundaries(batch)
        rings = shapely.linearrings(coords, indices=np.repeat(np.arange(len(batch)), counts))  # closed as Polygon does
        out[start:start + len(batch)] = shapely.polygons(rings)
    return out


def cell_centres(cells: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Longitudes and latitudes of H3 cell centres, as ``h3.cell_to_latlng`` gives them."""
    h3 = require("h3", "build")
    flat = np.fromiter(chain.from_iterable(h3.cell_to_latlng(cell) for cell in cells), dtype=float,
                       count=2 * len(cells))
    return flat[1::2].copy(), flat[0::2].copy()
