r"""Shared machinery of the conditioner-network flows (autoregressive and coupling).

* Element-wise maps :math:`y_i = \tau(x_i; \theta_i)` whose parameters come from a conditioner network: affine with a
  soft-clamped log-scale, the gated IAF update, and rational-quadratic splines. Each takes parameters of shape
  ``(..., P, n)`` (P raw parameters per coordinate) and returns the output and the summed log-derivative of the
  forward map.
* A *core* module (the network plus its element-wise map) exposes ``forward(x, context)`` and
  ``inverse(y, context)``, each returning ``(output, log|det ∂y/∂x|)`` in one call; :class:`NetworkFlow`,
  :class:`NetworkConditionalFlow` and :class:`ConditionedNetworkFlow` wrap it into the unconditional flow, the
  conditional family and the flow conditioned on a context tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Transform

from pyro_flows.transforms._splines import num_spline_params, rational_quadratic_spline
from pyro_flows.transforms.base import ConditionalFlow, Flow, FlowMixin, check_tensor


def soft_clamp(raw: Tensor, bound: float) -> Tensor:
    r"""Smoothly squash ``raw`` into :math:`(-B, B)`: :math:`B \tanh(\mathrm{raw} / B)` (slope 1 at 0)."""
    return bound * torch.tanh(raw / bound)


class ElementwiseMap:
    r"""An element-wise bijection family :math:`y_i = \tau(x_i; \theta_i)`, ``num_params`` raw parameters each."""

    num_params: int

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, Σ_i log τ'(x_i))`` for ``x`` ``(..., n)`` and raw ``params`` ``(..., P, n)``."""
        raise NotImplementedError

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, Σ_i log τ'(x_i))`` with ``τ(x; θ) = y``."""
        raise NotImplementedError


class AffineMap(ElementwiseMap):
    r"""Affine map :math:`y = \mu + e^{s} x` with a soft-clamped log-scale.

    :math:`s = B \tanh(\tilde s / B)`; params ``(μ, s̃)``; log-det :math:`\sum s`.
    """

    num_params = 2

    def __init__(self, log_scale_bound: float) -> None:
        if log_scale_bound <= 0:
            raise ValueError(f"log_scale_bound must be positive, got {log_scale_bound}")
        self.bound = float(log_scale_bound)

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """See :class:`ElementwiseMap`."""
        shift, log_scale = params.unbind(-2)
        log_scale = soft_clamp(log_scale, self.bound)
        return x * log_scale.exp() + shift, log_scale.sum(-1)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """See :class:`ElementwiseMap`."""
        shift, log_scale = params.unbind(-2)
        log_scale = soft_clamp(log_scale, self.bound)
        return (y - shift) * (-log_scale).exp(), log_scale.sum(-1)


class NormalizingAffineMap(AffineMap):
    r"""Affine map parameterized in its *inverse* direction: :math:`x = y e^{s} + \mu`, :math:`y = (x - \mu) e^{-s}`.

    For MAF, whose one-pass direction is the inverse (data → base): there the shift is added after the scale, so
    :math:`\partial x / \partial \mu = 1` does not depend on the scale, which trains markedly better than
    :math:`x = (y - \mu) e^{-s}` (see ``benchmarks/bench_autoregressive.py``). Log-det of the forward map:
    :math:`-\sum s`.
    """

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """See :class:`ElementwiseMap`."""
        shift, log_scale = params.unbind(-2)
        log_scale = soft_clamp(log_scale, self.bound)
        return (x - shift) * (-log_scale).exp(), -log_scale.sum(-1)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """See :class:`ElementwiseMap`."""
        shift, log_scale = params.unbind(-2)
        log_scale = soft_clamp(log_scale, self.bound)
        return y * log_scale.exp() + shift, -log_scale.sum(-1)


class GatedMap(ElementwiseMap):
    r"""Gated IAF update :math:`y = \sigma \odot x + (1 - \sigma) \odot m`, :math:`\sigma = \mathrm{sigmoid}(g + b)`.

    Params ``(m, g)``; log-det :math:`\sum \log \sigma` (``logsigmoid``); inverse
    :math:`x = m + (y - m)(1 + e^{-(g + b)})`. ``b`` (``gate_bias``) starts :math:`\sigma` near 1.
    """

    num_params = 2

    def __init__(self, gate_bias: float) -> None:
        self.gate_bias = float(gate_bias)

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """See :class:`ElementwiseMap`."""
        mean, gate = params.unbind(-2)
        logit = gate + self.gate_bias
        sigma = torch.sigmoid(logit)
        return mean + sigma * (x - mean), F.logsigmoid(logit).sum(-1)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """See :class:`ElementwiseMap`."""
        mean, gate = params.unbind(-2)
        logit = gate + self.gate_bias
        return mean + (y - mean) * (1 + (-logit).exp()), F.logsigmoid(logit).sum(-1)


class SplineMap(ElementwiseMap):
    """Rational-quadratic spline with ``num_bins`` bins on ``[-bound, bound]``, identity outside (see ``_splines``)."""

    def __init__(self, num_bins: int, bound: float) -> None:
        if num_bins < 1 or bound <= 0:
            raise ValueError(f"splines need num_bins >= 1 and bound > 0, got {num_bins} and {bound}")
        self.num_bins = int(num_bins)
        self.bound = float(bound)
        self.num_params = num_spline_params(self.num_bins)

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """See :class:`ElementwiseMap`."""
        y, log_deriv = rational_quadratic_spline(x, params.transpose(-1, -2), self.bound)
        return y, log_deriv.sum(-1)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """See :class:`ElementwiseMap`."""
        x, log_deriv = rational_quadratic_spline(y, params.transpose(-1, -2), self.bound, inverse=True)
        return x, log_deriv.sum(-1)


class NetworkCore(nn.Module):
    """A conditioner network plus its element-wise map; subclasses implement ``forward`` and ``inverse``."""

    fast_direction: str = "forward"

    def reference_tensor(self) -> Tensor:
        """A floating-point parameter whose dtype and device are those of the whole module."""
        raise NotImplementedError

    def forward(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(y, log|det ∂y/∂x|)``."""
        raise NotImplementedError

    def inverse(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(x, log|det ∂y/∂x|)``."""
        raise NotImplementedError


class NetworkFlow(Flow):
    """An unconditional flow computed by a :class:`NetworkCore` (``self.core``)."""

    core: NetworkCore

    def _dtype_and_device(self) -> tuple[torch.dtype | None, torch.device | None]:
        # the network's output bias stands for all the state: avoids walking the module tree on every call
        reference = self.core.reference_tensor()
        return reference.dtype, reference.device

    def _forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.core(x, None)

    def _inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.core.inverse(y, None)


class NetworkConditionalFlow(ConditionalFlow):
    """A conditional family computed by a :class:`NetworkCore` (``self.core``) that reads the context."""

    core: NetworkCore
    #: Which direction of the conditioned flows is one network pass (as :attr:`FlowMixin.fast_direction`).
    fast_direction: str = "forward"
    inverse_atol: float = 1e-6

    def condition(self, context: Tensor) -> ConditionedNetworkFlow:
        """Return the flow for ``context`` of shape ``(..., context_dim)`` (its batch dims broadcast with events)."""
        self.check_context(context)
        return ConditionedNetworkFlow(self, context)


class ConditionedNetworkFlow(FlowMixin, Transform):
    """The flow of a :class:`NetworkConditionalFlow` at a fixed context (a plain ``Transform``).

    Args:
        owner: the conditional family (its network and weights are used).
        context: ``(..., context_dim)`` context; its batch dims broadcast with the events'.

    """

    def __init__(self, owner: NetworkConditionalFlow, context: Tensor, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        self.owner = owner
        self.context = context
        self.event_shape = owner.event_shape
        self.fast_direction = owner.core.fast_direction  # type: ignore[misc]
        self.inverse_atol = owner.inverse_atol  # type: ignore[misc]
        self._ld_cache = None

    def _dtype_and_device(self) -> tuple[torch.dtype | None, torch.device | None]:
        return self.context.dtype, self.context.device

    def _check(self, x: Tensor) -> None:
        reference = self.owner.core.reference_tensor()
        name = f"{type(self.owner).__name__} (conditioned)"
        check_tensor(x, self.event_shape, reference.dtype, reference.device, name)

    def _forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.owner.core(x, self.context)

    def _inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.owner.core.inverse(y, self.context)

    def __repr__(self) -> str:
        return f"ConditionedNetworkFlow({type(self.owner).__name__})"
