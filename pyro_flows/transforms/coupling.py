r"""Coupling flows: RealNVP affine coupling and rational-quadratic spline coupling.

The coordinates are split by a fixed mask into a conditioning set $A$ (passed through unchanged) and a
transformed set $B$: $y_A = x_A$, $y_B = \tau(x_B; \theta(x_A))$, with $\theta$ from a
[`ResidualNet`][pyro_flows.nn.ResidualNet] (which also reads the context of the conditional variants, ``context_dim >
0``). The Jacobian is block triangular, so $\log|\det J| = \sum_{i \in B} \log \tau'(x_i)$. Both directions are one
network pass: $x_B = \tau^{-1}(y_B; \theta(y_A))$. The default ``"half"`` mask transforms the last $\lceil D/2 \rceil$
coordinates; stacks interleave reversals (`needs_permutation`), so any two consecutive layers transform every
coordinate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from pyro_flows.nn.resnet import ResidualNet
from pyro_flows.transforms._network_flows import AffineMap, ElementwiseMap, SplineMap
from pyro_flows.transforms.base import Flow
from pyro_flows.transforms.registry import registry

__all__ = [
    "AffineCoupling",
    "SplineCoupling",
    "coupling_mask",
]

Mask = Literal["half", "even", "odd"] | Sequence[bool] | Tensor

#: Default soft bound of the coupling log-scales.
LOG_SCALE_BOUND = 3.0


def coupling_mask(dim: int, mask: Mask = "half") -> Tensor:
    r"""Boolean mask of the conditioning (pass-through) coordinates.

    ``"half"``: the first $\lfloor D/2 \rfloor$ coordinates condition the others; ``"even"``: coordinates
    0, 2, 4, ...; ``"odd"``: 1, 3, 5, ...; or an explicit boolean sequence of length ``dim`` (True = conditioning).

    Raises:
        ValueError: if either set would be empty or the mask has the wrong length.

    Examples:
        >>> coupling_mask(5).tolist()
        [True, True, False, False, False]
        >>> coupling_mask(5, "odd").tolist()
        [False, True, False, True, False]

    """
    if isinstance(mask, str):
        if mask not in ("half", "even", "odd"):
            raise ValueError(f"mask must be 'half', 'even', 'odd' or a boolean sequence, got {mask!r}")
        index = torch.arange(dim)
        result = index < dim // 2 if mask == "half" else index % 2 == (0 if mask == "even" else 1)
    else:
        result = torch.as_tensor(mask, dtype=torch.bool).flatten()
        if result.numel() != dim:
            raise ValueError(f"mask must have {dim} entries, got {result.numel()}")
    if result.all() or not result.any():
        raise ValueError(f"a coupling layer needs both conditioning and transformed coordinates, got {result.tolist()}")
    return result


class _Coupling(Flow):
    """Split by a mask, transform the second part with parameters from the first (both directions one pass).

    Args:
        dim: event size D (≥ 2).
        elementwise: the element-wise bijection family.
        mask: conditioning coordinates, see [`coupling_mask`][pyro_flows.transforms.coupling.coupling_mask].
        hidden_dims: hidden widths of the conditioner.
        residual: residual conditioner (equal hidden widths).
        context_dim: context size (0: unconditional).

    """

    needs_permutation = True

    def __init__(
        self,
        dim: int,
        elementwise: ElementwiseMap,
        mask: Mask,
        hidden_dims: Sequence[int],
        residual: bool,
        context_dim: int,
    ) -> None:
        super().__init__(dim, context_dim=context_dim)
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

    def _couple(self, v: Tensor, context: Tensor | None, invert: bool) -> tuple[Tensor, Tensor]:
        fixed = v[..., self.conditioning]
        params = self.net(fixed, context).unflatten(-1, (self.elementwise.num_params, self.num_transformed))
        step = self.elementwise.inverse if invert else self.elementwise.forward
        moved, log_det = step(v[..., self.transformed], params)
        fixed = fixed.expand(*moved.shape[:-1], fixed.shape[-1])
        return torch.cat([fixed, moved], dim=-1)[..., self.restore], log_det

    def _forward_and_log_det(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._couple(x, context, invert=False)

    def _inverse_and_log_det(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._couple(y, context, invert=True)


@registry.register("affine_coupling")
class AffineCoupling(_Coupling):
    r"""RealNVP affine coupling (Dinh et al. 2017) with a soft-clamped log-scale.

    $y_A = x_A$, $y_B = x_B \odot e^{s} + t$, $(t, \tilde s) = \mathrm{NN}(x_A)$,
    $s = B \tanh(\tilde s / B)$ (bounded, so no layer can blow up).

    * log-det: $\sum_{i \in B} s_i$;
    * inverse (closed form, one pass): $x_B = (y_B - t(y_A)) e^{-s(y_A)}$.

    Starts at the identity (the network's output layer starts at zero).

    Args:
        dim: event size D (≥ 2).
        hidden_dims: hidden widths of the conditioner network.
        mask: ``"half"`` (default), ``"even"``, ``"odd"`` or a boolean sequence: the pass-through coordinates.
        log_scale_bound: soft bound $B$ of the log-scale.
        residual: residual conditioner (skip connections between equal hidden layers).
        context_dim: context size of the amortized variant (0: unconditional); the conditioner reads it.

    Examples:
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
        mask: Mask = "half",
        log_scale_bound: float = LOG_SCALE_BOUND,
        residual: bool = True,
        context_dim: int = 0,
    ) -> None:
        super().__init__(dim, AffineMap(log_scale_bound), mask, hidden_dims, residual, context_dim)


@registry.register("spline_coupling")
class SplineCoupling(_Coupling):
    r"""Rational-quadratic spline coupling (Durkan et al. 2019, "Neural Spline Flows").

    $y_A = x_A$, $y_B = \mathrm{RQS}(x_B; \theta(x_A))$: a monotonic rational-quadratic spline with K
    bins on $[-B, B]$, identity outside (linear tails).

    * log-det: $\sum_{i \in B} \log \mathrm{RQS}'(x_i)$;
    * inverse (closed form, one pass): per coordinate, the root in $[0, 1]$ of a quadratic, computed without
      cancellation (accurate for extreme conditioner outputs).

    Starts at the identity.

    Args:
        dim: event size D (≥ 2).
        hidden_dims: hidden widths of the conditioner network.
        num_bins: number of bins K.
        bound: half-width B of the spline interval.
        mask: pass-through coordinates, see [`AffineCoupling`][pyro_flows.transforms.coupling.AffineCoupling].
        residual: residual conditioner.
        context_dim: context size of the amortized variant (0: unconditional).

    Examples:
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
        mask: Mask = "half",
        residual: bool = True,
        context_dim: int = 0,
    ) -> None:
        super().__init__(dim, SplineMap(num_bins, bound), mask, hidden_dims, residual, context_dim)
