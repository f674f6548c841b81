r"""Pareto-smoothed importance sampling (PSIS) diagnostics of a variational approximation.

With importance ratios $r_s = p(x, z_s) / q(z_s)$, $z_s \sim q$, Yao, Vehtari, Simpson & Gelman
(2018, "Yes, but did it work?: Evaluating variational inference") fit a generalized Pareto distribution to the
largest ratios; its shape $\hat k$ says how heavy the tail of $p/q$ is:

* $\hat k < 0.5$: the guide is a good approximation; PSIS estimates have finite variance;
* $0.5 \le \hat k \le 0.7$: usable, with care; importance resampling improves the estimates;
* $\hat k > 0.7$: the guide misses mass of the posterior (typically too narrow); do not trust it.

Both functions here require a model and guide that can be vectorized over a leading particle plate (static
structure, every batch dimension declared by ``pyro.plate``), as `pyro.infer.importance.psis_diagnostic` does.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from pyro.infer.importance import psis_diagnostic, vectorized_importance_weights

from pyro_flows.diagnostics._sites import inspect_model
from pyro_flows.diagnostics.arviz import _assemble, _reshape_draws

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

__all__ = ["importance_resample", "psis_khat"]

logger = logging.getLogger(__name__)

#: Draws of the probe that detects constant importance ratios.
_PROBE_DRAWS = 200


def psis_khat(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    num_samples: int = 1000,
    max_simultaneous: int | None = None,
    flat_atol: float = 1e-3,
    **kwargs: Any,
) -> float:
    r"""PSIS $\hat k$ of ``guide`` as an approximation of ``model``'s posterior (Yao et al. 2018).

    Computed by Pyro's `psis_diagnostic` with the model's plate nesting
    inferred from one trace.

    Args:
        model: the Pyro model.
        guide: the fitted guide (any Pyro guide that can be vectorized over particles).
        *args: model/guide arguments.
        num_samples: number of importance draws (the estimate of $\hat k$ is noisy below ~1000).
        max_simultaneous: draws evaluated at once (a divisor of ``num_samples``; all at once by default).
        flat_atol: if the log-ratios of a probe of 200 draws vary by less than this (nats), the ratios are constant
            to numerical precision (the guide is the posterior up to its normalizer): there is no tail to fit, and
            0.0 is returned (Pyro's estimator would fit the rounding noise, or find no tail and return ``inf``).
        **kwargs: model/guide keyword arguments.

    Returns:
        $\hat k$; ``inf`` when a log-ratio is not finite or too few tail draws are available.

    Examples:
        >>> import pyro, pyro.distributions as dist, torch
        >>> def model():
        ...     pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> def narrow_guide():
        ...     pyro.sample("z", dist.Normal(torch.zeros(2), 0.3).to_event(1))
        >>> pyro.set_rng_seed(0)
        >>> psis_khat(model, narrow_guide, num_samples=2000) > 0.7
        True

    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
    sites = inspect_model(model, guide, args, kwargs)
    sites.refuse_enumeration("psis_khat")
    with torch.no_grad():
        log_weights = vectorized_importance_weights(
            model,
            guide,
            *args,
            num_samples=min(num_samples, _PROBE_DRAWS),
            max_plate_nesting=sites.max_plate_nesting,
            normalized=False,
            **kwargs,
        )[0]
        if not bool(torch.isfinite(log_weights).all()):
            return math.inf
        if float(log_weights.max() - log_weights.min()) < flat_atol:
            return 0.0
        khat = psis_diagnostic(
            model,
            guide,
            *args,
            num_particles=num_samples,
            max_simultaneous_particles=max_simultaneous or num_samples,
            max_plate_nesting=sites.max_plate_nesting,
            **kwargs,
        )
    return float(khat)


def importance_resample(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    num_samples: int = 1000,
    num_proposals: int | None = None,
    posterior_predictive: bool = True,
    log_likelihood: bool = True,
    **kwargs: Any,
) -> az.InferenceData:
    r"""PSIS-corrected posterior: draws of ``guide`` resampled by their Pareto-smoothed importance weights.

    Draws $z_1..z_S \sim q$ (``S = num_proposals``), computes $\log r_s = \log p(x, z_s) - \log
    q(z_s)$, smooths the largest ratios with ArviZ's `arviz.psislw` (Vehtari et al., "Pareto smoothed
    importance sampling") and resamples ``num_samples`` draws with replacement in proportion to the smoothed
    weights. Expectations under the result are the PSIS estimates; they improve on the guide when
    $\hat k < 0.7$, and cannot be trusted otherwise (a warning is logged). The returned InferenceData has
    the groups of [`to_inference_data`][pyro_flows.diagnostics.arviz.to_inference_data]; ``idata.attrs`` holds ``khat``
    (ArviZ's estimate from these ``S`` draws) and ``ess`` (the effective sample size of the smoothed weights, $1/\sum_s
    w_s^2$).

    Args:
        model: the Pyro model.
        guide: the fitted guide (vectorizable over particles).
        *args: model/guide arguments.
        num_samples: number of resampled draws.
        num_proposals: number of guide draws to weight (default ``max(4 * num_samples, 1000)``).
        posterior_predictive: add the ``posterior_predictive`` group.
        log_likelihood: add the ``log_likelihood`` group.
        **kwargs: model/guide keyword arguments.

    Returns:
        The resampled posterior as InferenceData.

    Examples:
        >>> import pyro, pyro.distributions as dist, torch
        >>> def model():
        ...     pyro.sample("z", dist.Normal(1.0, 1.0))
        >>> def wide_guide():
        ...     pyro.sample("z", dist.Normal(0.0, 2.0))
        >>> pyro.set_rng_seed(0)
        >>> idata = importance_resample(model, wide_guide, num_samples=2000, num_proposals=20000)
        >>> abs(float(idata.posterior["z"].mean()) - 1.0) < 0.1
        True

    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
    num_proposals = num_proposals or max(4 * num_samples, 1000)
    sites = inspect_model(model, guide, args, kwargs)
    sites.refuse_enumeration("importance_resample")
    sites.require_full_data("importance_resample")
    names = sites.names("latent") + sites.names("deterministic")
    with torch.no_grad():
        log_weights, model_trace, _ = vectorized_importance_weights(
            model,
            guide,
            *args,
            num_samples=num_proposals,
            max_plate_nesting=sites.max_plate_nesting,
            normalized=False,
            **kwargs,
        )
    draws = _reshape_draws({n: model_trace.nodes[n]["value"] for n in names}, sites, num_proposals)
    log_w = log_weights.detach().cpu().double().numpy()
    if not np.all(np.isfinite(log_w)):
        raise ValueError("non-finite importance weights: the guide puts mass where the model has none")
    smoothed, khat = az.psislw(log_w - log_w.max())
    weights = np.exp(smoothed)
    weights /= weights.sum()
    khat = float(khat)
    ess = float(1.0 / np.sum(weights**2))
    if khat > 0.7:
        logger.warning("PSIS k-hat = %.2f > 0.7: the importance-resampled posterior is unreliable", khat)
    probs = torch.as_tensor(weights, dtype=torch.float64)
    index = torch.multinomial(probs, num_samples, replacement=True)
    posterior = {n: v[index.to(v.device)] for n, v in draws.items()}
    idata = _assemble(model, sites, posterior, args, kwargs, posterior_predictive, log_likelihood)
    idata.attrs["khat"] = khat
    idata.attrs["ess"] = ess
    idata.attrs["num_proposals"] = num_proposals
    if math.isnan(khat):
        logger.warning("PSIS k-hat is NaN: too few distinct importance weights")
    return idata
