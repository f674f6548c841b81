"""Density estimation with normalizing flows: `FlowDensity`, `fit_density`, toys, dequantization.

Examples:
    >>> import torch
    >>> from pyro_flows.density import FlowDensity, two_moons
    >>> x = two_moons(512, generator=torch.Generator().manual_seed(0))
    >>> density = FlowDensity(2, flow="maf", num_flows=3, hidden_dims=(32, 32))
    >>> history = density.fit(x, epochs=2, progress=False, seed=0)
    >>> history.epochs
    2

"""

from pyro_flows.density.data import (
    CHECKERBOARD_ENTROPY,
    TOY_DATASETS,
    bits_per_dim,
    checkerboard,
    dequantize,
    eight_gaussians,
    rings,
    two_moons,
)
from pyro_flows.density.fit import FitHistory, fit_density
from pyro_flows.density.flow_density import FlowDensity

__all__ = [
    "CHECKERBOARD_ENTROPY",
    "TOY_DATASETS",
    "FitHistory",
    "FlowDensity",
    "bits_per_dim",
    "checkerboard",
    "dequantize",
    "eight_gaussians",
    "fit_density",
    "rings",
    "two_moons",
]
