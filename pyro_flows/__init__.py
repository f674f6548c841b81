"""pyro-flows: normalizing flows for Pyro.

Importing the package has no side effects on global state (no change to ``Distribution`` validation, default
dtype or Pyro settings).
"""

from pyro_flows import transforms
from pyro_flows.transforms import conditional_registry, image_registry, registry

__version__ = "0.1.0"

__all__ = ["__version__", "conditional_registry", "image_registry", "registry", "transforms"]
