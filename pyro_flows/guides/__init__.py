"""Flow autoguides for Pyro models: `AutoFlow`, presets, `AmortizedFlowGuide` (VAEs), `AutoLocalFlow` (local latents).

Train them with the flows at a fraction of the base's learning rate from a cold start:
[`flow_optim_args`][pyro_flows.guides.autoflow.flow_optim_args].

Examples:
    >>> import pyro, pyro.distributions as dist, torch
    >>> from pyro_flows.guides import AutoFlow
    >>> def model():
    ...     pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    >>> guide = AutoFlow(model, flow=("lu", "leaky_relu"), num_flows=2)
    >>> sorted(guide.sample_posterior(10))
    ['scale']

"""

from pyro_flows.guides import presets
from pyro_flows.guides.amortized import AmortizedFlowGuide
from pyro_flows.guides.autoflow import AutoFlow, FlowSpec, flow_optim_args
from pyro_flows.guides.local import AutoLocalFlow
from pyro_flows.guides.presets import *  # noqa: F403

#: Every preset class by name, in the order of `pyro_flows.guides.presets`.
PRESETS: dict[str, type[AutoFlow]] = {cls.__name__: cls for cls in presets._Preset.__subclasses__()}

__all__ = [
    "PRESETS",
    "AmortizedFlowGuide",
    "AutoFlow",
    "AutoLocalFlow",
    "FlowSpec",
    "flow_optim_args",
    *presets.__all__,
]
