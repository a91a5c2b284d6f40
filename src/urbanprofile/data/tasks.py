"""Prediction tasks: which regions and labels a task uses, with the peers' zero-label rule."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.errors import DataError, unknown_name

#: Every task name urbanprofile knows, by dataset family.
KNOWN_TASKS = ("checkin", "crime", "service_calls", "carbon", "population", "gdp")


@dataclass(frozen=True)
class TaskData:
    """The labelled regions of one task."""

    task: str
    region_ids: pd.Index
    y: np.ndarray
    n_missing: int
    n_zero_dropped: int
    scale: str = "raw"

    def describe(self) -> str:
        parts = [f"{len(self.y)} regions"]
        if self.n_missing:
            parts.append(f"{self.n_missing} missing labels dropped")
        if self.n_zero_dropped:
            parts.append(f"{self.n_zero_dropped} zero labels dropped (peers' rule)")
        if self.scale != "raw":
            parts.append(f"labels on the {self.scale} scale (peers' convention)")
        return f"{self.task}: " + ", ".join(parts)


def task_data(city: CityData, task: str) -> TaskData:
    """Select the regions with a usable label for ``task``.

    Missing labels (NaN) are always dropped; zero labels are dropped for the tasks the peers drop them
    for in this city (``city.meta['drop_zero']``, e.g. Chicago check-ins). Tasks listed in
    ``city.meta['task_scale']`` are predicted on that scale (CityView's indicators on log1p, as the
    UrbanCLIP/UrbanVLP papers do: a few point-source tiles would otherwise dominate every metric).
    """
    if task not in city.targets.columns:
        raise unknown_name(f"task for dataset {city.name!r}", task, city.targets.columns)
    label = city.targets[task]
    missing = label.isna()
    keep = ~missing
    zero_dropped = 0
    if task in city.meta.get("drop_zero", []):
        zero = keep & (label == 0)
        zero_dropped = int(zero.sum())
        keep &= ~zero
    if int(keep.sum()) < 10:
        raise DataError(f"{city.name}: task {task!r} has only {int(keep.sum())} labelled regions (need 10)")
    y = label[keep].to_numpy(dtype=float)
    scale = city.meta.get("task_scale", {}).get(task, "raw")
    if scale == "log1p":
        y = np.log1p(y)
    elif scale != "raw":
        raise DataError(f"{city.name}: unknown scale {scale!r} for task {task!r} (use 'raw' or 'log1p')")
    return TaskData(
        task=task,
        region_ids=city.region_ids[keep.to_numpy()],
        y=y,
        n_missing=int(missing.sum()),
        n_zero_dropped=zero_dropped,
        scale=scale,
    )
