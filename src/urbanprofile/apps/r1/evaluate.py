"""Held-out evaluation of the post-trained policy beside its baselines, with geographic bias per group.

Every method answers for the same held-out regions. Language models answer greedily; a completion with
no valid answer counts as a parse failure and is scored as the middle level (or the median training
label for numbers), so failures cost accuracy instead of being dropped. Ridge and knn-location predict
the label, which is then put on the same level scale with the same training-only edges.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from urbanprofile.apps.r1.config import R1Config, first_tokens, load_cities, prepare_task, read_config
from urbanprofile.apps.r1.prompts import parse_answer, taxi_totals, to_level
from urbanprofile.apps.r1.task import R1Data
from urbanprofile.errors import MethodUnavailableError, UrbanProfileError, unknown_name
from urbanprofile.evaluation.metrics import regression_metrics
from urbanprofile.heads.probes import make_probe
from urbanprofile.methods import get_method
from urbanprofile.threads import current_threads

METHODS = ("zero-shot", "grpo", "sft", "ridge", "knn-location")
LLM_METHODS = ("zero-shot", "grpo", "sft")


def group_bias(frame: pd.DataFrame, error_column: str = "abs_error") -> dict[str, Any]:
    """Per-group MAE, the worst group's gap to the overall MAE, and the spread between groups.

    Args:
        frame: One row per held-out region with ``group`` and the absolute error column.

    Returns:
        ``group_mae`` (dict), ``worst_group`` and ``worst_group_mae``, ``worst_group_gap`` (worst group MAE
        minus overall MAE), ``disparity`` (max minus min group MAE) and ``group_mae_std``.
    """
    if frame.empty:
        raise UrbanProfileError("no held-out regions to measure bias on")
    per = frame.groupby("group")[error_column].mean()
    overall = float(frame[error_column].mean())
    worst = str(per.idxmax())
    return {
        "group_mae": {str(k): float(v) for k, v in per.items()},
        "group_n": {str(k): int(v) for k, v in frame.groupby("group").size().items()},
        "worst_group": worst,
        "worst_group_mae": float(per.max()),
        "worst_group_gap": float(per.max()) - overall,
        "disparity": float(per.max() - per.min()),
        "group_mae_std": float(per.std(ddof=0)),
    }


def score(frame: pd.DataFrame, answer: str) -> dict[str, Any]:
    """Metrics of one method's held-out answers (``pred_level``, ``level``, ``pred``, ``label``, ``parsed``)."""
    out: dict[str, Any] = {"n": len(frame), "parse_failure_rate": float(1 - frame["parsed"].mean())}
    y_level = frame["level"].to_numpy(dtype=float)
    p_level = frame["pred_level"].to_numpy(dtype=float)
    level_metrics = regression_metrics(y_level, p_level)
    out.update({f"level_{k}": v for k, v in level_metrics.items()})
    out["spearman"] = _spearman(p_level, y_level)
    if "expected_level" in frame and frame["expected_level"].notna().all():
        out["spearman_expected_level"] = _spearman(frame["expected_level"].to_numpy(float), y_level)
    out["spearman_by_city"] = {
        str(city): _spearman(rows["pred_level"].to_numpy(float), rows["label"].to_numpy(float))
        for city, rows in frame.groupby("city")
    }
    if answer == "number":
        out.update({f"log_{k}": v for k, v in regression_metrics(
            np.log1p(frame["label"].to_numpy(float)), np.log1p(np.clip(frame["pred"].to_numpy(float), 0, None))
        ).items()})
    out["answer_counts"] = {str(k): int(v) for k, v in frame["pred_level"].value_counts().sort_index().items()}
    frame = frame.assign(abs_error=np.abs(p_level - y_level))
    out.update(group_bias(frame))
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")  # a constant answer carries no ranking
    return float(spearmanr(a, b).statistic)


def _test_frame(data: R1Data) -> pd.DataFrame:
    frame = data.frame("test")
    if frame.empty:
        raise UrbanProfileError("no held-out regions in this fold")
    return frame


def llm_predictions(
    model_name: str, adapter: Path | None, data: R1Data, config: R1Config, batch_size: int = 8
) -> tuple[pd.DataFrame, float]:
    """Greedy held-out answers of the base model (``adapter=None``) or a trained adapter / model folder."""
    from tqdm import tqdm

    # Here: policy imports torch (3.5 s measured); the baselines (ridge, knn-location) are scored without it.
    from urbanprofile.apps.r1.policy import chat_prompt, expected_levels, generate_answers, load_policy

    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        model, tokenizer = load_policy(str(adapter), config.random_state, config.device)  # fully fine-tuned
    else:
        model, tokenizer = load_policy(model_name, config.random_state, config.device)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
    frame = _test_frame(data)
    prompts = [chat_prompt(tokenizer, p, config.prefix) for p in frame["prompt"]]
    start = time.perf_counter()
    with tqdm(total=len(prompts), desc=f"answering ({adapter.parent.name + '/' + adapter.name if adapter else 'base'})",
              unit="region") as bar:
        completions = generate_answers(model, tokenizer, prompts, config.answer_tokens, batch_size, bar.update,
                                       first_tokens(config, tokenizer))
    seconds = time.perf_counter() - start
    mean_level = (
        expected_levels(model, tokenizer, prompts, config.n_levels, batch_size)
        if config.answer == "level" and config.answer_prefix else [float("nan")] * len(prompts)
    )
    middle = (config.n_levels - 1) // 2
    train = data.frame("train")
    median_label = {city: float(rows["label"].median()) for city, rows in train.groupby("city")}
    pred, pred_level, parsed = [], [], []
    for completion, (_, row) in zip(completions, frame.iterrows(), strict=True):
        p = parse_answer(config.full_completion(completion), config.answer, config.n_levels)
        parsed.append(p.value is not None)
        edges = np.asarray(data.edges[row["city"]])
        if config.answer == "level":
            level = int(p.value) if p.value is not None else middle
            pred.append(float(level))
            pred_level.append(level)
        else:
            value = p.value if p.value is not None else median_label[row["city"]]
            pred.append(float(value))
            pred_level.append(int(to_level(np.array([value]), edges)[0]))
    frame = frame.assign(completion=completions, pred=pred, pred_level=pred_level, parsed=parsed,
                         expected_level=mean_level)
    return frame, seconds


def baseline_predictions(method: str, data: R1Data, config: R1Config, cities: list[Any]) -> pd.DataFrame:
    """Tuned Ridge on the raw views (``raw-all``; alpha and transforms by inner CV on the training regions)
    or k-nearest-neighbour regression on centroids (``knn-location``), fit per city on its training regions.

    With a held-out city the Ridge is fit across cities instead (:func:`cross_city_ridge`) and
    ``knn-location`` does not apply (:data:`NOT_ACROSS_CITIES`).
    """
    if config.holdout_city is not None:
        if method != "ridge":
            raise MethodUnavailableError(NOT_ACROSS_CITIES)
        return cross_city_ridge(data, config, cities)
    frame = _test_frame(data)
    all_rows = data.frame()
    preds = pd.Series(np.nan, index=frame.index)
    for city in cities:
        spec = get_method("raw-all" if method == "ridge" else "knn-location")
        spec.check_available(city)
        embedding = spec.build(random_state=config.random_state).fit_transform(city)
        rows = all_rows[all_rows["city"] == city.name]
        train, test = rows[rows["split"] == "train"], rows[rows["split"] == "test"]
        X_train = embedding.loc[train["region_id"].to_numpy()].to_numpy(float)
        X_test = embedding.loc[test["region_id"].to_numpy()].to_numpy(float)
        probe = make_probe(spec.head, False, config.random_state).fit(X_train, train["label"].to_numpy(float))
        in_frame = frame.index[(frame["city"] == city.name).to_numpy()]
        preds.loc[in_frame] = probe.predict(X_test)
    levels = [int(to_level(np.array([v]), np.asarray(data.edges[c]))[0])
              for v, c in zip(preds, frame["city"], strict=True)]
    return frame.assign(completion="", pred=preds.to_numpy(), pred_level=levels, parsed=True)


NOT_ACROSS_CITIES = "does not apply to a held-out city (one city's coordinates say nothing about another's)"


def shared_features(city: Any) -> pd.DataFrame:
    """The raw facts a prompt states, per region: POI counts by category, land-use counts by class, taxi
    trips out and in (columns named by category, so cities with the same categories line up)."""
    parts = []
    if "poi_counts" in city.views:
        parts.append(city.views["poi_counts"].astype(float).add_prefix("poi:"))
    if "landuse_counts" in city.views:
        parts.append(city.views["landuse_counts"].astype(float).add_prefix("landuse:"))
    if "od_flows" in city.views:
        out, into = taxi_totals(city)
        parts.append(pd.DataFrame({"trips:out": out, "trips:in": into}))
    if not parts:
        raise UrbanProfileError(f"{city.name}: no POI, land-use or taxi view for the cross-city Ridge")
    return pd.concat(parts, axis=1)


def cross_city_ridge(data: R1Data, config: R1Config, cities: list[Any]) -> pd.DataFrame:
    """The Ridge baseline for a held-out city: the prompt's raw facts as percentiles within each city (the
    columns every city shares), fit on the training cities' regions to their levels (tuned by inner CV),
    rounded to the held-out city's level scale."""
    frame = _test_frame(data)
    tables = {city.name: shared_features(city) for city in cities}
    columns = sorted(set.intersection(*(set(t.columns) for t in tables.values())))
    if not columns:
        raise UrbanProfileError("the cities share no POI category, land-use class or taxi total to fit a Ridge on")
    ranks = {name: t[columns].rank(pct=True) for name, t in tables.items()}
    train = data.frame("train")

    def rows(part: pd.DataFrame) -> np.ndarray:
        return np.vstack([ranks[c].loc[[r]].to_numpy(float) for c, r in zip(part["city"], part["region_id"],
                                                                              strict=True)])

    probe = make_probe("ridge", False, config.random_state).fit(rows(train), train["level"].to_numpy(float))
    levels = np.clip(np.rint(probe.predict(rows(frame))), 0, config.n_levels - 1).astype(int)
    return frame.assign(completion="", pred=levels.astype(float), pred_level=levels, parsed=True)


def evaluate_run(
    run_dir: str | Path, methods: list[str] | None = None, cities: list[Any] | None = None, batch_size: int = 8,
    device: str | None = None,
) -> dict[str, Any]:
    """Score every method on the run's held-out regions; writes ``metrics.json`` and ``predictions.csv``.

    Args:
        device: Torch device of the language models (``None``: the run's ``device`` setting).
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if device is not None:
        config.device = device
    methods = methods or list(METHODS)
    for m in methods:
        if m not in METHODS:
            raise unknown_name("r1 evaluation method", m, METHODS)
    if cities is None:
        cities = load_cities(config)
    data = prepare_task(config, cities)
    results: dict[str, Any] = {}
    frames = []
    for m in methods:
        seconds = 0.0
        if m == "zero-shot":
            frame, seconds = llm_predictions(config.model, None, data, config, batch_size)
        elif m in ("grpo", "sft"):
            adapter = run_dir / "final" if m == "grpo" else run_dir / "sft" / "final"
            if not adapter.is_dir():
                raise UrbanProfileError(f"{run_dir}: no trained {m} model ({adapter} is missing); run `r1 train` first")
            frame, seconds = llm_predictions(config.model, adapter, data, config, batch_size)
        else:
            try:
                frame = baseline_predictions(m, data, config, cities)
            except MethodUnavailableError as error:  # a Ridge on CityView tiles (no count views), kNN across cities
                results[m] = {"skipped": " ".join(str(error).split())}
                continue
        results[m] = {**score(frame, config.answer), "answer_seconds": seconds}
        frames.append(frame.assign(method=m))
    predictions = pd.concat(frames, ignore_index=True).drop(columns=["prompt"])
    predictions.to_csv(run_dir / "predictions.csv", index=False)
    payload = {"config": config.to_json(), "n_test": len(data.split("test")), "groups": data.groups, "methods": results,
               "threads": current_threads()}
    (run_dir / "metrics.json").write_text(json.dumps(payload, indent=2, default=float))
    return payload
