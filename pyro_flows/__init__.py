"""pyro-flows: normalizing flows for Pyro.

Subpackages: `pyro_flows.transforms` (flow layers and registries, imported eagerly), and — imported on first
access — [`pyro_flows.nn`][pyro_flows.nn], `pyro_flows.guides`, `pyro_flows.density`, `pyro_flows.diagnostics`.
Importing the package has no side effects on global state (no change to ``Distribution`` validation, default
dtype, thread counts or Pyro settings).
"""

import importlib
from typing import Any

from pyro_flows import transforms
from pyro_flows.transforms import conditional_registry, image_registry, registry

__version__ = "0.1.0"

_LAZY = ("nn", "guides", "density", "diagnostics", "inference")

#: Objects of the lazy subpackages exported at the top level (imported on first access).
_LAZY_OBJECTS = {"fit": "inference", "FitOptions": "inference", "FitResult": "inference"}

__all__ = [
    "__version__",
    "conditional_registry",
    "image_registry",
    "registry",
    "transforms",
    *_LAZY,
    *_LAZY_OBJECTS,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"pyro_flows.{name}")
    if name in _LAZY_OBJECTS:
        return getattr(importlib.import_module(f"pyro_flows.{_LAZY_OBJECTS[name]}"), name)
    raise AttributeError(f"module 'pyro_flows' has no attribute {name!r}")
