r"""Coupling flows: RealNVP affine coupling and rational-quadratic spline coupling.

The coordinates are split by a fixed mask into a conditioning set :math:`A` (passed through unchanged) and a
transformed set :math:`B`: :math:`y_A = x_A`, :math:`y_B = \tau(x_B; \theta(x_A))`, with :math:`\theta` from a
:class:`~pyro_flows.nn.ResidualNet` (which also reads the context in the conditional variants). The Jacobian is
block triangular, so :math:`\log|\det J| = \sum_{i \in B} \log \tau'(x_i)`. Both directions are one network pass:
:math:`x_B = \tau^{-1}(y_B; \theta(y_A))`. Alternate the mask (``"even"``/``"odd"``) between stacked layers so that
every coordinate gets transformed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from pyro_flows.nn.resnet import ResidualNet
from pyro_flows.transforms._network_flows import (
    AffineMap,
    ElementwiseMap,
    NetworkConditionalFlow,
    NetworkCore,
    NetworkFlow,
    SplineMap,
)
from pyro_flows.transforms.registry import conditional_registry, registry

__all__ = [
    "AffineCoupling",
    "ConditionalAffineCoupling",
    "ConditionalSplineCoupling",
    "SplineCoupling",
    "coupling_mask",
]

Mask = Literal["even", "odd"] | Sequence[bool] | Tensor

#: Default soft bound of the coupling log-scales.
LOG_SCALE_BOUND = 3.0


def coupling_mask(dim: int, mask: Mask = "even") -> Tensor:
    """Boolean mask of the conditioning (pass-through) coordinates.

    ``"even"``: coordinates 0, 2, 4, ... condition the others; ``"odd"``: 1, 3, 5, ...; or an explicit boolean
    sequence of length ``dim`` (True = conditioning).

    Raises:
        ValueError: if either set would be empty or the mask has the wrong length.

    Example:
        >>> coupling_mask(5, "odd").tolist()
        [False, True, False, True, False]

    """
    if isinstance(mask, str):
        if mask not in ("even", "odd"):
            raise ValueError(f"mask must be 'even', 'odd' or a boolean sequence, got {mask!r}")
        result = torch.arange(dim) % 2 == (0 if mask == "even" else 1)
    else:
        result = torch.as_tensor(mask, dtype=torch.bool).flatten()
        if result.numel() != dim:
            raise ValueError(f"mask must have {dim} entries, got {result.numel()}")
    if result.all() or not result.any():
        raise ValueError(f"a coupling layer needs both conditioning and transformed coordinates, got {result.tolist()}")
    return result


class CouplingCore(NetworkCore):
    """Split by a mask, transform the second part with parameters from the first (both directions one pass).

    Args:
        dim: event size D.
        elementwise: the element-wise bijection family.
        mask: conditioning coordinates, see :func:`coupling_mask`.
        hidden_dims: hidden widths of the conditioner.
        context_dim: context size (0: unconditional).
        residual: residual conditioner (equal hidden widths).

    """

    fast_direction = "forward"

    def __init__(
        self,
        dim: int,
        elementwise: ElementwiseMap,
        mask: Mask,
        hidden_dims: Sequence[int],
        context_dim: int,
        residual: bool,
    ) -> None:
        super().__init__()
        keep = coupling_mask(dim, mask)
        conditioning = torch.nonzero(keep).flatten()
        transformed = torch.nonzero(~keep).flatten()
        self.register_buffer("conditioning", conditioning)
        self.register_buffer("transformed", transformed)
        self.register_buffer("restore", torch.argsort(torch.cat([conditioning, transformed])))
        self.elementwise = elementwise
        self.num_transformed = transformed.numel()
        self.net = ResidualNet(
            conditioning.numel(),
            elementwise.num_params * self.num_transformed,
            hidden_dims,
            context_dim=context_dim,
            residual=residual,
            zero_last=True,
        )

    def reference_tensor(self) -> Tensor:
        """The conditioner's output bias (dtype and device of the whole module)."""
        return self.net.output.bias

    def _couple(self, v: Tensor, context: Tensor | None, invert: bool) -> tuple[Tensor, Tensor]:
        fixed = v[..., self.conditioning]
        params = self.net(fixed, context).unflatten(-1, (self.elementwise.num_params, self.num_transformed))
        step = self.elementwise.inverse if invert else self.elementwise.forward
        moved, log_det = step(v[..., self.transformed], params)
        fixed = fixed.expand(*moved.shape[:-1], fixed.shape[-1])
        return torch.cat([fixed, moved], dim=-1)[..., self.restore], log_det

    def forward(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(y, log|det ∂y/∂x|)``, one network pass."""
        return self._couple(x, context, invert=False)

    def inverse(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(x, log|det ∂y/∂x|)``, one network pass."""
        return self._couple(y, context, invert=True)


@registry.register("affine_coupling")
class AffineCoupling(NetworkFlow):
    r"""RealNVP affine coupling (Dinh et al. 2017) with a soft-clamped log-scale.

    :math:`y_A = x_A`, :math:`y_B = x_B \odot e^{s} + t`, :math:`(t, \tilde s) = \mathrm{NN}(x_A)`,
    :math:`s = B \tanh(\tilde s / B)` (bounded, so no layer can blow up).

    * log-det: :math:`\sum_{i \in B} s_i`;
    * inverse (closed form, one pass): :math:`x_B = (y_B - t(y_A)) e^{-s(y_A)}`.

    Starts at the identity (the network's output layer starts at zero).

    Args:
        dim: event size D (≥ 2).
        hidden_dims: hidden widths of the conditioner network.
        mask: ``"even"`` (default), ``"odd"`` or a boolean sequence: the pass-through coordinates. Alternate
            ``"even"``/``"odd"`` when stacking.
        log_scale_bound: soft bound :math:`B` of the log-scale.
        residual: residual conditioner (skip connections between equal hidden layers).

    Example:
        >>> import torch
        >>> flow = AffineCoupling(4, hidden_dims=(16, 16))
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(flow(x), x)
        True

    """

    def __init__(
        self,
        dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        mask: Mask = "even",
        log_scale_bound: float = LOG_SCALE_BOUND,
        residual: bool = True,
    ) -> None:
        super().__init__(dim)
        self.core = CouplingCore(dim, AffineMap(log_scale_bound), mask, hidden_dims, 0, residual)


@conditional_registry.register("affine_coupling")
class ConditionalAffineCoupling(NetworkConditionalFlow):
    """Conditional :class:`AffineCoupling`: the conditioner network also reads the context.

    Args:
        dim: event size D (≥ 2).
        context_dim: context size.
        hidden_dims, mask, log_scale_bound, residual: see :class:`AffineCoupling`.

    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        mask: Mask = "even",
        log_scale_bound: float = LOG_SCALE_BOUND,
        residual: bool = True,
    ) -> None:
        super().__init__(dim, context_dim)
        self.core = CouplingCore(dim, AffineMap(log_scale_bound), mask, hidden_dims, context_dim, residual)


@registry.register("spline_coupling")
class SplineCoupling(NetworkFlow):
    r"""Rational-quadratic spline coupling (Durkan et al. 2019, "Neural Spline Flows").

    :math:`y_A = x_A`, :math:`y_B = \mathrm{RQS}(x_B; \theta(x_A))`: a monotonic rational-quadratic spline with K
    bins on :math:`[-B, B]`, identity outside (linear tails).

    * log-det: :math:`\sum_{i \in B} \log \mathrm{RQS}'(x_i)`;
    * inverse (closed form, one pass): per coordinate, the root in :math:`[0, 1]` of a quadratic, computed without
      cancellation (accurate for extreme conditioner outputs).

    Starts at the identity.

    Args:
        dim: event size D (≥ 2).
        hidden_dims: hidden widths of the conditioner network.
        num_bins: number of bins K.
        bound: half-width B of the spline interval.
        mask: pass-through coordinates, see :class:`AffineCoupling`.
        residual: residual conditioner.

    Example:
        >>> import torch
        >>> flow = SplineCoupling(4, hidden_dims=(16, 16))
        >>> y = flow(torch.randn(3, 4))
        >>> flow.log_abs_det_jacobian(torch.randn(3, 4), y).shape
        torch.Size([3])

    """

    def __init__(
        self,
        dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        num_bins: int = 8,
        bound: float = 3.0,
        mask: Mask = "even",
        residual: bool = True,
    ) -> None:
        super().__init__(dim)
        self.core = CouplingCore(dim, SplineMap(num_bins, bound), mask, hidden_dims, 0, residual)


@conditional_registry.register("spline_coupling")
class ConditionalSplineCoupling(NetworkConditionalFlow):
    """Conditional :class:`SplineCoupling`: the conditioner network also reads the context.

    Args:
        dim: event size D (≥ 2).
        context_dim: context size.
        hidden_dims, num_bins, bound, mask, residual: see :class:`SplineCoupling`.

    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        num_bins: int = 8,
        bound: float = 3.0,
        mask: Mask = "even",
        residual: bool = True,
    ) -> None:
        super().__init__(dim, context_dim)
        self.core = CouplingCore(dim, SplineMap(num_bins, bound), mask, hidden_dims, context_dim, residual)
