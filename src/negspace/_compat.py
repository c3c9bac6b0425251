"""Old module paths of the 0.1 layout, kept importable with a ``DeprecationWarning``.

``import negspace.editing.pure`` (and ``from negspace.editing.pure import X``) still works: a meta-path finder
serves an alias module whose attributes are looked up in the new modules, in order. Installed by
``negspace/__init__.py``; nothing else in the package imports an old path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings
from typing import Any

#: old module -> new modules that now define its public names (searched in order)
MOVED: dict[str, tuple[str, ...]] = {
    "negspace.attribution.reduce": ("negspace.reduce",),
    "negspace.callbacks._utils": ("negspace.callbacks.base",),
    "negspace.editing.codec": ("negspace.explain.codec",),
    "negspace.editing.contributions": ("negspace.explain.codec",),
    "negspace.editing.pure": ("negspace.explain.pure", "negspace.editing.router"),
    "negspace.editing.embeddings": ("negspace.explain.pure",),
    "negspace.explain.featureviz": ("negspace.explain.tension",),
    "negspace.explain.atlas": ("negspace.explain.tension",),
    "negspace.explain.linear": ("negspace.explain.le",),
    "negspace.explain.simulation": ("negspace.explain.le",),
    "negspace.explain.concepts": ("negspace.explain.le",),
    "negspace.explain.clip": ("negspace.models.clip",),
}


class _Alias(types.ModuleType):
    def __init__(self, name: str, targets: tuple[str, ...]) -> None:
        super().__init__(name, f"Deprecated alias of {', '.join(targets)}.")
        self._targets = targets

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        for t in self._targets:
            mod = importlib.import_module(t)
            try:
                return getattr(mod, attr)
            except AttributeError:
                continue
        raise AttributeError(f"{self.__name__!r} (moved to {self._targets}) has no attribute {attr!r}")

    def __dir__(self) -> list[str]:
        return sorted({n for t in self._targets for n in dir(importlib.import_module(t))})


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        targets = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} is deprecated; import from {' or '.join(targets)}", DeprecationWarning, stacklevel=2
        )
        return _Alias(spec.name, targets)

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, _Loader())
        return None


def install() -> None:
    """Add the finder to ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())  # last: a module that still exists on disk wins
