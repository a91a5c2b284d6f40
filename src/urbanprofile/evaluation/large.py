"""Evaluation on large region sets (a country of H3 cells): when to sample, and what to report while it runs.

On a million regions every protocol still runs on every region (outer folds, out-of-fold predictions, bias
figures); only the choices that do not need every region are made on seeded samples, so time and memory stay
close to linear: spatial blocks are k-means centres fitted on a sample of centroids (every region then goes to
its nearest centre), and a probe's inner CV chooses its settings on a sample of its training fold before the
chosen probe is fit on the whole fold. Below the thresholds nothing changes.
"""

from __future__ import annotations

import resource
import sys
import time

#: From this many labelled regions an evaluation reports each outer fold (time and peak memory) on stderr.
LARGE_EVALUATION = 50_000


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


class FoldProgress:
    """One stderr line per finished outer fold of a large evaluation: which fold, time so far, peak memory.

    Lines rather than a bar: the run's own progress bar (units) is live on the same terminal, and rich allows one
    live display at a time; its console prints these lines above the bar.
    """

    def __init__(self, where: str, n_folds: int, n_regions: int) -> None:
        self.where = where
        self.n_folds = n_folds
        self.enabled = n_regions >= LARGE_EVALUATION
        self.start = time.perf_counter()

    def fold_done(self, fold: int) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"{self.where}: fold {fold + 1}/{self.n_folds} done ({elapsed:.0f} s, peak memory "
                         f"{peak_rss_gb():.2f} GB)\n")
        sys.stderr.flush()
