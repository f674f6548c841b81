r"""Two-dimensional toy densities and the dequantization of integer data.

The toy generators draw i.i.d. samples with an explicit `torch.Generator` (so benchmarks and tests are
reproducible without touching the global seed). Their densities are standard test beds for flows
(Grathwohl et al. 2019, FFJORD; Chen et al. 2019, Residual Flows):

* [`two_moons`][pyro_flows.density.data.two_moons]: two interleaved half circles with Gaussian noise;
* [`eight_gaussians`][pyro_flows.density.data.eight_gaussians]: an equal mixture of 8 isotropic Gaussians on a circle;
* [`checkerboard`][pyro_flows.density.data.checkerboard]: the uniform density on the 8 dark squares of a 4 × 4 board of
  side-2 squares on $[-4, 4]^2$; its support has area 32, so its differential entropy is exactly $\log 32$ nats = 5 bits
  (`CHECKERBOARD_ENTROPY`), the lower bound of any model's expected NLL;
* [`rings`][pyro_flows.density.data.rings]: four noisy concentric rings.

Integer data (pixel intensities, counts) has no density; [`dequantize`][pyro_flows.density.data.dequantize] adds uniform
noise, $y = (x + u) / K$ with $u \sim U[0, 1)^D$ and $K$ the number of levels, so that for any continuous model $p$,
$\log P(x) \ge \mathbb{E}_u[\log p(y)] - D \log K$ (Theis et al. 2016).
[`bits_per_dim`][pyro_flows.density.data.bits_per_dim] turns the log-density of the scaled data into that bound in bits
per dimension.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pyro_flows._validation import check_size

__all__ = [
    "CHECKERBOARD_ENTROPY",
    "TOY_DATASETS",
    "bits_per_dim",
    "checkerboard",
    "dequantize",
    "eight_gaussians",
    "rings",
    "two_moons",
]

#: Differential entropy of `checkerboard` in nats ($\log 32$; 5 bits).
CHECKERBOARD_ENTROPY = math.log(32.0)


def two_moons(n: int, noise: float = 0.1, generator: torch.Generator | None = None) -> Tensor:
    r"""Sample the two-moons density: half circles $(\cos t, \sin t)$ and $(1 - \cos t, 0.5 - \sin t)$.

    $t \sim U[0, \pi]$, each moon with probability 1/2, plus $N(0, \mathrm{noise}^2 I)$; the result is
    centred (shifted by $(-0.5, -0.25)$) and scaled by 2.

    Args:
        n: number of samples.
        noise: standard deviation of the Gaussian noise (before the scaling by 2).
        generator: random generator.

    Returns:
        A ``(n, 2)`` float tensor.

    Examples:
        >>> two_moons(5, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([5, 2])

    """
    check_size(n, "the number of samples n")
    t = torch.rand(n, generator=generator) * math.pi
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.where(upper, t.cos(), 1.0 - t.cos())
    y = torch.where(upper, t.sin(), 0.5 - t.sin())
    points = torch.stack([x - 0.5, y - 0.25], dim=-1) + noise * torch.randn(n, 2, generator=generator)
    return 2.0 * points


def eight_gaussians(n: int, radius: float = 2.0, std: float = 0.2, generator: torch.Generator | None = None) -> Tensor:
    r"""Sample an equal mixture of 8 Gaussians $N(r (\cos \frac{k\pi}{4}, \sin \frac{k\pi}{4}), \sigma^2 I)$.

    Args:
        n: number of samples.
        radius: radius $r$ of the circle of means.
        std: standard deviation $\sigma$ of each component.
        generator: random generator.

    Returns:
        A ``(n, 2)`` float tensor.

    Examples:
        >>> eight_gaussians(4, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([4, 2])

    """
    check_size(n, "the number of samples n")
    k = torch.randint(0, 8, (n,), generator=generator).to(torch.get_default_dtype())
    angle = k * (math.pi / 4.0)
    centres = radius * torch.stack([angle.cos(), angle.sin()], dim=-1)
    return centres + std * torch.randn(n, 2, generator=generator)


def checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    r"""Sample the uniform density on the dark squares of a checkerboard on $[-4, 4]^2$.

    The board has 4 × 4 squares of side 2; square $(i, j)$ (column, row, from 0) is dark when
    $i + j$ is even. The density is $1/32$ on the 8 dark squares, so its entropy is
    `CHECKERBOARD_ENTROPY` $= \log 32$ nats (5 bits).

    Args:
        n: number of samples.
        generator: random generator.

    Returns:
        A ``(n, 2)`` float tensor.

    Examples:
        >>> x = checkerboard(1000, generator=torch.Generator().manual_seed(0))
        >>> bool(((x.div(2).floor() + 2).sum(-1) % 2 == 0).all())
        True

    """
    check_size(n, "the number of samples n")
    column = torch.randint(0, 4, (n,), generator=generator)
    row = 2 * torch.randint(0, 2, (n,), generator=generator) + column % 2
    corner = 2.0 * torch.stack([column, row], dim=-1).to(torch.get_default_dtype()) - 4.0
    return corner + 2.0 * torch.rand(n, 2, generator=generator)


def rings(
    n: int, radii: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0), std: float = 0.08, generator: torch.Generator | None = None
) -> Tensor:
    r"""Sample noisy concentric rings: a radius $r_k$ chosen with probability $\propto r_k$.

    A point is $r_k (\cos t, \sin t) + N(0, \sigma^2 I)$ with $t \sim U[0, 2\pi)$, so the density along
    each ring is uniform per unit length.

    Args:
        n: number of samples.
        radii: the ring radii.
        std: standard deviation $\sigma$ of the noise.
        generator: random generator.

    Returns:
        A ``(n, 2)`` float tensor.

    Examples:
        >>> rings(3, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([3, 2])

    """
    check_size(n, "the number of samples n")
    if not radii or any(r <= 0 for r in radii):
        raise ValueError(f"radii must be positive, got {radii!r}")
    weights = torch.tensor(radii, dtype=torch.get_default_dtype())
    radius = weights[torch.multinomial(weights, n, replacement=True, generator=generator)]
    t = 2.0 * math.pi * torch.rand(n, generator=generator)
    return radius.unsqueeze(-1) * torch.stack([t.cos(), t.sin()], dim=-1) + std * torch.randn(n, 2, generator=generator)


#: The toy generators by name: ``name -> sampler(n, generator=...)``.
TOY_DATASETS = {
    "two_moons": two_moons,
    "eight_gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "rings": rings,
}


def dequantize(
    x: Tensor, num_levels: int, generator: torch.Generator | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    r"""Uniformly dequantize integer data in $\{0, …, K-1\}$ to $y = (x + u) / K \in [0, 1)$.

    A continuous density $p$ of $y$ gives the discrete model
    $P(x) = \int_{[0,1)^D} p((x + u)/K)\, K^{-D} du$, and by Jensen
    $\log P(x) \ge \mathbb{E}_u[\log p(y)] - D \log K$; see [`bits_per_dim`][pyro_flows.density.data.bits_per_dim].

    Args:
        x: integer-valued tensor (any integer or floating dtype holding integers) with values in ``[0, num_levels)``.
        num_levels: number of levels $K$ (e.g. 256 for 8-bit images, 17 for scikit-learn's digits).
        generator: random generator of the noise $u$.
        dtype: floating dtype of the result (default: torch's default dtype).

    Returns:
        The dequantized tensor, of the shape of ``x``.

    Raises:
        ValueError: ``num_levels < 2``, or ``x`` has non-integer values or values outside ``[0, num_levels)``.

    Examples:
        >>> y = dequantize(torch.tensor([[0, 16]]), num_levels=17, generator=torch.Generator().manual_seed(0))
        >>> bool(((y * 17).floor() == torch.tensor([[0.0, 16.0]])).all())
        True

    """
    if num_levels < 2:
        raise ValueError(f"num_levels must be at least 2, got {num_levels}")
    dtype = dtype or torch.get_default_dtype()
    values = torch.as_tensor(x)
    if values.is_floating_point() and not torch.equal(values, values.round()):
        raise ValueError("dequantize expects integer values; got non-integer entries")
    if values.numel() and (values.min() < 0 or values.max() >= num_levels):
        raise ValueError(
            f"dequantize expects values in [0, {num_levels}), got range [{values.min().item()}, {values.max().item()}]"
        )
    values = values.to(dtype)
    noise = torch.rand(values.shape, generator=generator, dtype=dtype, device=values.device)
    return (values + noise) / num_levels


def bits_per_dim(log_prob: Tensor | float, dim: int, num_levels: int | None = None) -> Tensor | float:
    r"""Convert a log-density (nats) into the negative log-likelihood in bits per dimension.

    With ``num_levels`` $K$, ``log_prob`` is taken to be $\log p(y)$ of data dequantized and scaled by
    [`dequantize`][pyro_flows.density.data.dequantize], and the result is $-(\log p(y) - D \log K) / (D \log 2)$, an
    upper bound of the discrete model's bits/dim. Without it, $-\log p / (D \log 2)$.

    Args:
        log_prob: log-density of one event (or a tensor of them) in nats.
        dim: number of dimensions $D$ of one event.
        num_levels: number of quantization levels $K$, or ``None`` for continuous data.

    Examples:
        >>> round(bits_per_dim(0.0, dim=64, num_levels=256), 6)
        8.0

    """
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    correction = dim * math.log(num_levels) if num_levels is not None else 0.0
    return -(log_prob - correction) / (dim * math.log(2.0))
