"""Reports: leaderboard tables (Markdown) and the peers' published figures to set beside them."""

from __future__ import annotations

from urbanprofile.report.tables import PUBLISHED_R2, markdown_leaderboard, markdown_summary

__all__ = ["PUBLISHED_R2", "markdown_leaderboard", "markdown_summary"]
