"""Predict indicators where labels are missing: fit a method + head once, keep it in a model folder, predict with
conformal intervals and an applicability flag."""

from __future__ import annotations

from urbanprofile.predict.model import FittedModel, fit_model, load_model, predict_regions

__all__ = ["FittedModel", "fit_model", "load_model", "predict_regions"]
