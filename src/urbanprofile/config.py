"""Config files: a TOML file whose keys are the fields of a config dataclass, overridden by flags.

The defaults live only in the dataclasses (:class:`~urbanprofile.data.build.spec.BuildSpec`,
:class:`~urbanprofile.benchmark.runner.StudyConfig`, :class:`~urbanprofile.apps.r1.config.R1Config`): a value is
taken from the command line when given, else from the file, else from the dataclass.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from urbanprofile.errors import UrbanProfileError

T = TypeVar("T")


def load_config(path: Path, schema: type[Any]) -> dict[str, Any]:
    """Read a TOML file and check every key against the fields of ``schema``.

    Args:
        path: The ``.toml`` file.
        schema: A dataclass; its field names are the valid keys and their annotations the valid types.

    Returns:
        The file's values by field name (strings converted to ``Path`` where the field is a path, with ``~``
        and ``$VARIABLES`` expanded).

    Raises:
        UrbanProfileError: One line naming the file and the key: the file is missing or not TOML, a key is
            unknown (with a "did you mean"), or a value has the wrong type.
    """
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise UrbanProfileError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise UrbanProfileError(f"{path}: is a folder, not a config file") from None
    except tomllib.TOMLDecodeError as error:
        raise UrbanProfileError(f"{path}: not valid TOML ({error})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UrbanProfileError(f"{path}: could not read ({getattr(error, 'strerror', None) or error})") from None
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in names:
            hint = difflib.get_close_matches(key, names, n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise UrbanProfileError(f"{path}: unknown key {key!r}{did_you_mean}; valid keys: {', '.join(names)}")
        if not _matches(value, hints[key]):
            raise UrbanProfileError(
                f"{path}: key {key!r} must be {_describe(hints[key])}, got {type(value).__name__} {value!r}")
        values[key] = _convert(value, hints[key])
    return values


def make_config(schema: type[T], file_values: Mapping[str, Any], flags: Mapping[str, Any], *,
                source: Path | None = None, flag_names: Mapping[str, str] | None = None) -> T:
    """The config dataclass from the file's values overridden by the flags that were given.

    Args:
        schema: The config dataclass.
        file_values: What :func:`load_config` returned (empty without a file).
        flags: Values from the command line by field name; ``None`` means "not given".
        source: The config file, named in the error for a missing required value.
        flag_names: The flag of each field (``{"random_state": "--seed"}``), for that error.

    Raises:
        UrbanProfileError: A required field is neither in the file nor on the command line.
    """
    values = {**file_values, **{k: v for k, v in flags.items() if v is not None}}
    for item in dataclasses.fields(schema):  # type: ignore[arg-type]
        required = item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
        if required and item.name not in values:
            flag = (flag_names or {}).get(item.name, "--" + item.name.replace("_", "-"))
            where = f"{source}: required key {item.name!r} is missing" if source else f"missing {flag}"
            raise UrbanProfileError(f"{where} (give {flag}" + (f" or {item.name} = ... in the file)" if source
                                                                else " or --config FILE.toml)"))
    return schema(**values)


def _args(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint)


def _is_union(hint: Any) -> bool:
    return isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union


def _matches(value: Any, hint: Any) -> bool:
    """Whether a TOML value fits a field annotation (TOML has no null, so ``None`` never comes from a file)."""
    if hint is Any:
        return True
    if _is_union(hint):
        return any(_matches(value, h) for h in _args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # a whole number is a fine float (lr = 1 is 1.0)
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is Path:
        return isinstance(value, str) and value != ""
    origin = typing.get_origin(hint)
    if origin in (list, tuple, Sequence):
        inner = _args(hint)[0] if _args(hint) else Any
        return isinstance(value, list) and all(_matches(v, inner) for v in value)
    if origin in (dict, Mapping):
        key_hint, value_hint = _args(hint) or (Any, Any)
        return isinstance(value, dict) and all(_matches(k, key_hint) and _matches(v, value_hint)
                                               for k, v in value.items())
    return isinstance(value, hint)


def _convert(value: Any, hint: Any) -> Any:
    """Strings to paths where the field is a path (the only conversion TOML values need).

    ``~`` and ``$VARIABLES`` are expanded, so that a file can name ``$URBANPROFILE_DATA/...``; a relative path
    stays relative to the current directory, as the same path given as a flag would.
    """
    if isinstance(value, str) and (hint is Path or (_is_union(hint) and Path in _args(hint)
                                                    and str not in _args(hint))):
        return Path(os.path.expandvars(value)).expanduser()
    return value


def _describe(hint: Any) -> str:
    """A type in words: ``int``, ``a list of str``, ``str or a list of str``."""
    if _is_union(hint):
        return " or ".join(_describe(h) for h in _args(hint) if h is not type(None))
    if hint is Path:
        return "a path (str)"
    origin = typing.get_origin(hint)
    if origin in (list, tuple, Sequence):
        return f"a list of {_describe(_args(hint)[0])}" if _args(hint) else "a list"
    if origin in (dict, Mapping):
        return f"a table of {_describe(_args(hint)[1])}" if _args(hint) else "a table"
    return getattr(hint, "__name__", str(hint))
