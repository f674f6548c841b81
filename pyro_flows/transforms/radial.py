r"""Radial flows (Rezende & Mohamed 2015) with a closed-form inverse."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from pyro_flows.transforms._utils import RAW_ONE, positive
from pyro_flows.transforms.base import ParametricFlow, expand_log_det
from pyro_flows.transforms.registry import registry

__all__ = ["Radial"]


@registry.register("radial")
class Radial(ParametricFlow):
    r"""Radial flow $f(z) = z + \beta\, h(\alpha, r)\,(z - z_0)$ (Rezende & Mohamed 2015).

    Here $h = 1 / (\alpha + r)$ and $r = \lVert z - z_0 \rVert$.

    Parameterization: $\alpha = \mathrm{softplus}(\rho_\alpha) + 10^{-3} > 0$ and
    $\beta = -\alpha + \mathrm{softplus}(\rho_\beta) + 10^{-3} > -\alpha$, which makes $f$ a bijection
    for any raw values (the radius map $r \mapsto r (\alpha + \beta + r) / (\alpha + r)$ is strictly
    increasing from 0 to ∞).

    * log-det: $(D - 1) \log(1 + \beta h) + \log(1 + \beta h + \beta h' r)
      = (D - 1)\log\big(1 + \tfrac{\beta}{\alpha + r}\big) + \log\big(1 + \tfrac{\alpha\beta}{(\alpha + r)^2}\big)$,
      O(D);
    * inverse (closed form, O(D)): $r' = \lVert y - z_0 \rVert$ gives $r$ as the positive root of
      $r^2 + (\alpha + \beta - r') r - \alpha r' = 0$ (evaluated in a cancellation-free form), then
      $z = z_0 + (y - z_0) / (1 + \beta / (\alpha + r))$.

    Starts at the identity ($\beta = 0$, $\alpha = 1$, random centre $z_0$).

    Args:
        dim: event size D.
        **context: ``context_dim`` and ``context_hidden_dims`` of the amortized variant
            ([`ParametricFlow`][pyro_flows.transforms.base.ParametricFlow]).

    Examples:
        >>> import torch
        >>> flow = Radial(3)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(flow(x), x)
        True

    """

    def __init__(self, dim: int, **context: Any) -> None:
        super().__init__(dim, **context)
        self.add_raw_param("center", torch.randn(dim))
        self.add_raw_param("raw_alpha", torch.full((), RAW_ONE))
        self.add_raw_param("raw_beta", torch.full((), RAW_ONE))

    @staticmethod
    def _alpha_gamma(params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        r"""$\alpha$ and $\gamma = \alpha + \beta$, both positive (no cancellation for any raw values)."""
        return positive(params["raw_alpha"]).unsqueeze(-1), positive(params["raw_beta"]).unsqueeze(-1)

    def _log_det(self, alpha: Tensor, gamma: Tensor, r: Tensor) -> Tensor:
        # 1 + βh = (γ + r) / (α + r) and 1 + αβh² = (r (2α + r) + αγ) / (α + r)²: sums of positive terms
        log_a = torch.log(alpha + r)
        log_det = (self.dim - 1) * (torch.log(gamma + r) - log_a) + torch.log(r * (2.0 * alpha + r) + alpha * gamma)
        return (log_det - 2.0 * log_a).squeeze(-1)

    def _forward_with(self, params: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        alpha, gamma = self._alpha_gamma(params)
        center = params["center"]
        diff = x - center
        r = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
        y = center + diff * ((gamma + r) / (alpha + r))
        return y, expand_log_det(self._log_det(alpha, gamma, r), x, 1)

    def _inverse_with(self, params: Mapping[str, Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        alpha, gamma = self._alpha_gamma(params)
        center = params["center"]
        diff = y - center
        r_out = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
        p = gamma - r_out
        root = torch.sqrt(p * p + 4.0 * alpha * r_out)
        # both branches are the same root; each is evaluated where it has no cancellation
        safe = torch.where(p > 0, p + root, torch.ones_like(root))
        r = torch.where(p > 0, 2.0 * alpha * r_out / safe, 0.5 * (root - p))
        x = center + diff * ((alpha + r) / (gamma + r))
        return x, expand_log_det(self._log_det(alpha, gamma, r), y, 1)
