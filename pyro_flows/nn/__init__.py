"""Conditioner networks: MLPs, masked autoregressive networks and context encoders."""

from pyro_flows.nn.mlp import MLP

__all__ = ["MLP"]
