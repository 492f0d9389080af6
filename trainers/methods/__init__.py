"""Method registry. Adding a method = one file in this package defining a ``Method`` subclass.

Every module here is imported on first lookup and each ``Method`` subclass with a ``name`` is
registered, so nothing else has to be edited to add a method.
"""

from __future__ import annotations

import importlib
import pkgutil

from trainers.methods.base import Method, MethodContext
from trainers.options import ConfigError

_REGISTRY: dict[str, type[Method]] = {}


def _discover() -> None:
    if _REGISTRY:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Method) and obj is not Method and obj.name:
                _REGISTRY[obj.name] = obj


def available_methods() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_method(name: str, path: str = "method.name") -> type[Method]:
    _discover()
    if name not in _REGISTRY:
        raise ConfigError(path, f"unknown method {name!r}; allowed: {available_methods()}")
    return _REGISTRY[name]


__all__ = ["Method", "MethodContext", "available_methods", "get_method"]
