"""Conditioner networks: MLPs, masked autoregressive networks and context encoders."""

from pyro_flows.nn.lipschitz import LipschitzMLP, LipSwish, SpectralNormLinear
from pyro_flows.nn.made import MADE, MaskedLinear, made_degrees
from pyro_flows.nn.mlp import MLP
from pyro_flows.nn.packed import PackedLayout, named_tensors
from pyro_flows.nn.resnet import ResidualNet

__all__ = [
    "MADE",
    "MLP",
    "LipSwish",
    "LipschitzMLP",
    "MaskedLinear",
    "PackedLayout",
    "ResidualNet",
    "SpectralNormLinear",
    "made_degrees",
    "named_tensors",
]
