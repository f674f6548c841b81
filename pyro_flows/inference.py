r"""One call from a Pyro model to a checked posterior: [`fit`][pyro_flows.inference.fit].

`fit(model, *args, **kwargs)` runs, without tuning:

1. **MAP**: L-BFGS (strong-Wolfe line search) on the log joint in unconstrained space,
   $\log p(x, \theta(z)) + \log|\det \partial\theta/\partial z|$, from `init_to_feasible`; Adam (through
   `train`) when L-BFGS fails or ends on a non-finite value.
2. **Laplace**: the Gaussian $\mathcal{N}(\hat z, H^{-1})$ with $H$ the exact Hessian of the negative log joint
   at the MAP for $D \le$ `dense_laplace_max_dim` (200) unconstrained dimensions; above, the diagonal
   $\mathcal{N}(\hat z, \mathrm{diag}(1 / H_{ii}))$ (no $D \times D$ matrix in the guide).
3. **Warm start**: the flow guide $z = \mu + d \odot U\, f_4(\cdots f_1(\varepsilon))$,
   `AutoFlow.from_guide` of the Laplace fit: $\mu = \hat z$, $d$ its conditional sds and a last unit
   lower-triangular `Triangular` layer $U$ with $\Sigma = \mathrm{diag}(d) U U^\top \mathrm{diag}(d)$ (so no layer
   diagonal has to represent a near-singular correlation, e.g. a regression on an uncentred predictor), and four
   affine IAF layers $f_k$ (`gated=False`, hidden (32, 32), at the
   identity) on the whitened coordinates. At step 0 the guide is exactly the Laplace Gaussian. Where the
   Laplace Gaussian is a worse start than the package's cold start (MAP at a degenerate mode, as in a funnel:
   the mode sits at the neck), the guide with the same flows starts from `init_to_feasible` at scale 0.1 instead;
   the start with the higher ELBO estimate (256 draws) wins.
4. **SVI**: `Trace_ELBO(num_particles=8, vectorize_particles=True).differentiable_loss` minimized by Pyro's
   `ClippedAdam` in the package's training loop, checked every `check_every` (100) steps. The learning rate
   starts at `lr` (1e-2) and drops by $\sqrt{10}$ each time the ELBO plateaus, down to `final_lr` (1e-3); a
   plateau at `final_lr` ends the run, as do `max_steps` and the `max_seconds` wall-time cap (whole fit). Each
   rate runs at least `plateau_window` (500) steps; the plateau test fits a line to the ELBO of the last
   `plateau_window` steps (a smoothed trace) and compares its gain over the window,
   $\Delta = \text{window} \cdot \text{slope}$, with $\max(\text{tol}, 2\,\mathrm{se}(\Delta))$.
5. **PSIS** $\hat k$ (`psis_khat`, Yao et al. 2018).

The [`FitResult`][pyro_flows.inference.FitResult] draws importance-resampled posterior samples when
$\hat k < 0.7$ and warns (once, at the end of the fit) otherwise.

The fit's options never collide with the model's arguments: they travel in one keyword argument, `fit_options`
(a [`FitOptions`][pyro_flows.inference.FitOptions] or a dict of its fields); every other argument goes to the
model.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal
from pyro.infer.autoguide.initialization import init_to_feasible
from pyro.optim.clipped_adam import ClippedAdam
from torch import Tensor, nn
from torch.distributions import biject_to

from pyro_flows._validation import check_real, check_size
from pyro_flows.diagnostics import (
    ELBOTrace,
    importance_resample,
    plot_elbo,
    psis_khat,
    to_inference_data,
)
from pyro_flows.guides import AutoFlow
from pyro_flows.training import train
from pyro_flows.transforms import build_flows
from pyro_flows.transforms.linear import Triangular

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

__all__ = ["FitOptions", "FitResult", "fit"]

logger = logging.getLogger(__name__)

#: PSIS $\hat k$ at or above which the guide is not trusted (no resampling, a warning).
KHAT_THRESHOLD = 0.7

#: Draws of the ELBO estimate that chooses between the Laplace start and the cold start.
_START_DRAWS = 256

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
        dense_laplace_max_dim: largest unconstrained dimension with a full-covariance Laplace start.
        khat_samples: importance draws of the PSIS $\hat k$.

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
    dense_laplace_max_dim: int = 200
    khat_samples: int = 1000

    def __post_init__(self) -> None:
        for name in (
            "max_steps",
            "num_particles",
            "check_every",
            "plateau_window",
            "num_flows",
            "dense_laplace_max_dim",
        ):
            check_size(getattr(self, name), f"FitOptions.{name}", minimum=0 if name == "num_flows" else 1)
        if self.khat_samples < 100:
            raise ValueError(f"FitOptions.khat_samples must be at least 100, got {self.khat_samples!r}")
        for name in ("max_seconds", "lr", "final_lr", "tol"):
            check_real(getattr(self, name), f"FitOptions.{name}", positive=True)
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
        if self.resampled:
            return importance_resample(
                self.model, self.guide, *self.args, log_likelihood=log_likelihood, **options, **self.kwargs
            )
        return to_inference_data(
            self.model, self.guide, *self.args, log_likelihood=log_likelihood, **options, **self.kwargs
        )

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


def _log_joint(
    model: Callable[..., Any], prototype: AutoDiagonalNormal, args: tuple, kwargs: Mapping[str, Any]
) -> Callable[[Tensor], Tensor]:
    r"""$z \mapsto \log p(x, \theta(z)) + \log|\det \partial\theta / \partial z|$ on the packed latent vector."""

    def log_joint(latent: Tensor) -> Tensor:
        values, log_det = {}, latent.new_zeros(())
        for site, unconstrained in prototype._unpack_latent(latent):
            transform = biject_to(site["fn"].support)
            value = transform(unconstrained)
            values[site["name"]] = value
            log_det = log_det + transform.log_abs_det_jacobian(unconstrained, value).sum()
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args, **kwargs)
        return trace.log_prob_sum() + log_det

    return log_joint


def _find_map(log_joint: Callable[[Tensor], Tensor], init: Tensor) -> Tensor | None:
    """The mode of `log_joint` by L-BFGS, else Adam from `init`; `None` if both end on non-finite values."""
    latent = init.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [latent], max_iter=500, line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = -log_joint(latent)
        loss.backward()
        return loss

    try:
        optimizer.step(closure)
        with torch.no_grad():
            value = log_joint(latent)
        if bool(torch.isfinite(latent).all()) and math.isfinite(float(value)):
            return latent.detach()
        logger.info("L-BFGS ended on a non-finite value; finding the MAP with Adam")
    except (RuntimeError, ValueError) as err:  # a failed line search or an out-of-support step
        logger.info("L-BFGS failed (%s: %s); finding the MAP with Adam", type(err).__name__, err)
    latent = init.detach().clone().requires_grad_(True)
    try:
        train(lambda _: -log_joint(latent), [latent], epochs=3000, lr=0.05, lr_schedule="cosine", progress=False)
    except FloatingPointError as err:
        logger.info("Adam stopped early: %s", err)
    with torch.no_grad():
        finite = math.isfinite(float(log_joint(latent)))
    return latent.detach() if finite else None


def _laplace_scales(
    log_joint: Callable[[Tensor], Tensor], mode: Tensor, dense_max_dim: int
) -> tuple[Tensor, Tensor] | None:
    r"""Conditional sds $d$ and unit lower-triangular $U$ with $\Sigma = \mathrm{diag}(d)\, U U^\top \mathrm{diag}(d)$.

    The factors of the Laplace Gaussian at `mode` (`None`: no curvature).

    For $D \le$ `dense_max_dim`: $\Sigma = H^{-1}$ with the exact Hessian $H$ of $-\log p$ (eigenvalues clipped
    at $10^{-8} \max|\lambda|$ when $H$ is not positive definite); above, the diagonal $\Sigma_{ii} = 1 / H_{ii}$
    and an identity correlation factor.
    """
    dim = mode.numel()
    point = mode.detach().clone().requires_grad_(True)
    grad = torch.autograd.grad(-log_joint(point), point, create_graph=True)[0]
    if dim > dense_max_dim:
        diag = torch.stack([torch.autograd.grad(grad[i], point, retain_graph=True)[0][i] for i in range(dim)])
        diag = diag.detach()
        if not bool((torch.isfinite(diag) & (diag > 0)).all()):
            return None
        return diag.rsqrt(), torch.eye(dim, dtype=mode.dtype, device=mode.device)
    rows = [torch.autograd.grad(grad[i], point, retain_graph=True)[0] for i in range(dim)]
    hessian = torch.stack(rows).detach()
    hessian = (hessian + hessian.T) / 2
    if not bool(torch.isfinite(hessian).all()):
        return None
    precision_tril, info = torch.linalg.cholesky_ex(hessian)
    if int(info) != 0:
        eigenvalues, eigenvectors = torch.linalg.eigh(hessian)
        floor = 1e-8 * float(eigenvalues.abs().max())
        if floor <= 0:
            return None
        logger.info("the Hessian at the MAP is not positive definite: its eigenvalues are clipped at %.3g", floor)
        covariance = (eigenvectors / eigenvalues.clamp_min(floor)) @ eigenvectors.T
    else:
        covariance = torch.cholesky_inverse(precision_tril)
    scale = torch.diagonal(covariance).sqrt()
    corr = covariance / scale / scale.unsqueeze(-1)
    corr_tril, info = torch.linalg.cholesky_ex((corr + corr.T) / 2)  # better conditioned than Σ's own factor
    if int(info) != 0:
        return None
    # Σ = L Lᵀ with L = diag(σ) C = diag(d) U: conditional sds d = σ ⊙ diag(C) and a unit lower-triangular U, so
    # that no diagonal of the guide's triangular layer has to represent a near-singular correlation
    diag = torch.diagonal(corr_tril)
    return scale * diag, corr_tril / diag.unsqueeze(-1)


def _flow_layers(corr_tril: Tensor | None, num_flows: int, hidden_dims: Sequence[int]) -> Callable[[int], list[Any]]:
    """`dim -> layers`: affine IAF layers (reversed between them), then a unit triangular layer set to `corr_tril`."""

    def layers(dim: int) -> list[Any]:
        flows: list[Any] = build_flows("iaf", dim, num_flows, hidden_dims=tuple(hidden_dims), gated=False)
        correlate = Triangular(dim, bias=False)
        if corr_tril is not None:
            rows, cols = torch.tril_indices(dim, dim, -1)
            with torch.no_grad():
                correlate.lower.copy_(corr_tril[rows, cols])  # the diagonal stays at its initial 1
        return [*flows, correlate]

    return layers


def _elbo_estimate(model: Callable[..., Any], guide: AutoFlow, args: tuple, kwargs: Mapping[str, Any]) -> float:
    with torch.no_grad():
        loss = Trace_ELBO(num_particles=_START_DRAWS, vectorize_particles=True).loss(model, guide, *args, **kwargs)
    return -loss if math.isfinite(loss) else -math.inf


def _start(
    model: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any], options: FitOptions
) -> tuple[AutoFlow, str]:
    """The warm-started flow guide (Laplace start, else the cold start if its ELBO estimate is higher)."""
    prototype = AutoDiagonalNormal(model, init_loc_fn=init_to_feasible)
    prototype._setup_prototype(*args, **kwargs)
    log_joint = _log_joint(model, prototype, args, kwargs)
    mode = _find_map(log_joint, prototype.loc)
    laplace = None if mode is None else _laplace_scales(log_joint, mode, options.dense_laplace_max_dim)
    cold = AutoFlow(
        model,
        flow=_flow_layers(None, options.num_flows, options.hidden_dims),
        name=f"pyro_flows_fit_{next(_GUIDE_IDS)}",
    )
    if laplace is None:
        logger.info("no Laplace approximation (no finite MAP or curvature): cold start")
        return cold, "cold"
    scale, corr_tril = laplace
    prototype.loc = nn.Parameter(mode)
    prototype.scale = scale
    warm = AutoFlow.from_guide(
        prototype,
        model,
        flow=_flow_layers(corr_tril, options.num_flows, options.hidden_dims),
        name=f"pyro_flows_fit_{next(_GUIDE_IDS)}",
    )
    warm_elbo, cold_elbo = _elbo_estimate(model, warm, args, kwargs), _elbo_estimate(model, cold, args, kwargs)
    logger.info("ELBO at the start: Laplace %.4g, cold %.4g", warm_elbo, cold_elbo)
    return (warm, "laplace") if warm_elbo >= cold_elbo else (cold, "cold")


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


def _run_svi(
    model: Callable[..., Any],
    guide: AutoFlow,
    args: tuple,
    kwargs: Mapping[str, Any],
    options: FitOptions,
    deadline: float,
) -> tuple[ELBOTrace, bool]:
    """SVI with the plateau-driven learning-rate schedule; returns the ELBO trace and whether it converged."""
    elbo = Trace_ELBO(num_particles=options.num_particles, vectorize_particles=True)

    def step(_: Any) -> Tensor:
        return elbo.differentiable_loss(model, guide, *args, **kwargs)

    with poutine.trace(param_only=True) as capture, torch.no_grad():
        step(None)
    params = [site["value"].unconstrained() for site in capture.trace.nodes.values()]
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
    return trace, converged


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
    unconstrained dimensions and ~1000 data points; the posteriordb posteriors of `examples/` take 5–40 s.

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
        ValueError: a bad option value, or a model with no latent site.

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
    with pyro.get_param_store().scope():
        guide, start = _start(model, args, kwargs, options)
        trace, converged = _run_svi(model, guide, args, kwargs, options, begin + options.max_seconds)
        khat = psis_khat(model, guide, *args, num_samples=options.khat_samples, **kwargs)
    logger.info(
        "fit: %s start, %d SVI steps (%s), k-hat %.2f, %.1f s",
        start,
        len(trace.elbo),
        "converged" if converged else "stopped by a cap",
        khat,
        time.perf_counter() - begin,
    )
    if not khat < KHAT_THRESHOLD:
        warnings.warn(
            f"PSIS k-hat is {khat:.2f} (≥ 0.7): the flow guide misses part of the posterior and draws() does not "
            "resample; try a richer flow (FitOptions.num_flows, hidden_dims), more steps (max_steps, max_seconds) "
            "or a reparameterization of the model (e.g. non-centered).",
            stacklevel=2,
        )
    return FitResult(
        guide=guide,
        khat=khat,
        elbo_trace=trace,
        start=start,
        converged=converged,
        seconds=time.perf_counter() - begin,
        model=model,
        args=args,
        kwargs=dict(kwargs),
    )
