"""H3 cell polygons and centres for millions of cells, built in bulk.

Making one shapely ``Polygon`` per cell from a Python list of vertices costs about 50 µs a cell (most of the time of
cutting a country into cells); here h3 gives each cell's vertices and shapely builds all the rings in one call, with
the same coordinates, so the polygons are the same, vertex for vertex, as ``Polygon([(lng, lat) for lat, lng in
h3.cell_to_boundary(cell)])``.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np

from urbanprofile.errors import require

#: Cells per batch: keeps the temporary vertex lists near 100 MB whatever the number of cells.
BATCH_CELLS = 250_000


def _api_cells(cells: Sequence[str] | np.ndarray) -> tuple[Any, Any]:
    """h3's string or integer API for ``cells``, and the cells as it takes them (Python ints for integers)."""
    h3 = require("h3", "build")
    if isinstance(cells, np.ndarray) and cells.dtype.kind in "ui":
        from h3.api import basic_int

        return basic_int, cells.tolist()  # Python ints: numpy scalars convert about 10 times slower
    return h3, cells


def cell_boundaries(cells: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The vertices of H3 cells, as h3 gives them, in (lon, lat) order.

    Args:
        cells: H3 cell ids (strings, or a uint64 array of cell integers: the same cells give the same vertices).

    Returns:
        The vertices of every cell one after the other, shape ``(M, 2)`` (lon, lat), and the number of vertices
        of each cell (6 for a hexagon, 5 for a pentagon, up to 10 for a cell cut by an icosahedron edge).
    """
    api, given = _api_cells(cells)
    boundaries = [api.cell_to_boundary(cell) for cell in given]
    counts = np.fromiter(map(len, boundaries), dtype=np.int64, count=len(boundaries))
    flat = np.fromiter(chain.from_iterable(chain.from_iterable(boundaries)), dtype=float, count=2 * int(counts.sum()))
    return flat.reshape(-1, 2)[:, ::-1].copy(), counts


def cell_polygons(cells: Sequence[str] | np.ndarray) -> np.ndarray:
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


def cell_centres(cells: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Longitudes and latitudes of H3 cell centres (strings or a uint64 array), as ``h3.cell_to_latlng`` gives them."""
    api, given = _api_cells(cells)
    flat = np.fromiter(chain.from_iterable(api.cell_to_latlng(cell) for cell in given), dtype=float,
                       count=2 * len(cells))
    return flat[1::2].copy(), flat[0::2].copy()
