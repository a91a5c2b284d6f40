"""Data: the city data model, real-data loaders, dataset discovery and the synthetic city."""

from __future__ import annotations

from urbanprofile.data.city import CityData
from urbanprofile.data.loaders.synthetic import make_synthetic_city
from urbanprofile.data.registry import discover, list_datasets, load_dataset, resolve_data_dir
from urbanprofile.data.tasks import TaskData, task_data

__all__ = [
    "CityData",
    "TaskData",
    "discover",
    "list_datasets",
    "load_dataset",
    "make_synthetic_city",
    "resolve_data_dir",
    "task_data",
]
