"""Lazy public namespaces: ``from negspace.explain import X`` imports only the submodule defining X."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def attach(
    package: str, names: Mapping[str, str], deprecated: Mapping[str, str] | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """Return ``(__getattr__, __dir__, __all__)`` for ``package`` given ``{public name: submodule}``.

    A submodule is relative to ``package`` unless it starts with ``negspace.``. ``deprecated`` maps old public
    names to ``"module:new_name"``; using one warns with a ``DeprecationWarning`` naming the new place.
    """
    deprecated = dict(deprecated or {})

    def __getattr__(name: str) -> Any:
        if name in names:
            mod = names[name]
            return getattr(importlib.import_module(mod if mod.startswith("negspace.") else f"{package}.{mod}"), name)
        if name in deprecated:
            mod, new = deprecated[name].split(":")
            warnings.warn(f"{package}.{name} is deprecated; use {mod}.{new}", DeprecationWarning, stacklevel=2)
            return getattr(importlib.import_module(mod), new)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(importlib.import_module(package).__dict__) | set(names))

    return __getattr__, __dir__, sorted(names)
