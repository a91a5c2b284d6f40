"""Command-line interface: a thin shell over data, methods, evaluation and the benchmark.

One module per command group (``data``, ``methods``, ``run``, ``results``, ``predict``); ``app`` assembles them
with the applications' groups (``urbanprofile.apps.r1.cli``) and holds the entry point, ``main``.
"""

from __future__ import annotations

from urbanprofile.cli.app import app, main

__all__ = ["app", "main"]
