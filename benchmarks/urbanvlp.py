"""UrbanVLP benchmark on CityView: quality, out-of-region transfer, house price, PerceptionScore.

Parts (``--parts``, comma-separated):

- ``cityview``: Beijing and Guangzhou, carbon and population, under ``spatial`` and ``nested``:
  ``urbanvlp`` (pretrained on the city's own tiles, several seeds) beside ``knn-location``,
  ``raw-location`` and, where registered, ``tfidf-captions`` and ``concat``.
- ``transfer``: pretrain on Beijing, embed Guangzhou with the frozen towers, probe on Guangzhou (same
  protocols); and the strict setting: a Ridge head fit on Beijing's embeddings predicts Guangzhou.
- ``houseprice``: the 440 tiles of ``beijing_indicators_urbanvlp.csv``: urbanvlp (pretrained on all
  Beijing tiles, no labels) probed for house price, beside UrbanVLP's own ``houseprice_predict``.
- ``perception``: CLIPScore with our aligned towers on every real image-caption pair (16 tiles and 3
  street-view photos), leave-one-out; CycleScore is not computed (no offline text-to-image model or
  segmenter), and the output says so.

    URBANPROFILE_DATA=../shared/data python benchmarks/urbanvlp.py [--parts cityview,transfer] [--seeds 0,1,2]
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from common import RESULTS, environment, parse_seeds, parser, run, set_threads, write_json, write_text

from urbanprofile.data import load_dataset
from urbanprofile.data.city import CityData
from urbanprofile.embedders.multimodal.perception import ONLY_CLIP_NOTE, align_image_tower, clip_score, perception_score
from urbanprofile.embedders.multimodal.urbanvlp import UrbanVLPEmbedder, VLPInputs, projection_tower
from urbanprofile.embedders.multimodal.urbanvlp_inputs import vlp_inputs_from_city
from urbanprofile.errors import UrbanProfileError
from urbanprofile.evaluation.metrics import regression_metrics
from urbanprofile.evaluation.protocols import evaluate_embedding
from urbanprofile.heads.probes import make_probe
from urbanprofile.methods import get_method, list_methods

PARTS = ("cityview", "transfer", "houseprice", "perception")
CITIES = ("cityview-beijing", "cityview-guangzhou")
TASKS = ("carbon", "population")
PROTOCOLS = ("spatial", "nested")
#: ``concat`` (the frozen outputs side by side, ~2,600-d) is left out here: its nested Ridge SVDs on 4,587 tiles
#: take tens of minutes on the shared cores.
BASELINES = ("knn-location", "raw-location", "tfidf-captions")


def log(message: str) -> None:
    print(message, flush=True)


class Inputs:
    """Frozen-encoder inputs of each city, computed once (the encoders cache them on disk too)."""

    def __init__(self) -> None:
        self.cities: dict[str, CityData] = {}
        self.inputs: dict[str, VLPInputs] = {}
        self.seconds: dict[str, float] = {}
        self.models: dict[tuple[str, int, str], tuple[UrbanVLPEmbedder, float]] = {}

    def city(self, name: str) -> CityData:
        if name not in self.cities:
            self.cities[name] = load_dataset(name)
        return self.cities[name]

    def get(self, name: str, params: dict[str, Any]) -> VLPInputs:
        """The city's inputs (encoded once, with photos); without photos when ``params["images"]`` is false."""
        if name not in self.inputs:
            start = time.perf_counter()
            inputs = vlp_inputs_from_city(self.city(name), location_encoder=params.get("location_encoder", "geoclip"),
                                          images=True, max_tokens=params.get("max_tokens", 32))
            self.inputs[name] = inputs
            self.seconds[name] = time.perf_counter() - start
            log(f"  inputs of {name}: {inputs.n_regions} tiles, {inputs.n_items} street-view items in "
                f"{self.seconds[name]:.1f} s; " + "; ".join(inputs.notes))
        inputs = self.inputs[name]
        if params.get("images", True):
            return inputs
        return dataclasses.replace(inputs, tile_image=None, has_tile_image=None, item_image=None,
                                   has_item_image=None)

    def model(self, name: str, seed: int, params: dict[str, Any]) -> tuple[UrbanVLPEmbedder, float]:
        """The model pretrained on ``name`` with ``seed`` (trained once, reused by every part)."""
        key = (name, seed, json.dumps(params, sort_keys=True))
        if key not in self.models:
            self.models[key] = pretrain(self.get(name, params), seed, params)
        return self.models[key]


def urbanvlp_params() -> dict[str, Any]:
    return dict(get_method("urbanvlp").params)


def pretrain(inputs: VLPInputs, seed: int, params: dict[str, Any]) -> tuple[UrbanVLPEmbedder, float]:
    start = time.perf_counter()
    model = UrbanVLPEmbedder(**params, random_state=seed).fit_inputs(inputs)
    return model, time.perf_counter() - start


def result_row(city: CityData, method: str, seed: int, task: str, protocol: str, emb: pd.DataFrame,
               head: str = "ridge", **extra: Any) -> dict[str, Any]:
    res = evaluate_embedding(city, emb, task=task, protocol=protocol, head=head, random_state=seed)
    if city.meta.get("task_scale", {}).get(task) == "log1p":  # also on the labels' own scale
        extra["r2_raw_scale"] = regression_metrics(np.expm1(res.y), np.expm1(res.pred))["r2"]
    return {"dataset": city.name, "method": method, "seed": seed, "task": task, "protocol": protocol,
            **{k: float(v) for k, v in res.metrics.items()}, "worst_block_r2": float(res.bias["worst_block_r2"]),
            "morans_i": float(res.bias["morans_i"]), **extra}


def baseline_rows(city: CityData, tasks: tuple[str, ...], protocols: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = []
    for name in BASELINES:
        if name not in list_methods():
            log(f"  {name}: not registered on this branch, skipped")
            continue
        spec = get_method(name)
        reason = spec.unavailable_reason(city)
        if reason:
            log(f"  {name}: {reason}")
            continue
        start = time.perf_counter()
        emb = spec.build(random_state=0).fit_transform(city)
        fit_s = time.perf_counter() - start
        for task in tasks:
            for protocol in protocols:
                rows.append(result_row(city, name, 0, task, protocol, emb, head=spec.head, fit_seconds=fit_s))
    return rows


def part_cityview(cache: Inputs, seeds: list[int], params: dict[str, Any]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    train: list[dict[str, Any]] = []
    for name in CITIES:
        city = cache.city(name)
        log(f"{name}: baselines")
        rows += baseline_rows(city, TASKS, PROTOCOLS)
        inputs = cache.get(name, params)
        for seed in seeds:
            model, seconds = cache.model(name, seed, params)
            train.append({"dataset": name, "seed": seed, "seconds": seconds, "losses": [model.losses_[0],
                                                                                         model.losses_[-1]]})
            log(f"  urbanvlp seed {seed}: pretrained in {seconds:.1f} s; "
                f"loss {model.losses_[0]} -> {model.losses_[-1]}")
            emb = model.transform_inputs(inputs)
            for task in TASKS:
                for protocol in PROTOCOLS:
                    rows.append(result_row(city, "urbanvlp", seed, task, protocol, emb, fit_seconds=seconds))
    return {"rows": rows, "training": train}


def part_transfer(cache: Inputs, seeds: list[int], params: dict[str, Any]) -> dict[str, Any]:
    source, target = cache.city(CITIES[0]), cache.city(CITIES[1])
    src_inputs, tgt_inputs = cache.get(CITIES[0], params), cache.get(CITIES[1], params)
    rows, strict = [], []
    for seed in seeds:
        model, seconds = cache.model(CITIES[0], seed, params)
        log(f"  urbanvlp pretrained on {source.name} (seed {seed}) in {seconds:.1f} s")
        emb_t = model.transform_inputs(tgt_inputs)
        emb_s = model.transform_inputs(src_inputs)
        for task in TASKS:
            for protocol in PROTOCOLS:
                rows.append(result_row(target, "urbanvlp (pretrained on Beijing)", seed, task, protocol, emb_t))
            strict.append({"method": "urbanvlp", "seed": seed, "task": task,
                           **head_transfer(source, emb_s, target, emb_t, task, seed)})
    for name in ("tfidf-captions",):
        if name not in list_methods():
            continue
        spec = get_method(name)
        try:
            fitted = spec.build(random_state=0).fit(source)
            emb_s, emb_t = fitted.transform(source), fitted.transform(target)
        except (UrbanProfileError, ValueError) as err:
            log(f"  {name}: cannot transfer ({err})")
            continue
        for task in TASKS:
            strict.append({"method": name, "seed": 0, "task": task,
                           **head_transfer(source, emb_s, target, emb_t, task, 0)})
    for task in TASKS:
        y_s, y_t = _labels(source, task), _labels(target, task)
        strict.append({"method": "Beijing mean", "seed": 0, "task": task,
                       **regression_metrics(y_t.to_numpy(), np.full(len(y_t), y_s.mean()))})
    return {"rows": rows, "strict": strict}


def _labels(city: CityData, task: str) -> pd.Series:
    from urbanprofile.data.tasks import task_data

    td = task_data(city, task)
    return pd.Series(td.y, index=td.region_ids)


def head_transfer(source: CityData, emb_s: pd.DataFrame, target: CityData, emb_t: pd.DataFrame, task: str,
                  seed: int) -> dict[str, float]:
    """A Ridge head chosen by inner CV on the source city predicts the target city (no target labels seen)."""
    y_s, y_t = _labels(source, task), _labels(target, task)
    probe = make_probe("ridge", False, seed).fit(emb_s.loc[y_s.index].to_numpy(), y_s.to_numpy())
    pred = probe.predict(emb_t.loc[y_t.index].to_numpy())
    return {k: float(v) for k, v in regression_metrics(y_t.to_numpy(), pred).items()}


def part_houseprice(cache: Inputs, seeds: list[int], params: dict[str, Any]) -> dict[str, Any]:
    from urbanprofile.data.registry import list_datasets

    names = [n for n in list_datasets() if "urbanvlp" in n]
    if not names:
        log("  no UrbanVLP indicator dataset is registered on this branch; skipped")
        return {"rows": [], "skipped": "no dataset"}
    name = names[0]
    city = cache.city(name)
    rows = []
    column = city.meta.get("peer_predictions", {}).get("houseprice")
    if column and column in city.regions:
        td_y = _labels(city, "houseprice")
        peer = city.regions.loc[td_y.index, column].to_numpy(dtype=float)
        scale = city.meta.get("task_scale", {}).get("houseprice", "raw")
        raw_y = np.expm1(td_y.to_numpy()) if scale == "log1p" else td_y.to_numpy()
        n_negative = int((peer < 0).sum())
        # Their predictions are in yuan/m2 and a few are negative: on the log scale those are clipped to 0.
        log_peer = np.log1p(np.clip(peer, 0, None)) if scale == "log1p" else peer
        rows.append({"dataset": name, "method": "UrbanVLP's houseprice_predict (published)", "seed": 0,
                     "task": "houseprice", "protocol": "as published",
                     **regression_metrics(td_y.to_numpy(), log_peer),
                     "r2_raw_scale": regression_metrics(raw_y, peer)["r2"], "n_negative_predictions": n_negative})
    sub_inputs = cache.get(name, params)
    for baseline in ("knn-location", "raw-location", "raw-poi", "tfidf-captions"):
        if baseline not in list_methods() or get_method(baseline).unavailable_reason(city):
            continue
        spec = get_method(baseline)
        emb = spec.build(random_state=0).fit_transform(city)
        for protocol in ("paper", "nested", "spatial"):
            rows.append(result_row(city, baseline, 0, "houseprice", protocol, emb, head=spec.head))
    for seed in seeds:
        model, _ = cache.model(CITIES[0], seed, params)
        emb = model.transform_inputs(sub_inputs)
        for protocol in ("paper", "nested", "spatial"):
            rows.append(result_row(city, "urbanvlp", seed, "houseprice", protocol, emb))
    return {"rows": rows, "dataset": name}


def part_perception(cache: Inputs, params: dict[str, Any]) -> dict[str, Any]:
    """Leave-one-out CLIPScore on the real image-caption pairs, with a text tower pretrained without images."""
    text_params = {**params, "images": False}
    model, _ = cache.model(CITIES[0], 0, text_params)
    pairs_img, pairs_txt, labels = [], [], []
    for name in CITIES:
        inputs = cache.get(name, params)
        if inputs.tile_image is not None and inputs.has_tile_image is not None:
            for row in np.flatnonzero(inputs.has_tile_image & inputs.has_tile_text):
                pairs_img.append(inputs.tile_image[row])
                pairs_txt.append(inputs.tile_text[row])
                labels.append(f"{name} tile {inputs.region_ids[row]}")
        if inputs.item_image is not None and inputs.has_item_image is not None and inputs.item_text is not None:
            both = inputs.has_item_image & (inputs.has_item_text if inputs.has_item_text is not None else False)
            for row in np.flatnonzero(both):
                pairs_img.append(inputs.item_image[row])
                pairs_txt.append(inputs.item_text[row])
                labels.append(f"{name} street view {row}")
    n = len(pairs_img)
    if n < 3:
        return {"n_pairs": n, "note": "fewer than 3 real image-caption pairs; nothing scored"}
    images, texts = np.stack(pairs_img), np.stack(pairs_txt)
    base = model.network_
    d = base.d
    matched, mismatched, ranks = [], [], []
    held_image, held_text = [], []
    for k in range(n):
        network = copy.deepcopy(base)
        torch.manual_seed(k)
        network.image = projection_tower(images.shape[1], d)
        others = np.array([j for j in range(n) if j != k])
        align_image_tower(network, images[others], texts[others], epochs=200, random_state=k)
        with torch.no_grad():
            iv = network.encode_image(torch.as_tensor(images, dtype=torch.float32)).numpy()
            tv = network.encode_text(torch.as_tensor(texts, dtype=torch.float32)).numpy()
        scores = clip_score(np.repeat(iv[k:k + 1], n, axis=0), tv)
        held_image.append(iv[k])
        held_text.append(tv[k])
        matched.append(float(scores[k]))
        mismatched.append(float(np.delete(scores, k).mean()))
        ranks.append(int((scores > scores[k]).sum()) + 1)
    # No text-to-image model or segmenter is supplied: the result carries CLIPScore and says so.
    result = perception_score(np.stack(held_image), np.stack(held_text))
    return {"n_pairs": n, "pairs": labels, "clip_score_matched": matched, "clip_score_mismatched": mismatched,
            "rank_of_true_caption": ranks, "mean_matched": float(np.mean(result.clip_score)),
            "mean_mismatched": float(np.mean(mismatched)), "mean_rank": float(np.mean(ranks)),
            "chance_rank": (n + 1) / 2, "cycle_score": None, "perception_score": None, "note": result.note}


def summarise(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    keys = ["dataset", "task", "protocol", "method"]
    out = frame.groupby(keys, sort=True)["r2"].agg(["mean", "std", "count"]).reset_index()
    if "r2_raw_scale" in frame:
        raw = frame.groupby(keys, sort=True)["r2_raw_scale"].mean().rename("raw").reset_index()
        out = out.merge(raw, on=keys)
    return out


def markdown(frame: pd.DataFrame, title: str) -> str:
    if frame.empty:
        return f"## {title}\n\n(no rows)\n"
    lines = [f"## {title}", "", "| dataset | task | protocol | method | R² | R² (labels' own scale) | seeds |",
             "|---|---|---|---|---|---|---|"]
    for r in frame.itertuples(index=False):
        std = f" ± {r.std:.3f}" if r.count > 1 and np.isfinite(r.std) else ""
        raw = f"{r.raw:.3f}" if "raw" in frame and np.isfinite(r.raw) else "-"
        lines.append(f"| {r.dataset} | {r.task} | {r.protocol} | {r.method} | {r.mean:.3f}{std} | {raw} | {r.count} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser_ = parser(__doc__, parts=",".join(PARTS), parts_help=f"comma-separated from {','.join(PARTS)}",
                     seeds="0,1", seeds_help="seeds of the pretraining")
    parser_.add_argument("--epochs", type=int, default=None, help="override the registry's epochs (smoke runs)")
    args = parser_.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise UrbanProfileError(f"unknown part {unknown[0]!r}; valid: {', '.join(PARTS)}")
    seeds = parse_seeds(args.seeds)
    set_threads(1)
    # One BLAS thread too: on shared cores a multi-threaded OpenBLAS made each Ridge SVD ~60x slower.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    params = urbanvlp_params()
    if args.epochs is not None:
        params["epochs"] = args.epochs
    env = {**environment(), "params": params, "seeds": seeds}
    cache = Inputs()
    for part in parts:
        start = time.perf_counter()
        log(f"## part {part}")
        if part == "cityview":
            payload = part_cityview(cache, seeds, params)
        elif part == "transfer":
            payload = part_transfer(cache, seeds, params)
        elif part == "houseprice":
            payload = part_houseprice(cache, seeds, params)
        else:
            payload = part_perception(cache, params)
        wall = time.perf_counter() - start
        payload.update({"part": part, "wall_seconds": wall, "environment": env,
                        "input_seconds": dict(cache.seconds)})
        write_json(RESULTS / f"urbanvlp_{part}.json", payload, default=str)
        text = f"<!-- generated by benchmarks/urbanvlp.py --parts {part}; wall {wall:.0f} s -->\n\n"
        if "rows" in payload:
            text += markdown(summarise(payload["rows"]), f"{part}: R² (mean ± std over seeds)")
        if "strict" in payload:
            strict = pd.DataFrame(payload["strict"]).groupby(["task", "method"])["r2"].agg(["mean", "std", "count"])
            text += ("\n## head fit on Beijing, evaluated on Guangzhou (R²)\n\n"
                     "| task | method | R² | seeds |\n|---|---|---|---|\n")
            for (task, method), r in strict.iterrows():
                std = f" ± {r['std']:.3f}" if r["count"] > 1 else ""
                text += f"| {task} | {method} | {r['mean']:.3f}{std} | {int(r['count'])} |\n"
        if part == "perception":
            text += (f"## PerceptionScore on {payload.get('n_pairs')} real pairs (leave-one-out alignment)\n\n"
                     f"- CLIPScore, matched pairs: {payload.get('mean_matched', float('nan')):.3f}\n"
                     f"- CLIPScore, mismatched (same image, the other captions): "
                     f"{payload.get('mean_mismatched', float('nan')):.3f}\n"
                     f"- mean rank of the true caption: {payload.get('mean_rank', float('nan')):.2f} "
                     f"(chance {payload.get('chance_rank', float('nan')):.1f})\n- {ONLY_CLIP_NOTE}\n")
        write_text(RESULTS / f"urbanvlp_{part}.md", text)
        log(text)
        log(f"part {part}: {wall:.0f} s wall")
    return 0


if __name__ == "__main__":
    run(main)
