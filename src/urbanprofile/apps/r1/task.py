"""The region-profiling task for post-training: examples, held-out split, geographic groups (no torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from urbanprofile.apps.r1.prompts import RegionDescriber, check_answer_kind, level_edges, question, to_level
from urbanprofile.data.city import CityData
from urbanprofile.data.tasks import task_data
from urbanprofile.errors import DataError, UrbanProfileError
from urbanprofile.evaluation.protocols import check_protocol, outer_splits
from urbanprofile.evaluation.spatial import spatial_blocks

#: How prompts name the cities we ship loaders for.
CITY_LABELS = {
    "hafusion-nyc": "New York City (Manhattan)",
    "hafusion-chicago": "Chicago",
    "cityview-beijing": "Beijing",
    "cityview-guangzhou": "Guangzhou",
}


def city_label(city: CityData) -> str:
    return CITY_LABELS.get(city.name, city.name)


@dataclass(frozen=True)
class TaskSpec:
    """What is asked and which regions are held out.

    Attributes:
        task: Indicator, e.g. ``checkin``.
        answer: ``level`` (a quantile level of the city's training labels) or ``number``.
        n_levels: Levels of the scale (``answer="level"``).
        protocol: Whose outer folds define the held-out regions (``spatial``, ``nested`` or ``paper``).
        fold: Which outer fold of each city is held out.
        blocks_per_city: Geographic groups per city (k-means blocks of centroids; 1 = the city itself).
        holdout_city: A dataset held out whole (the out-of-region setting): every region of it is a test
            region and every region of the other cities a training region (``protocol`` and ``fold`` then
            play no part). Its answer scale is the quantile levels of its own labels, which only define
            the scale the question names; no model sees them.
    """

    task: str
    answer: str = "level"
    n_levels: int = 5
    protocol: str = "spatial"
    fold: int = 0
    blocks_per_city: int = 2
    holdout_city: str | None = None

    def check(self) -> None:
        check_answer_kind(self.answer, self.n_levels)
        check_protocol(self.protocol)
        if self.fold < 0:
            raise UrbanProfileError(f"fold must be >= 0, got {self.fold}")
        if self.blocks_per_city < 1:
            raise UrbanProfileError(f"blocks_per_city must be >= 1, got {self.blocks_per_city}")


@dataclass
class R1Example:
    """One region as a prompt with its verifiable answer."""

    city: str
    region_id: Any
    group: str
    split: str  # "train" or "test"
    prompt: str  # the user message (description + question)
    target: float  # the level, or the label value for answer="number"
    label: float  # the label on the task's scale
    level: int  # the level (also for answer="number", to compare on one scale)


@dataclass
class R1Data:
    """Every example of a task over one or more cities, with the training-only level edges."""

    spec: TaskSpec
    examples: list[R1Example]
    edges: dict[str, list[float]] = field(default_factory=dict)

    def split(self, name: str) -> list[R1Example]:
        return [e for e in self.examples if e.split == name]

    @property
    def groups(self) -> list[str]:
        return sorted({e.group for e in self.examples})

    @property
    def train_groups(self) -> list[str]:
        """The groups with training regions (a held-out city's groups have none): one prompt each per step."""
        return sorted({e.group for e in self.examples if e.split == "train"})

    def frame(self, split: str | None = None) -> pd.DataFrame:
        rows = [asdict(e) for e in self.examples if split is None or e.split == split]
        return pd.DataFrame(rows)


def build_task(
    cities: list[CityData], spec: TaskSpec, captions: dict[str, pd.Series] | None = None
) -> R1Data:
    """Build prompts for every labelled region of every city and mark the held-out fold.

    Levels are quantile bins of each city's *training* labels (the held-out labels never set an edge).

    Raises:
        UnknownNameError: A city lacks the task.
        DataError: A group has no training region, or the fold does not exist.
    """
    spec.check()
    if not cities:
        raise UrbanProfileError("no cities given")
    names = [c.name for c in cities]
    if len(set(names)) != len(names):
        raise UrbanProfileError(f"a city is given twice: {names}")
    if spec.holdout_city is not None:
        if spec.holdout_city not in names:
            raise UrbanProfileError(
                f"held-out city {spec.holdout_city!r} is not among the datasets ({', '.join(names)})"
            )
        if len(names) < 2:
            raise UrbanProfileError("a held-out city needs at least one other city to train on")
    examples: list[R1Example] = []
    edges: dict[str, list[float]] = {}
    held_out_groups: set[str] = set()  # the held-out city's groups have no training region by design
    for city in cities:
        td = task_data(city, spec.task)
        is_test = np.zeros(len(td.y), dtype=bool)
        if spec.holdout_city is not None:
            is_test[:] = city.name == spec.holdout_city
            train_idx = np.arange(len(td.y)) if city.name != spec.holdout_city else np.arange(0)
        else:
            splits = outer_splits(city, td, spec.protocol)
            if spec.fold >= len(splits):
                raise DataError(
                    f"{city.name}: fold {spec.fold} does not exist ({len(splits)} folds under {spec.protocol})"
                )
            train_idx, test_idx = splits[spec.fold]
            is_test[test_idx] = True
        city_edges = level_edges(td.y[train_idx] if len(train_idx) else td.y, spec.n_levels)
        edges[city.name] = [float(v) for v in city_edges]
        levels = to_level(td.y, city_edges)
        if spec.blocks_per_city > 1 and city.has_locations:
            block = pd.Series(spatial_blocks(city, spec.blocks_per_city), index=city.region_ids)
        else:
            block = pd.Series(0, index=city.region_ids)
        label = city_label(city)
        city_captions = (captions or {}).get(city.name)
        if city_captions is None and "tile_caption" in city.modalities:
            city_captions = tile_captions(city)
        describer = RegionDescriber(city, city_label=label, captions=city_captions)
        ask = question(spec.task, label, spec.answer, spec.n_levels)
        for i, region in enumerate(td.region_ids):
            group = f"{label}/block {int(block.loc[region])}" if spec.blocks_per_city > 1 else label
            if city.name == spec.holdout_city:
                held_out_groups.add(group)
            examples.append(
                R1Example(
                    city=city.name,
                    region_id=region.item() if hasattr(region, "item") else region,
                    group=group,
                    split="test" if is_test[i] else "train",
                    prompt=describer.describe(region) + "\n\n" + ask,
                    target=float(levels[i]) if spec.answer == "level" else float(td.y[i]),
                    label=float(td.y[i]),
                    level=int(levels[i]),
                )
            )
    data = R1Data(spec=spec, examples=examples, edges=edges)
    train_groups = {e.group for e in data.split("train")}
    for group in data.groups:
        if group not in train_groups and group not in held_out_groups:
            raise DataError(
                f"group {group!r} has no training region (all held out); use fewer blocks per city or another fold"
            )
    return data


def tile_captions(city: CityData, sentences: int = 3) -> pd.Series:
    """A region's caption for its prompt: the first few sentences of its tile caption, joined."""
    table = city.modalities["tile_caption"]
    return table.groupby("region_id", sort=False)["text"].agg(
        lambda texts: " ".join(str(t).strip().rstrip(".") + "." for t in list(texts)[:sentences] if str(t).strip())
    )


def balanced_order(
    examples: list[R1Example], n_batches: int, random_state: int | None = 0
) -> tuple[list[int], list[str]]:
    """Indices into ``examples`` for ``n_batches`` batches holding one example of every group each.

    Every group contributes equally to every batch, whatever its size: a group is cycled through in a
    fresh random order before any of its examples repeats.

    Returns:
        The flat index list (``n_batches * n_groups`` long, batch after batch) and the group order.
    """
    by_group: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        by_group.setdefault(example.group, []).append(i)
    if not by_group:
        raise DataError("no training examples: every group is empty")
    empty = [g for g, members in by_group.items() if not members]
    if empty:
        raise DataError(f"group {empty[0]!r} is empty")
    rng = np.random.default_rng(random_state)
    groups = sorted(by_group)
    queues: dict[str, list[int]] = {g: [] for g in groups}
    order: list[int] = []
    for _ in range(n_batches):
        for g in groups:
            if not queues[g]:
                queues[g] = list(rng.permutation(by_group[g]))
            order.append(int(queues[g].pop()))
    return order, groups
