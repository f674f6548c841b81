"""Flow autoguides for Pyro models: :class:`AutoFlow`, per-family presets and :class:`AmortizedFlowGuide` (VAEs).

Example:
    >>> import pyro, pyro.distributions as dist, torch
    >>> from pyro_flows.guides import AutoFlow
    >>> def model():
    ...     pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    >>> guide = AutoFlow(model, flow=("lu", "leaky_relu"), num_flows=2)
    >>> sorted(guide.sample_posterior(10))
    ['scale']

"""

from pyro_flows.guides.amortized import AmortizedFlowGuide
from pyro_flows.guides.autoflow import AutoFlow, FlowSpec
from pyro_flows.guides.presets import (
    AutoConvexTriangular,
    AutoFFJORD,
    AutoHouseholder,
    AutoIAF,
    AutoMAF,
    AutoPlanar,
    AutoRadial,
    AutoResidual,
    AutoSplineCoupling,
    AutoSylvester,
)

#: Every preset class by name (their families must be registered to build them).
PRESETS = {
    cls.__name__: cls
    for cls in (
        AutoIAF,
        AutoMAF,
        AutoPlanar,
        AutoRadial,
        AutoSylvester,
        AutoHouseholder,
        AutoConvexTriangular,
        AutoSplineCoupling,
        AutoResidual,
        AutoFFJORD,
    )
}

__all__ = [
    "PRESETS",
    "AmortizedFlowGuide",
    "AutoConvexTriangular",
    "AutoFFJORD",
    "AutoFlow",
    "AutoHouseholder",
    "AutoIAF",
    "AutoMAF",
    "AutoPlanar",
    "AutoRadial",
    "AutoResidual",
    "AutoSplineCoupling",
    "AutoSylvester",
    "FlowSpec",
]
