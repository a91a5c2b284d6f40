"""How many CPU threads torch, BLAS and OpenMP use in this process and the worker processes it starts.

Our learned methods fit small dense problems (77 to a few thousand regions): extra threads mostly add
synchronisation, and on a busy machine they make a fit many times slower (a ``srel`` fit inside ``benchmark``
took 815 s with torch's default threads on a loaded 2-core machine, against 15.9 s on an idle one; with one
thread ``hafusion`` on Chicago takes 46 s). So every command that computes runs with one thread per process
unless told otherwise (``--threads N``; ``--threads 0`` keeps the libraries' own defaults, one per core).

Workers of ``--jobs`` and Ray tasks call :func:`apply_threads` too, and the environment variables set here
are inherited by any process started afterwards.
"""

from __future__ import annotations

import contextlib
import os
import sys

from urbanprofile.errors import UrbanProfileError

#: Threads per process when none is asked for.
DEFAULT_THREADS = 1
#: Read by OpenMP, the BLAS libraries and numexpr when they load (so also in worker processes).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                    "NUMEXPR_NUM_THREADS")

_configured: int | None = None
_limiter: object | None = None  # keeps threadpoolctl's limits alive


def resolve_threads(threads: int | None) -> int:
    """The thread count to use: ``threads``, or :data:`DEFAULT_THREADS` when ``None``.

    Raises:
        UrbanProfileError: If ``threads`` is negative (``0`` means the libraries' defaults).
    """
    if threads is None:
        return DEFAULT_THREADS
    if threads < 0:
        raise UrbanProfileError(f"--threads must be 0 (the libraries' defaults) or more, got {threads}")
    return int(threads)


def apply_threads(threads: int | None = None) -> int:
    """Limit torch, BLAS and OpenMP in this process (and the processes it starts) to ``threads`` threads.

    Libraries already loaded are limited at once (``torch.set_num_threads``, threadpoolctl for BLAS and
    OpenMP); libraries loaded later read the environment variables set here.

    Args:
        threads: Threads per process; ``None``: :data:`DEFAULT_THREADS`; ``0``: the libraries' defaults
            (nothing is changed).

    Returns:
        The threads in effect (for ``0``, the number of CPUs the libraries default to).
    """
    global _configured, _limiter
    count = resolve_threads(threads)
    if count == 0:
        _configured = 0
        return current_threads()
    for variable in THREAD_VARIABLES:
        os.environ[variable] = str(count)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(count)
        with contextlib.suppress(RuntimeError):  # allowed once, before any inter-op work; our fits use intra-op
            torch.set_num_interop_threads(count)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the environment variables still hold for libraries loaded from now on
        pass
    else:
        _limiter = threadpool_limits(limits=count)
    _configured = count
    return count


def current_threads() -> int:
    """The threads per process in effect: as applied, or else torch's (when loaded) or the CPU count."""
    if _configured:
        return _configured
    torch = sys.modules.get("torch")
    if torch is not None:
        return int(torch.get_num_threads())
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
