r"""Lipschitz-constrained networks for residual flows: spectral-normalized linear layers and LipSwish.

A residual block $f(x) = x + g(x)$ is invertible when $\mathrm{Lip}(g) < 1$ (Behrmann et al. 2019).
[`LipschitzMLP`][pyro_flows.nn.LipschitzMLP] guarantees it *by construction*, for any raw parameter values: every linear
layer uses

$$
\hat W = W \cdot \min\!\bigl(1, c / \sigma_{\max}(W)\bigr), \qquad c < 1,
$$

with the **exact** spectral norm $\sigma_{\max}$ (``torch.linalg.matrix_norm(W, 2)``, an SVD per call; no
power-iteration estimate that could under-estimate it), and every activation is [`LipSwish`][pyro_flows.nn.LipSwish],
which is 1-Lipschitz. Hence $\mathrm{Lip}(g) \le \prod_i \sigma_{\max}(\hat W_i) \le c^{L}$ for ``L`` linear layers.

Because the network is a plain chain of affine maps and elementwise activations, its Jacobian
$J_g(x) = \hat W_L \, \mathrm{diag}(\phi'(h_{L-1})) \cdots \mathrm{diag}(\phi'(h_1)) \, \hat W_1$ is available in
closed form: [`LipschitzMLP.linearize`][pyro_flows.nn.LipschitzMLP.linearize] returns the output together with a
`Linearization` offering vector-Jacobian products and the full Jacobian, differentiable with ordinary autograd (no
nested ``autograd.grad``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_flows._validation import check_widths

__all__ = ["Linearization", "LipSwish", "LipschitzMLP", "SpectralNormLinear"]

#: Bound on the derivative of t ↦ t·sigmoid(t) (its maximum is ≈ 1.0998 at t ≈ 2.40).
_SWISH_MAX_SLOPE = 1.1
#: Raw value whose softplus is 1.
_RAW_BETA_ONE = math.log(math.expm1(1.0))


class LipSwish(nn.Module):
    r"""LipSwish activation $\phi(x) = x\,\mathrm{sigmoid}(\beta x) / 1.1$ (Chen et al. 2019).

    $\beta = \mathrm{softplus}(\rho) > 0$ is learned per feature. Since $|d/dt\,[t\,\mathrm{sigmoid}(t)]|
    \le 1.0998$, $|\phi'| < 1$ for any $\rho$: the activation is 1-Lipschitz and, unlike ReLU, smooth
    (its derivative is continuous, which the log-det gradient needs).

    Args:
        features: number of features (one $\beta$ each), initialized at $\beta = 1$.

    Examples:
        >>> import torch
        >>> act = LipSwish(3)
        >>> value, slope = act.value_and_slope(torch.randn(4, 3))
        >>> bool((slope.abs() < 1).all())
        True

    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.raw_beta = nn.Parameter(torch.full((features,), _RAW_BETA_ONE))

    def forward(self, x: Tensor) -> Tensor:
        """Apply the activation elementwise to ``x`` of shape ``(..., features)``."""
        beta = F.softplus(self.raw_beta)
        return x * torch.sigmoid(beta * x) / _SWISH_MAX_SLOPE

    def value_and_slope(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""Return $\phi(x)$ and $\phi'(x) = [s + \beta x s (1 - s)] / 1.1$, $s = \sigma(\beta x)$."""
        beta = F.softplus(self.raw_beta)
        s = torch.sigmoid(beta * x)
        return x * s / _SWISH_MAX_SLOPE, (s + beta * x * s * (1 - s)) / _SWISH_MAX_SLOPE


class SpectralNormLinear(nn.Module):
    r"""Affine layer $h = \hat W x + V c + b$ whose ``x``-part has spectral norm at most ``coeff``.

    $\hat W = W \min(1, c/\sigma_{\max}(W))$ with the exact largest singular value, so the bound holds for any
    raw $W$ (cost: one SVD of the ``out × in`` weight per call). The optional context term $V c$ is
    unconstrained: it shifts the layer without changing its Lipschitz constant in ``x``.

    Args:
        in_features: size of ``x``.
        out_features: output size.
        coeff: the bound $c$ on $\sigma_{\max}(\hat W)$, in ``(0, 1]``.
        context_features: size of the context ``c`` (0: no context).
        zero_init: start with $W = 0$, $b = 0$ (the layer outputs $V c$).

    Examples:
        >>> import torch
        >>> layer = SpectralNormLinear(4, 3, coeff=0.9)
        >>> with torch.no_grad():
        ...     _ = layer.weight.mul_(100.0)
        >>> bool(torch.linalg.matrix_norm(layer.normalized_weight(), 2) <= 0.9 + 1e-6)
        True

    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        coeff: float = 0.97,
        context_features: int = 0,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 < coeff <= 1.0:
            raise ValueError(f"coeff must be in (0, 1], got {coeff}")
        self.coeff = float(coeff)
        base = nn.Linear(in_features + context_features, out_features)
        weight = base.weight.detach()
        self.weight = nn.Parameter(
            torch.zeros_like(weight[:, :in_features]) if zero_init else weight[:, :in_features].clone()
        )
        self.bias = nn.Parameter(torch.zeros_like(base.bias) if zero_init else base.bias.detach().clone())
        self.context_weight = nn.Parameter(weight[:, in_features:].clone()) if context_features else None

    def normalized_weight(self) -> Tensor:
        r"""Return $\hat W = W \cdot c / \max(c, \sigma_{\max}(W))$ (spectral norm ≤ ``coeff``)."""
        return self.normalized_weight_and_norm()[0]

    def normalized_weight_and_norm(self) -> tuple[Tensor, float]:
        r"""Return $\hat W$ and its spectral norm $\min(c, \sigma_{\max}(W))$ (one SVD)."""
        sigma = torch.linalg.matrix_norm(self.weight, 2)
        clamped = torch.clamp(sigma, min=self.coeff)
        return self.weight * (self.coeff / clamped), min(float(sigma.detach()), self.coeff)

    def shift(self, context: Tensor | None) -> Tensor:
        """Return the bias plus the context term (``(..., out_features)``, or ``(out_features,)`` without context)."""
        if self.context_weight is None:
            return self.bias
        if context is None:
            raise ValueError("this layer needs a context")
        return context @ self.context_weight.transpose(0, 1) + self.bias

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Apply the layer to ``x`` of shape ``(..., in_features)``."""
        return x @ self.normalized_weight().transpose(0, 1) + self.shift(context)

    def extra_repr(self) -> str:
        """Show sizes and the coefficient."""
        ctx = 0 if self.context_weight is None else self.context_weight.shape[1]
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, context={ctx}, coeff={self.coeff}"


@dataclass(frozen=True)
class Linearization:
    r"""The Jacobian $J = \hat W_L D_{L-1} \cdots D_1 \hat W_1$ of a `LipschitzMLP` at a point.

    Attributes:
        weights: the normalized weights $\hat W_i$ (``out × in``).
        slopes: the activation derivatives $\mathrm{diag}(D_i)$, each of shape ``batch + (hidden_i,)``.

    """

    weights: tuple[Tensor, ...]
    slopes: tuple[Tensor, ...]

    def detach(self) -> Linearization:
        """The same linearization without autograd history."""
        return Linearization(tuple(w.detach() for w in self.weights), tuple(s.detach() for s in self.slopes))

    def vjp(self, u: Tensor) -> Tensor:
        """Return $u^T J$ for ``u`` of shape ``(..., out)`` broadcasting with the batch shape."""
        for i in range(len(self.weights) - 1, -1, -1):
            u = u @ self.weights[i]
            if i > 0:
                u = u * self.slopes[i - 1]
        return u

    def jvp(self, v: Tensor) -> Tensor:
        """Return $J v$ for ``v`` of shape ``(..., in)`` broadcasting with the batch shape."""
        for i, weight in enumerate(self.weights):
            v = v @ weight.transpose(0, 1)
            if i < len(self.slopes):
                v = v * self.slopes[i]
        return v

    def jacobian(self) -> Tensor:
        """Return the Jacobian, of shape ``batch + (out, in)`` (cost O(batch · Σ hᵢ hᵢ₊₁ · in))."""
        matrix = self.slopes[0].unsqueeze(-1) * self.weights[0]
        for i in range(1, len(self.weights)):
            matrix = self.weights[i] @ matrix
            if i < len(self.slopes):
                matrix = self.slopes[i].unsqueeze(-1) * matrix
        return matrix


class LipschitzMLP(nn.Module):
    r"""MLP $g(x; c)$ with $\mathrm{Lip}_x(g) \le c^L < 1$ ($c$ = ``coeff``) for any parameter values.

    Layers: [`SpectralNormLinear`][pyro_flows.nn.SpectralNormLinear] → [`LipSwish`][pyro_flows.nn.LipSwish] → … →
    [`SpectralNormLinear`][pyro_flows.nn.SpectralNormLinear]. The context (if any) enters the first layer additively,
    so the bound holds in ``x`` for every context. The last layer starts at zero, so ``g = 0`` and the residual block
    ``x + g(x)`` starts at the identity.

    Args:
        features: input and output size.
        hidden_dims: hidden widths (at least one).
        coeff: spectral-norm bound of each linear layer, in ``(0, 1)``.
        context_features: size of the context vector (0: unconditional).

    Examples:
        >>> import torch
        >>> net = LipschitzMLP(3, (8,))
        >>> value, lin = net.linearize(torch.randn(5, 3))
        >>> value.shape, lin.jacobian().shape
        (torch.Size([5, 3]), torch.Size([5, 3, 3]))

    """

    def __init__(
        self,
        features: int,
        hidden_dims: Sequence[int] = (64, 64),
        coeff: float = 0.97,
        context_features: int = 0,
    ) -> None:
        super().__init__()
        hidden_dims = check_widths(hidden_dims, "hidden_dims")
        if len(hidden_dims) == 0 or features < 1:
            raise ValueError(f"need features ≥ 1 and one or more positive hidden widths, got {tuple(hidden_dims)}")
        if not 0.0 < coeff < 1.0:
            raise ValueError(f"coeff must be in (0, 1) for an invertible residual block, got {coeff}")
        sizes = [features, *hidden_dims, features]
        self.linears = nn.ModuleList(
            SpectralNormLinear(
                sizes[i],
                sizes[i + 1],
                coeff,
                context_features=context_features if i == 0 else 0,
                zero_init=i == len(sizes) - 2,
            )
            for i in range(len(sizes) - 1)
        )
        self.activations = nn.ModuleList(LipSwish(h) for h in hidden_dims)

    def normalized_weights(self) -> tuple[tuple[Tensor, ...], float]:
        r"""Return the normalized weights $\hat W_i$ and the Lipschitz bound $\prod_i \|\hat W_i\|_2$.

        Computing them once and passing them to
        [`forward`][pyro_flows.nn.LipschitzMLP.forward]/[`linearize`][pyro_flows.nn.LipschitzMLP.linearize] saves the
        SVDs in loops (e.g. the fixed-point inverse).
        """
        pairs = [linear.normalized_weight_and_norm() for linear in self.linears]
        return tuple(w for w, _ in pairs), math.prod(n for _, n in pairs)

    def forward(self, x: Tensor, context: Tensor | None = None, weights: Sequence[Tensor] | None = None) -> Tensor:
        """Return $g(x; c)$ for ``x`` of shape ``(..., features)`` (weights from `normalized_weights`)."""
        return self.linearize(x, context, weights, slopes=False)[0]

    def linearize(
        self,
        x: Tensor,
        context: Tensor | None = None,
        weights: Sequence[Tensor] | None = None,
        slopes: bool = True,
    ) -> tuple[Tensor, Linearization]:
        """Return $g(x; c)$ and its `Linearization` at ``x`` (one pass, the same weights for both).

        With ``slopes=False`` the activation derivatives are not computed (the linearization is then incomplete).
        """
        weights = tuple(self.normalized_weights()[0] if weights is None else weights)
        derivatives = []
        h = x @ weights[0].transpose(0, 1) + self.linears[0].shift(context)
        for act, linear, weight in zip(self.activations, self.linears[1:], weights[1:], strict=True):
            if slopes:
                a, slope = act.value_and_slope(h)
                derivatives.append(slope)
            else:
                a = act(h)
            h = a @ weight.transpose(0, 1) + linear.bias
        return h, Linearization(weights, tuple(derivatives))

    def lipschitz_bound(self) -> float:
        r"""A guaranteed bound $\prod_i \sigma_{\max}(\hat W_i) \le c^L$ on $\mathrm{Lip}_x(g)$."""
        return self.normalized_weights()[1]
