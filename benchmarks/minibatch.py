"""Mini-batch multi-view embedders: R² against full batch on the real cities, time and memory up to 1 M regions.

Parts (results in benchmarks/results/minibatch.{json,md}; a part not run keeps its previous figures there):

- parity: each method in ``--methods`` (default hafusion) fit full-batch (``mode="full"``) and in mini-batches of
  ``--batch-size`` regions (``mode="minibatch"``) with the same seed, on hafusion-nyc (180 regions) and
  hafusion-chicago (77), seeds ``--seeds``; each embedding evaluated under ``nested`` on every task, the
  checkpoint chosen by inner CV as in ``urbanprofile benchmark``. Reports R² of both and their difference.
  With ``--negatives M`` each mini-batch gets M uniform negatives and the rows go to ``parity_negatives``.
  ``--methods srel`` (halo mini-batches) puts its rows in ``parity_srel_auto`` (its default ``negatives="auto"``;
  ``parity_srel`` with a count); ``--modes full,minibatch,accumulate`` adds a third fit per seed, the halo mode with
  one optimizer step per epoch (``accumulate=True``); ``rescaled`` and ``reseeded`` add the floors (full batch with
  its loss x (1 + 1e-6), or with other dropout masks). Each parity table is followed by its distribution over seeds
  per (city, task): mini-batch minus full batch and the ``reseeded`` floor minus full batch as means with 95% t
  intervals, the cells within 0.02, and a verdict (:func:`parity_distribution`).
- scale: a seeded synthetic metro generated in memory (clustered towns on a rural background, sparse POI counts,
  sparse OD from distance-decaying trips), ``--sizes`` regions; each (size, method) runs in a fresh process with
  one thread: setup seconds (inputs, neighbourhoods), seconds per training epoch, peak resident memory
  (ru_maxrss). Cities above ``--full-epoch-max`` regions train for ``--steps`` steps only and their epoch time
  is that time per step times the steps of an epoch (labelled "extrapolated"); smaller ones train one whole
  epoch and embed every region.

    URBANPROFILE_DATA=../shared/data python benchmarks/minibatch.py [--parts parity,scale] [--seeds 0,1,2]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS, environment, md_table, parse_seeds, parser, run, set_threads, write_results

CITIES = ("hafusion-nyc", "hafusion-chicago")
TASKS = ("checkin", "crime", "service_calls")


def synthetic_metro(n_regions: int, random_state: int = 0, n_poi_categories: int = 20, n_landuse_classes: int = 6,
                    cell_km: float = 0.35, trips_per_region: float = 12.0) -> Any:
    """A seeded synthetic metro of ``n_regions`` grid cells, made in memory (no files, no ``build``).

    Towns (one per 20,000 cells, at least 3) of random size and weight on a rural background set the density;
    land use is a softmax of smooth random waves; POI counts are Poisson draws from the land-use mixtures
    times the density (mostly zero outside towns, kept sparse); each cell sends Poisson(density-scaled) trips
    over an exponential distance decay (mean 3 cells), a tenth of them to its nearest town centre, summed
    into a sparse OD matrix (about ``trips_per_region`` trips per cell).
    """
    import geopandas as gpd
    import pandas as pd
    from scipy import sparse

    from urbanprofile.data.city import CityData, frame_from_array, sparse_square_view

    rng = np.random.default_rng(random_state)
    n = n_regions
    cols = int(np.ceil(np.sqrt(n)))
    gx, gy = np.arange(n) % cols, np.arange(n) // cols
    xy = np.column_stack([gx, gy]) * cell_km + cell_km / 2
    side = cols * cell_km
    n_towns = max(3, n // 20_000)
    centres = rng.uniform(0, side, size=(n_towns, 2))
    radii = rng.uniform(0.01, 0.05, size=n_towns) * side + cell_km
    weights = rng.lognormal(0.0, 1.0, size=n_towns)
    density = np.full(n, 0.05)
    nearest_town = np.zeros(n, dtype=np.int64)
    best = np.full(n, np.inf)
    for t in range(n_towns):  # one town at a time: O(N) memory
        dist = np.linalg.norm(xy - centres[t], axis=1)
        density += weights[t] * np.exp(-dist / radii[t])
        closer = dist < best
        nearest_town[closer], best[closer] = t, dist[closer]
    waves = rng.normal(size=(n_landuse_classes, 2)) * (2 * np.pi / (side / 4))
    phases = rng.uniform(0, 2 * np.pi, size=n_landuse_classes)
    logits = 1.5 * np.sin(xy @ waves.T + phases)
    logits[:, 0] += np.log(density)  # residential follows the towns
    shares = np.exp(logits - logits.max(axis=1, keepdims=True))
    shares /= shares.sum(axis=1, keepdims=True)
    landuse = rng.poisson(shares * 20).astype(np.int32)
    mixtures = rng.dirichlet(np.full(n_poi_categories, 0.3), size=n_landuse_classes)
    poi = sparse.csr_matrix(rng.poisson(density[:, None] * (shares @ mixtures) * 2.0).astype(np.float64))

    trips = rng.poisson(trips_per_region * density / density.mean())
    origin = np.repeat(np.arange(n), trips)
    radius = rng.exponential(3.0, size=len(origin))
    angle = rng.uniform(0, 2 * np.pi, size=len(origin))
    dx = np.clip(np.rint(gx[origin] + radius * np.cos(angle)), 0, cols - 1).astype(np.int64)
    dy = np.clip(np.rint(gy[origin] + radius * np.sin(angle)), 0, (n - 1) // cols).astype(np.int64)
    destination = np.minimum(dy * cols + dx, n - 1)
    to_town = rng.random(len(origin)) < 0.1
    town_cells = np.rint(centres[nearest_town[origin[to_town]]] / cell_km - 0.5).astype(np.int64)
    town_cells = np.clip(town_cells, 0, cols - 1)
    destination[to_town] = np.minimum(town_cells[:, 1] * cols + town_cells[:, 0], n - 1)
    od = sparse.csr_matrix((np.ones(len(origin)), (origin, destination)), shape=(n, n))
    od.sum_duplicates()

    ids = pd.Index(np.arange(n), name="region_id")
    lat0 = 45.0
    lon = (xy[:, 0] - side / 2) / (111.32 * np.cos(np.deg2rad(lat0)))
    lat = lat0 + (xy[:, 1] - side / 2) / 111.32
    regions = gpd.GeoDataFrame({"lon": lon, "lat": lat}, index=ids, geometry=gpd.points_from_xy(lon, lat),
                               crs="EPSG:4326")
    poi_frame = pd.DataFrame.sparse.from_spmatrix(poi, index=ids, columns=[f"poi_{k}" for k in range(poi.shape[1])])
    views = {"poi_counts": poi_frame,
             "landuse_counts": frame_from_array(landuse, ids, [f"landuse_{k}" for k in range(n_landuse_classes)]),
             "od_flows": sparse_square_view(od, ids)}
    meta = {"source": f"benchmarks/minibatch.py synthetic_metro(n_regions={n}, random_state={random_state})",
            "family": "synthetic", "city": "synthetic-metro", "notes": []}
    return CityData(f"synthetic-metro-{n}", regions, views, pd.DataFrame(index=ids), None, meta)


def make_embedder(method: str, **params: Any) -> Any:
    from urbanprofile.embedders.multiview.hafusion import HAFusionEmbedder
    from urbanprofile.embedders.multiview.srel import SRELEmbedder

    classes = {"hafusion": HAFusionEmbedder, "srel": SRELEmbedder}
    return classes[method](**params)


#: Parity fits: the mode and the extra parameters of each (``accumulate``: the halo mode's one step per epoch).
#: ``rescaled`` and ``reseeded`` are floors: full batch with its loss times 1 + 1e-6 (rounding), and with the same
#: initial weights but other dropout masks (torch reseeded after the network is built).
PARITY_MODES: dict[str, dict[str, Any]] = {"full": {"mode": "full"}, "minibatch": {"mode": "minibatch"},
                                           "accumulate": {"mode": "minibatch", "accumulate": True},
                                           "rescaled": {"mode": "full"}, "reseeded": {"mode": "full"}}
#: Row fields of the modes beyond full and minibatch.
EXTRA_FIELDS = {"accumulate": ("r2_accumulate", "difference_accumulate"),
                "rescaled": ("r2_full_rescaled", "difference_rescaled"),
                "reseeded": ("r2_full_reseeded", "difference_reseeded")}


def floor_embedder(method: str, kind: str, **params: Any) -> Any:
    """A full-batch embedder whose training differs only by rounding (``rescaled``) or dropout masks (``reseeded``)."""
    base = type(make_embedder(method))

    class Floor(base):  # type: ignore[misc, valid-type]
        def build(self, city: Any, inputs: Any) -> Any:
            network, step = super().build(city, inputs)
            if kind == "reseeded":
                import torch

                torch.manual_seed(10_000 + int(self.random_state or 0))  # same weights, other dropout masks
                return network, step
            return network, (lambda: {k: v * (1.0 + 1e-6) for k, v in step().items()})

    return Floor(**params)


def parity(cities: list[str], methods: list[str], seeds: list[int], batch_size: int,
           epochs: int | None, negatives: int | str | None = 0,
           modes: tuple[str, ...] = ("full", "minibatch")) -> list[dict[str, Any]]:
    from urbanprofile.data import load_dataset
    from urbanprofile.evaluation import evaluate_embedding

    rows = []
    for name in cities:
        city = load_dataset(name)
        for method in methods:
            for seed in seeds:
                r2: dict[str, dict[str, float]] = {}
                seconds: dict[str, float] = {}
                for mode in modes:
                    extra: dict[str, Any] = {} if epochs is None else {"epochs": epochs}
                    if negatives is not None:
                        extra["negatives"] = negatives
                    made = floor_embedder if mode in ("rescaled", "reseeded") else None
                    embedder = (made(method, mode, batch_size=batch_size, random_state=seed, **PARITY_MODES[mode],
                                     **extra) if made else
                                make_embedder(method, batch_size=batch_size, random_state=seed, **PARITY_MODES[mode],
                                              **extra))
                    start = time.perf_counter()
                    embedding = embedder.fit_transform(city)
                    seconds[mode] = time.perf_counter() - start
                    r2[mode] = {task: evaluate_embedding(city, embedding, task, "nested", random_state=seed,
                                                         candidates=embedder.candidates_).metrics["r2"]
                                for task in TASKS if task in city.tasks}
                for task in r2["full"]:
                    row = {"dataset": name, "method": method, "seed": seed, "task": task, "batch_size": batch_size,
                           "epochs": embedder.epochs, "negatives": embedder.negatives,
                           "training": "halo" if getattr(embedder, "minibatch_halo", False) else "in-batch",
                           "r2_full": r2["full"][task], "r2_minibatch": r2["minibatch"][task],
                           "difference": r2["minibatch"][task] - r2["full"][task],
                           "fit_seconds_full": seconds["full"], "fit_seconds_minibatch": seconds["minibatch"],
                           "load_average": os.getloadavg()[0]}
                    for mode, (r2_key, difference_key) in EXTRA_FIELDS.items():
                        if mode in r2:
                            row.update({r2_key: r2[mode][task], difference_key: r2[mode][task] - r2["full"][task],
                                        f"fit_seconds_{mode}": seconds[mode]})
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def scale_worker(size: int, method: str, steps: int | None, batch_size: int) -> dict[str, Any]:
    """One (size, method) measurement inside this process (called in a fresh process by :func:`scale`)."""
    from urbanprofile.embedders.multiview.halo import fit_batched
    from urbanprofile.evaluation.large import peak_rss_gb

    start = time.perf_counter()
    city = synthetic_metro(size)
    generate_seconds = time.perf_counter() - start
    embedder = make_embedder(method, mode="minibatch", batch_size=batch_size, epochs=1, random_state=0)
    training = "halo" if getattr(embedder, "minibatch_halo", False) else "in-batch"
    start = time.perf_counter()
    fit_batched(embedder, city, max_steps=steps)
    total = time.perf_counter() - start
    log = embedder.log_
    epoch = log.epoch_seconds[0]
    done = steps if steps is not None and steps < log.steps_per_epoch else log.steps_per_epoch
    row = {"regions": size, "method": method, "batch_size": batch_size, "generate_seconds": generate_seconds,
           "steps_run": done, "steps_per_epoch": log.steps_per_epoch,
           "epoch_seconds": epoch * log.steps_per_epoch / done, "extrapolated": done < log.steps_per_epoch,
           "setup_seconds": total - log.seconds, "embed_seconds": log.seconds - epoch if done == log.steps_per_epoch
           else None, "peak_rss_gb": peak_rss_gb(),
           "load_average": os.getloadavg()[0], "negatives": embedder.negatives, "training": training}
    return row


def scale(sizes: list[int], methods: list[str], steps: int, full_epoch_max: int, batch_size: int,
          timeout: float) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        for method in methods:
            command = [sys.executable, __file__, "--worker", f"{size},{method},"
                       f"{steps if size > full_epoch_max else 0},{batch_size}"]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
            except subprocess.TimeoutExpired:
                row = {"regions": size, "method": method, "error": f"over the {timeout:.0f} s limit"}
            else:
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                row = json.loads(lines[-1]) if done.returncode == 0 and lines else {
                    "regions": size, "method": method, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def parity_table(parity_rows: list[dict[str, Any]]) -> str:
    """The parity rows as a table per (dataset, method, task) and a summary line (with the accumulate fits' too)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in parity_rows:
        groups.setdefault((r["dataset"], r["method"], r["task"]), []).append(r)
    accumulated = all("r2_accumulate" in r for r in parity_rows)
    # Floors, added to the rows by a separate script (see the notes): full batch again with its loss times 1 + 1e-6
    # (rounding), and with the same initial weights but other dropout masks.
    floors = [(key, label) for key, label in (("difference_rescaled", "full, loss x (1 + 1e-6)"),
                                              ("difference_reseeded", "full, other dropout masks"))
              if any(key in r for r in parity_rows)]
    table = []
    for (d, m, t), rs in groups.items():
        line = [d, m, t, len(rs), float(np.mean([r["r2_full"] for r in rs])),
                float(np.mean([r["r2_minibatch"] for r in rs])), float(np.mean([r["difference"] for r in rs])),
                float(np.max(np.abs([r["difference"] for r in rs])))]
        if accumulated:
            line += [float(np.mean([r["r2_accumulate"] for r in rs])),
                     float(np.mean([r["difference_accumulate"] for r in rs])),
                     float(np.max(np.abs([r["difference_accumulate"] for r in rs])))]
        for key, _ in floors:
            floor = [r[key] for r in rs if key in r]
            line += [float(np.mean(floor)), float(np.max(np.abs(floor)))] if floor else ["-", "-"]
        line.append(float(np.std([r["r2_full"] for r in rs], ddof=1)) if len(rs) > 1 else "-")
        table.append(line)
    header = ["dataset", "method", "task", "seeds", "R² full", "R² mini-batch", "mean difference",
              "largest abs. difference"]
    if accumulated:
        header += ["R² accumulate", "mean difference (accumulate)", "largest abs. difference (accumulate)"]
    for _, label in floors:
        header += [f"mean difference ({label})", f"largest abs. difference ({label})"]
    text = md_table([*header, "sd of full over seeds"], table)
    first = parity_rows[0]
    text += (f"\nBatch size {first['batch_size']} regions, negatives {first.get('negatives', 0)}, "
             f"{first['epochs']} epochs, {first.get('training', 'in-batch')} mini-batches. ")
    kinds = [("difference", "Mini-batch (a step per batch)")]
    if accumulated:
        kinds.append(("difference_accumulate", "Accumulate (a step per epoch)"))
    kinds += [(key, f"Floor, {label}") for key, label in floors]
    for key, label in kinds:
        diffs = [r[key] for r in parity_rows if key in r]
        within = sum(abs(d) <= 0.02 for d in diffs)
        text += (f"{label}: {within} of {len(diffs)} (city, task, seed) cells within 0.02; mean difference "
                 f"{np.mean(diffs):+.3f}, mean absolute difference {np.mean(np.abs(diffs)):.3f}. ")
    by_seed = [f"{d} {t}: " + ", ".join(f"{r['seed']}: {r['difference']:+.3f}" for r in rs)
               for (d, _, t), rs in groups.items()]
    text += "\n\nPer (city, task), mini-batch minus full batch by seed: " + "; ".join(by_seed)
    text += ".\n\n"
    seconds = [f"{np.mean([r[f'fit_seconds_{mode}'] for r in parity_rows]):.1f}"
               for mode in ("full", "minibatch", "accumulate") if f"fit_seconds_{mode}" in first]
    text += f"Fit seconds ({' / '.join(m for m in ('full', 'mini-batch', 'accumulate')[:len(seconds)])}, mean): "
    return text + " / ".join(seconds) + ".\n\n"


#: Where one seed's R² may lie from another's and still count as the same, per cell (issue 22's figure).
PARITY_TOLERANCE = 0.02
#: The floor a parity is read against: full batch again, same initial weights, other dropout masks.
FLOOR_KEY, FLOOR_LABEL = "difference_reseeded", "full batch, other dropout masks"


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """The mean and its 95% Student t interval (seeds are few, so a bootstrap would understate the width)."""
    from scipy import stats

    data = np.asarray(values, dtype=float)
    mean = float(data.mean())
    if len(data) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, len(data) - 1) * data.std(ddof=1) / np.sqrt(len(data)))
    return mean, mean - half, mean + half


def parity_verdict(minibatch: tuple[float, float, float], floor: tuple[float, float, float] | None) -> str:
    """``same method`` when the mini-batch's 95% interval lies within the tolerance or overlaps the floor's."""
    _, low, high = minibatch
    if low >= -PARITY_TOLERANCE and high <= PARITY_TOLERANCE:
        return f"same method (within ±{PARITY_TOLERANCE})"
    if floor is None:
        return f"not within ±{PARITY_TOLERANCE} (no floor measured)"
    if low <= floor[2] and floor[1] <= high:
        return "same method (not told apart from the floor)"
    return "differs (apart from the floor)"


def parity_distribution(parity_rows: list[dict[str, Any]]) -> str:
    """Per (city, task) and over all cells: mini-batch minus full batch over seeds as a mean with its 95% interval,
    the same for the floor (:data:`FLOOR_KEY`) where the rows have it, the paired mini-batch minus floor, the cells
    within :data:`PARITY_TOLERANCE`, and the verdict of :func:`parity_verdict`."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in parity_rows:
        groups.setdefault((r["dataset"], r["task"]), []).append(r)
    groups[("all cells", "")] = list(parity_rows)
    floored = all(FLOOR_KEY in r for r in parity_rows)

    def shown(stat: tuple[float, float, float]) -> str:
        return f"{stat[0]:+.3f} [{stat[1]:+.3f}, {stat[2]:+.3f}]"

    def within(values: list[float]) -> str:
        return f"{sum(abs(v) <= PARITY_TOLERANCE for v in values)} of {len(values)}"

    table = []
    for (dataset, task), rs in groups.items():
        differences = [r["difference"] for r in rs]
        minibatch = mean_interval(differences)
        line = [dataset, task, len(rs), shown(minibatch), within(differences)]
        floor = None
        if floored:
            floors = [r[FLOOR_KEY] for r in rs]
            floor = mean_interval(floors)
            paired = mean_interval([r["r2_minibatch"] - r["r2_full"] - r[FLOOR_KEY] for r in rs])
            line += [shown(floor), within(floors), shown(paired)]
        table.append([*line, parity_verdict(minibatch, floor)])
    header = ["dataset", "task", "cells", "mini-batch − full: mean [95% CI]", f"within {PARITY_TOLERANCE}"]
    if floored:
        header += [f"floor ({FLOOR_LABEL}) − full: mean [95% CI]", f"within {PARITY_TOLERANCE}",
                   "mini-batch − floor, paired: mean [95% CI]"]
    text = md_table([*header, "verdict"], table)
    return text + (f"\nIntervals: 95% Student t over the seeds of each (city, task) (over all cells on the last line, "
                   f"whose cells of one seed share a fit, so that interval is too narrow). Verdict: \"same method\" "
                   f"where the mini-batch interval lies within ±{PARITY_TOLERANCE} or overlaps the floor's; with "
                   f"{min(len(rs) for rs in groups.values())} seeds an overlap says the two are not told apart, not "
                   f"that they are equal.\n\n")


def markdown(payload: dict[str, Any]) -> str:
    text = ("# Mini-batch multi-view embedders\n\n`python benchmarks/minibatch.py` (figures from a loaded, shared "
            "2-core machine, one thread per process).\n\n")
    for key, title in (("parity_srel_auto", "srel with halo mini-batches, negatives \"auto\" (every region a "
                                            "candidate on these cities): R², full batch vs mini-batch (nested, same "
                                            "seeds)"),
                       ("parity_srel", "srel with halo mini-batches: R², full batch vs mini-batch (nested, same "
                                       "seeds)"),
                       ("parity", "R², full batch vs mini-batch (nested, same seeds)"),
                       ("parity_negatives", "The same with uniform negatives joined to each batch")):
        if payload.get(key):
            text += f"## {title}\n\n" + parity_table(payload[key])
            text += "As a distribution over seeds:\n\n" + parity_distribution(payload[key])
    for note in payload.get("notes", []):
        text += f"Note: {note}\n\n"
    scale_rows = payload.get("scale", [])
    if scale_rows:
        text += "## Seconds per epoch and peak memory on synthetic metros (mini-batch)\n\n"
        table = []
        for r in scale_rows:
            form = r.get("training", "in-batch")
            if "error" in r:
                table.append([r["regions"], r["method"], form, "-", "-", "-", "-", r["error"]])
                continue
            how = (f"batches of {r['batch_size']}; extrapolated from {r['steps_run']} of {r['steps_per_epoch']} steps"
                   if r["extrapolated"] else
                   f"one whole epoch ({r['steps_per_epoch']} steps); embedding all regions {r['embed_seconds']:.0f} s")
            table.append([f"{r['regions']:,}", r["method"], form, f"{r['epoch_seconds']:.0f}",
                          f"{r['setup_seconds']:.0f}", f"{r['peak_rss_gb']:.2f}", f"{r['load_average']:.1f}", how])
        text += md_table(["regions", "method", "mini-batches", "s / epoch", "setup s", "peak RSS GB", "load", "how"],
                         table)
        text += ("\nSetup: the sparse OD view to CSR, SVD mobility features, k-nearest neighbourhoods (srel), the "
                 "objective's sparse matrices. Peak RSS includes the synthetic city itself (generated in the same "
                 "process, its OD as a pandas sparse view).\n")
    return text


def main() -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    set_threads(1)
    args_parser = parser(__doc__, out=RESULTS, seeds="0,1,2", parts="parity,scale")
    args_parser.add_argument("--methods", default="hafusion", help="parity: methods (hafusion, srel)")
    args_parser.add_argument("--cities", default=",".join(CITIES), help="parity: datasets")
    args_parser.add_argument("--scale-methods", default="srel,hafusion", help="scale: methods")
    args_parser.add_argument("--batch-size", type=int, default=None,
                             help="regions per batch (default: 64 for parity, 1024 for scale)")
    args_parser.add_argument("--epochs", type=int, default=None, help="parity: epochs (default: the method's)")
    args_parser.add_argument("--negatives", type=negatives_argument, default=None,
                             help="parity: negatives per mini-batch, a count or (srel) auto / all (default: the "
                                  "method's; hafusion rows with negatives go to parity_negatives)")
    args_parser.add_argument("--note", default=None, help="a note to add below the tables (how the run was made)")
    args_parser.add_argument("--modes", default="full,minibatch",
                             help="parity: fits per seed (full, minibatch, accumulate: the halo mode's one step "
                                  "per epoch; rescaled, reseeded: the floors, full batch with its loss x (1 + 1e-6) "
                                  "or with other dropout masks); full and minibatch are needed")
    args_parser.add_argument("--key", default=None,
                             help="parity: where the rows go in the results (default: parity_srel for srel, else "
                                  "parity or parity_negatives)")
    args_parser.add_argument("--sizes", default="10000,100000,1000000", help="scale: regions")
    args_parser.add_argument("--steps", type=int, default=40, help="scale: steps timed above --full-epoch-max")
    args_parser.add_argument("--full-epoch-max", type=int, default=100_000,
                             help="scale: largest city run a whole epoch")
    args_parser.add_argument("--timeout", type=float, default=900, help="scale: seconds per (size, method)")
    args_parser.add_argument("--worker", default=None, help=argparse_hidden())
    args = args_parser.parse_args()
    if args.worker:
        size, method, steps, batch = args.worker.split(",")
        row = scale_worker(int(size), method, int(steps) or None, int(batch))
        print(json.dumps(row))
        return 0
    parts = [p.strip() for p in args.parts.split(",")]
    path = args.out / "minibatch.json"
    payload: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    payload["environment"] = environment()
    if "parity" in parts:
        methods = [m.strip() for m in args.methods.split(",")]
        # srel's rows by its default negatives ("auto") go beside those of the earlier default (32, parity_srel).
        key = args.key or (("parity_srel_auto" if args.negatives in (None, "auto") else "parity_srel")
                           if methods == ["srel"] else "parity_negatives" if args.negatives else "parity")
        payload[key] = parity([c.strip() for c in args.cities.split(",")],
                              [m.strip() for m in args.methods.split(",")], parse_seeds(args.seeds),
                              args.batch_size or 64, args.epochs, args.negatives,
                              tuple(m.strip() for m in args.modes.split(",")))
    if args.note:
        payload.setdefault("notes", []).append(args.note)
    if "scale" in parts:
        payload["scale"] = scale([int(s) for s in args.sizes.split(",")],
                                 [m.strip() for m in args.scale_methods.split(",")], args.steps, args.full_epoch_max,
                                 args.batch_size or 1024, args.timeout)
    _, md_path = write_results(args.out, "minibatch", payload, markdown(payload))
    print(md_path.read_text())
    return 0


def negatives_argument(value: str) -> int | str:
    """``--negatives``: a count, or a word of the halo form (``auto``, ``all``)."""
    return value if value in ("auto", "all") else int(value)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    run(main)
