"""Export a fitted Pyro guide (any guide: flow, ``AutoNormal``, hand-written) to `arviz.InferenceData`.

Posterior draws are the guide's draws replayed through the model (so constrained values and ``pyro.deterministic``
sites are recorded); posterior-predictive draws come from `pyro.infer.Predictive` on the model with its
observations released (`pyro.poutine.uncondition`); pointwise log-likelihoods from the model's observed
sites conditioned on each draw (``Predictive.get_vectorized_trace``). The groups are assembled by ArviZ's own
converters (`arviz.from_dict`, `arviz.dict_to_dataset`), so the result works with ``az.summary``,
``az.plot_pair``, ``az.loo`` and the rest of ArviZ.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import Predictive
from pyro.poutine.runtime import Message
from pyro.poutine.uncondition_messenger import UnconditionMessenger
from torch import Tensor

from pyro_flows.diagnostics._sites import ModelSites, inspect_model

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

__all__ = ["samples_to_inference_data", "to_inference_data"]

logger = logging.getLogger(__name__)


def _try_parallel(fn: Callable[[bool], Any], parallel: bool | None, what: str) -> Any:
    """Run ``fn(parallel)``; with ``parallel=None`` try the vectorized path first, then the sequential one."""
    if parallel is not None:
        return fn(parallel)
    try:
        return fn(True)
    except Exception as err:  # a model that is not vectorizable fails in many ways; the sequential path is exact
        logger.info("vectorized %s failed (%s: %s); running it draw by draw", what, type(err).__name__, err)
        return fn(False)


def _reshape_draws(samples: Mapping[str, Tensor], sites: ModelSites, num_samples: int) -> dict[str, Tensor]:
    """Drop the singleton plate axes of vectorized draws: ``(N, *site_shape)`` per site."""
    out = {}
    for name, value in samples.items():
        shape = (num_samples, *sites.sites[name].shape)
        out[name] = value.reshape(shape) if value.numel() == int(np.prod(shape)) else value.expand(shape)
    return out


def _pad_draws(draws: Mapping[str, Tensor], sites: ModelSites, parallel: bool) -> dict[str, Tensor]:
    """Draws as `Predictive` expects them: ``(N, 1, ..., *site_shape)`` when vectorized.

    In a vectorized run the draw axis is a plate left of all the model's plates, so each site's batch part is
    padded with singleton axes up to the model's plate nesting (``Predictive`` cannot tell batch from event axes).
    """
    if not parallel:
        return dict(draws)
    out = {}
    for name, value in draws.items():
        site = sites.sites[name]
        pad = sites.max_plate_nesting - (len(site.shape) - site.event_dim)
        out[name] = value.reshape(value.shape[0], *([1] * max(pad, 0)), *site.shape)
    return out


@dataclass(frozen=True)
class _Runs:
    """How to run a model over ``num_samples`` draws: its sites and arguments, vectorized or not (``None``: try)."""

    model: Callable[..., Any]
    sites: ModelSites
    args: tuple
    kwargs: Mapping[str, Any]
    num_samples: int
    parallel: bool | None


def _guide_draws(runs: _Runs, guide: Callable[..., Any]) -> dict[str, Tensor]:
    """Guide draws of the latent sites, replayed through the model for the deterministic sites.

    Vectorized, the guide and the model run once inside a plate of ``num_samples`` draws left of the model's
    plates (`Predictive` with a guide would lose the plate padding of sites with event
    dimensions when the guide has fewer plates than the model); sequentially, once per draw.
    """
    model, sites, args, kwargs, num_samples = runs.model, runs.sites, runs.args, runs.kwargs, runs.num_samples
    names = sites.names("latent") + sites.names("deterministic")

    def run_once() -> dict[str, Tensor]:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        return {n: model_trace.nodes[n]["value"] for n in names}

    def draw(par: bool) -> dict[str, Tensor]:
        with torch.no_grad(), poutine.block():
            if par:
                with pyro.plate("_num_draws", num_samples, dim=-(sites.max_plate_nesting + 1)):
                    return run_once()
            per_draw = [run_once() for _ in range(num_samples)]
            return {n: torch.stack([d[n] for d in per_draw]) for n in names}

    return _reshape_draws(_try_parallel(draw, runs.parallel, "posterior sampling"), sites, num_samples)


def _batch_log_prob(site: Mapping[str, Any], batch_shape: torch.Size) -> Tensor:
    """Pointwise log-likelihood of one observed site of a single (non-vectorized) run, shaped ``batch_shape``."""
    log_prob = site["fn"].log_prob(site["value"])
    return log_prob.reshape(log_prob.shape[log_prob.dim() - len(batch_shape) :]).expand(batch_shape)


def _log_likelihood(runs: _Runs, latents: Mapping[str, Tensor]) -> dict[str, Tensor]:
    model, sites, args, kwargs, num_samples = runs.model, runs.sites, runs.args, runs.kwargs, runs.num_samples
    observed = sites.names("observed")
    batch_shapes = {n: sites.sites[n].shape[: len(sites.sites[n].shape) - sites.sites[n].event_dim] for n in observed}

    def compute(par: bool) -> dict[str, Tensor]:
        with torch.no_grad():
            if par:
                trace = Predictive(
                    model, posterior_samples=_pad_draws(latents, sites, True), parallel=True
                ).get_vectorized_trace(*args, **kwargs)
                out = {}
                for name in observed:
                    log_prob = trace.nodes[name]["fn"].log_prob(trace.nodes[name]["value"])
                    batch = batch_shapes[name]
                    tail = log_prob.shape[log_prob.dim() - len(batch) :] if batch else torch.Size()
                    out[name] = log_prob.reshape(num_samples, *tail).expand(num_samples, *batch)
                return out
            per_draw: dict[str, list[Tensor]] = {name: [] for name in observed}
            for i in range(num_samples):
                draw = {k: v[i] for k, v in latents.items()}
                trace = poutine.trace(poutine.condition(model, data=draw)).get_trace(*args, **kwargs)
                for name in observed:
                    per_draw[name].append(_batch_log_prob(trace.nodes[name], batch_shapes[name]))
            return {name: torch.stack(values) for name, values in per_draw.items()}

    return _try_parallel(compute, runs.parallel, "log-likelihood")


class _UnconditionObserved(UnconditionMessenger):
    """`pyro.poutine.uncondition` that leaves ``pyro.deterministic`` sites alone.

    (Pyro's messenger would re-sample their ``Delta`` inside plates and broadcast it against itself.)
    """

    def _pyro_sample(self, msg: Message) -> None:
        if msg["infer"] and msg["infer"].get("_deterministic"):
            return
        super()._pyro_sample(msg)


def _posterior_predictive(runs: _Runs, latents: Mapping[str, Tensor]) -> dict[str, Tensor]:
    def draw(par: bool) -> dict[str, Tensor]:
        with torch.no_grad():
            predictive = Predictive(
                _UnconditionObserved()(runs.model),
                posterior_samples=_pad_draws(latents, runs.sites, par),
                return_sites=runs.sites.names("observed"),
                parallel=par,
            )
            return predictive(*runs.args, **runs.kwargs)

    drawn = _try_parallel(draw, runs.parallel, "posterior-predictive sampling")
    return _reshape_draws(drawn, runs.sites, runs.num_samples)


def _numpy(values: Mapping[str, Tensor], chain: bool = True) -> dict[str, np.ndarray]:
    return {
        k: (v.detach().cpu().double().numpy()[None] if chain else v.detach().cpu().double().numpy())
        for k, v in values.items()
    }


def samples_to_inference_data(
    model: Callable[..., Any],
    samples: Mapping[str, Tensor],
    *args: Any,
    posterior_predictive: bool = True,
    log_likelihood: bool = True,
    parallel: bool | None = None,
    coords: Mapping[str, Any] | None = None,
    dims: Mapping[str, list[str]] | None = None,
    **kwargs: Any,
) -> az.InferenceData:
    """Build `arviz.InferenceData` from draws of a model's latent sites (one chain).

    This is the second half of [`to_inference_data`][pyro_flows.diagnostics.arviz.to_inference_data], for draws that
    come from elsewhere (e.g. the PSIS-resampled draws of
    [`importance_resample`][pyro_flows.diagnostics.psis.importance_resample], or ``MCMC.get_samples()``).

    Args:
        model: the Pyro model.
        samples: ``{latent site: tensor of shape (num_draws, *site_shape)}`` in constrained space; every latent
            site of the model must be present. Deterministic sites are recomputed by the model when missing.
        *args: model arguments (with the observed data).
        posterior_predictive: add the ``posterior_predictive`` group.
        log_likelihood: add the pointwise ``log_likelihood`` group (one variable per observed site).
        parallel: vectorize the model over draws (``True``), run it draw by draw (``False``), or try the former
            and fall back to the latter (``None``).
        coords: extra ArviZ coordinates (``{dim name: labels}``).
        dims: ArviZ dims overriding the inferred ones (``{variable: [dim names]}``).
        **kwargs: model keyword arguments.

    Returns:
        InferenceData with groups ``posterior``, ``observed_data`` and, as requested, ``posterior_predictive``
        and ``log_likelihood``.

    Raises:
        ValueError: if a latent site of the model has no draws, or draws of different lengths, or a plate of the
            model subsamples (the subsample would be exported as the data).

    """
    sites = inspect_model(model, None, args, kwargs)
    sites.require_full_data("samples_to_inference_data")
    latent = sites.names("latent")
    missing = [n for n in latent if n not in samples]
    if missing:
        raise ValueError(f"no draws for the latent site(s) {missing}; got draws for {sorted(samples)}")
    lengths = {int(samples[n].shape[0]) for n in latent}
    if len(lengths) != 1:
        raise ValueError(f"the latent sites have different numbers of draws: {sorted(lengths)}")
    num_samples = lengths.pop()
    latents = _reshape_draws({n: samples[n] for n in latent}, sites, num_samples)
    determ = sites.names("deterministic")
    posterior = dict(latents)
    if determ:
        if all(n in samples for n in determ):
            posterior.update(_reshape_draws({n: samples[n] for n in determ}, sites, num_samples))
        else:

            def recompute(par: bool) -> dict[str, Tensor]:
                with torch.no_grad():
                    return Predictive(
                        model, posterior_samples=_pad_draws(latents, sites, par), return_sites=determ, parallel=par
                    )(*args, **kwargs)

            posterior.update(
                _reshape_draws(_try_parallel(recompute, parallel, "deterministic sites"), sites, num_samples)
            )
    return _assemble(
        model, sites, posterior, args, kwargs, posterior_predictive, log_likelihood, parallel, coords, dims
    )


def _assemble(
    model: Callable[..., Any],
    sites: ModelSites,
    posterior: Mapping[str, Tensor],
    args: tuple,
    kwargs: Mapping[str, Any],
    posterior_predictive: bool = True,
    log_likelihood: bool = True,
    parallel: bool | None = None,
    coords: Mapping[str, Any] | None = None,
    dims: Mapping[str, list[str]] | None = None,
) -> az.InferenceData:
    """The InferenceData of posterior draws ``(num_samples, *site_shape)`` of every latent (and deterministic) site."""
    latents = {name: posterior[name] for name in sites.names("latent")}
    runs = _Runs(model, sites, args, kwargs, len(next(iter(latents.values()))), parallel)
    observed = sites.names("observed")
    all_dims = {name: list(site.dims) for name, site in sites.sites.items()}
    all_dims.update(dict(dims or {}))
    groups: dict[str, Any] = {"posterior": _numpy(posterior)}
    if observed:
        groups["observed_data"] = _numpy({n: sites.sites[n].value for n in observed}, chain=False)
        if posterior_predictive:
            groups["posterior_predictive"] = _numpy(_posterior_predictive(runs, latents))
    idata = az.from_dict(**groups, coords=dict(coords or {}), dims=all_dims, attrs={"inference_library": "pyro"})
    if observed and log_likelihood:
        values = _numpy(_log_likelihood(runs, latents))
        ll_dims = {}
        for name in observed:
            site = sites.sites[name]
            ll_dims[name] = all_dims[name][: len(site.shape) - site.event_dim]
        ll = az.dict_to_dataset(values, coords=dict(coords or {}), dims=ll_dims, library=pyro)
        idata.add_groups({"log_likelihood": ll})
    return idata


def to_inference_data(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    num_samples: int = 1000,
    posterior_predictive: bool = True,
    log_likelihood: bool = True,
    parallel: bool | None = None,
    coords: Mapping[str, Any] | None = None,
    dims: Mapping[str, list[str]] | None = None,
    **kwargs: Any,
) -> az.InferenceData:
    r"""Draw from a fitted guide and return an `arviz.InferenceData` (one chain).

    Groups:

    * ``posterior``: every latent site in **constrained** space and every ``pyro.deterministic`` site, shaped
      ``(chain=1, draw=num_samples, *site_shape)``; axes inside a ``pyro.plate`` are named after the plate,
      other axes ``<site>_dim_<i>``;
    * ``posterior_predictive``: fresh draws of every observed site given each posterior draw;
    * ``log_likelihood``: $\log p(y_i \mid \theta^{(s)})$ per observed site, pointwise over its batch
      (plate) axes, as ``az.loo``/``az.waic`` expect;
    * ``observed_data``: the observed values.

    Works with any guide that `pyro.infer.Predictive` accepts (flow guides, ``AutoNormal``,
    ``AutoMultivariateNormal``, hand-written guides). The model must have a static structure. A model whose plate
    subsamples is refused with a ``ValueError`` (the subsample would be exported as the data): call it on the full
    data (e.g. ``model(..., subsample_size=None)``; ``AutoLocalFlow`` then draws the locals of every data point).
    Observed sites scaled up by ``poutine.scale`` (a mini-batch scaled by hand) get a warning.

    Args:
        model: the Pyro model.
        guide: the fitted guide.
        *args: model/guide arguments (with the observed data).
        num_samples: number of posterior draws.
        posterior_predictive: add the ``posterior_predictive`` group.
        log_likelihood: add the ``log_likelihood`` group.
        parallel: vectorize over draws (``True``), go draw by draw (``False``), or try the former and fall back
            to the latter (``None``, the default).
        coords: extra ArviZ coordinates (``{dim name: labels}``).
        dims: ArviZ dims overriding the inferred ones (``{variable: [dim names]}``).
        **kwargs: model/guide keyword arguments.

    Returns:
        The InferenceData.

    Raises:
        ValueError: a ``num_samples`` below 1, or a plate of the model that subsamples (the subsample would be
            exported as the data).

    Examples:
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("obs", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> y = torch.tensor([0.5, -0.2, 1.3])
        >>> pyro.clear_param_store()
        >>> guide = AutoNormal(model)
        >>> idata = to_inference_data(model, guide, y, num_samples=50)
        >>> sorted(idata.groups())
        ['log_likelihood', 'observed_data', 'posterior', 'posterior_predictive']
        >>> idata.posterior["mu"].shape, idata.log_likelihood["y"].dims
        ((1, 50), ('chain', 'draw', 'obs'))

    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
    sites = inspect_model(model, guide, args, kwargs)
    sites.require_full_data("to_inference_data")
    posterior = _guide_draws(_Runs(model, sites, args, kwargs, num_samples, parallel), guide)
    idata = _assemble(
        model, sites, posterior, args, kwargs, posterior_predictive, log_likelihood, parallel, coords, dims
    )
    idata.posterior.attrs["guide"] = type(guide).__name__
    return idata
