r"""Normalizing-flow layers as Pyro ``TransformModule`` s, one module per family, and their registries.

See :mod:`pyro_flows.transforms.registry` for the name → factory mappings used by guides and density estimators.
"""

from pyro_flows.transforms.base import (
    ConditionalFlow,
    ConditionedFlow,
    Flow,
    HyperConditionalFlow,
    ParametricFlow,
)
from pyro_flows.transforms.elementwise import (
    ConditionalElementwiseAffine,
    ConditionalLeakyReLU,
    ElementwiseAffine,
    LeakyReLU,
)
from pyro_flows.transforms.linear import LU, ConditionalLU, ConditionalTriangular, Permutation, Triangular
from pyro_flows.transforms.registry import FlowRegistry, conditional_registry, image_registry, registry

__all__ = [
    "LU",
    "ConditionalElementwiseAffine",
    "ConditionalFlow",
    "ConditionalLU",
    "ConditionalLeakyReLU",
    "ConditionalTriangular",
    "ConditionedFlow",
    "ElementwiseAffine",
    "Flow",
    "FlowRegistry",
    "HyperConditionalFlow",
    "LeakyReLU",
    "ParametricFlow",
    "Permutation",
    "Triangular",
    "conditional_registry",
    "image_registry",
    "registry",
]
