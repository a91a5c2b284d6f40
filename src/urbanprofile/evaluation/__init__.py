"""Evaluation: leak-free protocols, pooled metrics and geographic bias (no torch here)."""

from __future__ import annotations

from urbanprofile.evaluation.metrics import regression_metrics
from urbanprofile.evaluation.protocols import PROTOCOLS, ProtocolResult, evaluate_embedding, outer_splits

__all__ = ["PROTOCOLS", "ProtocolResult", "evaluate_embedding", "outer_splits", "regression_metrics"]
