"""Element-wise flows: each output coordinate depends on its own input coordinate only.

They are cheap (O(D) forward, inverse and log-det) but cannot create correlations; stack them with linear or
autoregressive layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from pyro_flows.transforms.base import ParametricFlow, expand_log_det
from pyro_flows.transforms.registry import registry

__all__ = ["ElementwiseAffine", "LeakyReLU"]


@registry.register("elementwise_affine")
class ElementwiseAffine(ParametricFlow):
    r"""Per-dimension affine map $y = \mu + e^{s} \odot x$.

    * log-det: $\sum_i s_i$ (independent of $x$);
    * inverse (closed form, O(D)): $x = (y - \mu) e^{-s}$.

    Starts at the identity ($\mu = 0, s = 0$).

    Args:
        dim: event size D.
        **context: ``context_dim`` and ``context_hidden_dims`` of the amortized variant
            ([`ParametricFlow`][pyro_flows.transforms.base.ParametricFlow]).

    Examples:
        >>> import torch
        >>> flow = ElementwiseAffine(3)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(flow.inv(flow(x)), x)
        True
        >>> flow.log_abs_det_jacobian(x, flow(x)).shape
        torch.Size([4])

    """

    sign = 1

    def __init__(self, dim: int, **context: Any) -> None:
        super().__init__(dim, **context)
        self.add_raw_param("loc", torch.zeros(dim))
        self.add_raw_param("log_scale", torch.zeros(dim))

    def _forward_with(self, params: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        log_scale = params["log_scale"]
        y = params["loc"] + log_scale.exp() * x
        return y, expand_log_det(log_scale.sum(-1), x, 1)

    def _inverse_with(self, params: Mapping[str, Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        log_scale = params["log_scale"]
        x = (y - params["loc"]) * (-log_scale).exp()
        return x, expand_log_det(log_scale.sum(-1), y, 1)


@registry.register("leaky_relu")
class LeakyReLU(ParametricFlow):
    r"""Leaky ReLU with a learnable positive slope per dimension.

    $y_i = x_i$ if $x_i \ge 0$ else $a_i x_i$, with $a = e^{\rho}$.

    * log-det: $\sum_{i: x_i < 0} \log a_i$;
    * inverse (closed form, O(D)): $x_i = y_i$ if $y_i \ge 0$ else $y_i / a_i$.

    Starts at the identity ($a = 1$). The map is piecewise linear; it is the element-wise non-linearity
    used between linear flows (e.g. Pyro's fixed-slope ``LeakyReLUTransform``), here with a learnable slope.

    Args:
        dim: event size D.
        **context: ``context_dim`` and ``context_hidden_dims`` of the amortized variant
            ([`ParametricFlow`][pyro_flows.transforms.base.ParametricFlow]).

    Examples:
        >>> import torch
        >>> flow = LeakyReLU(2)
        >>> x = torch.tensor([[-1.0, 2.0]])
        >>> flow(x).tolist()
        [[-1.0, 2.0]]

    """

    sign = 1

    def __init__(self, dim: int, **context: Any) -> None:
        super().__init__(dim, **context)
        self.add_raw_param("log_slope", torch.zeros(dim))

    def _forward_with(self, params: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        log_slope = params["log_slope"]
        negative = x < 0
        y = torch.where(negative, x * log_slope.exp(), x)
        log_det = torch.where(negative, log_slope, torch.zeros_like(log_slope)).sum(-1)
        return y, expand_log_det(log_det, x, 1)

    def _inverse_with(self, params: Mapping[str, Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        log_slope = params["log_slope"]
        negative = y < 0
        x = torch.where(negative, y * (-log_slope).exp(), y)
        log_det = torch.where(negative, log_slope, torch.zeros_like(log_slope)).sum(-1)
        return x, expand_log_det(log_det, y, 1)
