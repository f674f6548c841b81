r"""Normalizing-flow layers as Pyro ``TransformModule`` s, one module per family, and their registries.

Every family module defines ``__all__``; its public names are re-exported here. Importing a family module
registers its flows in [`registry`][pyro_flows.transforms.registry], `conditional_registry` or `image_registry`
(see [`pyro_flows.transforms.registry`][pyro_flows.transforms.registry]), the name → factory mappings behind the one
stack builder [`build_flows`][pyro_flows.transforms.stack.build_flows] that guides and density estimators use.
"""

from pyro_flows.transforms import (
    autoregressive,
    continuous,
    conv,
    coupling,
    elementwise,
    linear,
    planar,
    radial,
    residual,
    sylvester,
)
from pyro_flows.transforms.autoregressive import *  # noqa: F403
from pyro_flows.transforms.base import ConditionalFlow, ConditionedFlow, Flow, ParametricFlow
from pyro_flows.transforms.continuous import *  # noqa: F403
from pyro_flows.transforms.conv import *  # noqa: F403
from pyro_flows.transforms.coupling import *  # noqa: F403
from pyro_flows.transforms.elementwise import *  # noqa: F403
from pyro_flows.transforms.linear import *  # noqa: F403
from pyro_flows.transforms.planar import *  # noqa: F403
from pyro_flows.transforms.radial import *  # noqa: F403
from pyro_flows.transforms.registry import FlowRegistry, conditional_registry, image_registry, registry
from pyro_flows.transforms.residual import *  # noqa: F403
from pyro_flows.transforms.stack import build_flows, condition_flows
from pyro_flows.transforms.sylvester import *  # noqa: F403

_FAMILIES = (autoregressive, continuous, conv, coupling, elementwise, linear, planar, radial, residual, sylvester)

__all__ = [
    "ConditionalFlow",
    "ConditionedFlow",
    "Flow",
    "FlowRegistry",
    "ParametricFlow",
    "build_flows",
    "condition_flows",
    "conditional_registry",
    "image_registry",
    "registry",
    *(name for family in _FAMILIES for name in family.__all__),
]
