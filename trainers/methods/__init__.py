"""Method registry. Adding a method = one file in this package defining a ``Method`` subclass.

A lookup imports the module named after the method first (``bam`` -> ``bam.py``) and every module here
only when that one does not define it, or for the list of names, registering each ``Method`` subclass
with a ``name``; so nothing else has to be edited to add a method. Importing one module, not all: MAE's
imports timm, torchvision and with them ``torch._dynamo``, about 4 s of a driver's start-up that a BAM run
does not use.

Importing this package costs nothing: the option sections and their checks live in the torch-free
:mod:`.options` (a run's config is unpickled by Ray Train's controller, and validated by ``bamray`` before
Ray starts, neither of which should import torch: :func:`get_options`), and ``Method`` /
``MethodContext`` (torch) are imported when first asked for.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

from trainers.options import ConfigError

if TYPE_CHECKING:
    from trainers.methods.base import Method, MethodContext

_REGISTRY: dict[str, type[Method]] = {}
_IMPORTED: set[str] = set()


def _modules() -> list[str]:
    return [
        i.name
        for i in pkgutil.iter_modules(__path__)
        if not i.name.startswith("_") and i.name not in ("base", "options")
    ]


def _register(module_name: str) -> None:
    if module_name in _IMPORTED:
        return
    from trainers.methods.base import Method

    module = importlib.import_module(f"{__name__}.{module_name}")
    _IMPORTED.add(module_name)
    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, Method) and obj is not Method and obj.name:
            _REGISTRY[obj.name] = obj


def _discover() -> None:
    for module_name in _modules():
        _register(module_name)


def available_methods() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_method(name: str, path: str = "method.name") -> type[Method]:
    if name not in _REGISTRY and name in _modules():
        _register(name)
    if name not in _REGISTRY:
        _discover()
    if name not in _REGISTRY:
        raise ConfigError(path, f"unknown method {name!r}; allowed: {available_methods()}")
    return _REGISTRY[name]


def get_options(name: str, path: str = "method.name") -> type:
    """The option section of method ``name`` (its ``method.*`` fields and their ``check``) without
    importing the method (torch) when it is one of :data:`.options.BY_METHOD`."""
    from trainers.methods.options import BY_METHOD

    return BY_METHOD[name] if name in BY_METHOD else get_method(name, path).Options


def __getattr__(name: str) -> Any:
    if name in ("Method", "MethodContext"):
        from trainers.methods import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Method", "MethodContext", "available_methods", "get_method"]
