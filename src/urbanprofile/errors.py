"""Exceptions that urbanprofile raises for user mistakes (the CLI turns them into one-line errors)."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable
from types import ModuleType


class UrbanProfileError(Exception):
    """Base class: a problem the user can fix; its message is one line naming what is wrong."""


class DataError(UrbanProfileError):
    """A data file, field or region is missing or malformed."""


class DatasetNotFoundError(DataError):
    """The data directory or a named dataset does not exist."""


class UnknownNameError(UrbanProfileError, KeyError):
    """An unknown dataset, method, task or protocol name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MethodUnavailableError(UrbanProfileError):
    """A method cannot run on a dataset (a view or locations are missing)."""


class NotFittedError(UrbanProfileError, ValueError):
    """``transform`` was called before ``fit``."""


class TrainingError(UrbanProfileError):
    """Training diverged (for example a NaN loss)."""


class MissingDependencyError(UrbanProfileError, ImportError):
    """An optional dependency is not installed."""


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> UnknownNameError:
    """Build the error for an unknown ``kind`` called ``name``, listing the valid ones."""
    choices = sorted(valid)
    hint = difflib.get_close_matches(name, choices, n=1)
    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
    listed = ", ".join(choices) if choices else "none"
    return UnknownNameError(f"unknown {kind} {name!r}{did_you_mean}; valid: {listed}")


def require(module: str, extra: str) -> ModuleType:
    """Import an optional dependency or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(f"{module} is needed: pip install 'urbanprofile[{extra}]'") from err


class ParameterError(UrbanProfileError, ValueError):
    """A method parameter is out of range or of the wrong kind (a ``ValueError`` too, as scikit-learn's)."""
