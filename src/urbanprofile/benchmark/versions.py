"""The version of a result's code: a hash of the code of every urbanprofile module the result depends on.

A module's hash is taken over its syntax tree without docstrings (comments never reach the tree), so
editing a comment or a docstring recomputes nothing, while any change to what the code does is a new version.

A stored result is reused only when it was computed by the same code. The modules a result depends on are
found statically, per component: the method's factory module, the evaluation code that probes every embedding
(without the modules of the optional heads), the modules of the head the result used
(:data:`urbanprofile.heads.registry.HEAD_MODULES`), and every ``urbanprofile`` module they import (at any depth,
also inside functions). So an edit to the MoE head recomputes the rows probed with ``moe`` and no ridge row.
``from package import Name`` is followed to the submodule that defines ``Name`` when the package re-exports it,
so that a change to, say, the dataset builder does not invalidate results of methods that only use ``CityData``.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from urbanprofile.heads.registry import DEFAULT_HEAD, HEAD_MODULES, parse_head

if TYPE_CHECKING:
    from urbanprofile.data.city import CityData

#: Modules whose code shapes every row, whatever the method: protocols, metrics, spatial blocks (the heads they
#: build are counted per row, by the head used).
EVALUATION_MODULES = ("urbanprofile.evaluation.protocols",)
_PACKAGE = "urbanprofile"
#: Where the package's source is read from (tests point it at an edited copy).
SOURCE_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class CodeVersion:
    """A short hash over module source hashes, and the per-module hashes (to say what changed)."""

    version: str
    modules: dict[str, str]

    def changed_modules(self, other: dict[str, str] | None) -> list[str]:
        """Modules of this version whose code differs from (or is missing in) ``other``.

        Modules that only ``other`` covers are no cause: a row stored before versions were taken per component
        covered every head's modules.
        """
        other = other or {}
        return sorted(n for n in self.modules if self.modules[n] != other.get(n))

    def matches(self, version: str | None, modules: dict[str, str] | None) -> bool:
        """Whether a row stored with ``version`` and per-module hashes ``modules`` was computed by this code: the
        same version, or the same code for every module this version covers (a row from before versions were
        taken per component covered more modules, and is still current when the ones it used are unchanged)."""
        if version == self.version:
            return True
        return bool(modules) and not self.changed_modules(modules)


@functools.cache
def _source(module: str) -> tuple[Path, str] | None:
    """The file and text of an ``urbanprofile`` module, found on disk (importing it could pull in torch)."""
    parts = module.split(".")
    if parts[0] != _PACKAGE:
        return None
    base = SOURCE_ROOT.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path, path.read_text(encoding="utf-8")
    return None


def _is_package(module: str) -> bool:
    found = _source(module)
    return found is not None and found[0].name == "__init__.py"


@functools.cache
def _imports(module: str) -> tuple[str, ...]:
    """The ``urbanprofile`` modules that ``module`` imports (resolved to the defining submodule)."""
    found = _source(module)
    if found is None:
        return ()
    path, text = found
    tree = ast.parse(text, filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names if alias.name.split(".")[0] == _PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            if base.split(".")[0] != _PACKAGE:
                continue
            for alias in node.names:
                out.append(_defining_module(base, alias.name))
    return tuple(dict.fromkeys(out))


def _defining_module(base: str, name: str) -> str:
    """Where ``from base import name`` gets ``name``: a submodule, the module a package re-exports it from,
    or ``base`` itself."""
    if _source(f"{base}.{name}") is not None:
        return f"{base}.{name}"
    if _is_package(base):
        found = _source(base)
        assert found is not None
        for node in ast.walk(ast.parse(found[1])):
            if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
                target = node.module or ""
                if node.level:
                    parts = base.split(".")
                    parent = ".".join(parts[: len(parts) - node.level + 1])
                    target = f"{parent}.{target}" if target else parent
                if target.split(".")[0] == _PACKAGE:
                    return _defining_module(target, name) if _is_package(target) else target
    return base


def module_closure(roots: tuple[str, ...], guarded: frozenset[str] = frozenset()) -> list[str]:
    """Every ``urbanprofile`` module reachable by imports from ``roots`` (sorted).

    A ``guarded`` module is entered only as a root or from another guarded one: the head registry imports every
    head to build the one asked for, and only that one's code shapes a result.
    """
    seen: set[str] = set()
    stack = [r for r in roots if r.split(".")[0] == _PACKAGE]
    while stack:
        module = stack.pop()
        if module in seen or _source(module) is None:
            continue
        seen.add(module)
        stack += [m for m in _imports(module) if m not in seen and (m not in guarded or module in guarded)]
    return sorted(seen)


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def normalised_source_hash(text: str) -> str:
    """A hash of what the code does: its syntax tree without docstrings, comments or layout."""
    tree = _without_docstrings(ast.parse(text))
    return hashlib.sha1(ast.dump(tree, annotate_fields=False, include_attributes=False).encode()).hexdigest()[:12]


def code_version(factory: str, head: str = DEFAULT_HEAD) -> CodeVersion:
    """The code version of a result of a method built by ``factory`` (``"module:Class"``), probed with ``head`` by
    the protocols.

    Args:
        factory: The method's factory, as in :class:`urbanprofile.methods.MethodSpec`.
        head: The head name (``ridge``, ``moe``, ``prompt4re-llama``, ...).

    Returns:
        A 12-hex-digit version and the normalised code hash of each module it covers.
    """
    return _component_version(factory.partition(":")[0], parse_head(head).kind)


@functools.cache
def _component_version(module: str, head_kind: str) -> CodeVersion:
    heads = frozenset(m for modules in HEAD_MODULES.values() for m in modules)
    covered = {*module_closure((module,)), *module_closure((*EVALUATION_MODULES, *HEAD_MODULES[head_kind]), heads)}
    modules = {name: _module_hash(name) for name in sorted(covered)}
    digest = hashlib.sha1("".join(f"{k}={v};" for k, v in sorted(modules.items())).encode()).hexdigest()[:12]
    return CodeVersion(digest, modules)


@functools.cache
def _module_hash(module: str) -> str:
    found = _source(module)
    assert found is not None
    return normalised_source_hash(found[1])


def clear_caches() -> None:
    """Forget the sources and versions read so far (after :data:`SOURCE_ROOT` changed, or the files did)."""
    for cached in (_source, _imports, _component_version, _module_hash):
        cached.cache_clear()


def dataset_fingerprint(city: CityData) -> str:
    """A short hash of what a city's results depend on: region ids and locations, every view (name, shape,
    values), the labels, the neighbours and the modality tables.

    A stored row is reused only when its dataset still has this fingerprint, so rebuilding a dataset (new labels,
    another POI file) recomputes its rows. Image files named by a modality table are covered by their paths only.

    Args:
        city: A loaded city.

    Returns:
        16 hex digits.
    """
    import numpy as np
    import pandas as pd

    digest = hashlib.blake2b(digest_size=8)

    def frame(label: str, table: pd.DataFrame) -> None:
        digest.update(f"{label}:{table.shape}:{list(map(str, table.columns))}".encode())
        digest.update(pd.util.hash_pandas_object(table.index.to_series(), index=False).to_numpy().tobytes())
        numeric = table.select_dtypes(include=[np.number, np.bool_])
        if numeric.shape[1] == table.shape[1]:
            # Bytes of the values in one pass: hash_pandas_object would cost seconds on the big similarity views.
            digest.update(np.ascontiguousarray(numeric.to_numpy(dtype=float)).tobytes())
        else:
            digest.update(pd.util.hash_pandas_object(table.astype(str), index=False).to_numpy().tobytes())

    regions = city.regions
    frame("regions", pd.DataFrame(regions.drop(columns="geometry", errors="ignore")))
    if "geometry" in regions:
        digest.update(b"".join(g.wkb if g is not None else b"" for g in regions.geometry))
    for name, view in sorted(city.views.items()):
        frame(f"view {name}", view)
    frame("targets", city.targets)
    if city.neighbors is not None:
        digest.update(repr(sorted((str(k), sorted(map(str, v))) for k, v in city.neighbors.items())).encode())
    for name, table in sorted(city.modalities.items()):
        frame(f"modality {name}", table)
    return digest.hexdigest()
