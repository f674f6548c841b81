r"""One call from a Pyro model to a checked posterior: [`fit`][pyro_flows.inference.fit].

`fit(model, *args, **kwargs)` runs, without tuning:

1. **Start** ([`pyro_flows.guides.laplace`][pyro_flows.guides.laplace], `AutoFlow`'s default
   `start="laplace"`): the MAP by L-BFGS on the log joint in unconstrained space,
   $\log p(x, \theta(z)) + \log|\det \partial\theta/\partial z|$, from `init_to_feasible_point` (Pyro's
   `init_to_feasible`, which also starts `ImproperUniform` sites; Adam when L-BFGS fails), and the Laplace
   Gaussian $\mathcal{N}(\hat z, H^{-1})$ there: the exact Hessian for $D \le$ `AutoFlow.dense_max_dim` (200)
   unconstrained dimensions, its diagonal above.
2. **Guide**: [`AutoFlow`][pyro_flows.guides.autoflow.AutoFlow] $z = \mu + \mathrm{diag}(d)\, U\,
   f_4(\cdots f_1(\varepsilon))$ with four affine IAF layers $f_k$ (`gated=False`, hidden (32, 32), at the
   identity) on whitened coordinates, $\mu = \hat z$, $d$ the Laplace conditional sds and $U$ the unit
   lower-triangular factor of its correlations ($\Sigma = \mathrm{diag}(d) U U^\top \mathrm{diag}(d)$, so no
   diagonal has to represent a near-singular correlation, e.g. a regression on an uncentred predictor). At step
   0 the guide is exactly the Laplace Gaussian. Where the Laplace Gaussian is a worse start than the cold start
   (MAP at a degenerate mode, as in a funnel: the mode sits at the neck), the guide starts from
   `init_to_feasible_point` at scale 0.1 instead: the start with the higher ELBO estimate wins.
3. **SVI** as one loop: `Trace_ELBO(num_particles=8, vectorize_particles=True).differentiable_loss` minimized by Pyro's
   `ClippedAdam` in the package's training loop, checked every `check_every` (100) steps. The loss is traced
   (`JitTrace_ELBO`, run without TorchScript's optimization passes; faster per step: `benchmarks/README.md`) where
   the trace is exact: its loss and gradients equal the eager ones at the same random draws (two draws checked at the
   start); otherwise, or when tracing fails, SVI runs the eager ELBO (`jit=False` always does). The learning rate
   starts at `lr` (1e-2) and drops by $\sqrt{10}$ each time the ELBO plateaus, down to `final_lr` (1e-3); a
   plateau at `final_lr` ends the run, as do `max_steps` and the `max_seconds` wall-time cap (whole fit). Each
   rate runs at least `plateau_window` (500) steps; the plateau test fits a line to the ELBO of the last
   `plateau_window` steps (a smoothed trace) and compares its gain over the window,
   $\Delta = \text{window} \cdot \text{slope}$, with $\max(\text{tol}, 2\,\mathrm{se}(\Delta))$.
4. **PSIS** $\hat k$ (`psis_khat`, Yao et al. 2018).

The [`FitResult`][pyro_flows.inference.FitResult] draws importance-resampled posterior samples when
$\hat k < 0.7$ and warns (once, at the end of the fit) otherwise.

The fit's options never collide with the model's arguments: they travel in one keyword argument, `fit_options`
(a [`FitOptions`][pyro_flows.inference.FitOptions] or a dict of its fields); every other argument goes to the
model.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import pyro
import torch
from pyro.infer import Trace_ELBO
from pyro.optim.clipped_adam import ClippedAdam
from torch import Tensor

from pyro_flows._validation import check_real, check_size
from pyro_flows.diagnostics import (
    ELBOTrace,
    importance_resample,
    plot_elbo,
    psis_khat,
    to_inference_data,
)
from pyro_flows.diagnostics._sites import inspect_model
from pyro_flows.diagnostics.elbo import svi_parameters, traced_if_exact
from pyro_flows.guides import AutoFlow
from pyro_flows.guides.autoflow import init_to_feasible_point
from pyro_flows.training import train

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

__all__ = ["FitOptions", "FitResult", "fit"]

logger = logging.getLogger(__name__)

#: PSIS $\hat k$ at or above which the guide is not trusted (no resampling, a warning).
KHAT_THRESHOLD = 0.7

#: The refining pass (`FitOptions.refine_khat`): this many times the particles, and the plateau window and steps.
REFINE_PARTICLES, REFINE_WINDOW = 4, 5

#: Parameter-store names of the guides of `fit` (one per guide, so fits never share parameters).
_GUIDE_IDS = itertools.count()


@dataclass(frozen=True)
class FitOptions:
    r"""Options of [`fit`][pyro_flows.inference.fit]; the defaults need no tuning.

    Attributes:
        seed: seed of `pyro.set_rng_seed` (torch, NumPy and Python's `random`) at the start of the fit;
            `None` leaves the random state alone.
        progress: show the SVI `tqdm` bar with the running loss (the negative ELBO).
        max_seconds: wall-time cap of the fit (MAP, Laplace and SVI; checked between SVI windows).
        max_steps: cap on the number of SVI steps.
        num_particles: vectorized ELBO particles per SVI step.
        lr: initial learning rate of `ClippedAdam` (flows and affine base alike).
        final_lr: the last learning rate; a plateau at this rate ends SVI.
        check_every: SVI steps between two checks of the caps and of the plateau test.
        plateau_window: SVI steps of the plateau test (each learning rate runs at least this long).
        tol: ELBO gain (nats) over `plateau_window` steps below which the ELBO has plateaued.
        num_flows: affine IAF layers of the guide.
        hidden_dims: hidden layers of each IAF conditioner.
        khat_samples: importance draws of the PSIS $\hat k$.
        jit: trace the ELBO (`JitTrace_ELBO`) where the traced loss and gradients equal the eager ones at the same
            draws; `False` runs the eager `Trace_ELBO` (a model whose control flow depends on the sampled values
            is caught by the check only when the checked draws take another branch).
        refine_khat: PSIS $\hat k$ at or above which SVI runs a second, refining pass from where it ended:
            `REFINE_PARTICLES` times the particles and `REFINE_WINDOW` times the plateau window and steps, the
            learning-rate schedule restarted, within what is left of `max_seconds`; kept when its final ELBO is
            at least the first pass's. `None`: no refinement.

    """

    seed: int | None = 0
    progress: bool = True
    max_seconds: float = 60.0
    max_steps: int = 5000
    num_particles: int = 8
    lr: float = 1e-2
    final_lr: float = 1e-3
    check_every: int = 100
    plateau_window: int = 500
    tol: float = 0.05
    num_flows: int = 4
    hidden_dims: tuple[int, ...] = (32, 32)
    khat_samples: int = 1000
    jit: bool = True
    refine_khat: float | None = None

    def __post_init__(self) -> None:
        for name in ("progress", "jit"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"FitOptions.{name} must be True or False, got {getattr(self, name)!r}")
        for name in (
            "max_steps",
            "num_particles",
            "check_every",
            "plateau_window",
            "num_flows",
        ):
            check_size(getattr(self, name), f"FitOptions.{name}", minimum=0 if name == "num_flows" else 1)
        if self.khat_samples < 100:
            raise ValueError(f"FitOptions.khat_samples must be at least 100, got {self.khat_samples!r}")
        for name in ("max_seconds", "lr", "final_lr", "tol"):
            check_real(getattr(self, name), f"FitOptions.{name}", positive=True)
        check_real(self.refine_khat, "FitOptions.refine_khat", optional=True)
        if self.final_lr > self.lr:
            raise ValueError(f"FitOptions.final_lr ({self.final_lr}) must not exceed lr ({self.lr})")


def _options(value: FitOptions | Mapping[str, Any] | None) -> FitOptions:
    if value is None:
        return FitOptions()
    if isinstance(value, FitOptions):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {f.name for f in fields(FitOptions)})
        if unknown:
            raise TypeError(f"unknown fit option(s) {unknown}; FitOptions has {[f.name for f in fields(FitOptions)]}")
        return FitOptions(**value)
    raise TypeError(f"fit_options must be a FitOptions, a dict of its fields or None, got {type(value).__name__}")


@dataclass
class FitResult:
    r"""What [`fit`][pyro_flows.inference.fit] found: the fitted flow guide, its ELBO trace and its PSIS $\hat k$.

    Attributes:
        guide: the fitted `AutoFlow` (works with `pyro.infer.Predictive`).
        khat: PSIS $\hat k$ of the guide (< 0.5 good, ≥ 0.7 not trusted).
        elbo_trace: the ELBO of every SVI step (`ELBOTrace`).
        start: `"laplace"` or `"cold"`, the guide's starting point.
        converged: whether SVI ended on an ELBO plateau at the final learning rate (not on a cap).
        seconds: wall time of the fit, $\hat k$ included.
        model: the model.
        args: the model's positional arguments.
        kwargs: the model's keyword arguments.
        traced: whether SVI ran the traced ELBO (`FitOptions.jit`; else the eager one).
        refined: whether the guide is that of the refining pass (`FitOptions.refine_khat`).
        params: the state of Pyro's parameter store at the end of the fit (the fit runs in a scope of its own): the
            model's own `pyro.param`s as fitted. The methods below run the model with them; for your own runs,
            `with pyro.get_param_store().scope(result.params): Predictive(...)`.

    """

    guide: AutoFlow
    khat: float
    elbo_trace: ELBOTrace = field(repr=False)
    start: str
    converged: bool
    seconds: float
    model: Callable[..., Any] = field(repr=False)
    args: tuple = field(default=(), repr=False)
    kwargs: dict[str, Any] = field(default_factory=dict, repr=False)
    traced: bool = False
    refined: bool = False
    params: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def resampled(self) -> bool:
        r"""Whether [`draws`][pyro_flows.inference.FitResult.draws] importance-resamples (PSIS $\hat k$ < 0.7)."""
        return self.khat < KHAT_THRESHOLD

    def to_inference_data(
        self, num_samples: int = 1000, posterior_predictive: bool = True, log_likelihood: bool = True
    ) -> az.InferenceData:
        r"""The posterior as ArviZ InferenceData (one chain), PSIS-resampled when $\hat k$ < 0.7.

        With $\hat k$ < 0.7 the draws are those of
        `importance_resample` (`idata.attrs` holds its `khat` and
        `ess`), otherwise the guide's own draws (`to_inference_data`).

        Args:
            num_samples: number of posterior draws.
            posterior_predictive: add the `posterior_predictive` group.
            log_likelihood: add the pointwise `log_likelihood` group.

        Returns:
            The InferenceData: groups `posterior`, `observed_data` and the requested ones.

        """
        options = {"num_samples": num_samples, "posterior_predictive": posterior_predictive}
        export = importance_resample if self.resampled else to_inference_data
        with pyro.get_param_store().scope(copy.copy(self.params) if self.params else None):
            return export(self.model, self.guide, *self.args, log_likelihood=log_likelihood, **options, **self.kwargs)

    def draws(self, num_samples: int = 1000) -> dict[str, Tensor]:
        r"""Posterior draws of every latent and deterministic site, in constrained space.

        Importance-resampled by their Pareto-smoothed weights when $\hat k$ < 0.7, the guide's own draws
        otherwise.

        Args:
            num_samples: number of draws.

        Returns:
            `{site: tensor of shape (num_samples, *site_shape)}`, in the dtype of the guide.

        """
        posterior = self.to_inference_data(num_samples, posterior_predictive=False, log_likelihood=False).posterior
        dtype = self.guide.loc.dtype
        return {str(name): torch.as_tensor(value.values[0], dtype=dtype) for name, value in posterior.items()}

    def summary(self, num_samples: int = 1000, **kwargs: Any) -> Any:
        """ArviZ's summary table (`az.summary`) of the posterior of `to_inference_data`.

        Args:
            num_samples: number of posterior draws.
            **kwargs: options of `az.summary`; the default `kind="stats"` leaves out the MCMC diagnostics
                (r-hat, ESS), which mean nothing for independent draws.

        Returns:
            A pandas DataFrame, one row per scalar parameter.

        """
        idata = self.to_inference_data(num_samples, posterior_predictive=False, log_likelihood=False)
        return az.summary(idata, **{"kind": "stats", **kwargs})

    def plot(self, num_samples: int = 1000, var_names: Sequence[str] | None = None) -> tuple[Any, Any]:
        """Plot the ELBO trace and a pair plot of the posterior draws (needs matplotlib).

        Args:
            num_samples: number of posterior draws of the pair plot.
            var_names: variables of the pair plot (default: all).

        Returns:
            `(elbo_axis, pair_axes)`: the trace's matplotlib axis and the array of axes of `az.plot_pair`.

        Raises:
            ImportError: matplotlib is not installed.

        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise ImportError("FitResult.plot needs matplotlib: pip install matplotlib") from err
        _, elbo_axis = plt.subplots(figsize=(6, 3.5))
        plot_elbo(self.elbo_trace, ax=elbo_axis)
        elbo_axis.set_title(f"ELBO ({self.start} start, PSIS k-hat {self.khat:.2f})")
        idata = self.to_inference_data(num_samples, posterior_predictive=False, log_likelihood=False)
        pair_axes = az.plot_pair(idata, var_names=None if var_names is None else list(var_names), kind="scatter")
        return elbo_axis, pair_axes


def _start(model: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any], options: FitOptions) -> AutoFlow:
    """The fit's flow guide, set up (MAP, Laplace, start choice: `AutoFlow`'s default ``start="laplace"``)."""
    guide = AutoFlow(
        model,
        flow="iaf",
        num_flows=options.num_flows,
        hidden_dims=tuple(options.hidden_dims),
        gated=False,
        name=f"pyro_flows_fit_{next(_GUIDE_IDS)}",
    )
    guide._setup_prototype(*args, **kwargs)
    return guide


def _plateaued(elbo: Sequence[float], window: int, tol: float) -> bool:
    r"""Whether the ELBO's trend over the last `window` steps gains less than `max(tol, 2 se)` per window.

    The trend is the least-squares line through the last `window` ELBO estimates; its gain over the window is
    $\Delta = \text{window} \cdot \text{slope}$, with standard error $\mathrm{se}(\Delta)$ from the residuals.
    """
    values = np.asarray(elbo[-window:], dtype=np.float64)
    steps = np.arange(values.size) - (values.size - 1) / 2
    slope = float(steps @ (values - values.mean()) / (steps @ steps))
    residual_sd = float(np.std(values - values.mean() - slope * steps, ddof=2))
    return window * slope < max(tol, 2 * window * residual_sd / math.sqrt(steps @ steps))


def _loss(
    model: Callable[..., Any], guide: AutoFlow, args: tuple, kwargs: Mapping[str, Any], options: FitOptions
) -> tuple[Callable[[Any], Tensor], list[Tensor], bool]:
    """The SVI loss closure, the parameters it trains and whether it is traced (`traced_if_exact`), else eager."""
    eager = Trace_ELBO(num_particles=options.num_particles, vectorize_particles=True)

    def eager_step(_: Any) -> Tensor:
        return eager.differentiable_loss(model, guide, *args, **kwargs)

    params = svi_parameters(eager_step)
    traced = traced_if_exact(eager, model, guide, args, kwargs, params) if options.jit else None
    return (eager_step, params, False) if traced is None else (traced, params, True)


def _run_svi(
    model: Callable[..., Any],
    guide: AutoFlow,
    args: tuple,
    kwargs: Mapping[str, Any],
    options: FitOptions,
    deadline: float,
) -> tuple[ELBOTrace, bool, bool]:
    """SVI with the plateau-driven learning-rate schedule: the ELBO trace, whether it converged, whether traced."""
    step, params, traced = _loss(model, guide, args, kwargs, options)
    optimizer = ClippedAdam(params, lr=options.lr)
    num_levels = 1 + max(0, round(2 * math.log10(options.lr / options.final_lr)))
    rates = np.geomspace(options.lr, options.final_lr, num_levels) if num_levels > 1 else [options.lr]
    trace, level, level_start, converged = ELBOTrace(), 0, 0, False
    started = time.perf_counter()
    while len(trace.elbo) < options.max_steps:
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        window = min(options.check_every, options.max_steps - len(trace.elbo))
        if trace.elbo:
            per_step = (time.perf_counter() - started) / len(trace.elbo)
            window = max(1, min(window, int(left / per_step)))
        for group in optimizer.param_groups:
            group["lr"] = float(rates[level])
        try:
            result = train(
                step, params, epochs=window, optimizer=optimizer, progress=options.progress, desc="fit: -ELBO"
            )
        except FloatingPointError as err:
            logger.warning("SVI stopped at its last finite parameters: %s", err)
            break
        for loss in result.losses:
            trace.record(loss)
        at_level = len(trace.elbo) - level_start
        if at_level >= options.plateau_window and _plateaued(trace.elbo, options.plateau_window, options.tol):
            if level == len(rates) - 1:
                converged = True
                break
            level, level_start = level + 1, len(trace.elbo)
    trace.seconds = time.perf_counter() - started
    return trace, converged, traced


def _refine(
    run: Callable[[FitOptions], tuple[ELBOTrace, bool, bool]], guide: AutoFlow, options: FitOptions, first: ELBOTrace
) -> tuple[bool, ELBOTrace, bool]:
    """The refining pass from the guide's current parameters; the guide keeps its result only if it is better.

    ``run(options)`` runs SVI on the guide (`_run_svi`). Returns whether the refined guide was kept, the pass's ELBO
    trace and whether the pass converged. Better means a mean ELBO over the pass's last plateau window at least the
    first pass's over its own last window (both are unbiased estimates of the ELBO of the guide at the time, the
    second with less noise).
    """
    before = copy.deepcopy(guide.state_dict())
    refine = replace(
        options,
        num_particles=REFINE_PARTICLES * options.num_particles,
        plateau_window=REFINE_WINDOW * options.plateau_window,
        max_steps=REFINE_WINDOW * options.max_steps,
    )
    more, converged, _ = run(refine)
    kept = bool(more.elbo) and np.mean(more.elbo[-refine.plateau_window :]) >= np.mean(
        first.elbo[-options.plateau_window :]
    )
    if not kept:
        guide.load_state_dict(before)
    logger.info("fit: refining pass of %d steps %s", len(more.elbo), "kept" if kept else "discarded")
    return kept, more, converged


def fit(
    model: Callable[..., Any],
    *args: Any,
    fit_options: FitOptions | Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> FitResult:
    r"""Fit a flow guide to `model`'s posterior: MAP, Laplace, warm-started flow, SVI to convergence, PSIS $\hat k$.

    The steps are those of the module documentation ([`pyro_flows.inference`][pyro_flows.inference]). The model
    needs continuous global latents and a static structure that can be vectorized over particles (every batch
    dimension declared by `pyro.plate`), as Pyro's `AutoContinuous` guides and PSIS do. Pyro's parameter store
    is left as it was: the fit runs in its own scope and the guide's parameters carry a name of their own.

    Budget: with the defaults, ≤ 60 s on one CPU thread (the `max_seconds` cap) for models of up to ~30
    unconstrained dimensions and ~1000 data points; the posteriordb posteriors of `examples/` take 4–15 s.

    Args:
        model: the Pyro model.
        *args: the model's positional arguments (data included).
        fit_options: the fit's own options, a [`FitOptions`][pyro_flows.inference.FitOptions] or a dict of its
            fields (`{"seed": 1, "progress": False}`); the only keyword that does not go to the model.
        **kwargs: the model's keyword arguments, passed through whatever their names.

    Returns:
        The [`FitResult`][pyro_flows.inference.FitResult].

    Raises:
        TypeError: `fit_options` is not a `FitOptions`, a dict of its fields or `None`.
        ValueError: a bad option value, a model with no latent site, or one whose plates subsample the data
            (PSIS $\hat k$ and the draws weigh the full likelihood).

    Warns:
        UserWarning: once, when $\hat k \ge 0.7$ (then `draws` returns the guide's own draws).

    Examples:
        >>> import pyro, pyro.distributions as dist, torch
        >>> import pyro_flows
        >>> def model(y):
        ...     loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        ...     scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(loc, scale), obs=y)
        >>> y = 1.0 + 0.5 * torch.randn(100, generator=torch.Generator().manual_seed(0))
        >>> result = pyro_flows.fit(model, y, fit_options={"progress": False, "max_steps": 100})
        >>> result.start, result.khat < 0.7
        ('laplace', True)
        >>> draws = result.draws(500)
        >>> draws["scale"].shape, bool((draws["scale"] > 0).all())
        (torch.Size([500]), True)

    """
    options = _options(fit_options)
    begin = time.perf_counter()
    if options.seed is not None:
        pyro.set_rng_seed(options.seed)
    with pyro.get_param_store().scope() as params:
        # PSIS and the draws weigh the full likelihood: refuse a subsampling plate before any work (the model's
        # run there draws from its priors: in a forked random state, so that the fit's stream does not move)
        with torch.random.fork_rng():
            inspect_model(model, None, args, kwargs, init_to_feasible_point).require_full_data("pyro_flows.fit")
        guide = _start(model, args, kwargs, options)
        deadline = begin + options.max_seconds

        def run(with_options: FitOptions) -> tuple[ELBOTrace, bool, bool]:
            return _run_svi(model, guide, args, kwargs, with_options, deadline)

        trace, converged, traced = run(options)
        khat = psis_khat(model, guide, *args, num_samples=options.khat_samples, **kwargs)
        refined = False
        if options.refine_khat is not None and not khat < options.refine_khat and time.perf_counter() < deadline:
            refined, more, converged_more = _refine(run, guide, options, trace)
            if refined:
                converged = converged_more
                khat = psis_khat(model, guide, *args, num_samples=options.khat_samples, **kwargs)
            trace.elbo.extend(more.elbo)
            trace.seconds += more.seconds
    logger.info(
        "fit: %s start, %d SVI steps (%s, %s ELBO), k-hat %.2f, %.1f s",
        guide.start_used,
        len(trace.elbo),
        "converged" if converged else "stopped by a cap",
        "traced" if traced else "eager",
        khat,
        time.perf_counter() - begin,
    )
    if not khat < KHAT_THRESHOLD:
        warnings.warn(
            f"PSIS k-hat is {khat:.2f} (≥ 0.7): the flow guide misses part of the posterior and draws() does not "
            "resample; try a refining pass (FitOptions.refine_khat=0.5), a richer flow (num_flows, hidden_dims), "
            "more steps (max_steps, max_seconds) or a reparameterization of the model (e.g. non-centered).",
            stacklevel=2,
        )
    return FitResult(
        guide=guide,
        khat=khat,
        elbo_trace=trace,
        start=guide.start_used,
        converged=converged,
        traced=traced,
        refined=refined,
        params=params,
        seconds=time.perf_counter() - begin,
        model=model,
        args=args,
        kwargs=dict(kwargs),
    )
