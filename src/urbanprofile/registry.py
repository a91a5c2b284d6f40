"""One registry for every pluggable axis: methods, heads, dataset families and protocols.

A :class:`Registry` maps names to objects, says "did you mean" on a typo, and loads plug-ins lazily from an
entry-point group (``urbanprofile.methods``, ``urbanprofile.heads``, ``urbanprofile.datasets``,
``urbanprofile.protocols``) the first time it is read. A plug-in that fails to import does not stop the
program: it is remembered in :attr:`Registry.broken` (one line each) so ``urbanprofile methods list`` can name
it. Two plug-ins that claim one name are a user mistake (:class:`DuplicateNameError`, exit code 2), since
which one wins would otherwise depend on installation order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

from urbanprofile.errors import UrbanProfileError, unknown_name

T = TypeVar("T")


class DuplicateNameError(UrbanProfileError, ValueError):
    """Two registrations claim one name (and the second did not ask to replace the first)."""


class Registry(Generic[T]):
    """Objects of one kind by name, with lazy entry-point plug-ins.

    Args:
        kind: What the objects are, for messages (``method``, ``head``, ``dataset family``, ``protocol``).
        group: Entry-point group whose plug-ins are loaded on first read (``None``: no plug-ins).
        name_of: The registry name of a plug-in's object (default: the entry point's name).
        accepts: Whether a plug-in's object is of the right kind (others are recorded as broken).
    """

    def __init__(self, kind: str, group: str | None = None, name_of: Callable[[T], str] | None = None,
                 accepts: Callable[[object], bool] | None = None) -> None:
        self.kind = kind
        self.group = group
        self._name_of = name_of
        self._accepts = accepts
        #: Registered objects in registration order (a plain dict, so tests can save and restore it).
        self.items: dict[str, T] = {}
        #: Plug-ins that could not be loaded: entry-point name -> one-line reason.
        self.broken: dict[str, str] = {}
        self._plugins_loaded = False
        self._plugin_sources: dict[str, str] = {}

    def register(self, name: str, obj: T, replace: bool = False) -> T:
        """Add ``obj`` under ``name`` and return it.

        Raises:
            DuplicateNameError: ``name`` is taken and ``replace`` is false.
        """
        if name in self.items and not replace:
            raise DuplicateNameError(f"{self.kind} {name!r} is already registered")
        self.items[name] = obj
        return obj

    def unregister(self, name: str) -> None:
        """Remove ``name`` (no error when it is absent); tests use it to clean up after themselves."""
        self.items.pop(name, None)

    def get(self, name: str) -> T:
        """The object registered as ``name``.

        Raises:
            UnknownNameError: No such name (the message lists the valid ones and the closest match).
            UrbanProfileError: ``name`` is a plug-in that failed to load (the message says why).
        """
        self.load_plugins()
        if name not in self.items and name in self.broken:
            raise UrbanProfileError(f"{self.kind} plug-in {name!r} is installed but not loaded: {self.broken[name]}")
        if name not in self.items:
            raise unknown_name(self.kind, name, self.items)
        return self.items[name]

    def names(self) -> list[str]:
        """Every registered name, in registration order."""
        self.load_plugins()
        return list(self.items)

    def __contains__(self, name: object) -> bool:
        self.load_plugins()
        return name in self.items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def load_plugins(self) -> None:
        """Load the entry-point group once; broken plug-ins are recorded, duplicates raise.

        Raises:
            DuplicateNameError: A plug-in claims a name already registered by another registration.
        """
        if self._plugins_loaded or self.group is None:
            return
        self._plugins_loaded = True
        for point in entry_points(group=self.group):
            self._load_plugin(point)

    def _load_plugin(self, point: EntryPoint) -> None:
        try:
            obj = point.load()
        except Exception as error:  # a plug-in's own bug must not stop the CLI from starting
            reason = " ".join(f"{type(error).__name__}: {error}".split())
            self.broken[point.name] = f"{point.value} failed to import ({reason})"
            return
        if self._accepts is not None and not self._accepts(obj):
            self.broken[point.name] = f"{point.value} is a {type(obj).__name__}, not a {self.kind}"
            return
        name = self._name_of(obj) if self._name_of is not None else point.name
        source = self._plugin_sources.get(name)
        if source == point.value:  # the same plug-in seen twice (two copies of one distribution's metadata)
            return
        if name in self.items:
            other = f"plug-in {source}" if source else "a built-in"
            raise DuplicateNameError(f"{self.kind} {name!r} is registered twice: by {other} and by plug-in "
                                     f"{point.value} (entry point group {self.group}); uninstall one")
        self._plugin_sources[name] = point.value
        self.items[name] = obj
