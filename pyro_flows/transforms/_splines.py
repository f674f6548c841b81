r"""Monotonic rational-quadratic splines with linear tails (Durkan et al. 2019, "Neural Spline Flows").

On $[-B, B]$ the map is a piecewise rational-quadratic function through $K + 1$ knots
$(x_k, y_k)$ with positive derivatives $d_k$ at the knots; outside it is the identity (the boundary
derivatives are fixed to 1, so the map is $C^1$). In bin $k$, with $w = x_{k+1} - x_k$,
$h = y_{k+1} - y_k$, $s = h / w$, $\xi = (x - x_k) / w$ and $\tau = \xi (1 - \xi)$:

$$
y = y_k + \frac{h (s \xi^2 + d_k \tau)}{s + (d_{k+1} + d_k - 2 s) \tau}, \qquad
\frac{dy}{dx} = \frac{s^2 (d_{k+1} \xi^2 + 2 s \tau + d_k (1 - \xi)^2)}{(s + (d_{k+1} + d_k - 2 s) \tau)^2}.
$$

The inverse solves the quadratic $a \xi^2 + b \xi + c = 0$ for $\xi \in [0, 1]$ in closed form
($c \le 0$, $a + b = h s > 0$). The root is $2c / (-b - \sqrt{b^2 - 4ac})$, which cancels
catastrophically when $b < 0$ (steep, strongly curved bins: large conditioner outputs); there the algebraically
equal $(-b + \sqrt{b^2 - 4ac}) / 2a$ is used instead ($a > 0$). Everything is computed from the offset
$y - y_k$ inside the bin, never from absolute positions, so that precision holds for extreme conditioner
outputs (tiny bins, steep derivatives). Knot end points are set to exactly $\pm B$.

Raw parameters per coordinate: ``K`` widths, ``K`` heights (softmax, each bin ≥ 1e-3 of the interval) and ``K - 1``
interior derivatives (``softplus + 1e-3``, shifted so that raw zeros give derivative 1): all raw zeros give the
identity map.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyro_flows.transforms._utils import RAW_ONE, positive

#: Smallest bin width / height as a fraction of the interval.
MIN_BIN = 1e-3


def num_spline_params(num_bins: int) -> int:
    """Number of raw parameters per coordinate: ``3 * num_bins - 1``."""
    return 3 * num_bins - 1


def _knots(raw: Tensor, bound: float) -> Tensor:
    """Knot positions ``(..., K + 1)`` on ``[-bound, bound]`` from ``K`` raw bin sizes; ends exactly ``±bound``."""
    k = raw.shape[-1]
    fractions = MIN_BIN + (1 - MIN_BIN * k) * torch.softmax(raw, dim=-1)
    cum = torch.cumsum(fractions[..., :-1], dim=-1)
    zero = cum.new_zeros(()).expand(*cum.shape[:-1], 1)
    inner = -bound + 2 * bound * cum
    return torch.cat([zero - bound, inner, zero + bound], dim=-1)


def _gather(table: Tensor, index: Tensor) -> Tensor:
    """``table[..., index]`` with ``table`` broadcast to ``index``'s batch shape."""
    return table.expand(*index.shape, table.shape[-1]).gather(-1, index.unsqueeze(-1)).squeeze(-1)


def rational_quadratic_spline(
    inputs: Tensor, raw: Tensor, bound: float, inverse: bool = False
) -> tuple[Tensor, Tensor]:
    """Apply the spline (or its inverse) element-wise.

    Args:
        inputs: ``(...)`` points (``x`` for the forward map, ``y`` for the inverse).
        raw: ``(..., 3K - 1)`` raw parameters (widths, heights, interior derivatives), broadcastable to ``inputs``.
        bound: half-width ``B`` of the spline interval.
        inverse: evaluate the inverse map.

    Returns:
        ``(outputs, log|dy/dx|)`` element-wise, the log-derivative always of the forward map at the ``x`` point.

    """
    k = (raw.shape[-1] + 1) // 3
    xs = _knots(raw[..., :k], bound)
    ys = _knots(raw[..., k : 2 * k], bound)
    inner = positive(raw[..., 2 * k :] + RAW_ONE)
    one = inner.new_ones(()).expand(*inner.shape[:-1], 1)
    derivs = torch.cat([one, inner, one], dim=-1)

    inside = (inputs >= -bound) & (inputs <= bound)
    clamped = inputs.clamp(-bound, bound)
    search = ys if inverse else xs
    index = (clamped.unsqueeze(-1) >= search[..., 1:-1]).sum(-1)
    x_k, x_k1 = _gather(xs, index), _gather(xs[..., 1:], index)
    y_k, y_k1 = _gather(ys, index), _gather(ys[..., 1:], index)
    d_k, d_k1 = _gather(derivs, index), _gather(derivs[..., 1:], index)
    w, h = x_k1 - x_k, y_k1 - y_k
    s = h / w
    curvature = d_k1 + d_k - 2 * s

    if inverse:
        offset = clamped - y_k
        a = h * (s - d_k) + offset * curvature
        b = h * d_k - offset * curvature
        c = -s * offset
        root = (b * b - 4 * a * c).clamp(min=torch.finfo(inputs.dtype).tiny).sqrt()
        # the root in [0, 1] is 2c / (-b - √disc) = (-b + √disc) / 2a; take the form without cancellation
        # (b ≥ 0: the first; b < 0: the second, where a = hs - b > 0). Unused branches get safe denominators.
        positive_b = b >= 0
        first = 2 * c / torch.where(positive_b, -b - root, -torch.ones_like(b))
        second = (root - b) / torch.where(positive_b, torch.ones_like(a), 2 * a)
        xi = torch.where(positive_b, first, second).clamp(0, 1)
        out = x_k + xi * w
    else:
        xi = ((clamped - x_k) / w).clamp(0, 1)
    tau = xi * (1 - xi)
    denom = s + curvature * tau
    if not inverse:
        out = y_k + h * (s * xi * xi + d_k * tau) / denom
    numer = d_k1 * xi * xi + 2 * s * tau + d_k * (1 - xi) * (1 - xi)
    log_deriv = 2 * s.log() + numer.log() - 2 * denom.log()
    outputs = torch.where(inside, out, inputs)
    return outputs, torch.where(inside, log_deriv, torch.zeros_like(log_deriv))
