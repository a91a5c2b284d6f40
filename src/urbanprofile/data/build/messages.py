"""Short descriptions of values for one-line build errors (column lists, examples, extents)."""

from __future__ import annotations

from typing import Any

import numpy as np


def listed(columns: Any, limit: int = 12) -> str:
    """Column names joined with commas, the first ``limit`` of them (``a, b, ... (3 more)``)."""
    names = [str(c) for c in columns]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def few(values: Any, limit: int = 3) -> str:
    """The first ``limit`` distinct values, quoted, as examples in a message."""
    items = list(dict.fromkeys(str(v) for v in values))
    more = ", ..." if len(items) > limit else ""
    return ", ".join(repr(v) for v in items[:limit]) + more


def span(lon: np.ndarray, lat: np.ndarray) -> str:
    """The extent of coordinates in degrees (``lon a..b, lat c..d``)."""
    return f"lon {np.nanmin(lon):.4g}..{np.nanmax(lon):.4g}, lat {np.nanmin(lat):.4g}..{np.nanmax(lat):.4g}"


