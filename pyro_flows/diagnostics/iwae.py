r"""Importance-weighted estimates of per-datapoint log-likelihoods (the NLL of the VAE papers).

For a model with local latents $p(x_n, z_n)$ and a guide $q(z_n | x_n)$, the log importance weights
$\log w_k = \log p(x_n, z_k) - \log q(z_k | x_n)$, $z_k \sim q(\cdot | x_n)$, give

* the ELBO estimate $\frac1K \sum_k \log w_k$, and
* the importance-weighted bound (Burda et al. 2016, "Importance Weighted Autoencoders")

    $$
    \mathcal{L}_K(x) = \log \frac1K \sum_{k=1}^K w_k \le \log p(x),
    $$

    with $\mathbb{E}\,\mathcal{L}_1 = \mathrm{ELBO} \le \mathbb{E}\,\mathcal{L}_K \le \mathbb{E}\,\mathcal{L}_{K+1}$
    and $\mathcal{L}_K \to \log p(x)$ as $K \to \infty$; it equals $\log p(x)$ for every sample when
    $q$ is the exact posterior. The VAE papers report $-\mathcal{L}_{5000}$ as the test NLL.

The computation is batched over data points (``batch_size``) and over samples (``particle_batch_size``): at most
``batch_size * particle_batch_size`` latent samples are alive at a time, and the log-mean-exp is accumulated chunk
by chunk, so ``K = 5000`` fits in a bounded amount of memory.

Model and guide are called as ``model(x_chunk, *args, **kwargs)`` under an extra ``pyro.plate`` of samples at
``dim = -(max_plate_nesting + 1)``; the data plate must be the plate at ``dim=-1`` (Pyro's default for the
outermost plate of a model with ``max_plate_nesting=1``), and every sample site must lie inside it (local latents
and observations; plates nested inside it are summed). Log-densities are taken unscaled, so a minibatch
``full_size`` passed through ``kwargs`` does not change the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor

__all__ = ["elbo_estimate", "importance_log_weights", "iwae_bound"]

_PARTICLE_PLATE = "_iwae_particles"


def _site_log_density(site: dict[str, Any], num_samples: int, batch: int, max_plate_nesting: int) -> Tensor:
    if not any(frame.dim == -1 and frame.name != _PARTICLE_PLATE for frame in site["cond_indep_stack"]):
        raise ValueError(
            f"sample site {site['name']!r} is outside the data plate (dim=-1): per-datapoint importance weights "
            "need every sample site to be local to a data point"
        )
    lp = site["fn"].log_prob(site["value"])
    ndim = max_plate_nesting + 1
    if lp.dim() > ndim:
        raise ValueError(
            f"sample site {site['name']!r} has log-density of shape {tuple(lp.shape)}, more batch dimensions than "
            f"max_plate_nesting + 1 = {ndim}; raise max_plate_nesting"
        )
    lp = lp.reshape((1,) * (ndim - lp.dim()) + lp.shape)
    if ndim > 2:
        lp = lp.sum(dim=tuple(range(1, ndim - 1)))
    try:
        return lp.expand(num_samples, batch)
    except RuntimeError:
        raise ValueError(
            f"sample site {site['name']!r} has log-density of shape {tuple(lp.shape)} after summing nested plates; "
            f"expected ({num_samples}, {batch}) (samples, data points)"
        ) from None


def importance_log_weights(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    x: Tensor,
    *args: Any,
    num_samples: int = 1,
    max_plate_nesting: int = 1,
    **kwargs: Any,
) -> Tensor:
    r"""Log importance weights $\log p(x_n, z_{kn}) - \log q(z_{kn} | x_n)$ of shape ``(num_samples, B)``.

    One vectorized pass (no chunking; see [`iwae_bound`][pyro_flows.diagnostics.iwae.iwae_bound] for the memory-bounded
    version). Gradients flow unless the caller disables them.

    Args:
        model: the model, called as ``model(x, *args, **kwargs)``.
        guide: its guide (e.g. [`AmortizedFlowGuide`][pyro_flows.guides.amortized.AmortizedFlowGuide]), called the same
            way.
        x: a batch of ``B`` data points (first dimension).
        *args: further positional arguments of model and guide.
        num_samples: number K of samples per data point.
        max_plate_nesting: the model's plate nesting (the sample plate goes one dimension further left).
        **kwargs: keyword arguments of model and guide.

    Raises:
        ValueError: ``num_samples < 1``, or a site is not local to the data plate.

    Examples:
        >>> import pyro, pyro.distributions as dist, torch
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...         pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("z", dist.Normal(x / 2, 0.5**0.5))  # the exact posterior
        >>> x = torch.tensor([0.0, 1.0, -2.0])
        >>> log_w = importance_log_weights(model, guide, x, num_samples=4)
        >>> log_p = dist.Normal(0.0, 2**0.5).log_prob(x)
        >>> torch.allclose(log_w, log_p.expand(4, 3), atol=1e-5)
        True

    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
    if max_plate_nesting < 1:
        raise ValueError(f"max_plate_nesting must be at least 1 (the data plate), got {max_plate_nesting}")
    batch = x.shape[0]
    with pyro.plate(_PARTICLE_PLATE, num_samples, dim=-(max_plate_nesting + 1)):
        guide_trace = poutine.trace(guide).get_trace(x, *args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, *args, **kwargs)
    log_w = x.new_zeros(num_samples, batch)
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if trace is guide_trace and site["is_observed"]:
                continue
            log_w = log_w + sign * _site_log_density(site, num_samples, batch, max_plate_nesting)
    return log_w


def _chunked_log_weight_stats(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    x: Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    num_samples: int,
    batch_size: int,
    particle_batch_size: int,
    max_plate_nesting: int,
) -> tuple[Tensor, Tensor]:
    """Per-datapoint log-sum-exp and sum of the log weights, accumulated over data and sample chunks."""
    if num_samples < 1 or batch_size < 1 or particle_batch_size < 1:
        raise ValueError(
            f"num_samples, batch_size and particle_batch_size must be positive, got {num_samples}, {batch_size}, "
            f"{particle_batch_size}"
        )
    lse_chunks, sum_chunks = [], []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size]
            lse = xb.new_full((xb.shape[0],), -math.inf)
            total = xb.new_zeros(xb.shape[0])
            for done in range(0, num_samples, particle_batch_size):
                k = min(particle_batch_size, num_samples - done)
                log_w = importance_log_weights(
                    model, guide, xb, *args, num_samples=k, max_plate_nesting=max_plate_nesting, **kwargs
                )
                lse = torch.logaddexp(lse, torch.logsumexp(log_w, dim=0))
                total = total + log_w.sum(0)
            lse_chunks.append(lse)
            sum_chunks.append(total)
    return torch.cat(lse_chunks), torch.cat(sum_chunks)


def iwae_bound(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    x: Tensor,
    *args: Any,
    num_samples: int = 5000,
    batch_size: int = 100,
    particle_batch_size: int = 500,
    max_plate_nesting: int = 1,
    **kwargs: Any,
) -> Tensor:
    r"""Per-datapoint importance-weighted bound $\mathcal{L}_K(x_n) \le \log p(x_n)$, shape ``(N,)``.

    ``-iwae_bound(...).mean()`` is the test NLL of the VAE papers (``num_samples=5000``). Runs without gradients,
    ``batch_size`` data points and ``particle_batch_size`` samples at a time.

    Args:
        model: the model, called as ``model(x_chunk, *args, **kwargs)``.
        guide: its guide, called the same way.
        x: ``N`` data points (first dimension).
        *args: further positional arguments of model and guide.
        num_samples: number K of importance samples per data point.
        batch_size: data points per chunk.
        particle_batch_size: samples per chunk.
        max_plate_nesting: the model's plate nesting.
        **kwargs: keyword arguments of model and guide.

    Raises:
        ValueError: non-positive sizes, or a sample site outside the data plate.

    Examples:
        >>> import pyro, pyro.distributions as dist, torch
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...         pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("z", dist.Normal(0.0, 1.0))  # the prior: a poor proposal
        >>> x = torch.tensor([0.0, 1.0, -2.0])
        >>> bound = iwae_bound(model, guide, x, num_samples=20000, batch_size=2, particle_batch_size=3000)
        >>> torch.allclose(bound, dist.Normal(0.0, 2**0.5).log_prob(x), atol=0.05)
        True

    """
    lse, _ = _chunked_log_weight_stats(
        model, guide, x, args, kwargs, num_samples, batch_size, particle_batch_size, max_plate_nesting
    )
    return lse - math.log(num_samples)


def elbo_estimate(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    x: Tensor,
    *args: Any,
    num_samples: int = 100,
    batch_size: int = 100,
    particle_batch_size: int = 500,
    max_plate_nesting: int = 1,
    **kwargs: Any,
) -> Tensor:
    r"""Per-datapoint Monte Carlo ELBO $\frac1K \sum_k \log w_k$, shape ``(N,)`` (batched as `iwae_bound`).

    Args:
        model: the model, called as ``model(x_chunk, *args, **kwargs)``.
        guide: its guide, called the same way.
        x: ``N`` data points (first dimension).
        *args: further positional arguments of model and guide.
        num_samples: number K of samples per data point.
        batch_size: data points per chunk.
        particle_batch_size: samples per chunk.
        max_plate_nesting: the model's plate nesting.
        **kwargs: keyword arguments of model and guide.

    Raises:
        ValueError: non-positive sizes, or a sample site outside the data plate.

    """
    _, total = _chunked_log_weight_stats(
        model, guide, x, args, kwargs, num_samples, batch_size, particle_batch_size, max_plate_nesting
    )
    return total / num_samples
