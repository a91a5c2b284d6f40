"""urbanprofile: learn region representations from multimodal urban data and evaluate them honestly."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
