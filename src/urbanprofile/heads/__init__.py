"""Heads: estimators (scikit-learn contract) that map region embeddings to indicator predictions."""

from __future__ import annotations

from urbanprofile.heads.probes import HEADS, KNNProbe, RidgeProbe, make_probe

__all__ = ["HEADS", "KNNProbe", "RidgeProbe", "make_probe"]
