"""pyro-flows: normalizing flows for Pyro.

Subpackages: :mod:`pyro_flows.transforms` (flow layers and registries, imported eagerly), and — imported on first
access — :mod:`pyro_flows.nn`, :mod:`pyro_flows.guides`, :mod:`pyro_flows.density`, :mod:`pyro_flows.diagnostics`.
Importing the package has no side effects on global state (no change to ``Distribution`` validation, default
dtype, thread counts or Pyro settings).
"""

import importlib
from types import ModuleType

from pyro_flows import transforms
from pyro_flows.transforms import conditional_registry, image_registry, registry

__version__ = "0.1.0"

_LAZY = ("nn", "guides", "density", "diagnostics")

__all__ = ["__version__", "conditional_registry", "image_registry", "registry", "transforms", *_LAZY]


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY:
        return importlib.import_module(f"pyro_flows.{name}")
    raise AttributeError(f"module 'pyro_flows' has no attribute {name!r}")
