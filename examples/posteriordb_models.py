"""Eleven posteriordb posteriors written in Pyro, with a loader for posteriordb data files.

The models follow the Stan programs of the public posteriordb repository (``posterior_database/models/stan``)
statement by statement; site names and shapes match
the reference draws (``theta``, ``beta``, ``sigma``, ...), so a guide's ``InferenceData`` compares directly with
`pyro_flows.diagnostics.read_posteriordb_draws`.

Stan's improper flat priors (no sampling statement) become the vague proper priors ``N(0, 1000²)`` on real
coefficients and ``HalfNormal(1000)`` on scales: Pyro's ``Predictive`` and autoguide initializations sample every
prior once, which ``ImproperUniform`` cannot do. At the posterior scales of these models (coefficients ≲ 100,
posterior sds ≲ 10) the change moves posterior means and sds by far less than 10⁻³ posterior sd.

Batch dimensions follow Pyro's plate convention (global latents broadcast from the left), so the models can be
vectorized over particles (``vectorize_particles=True``, ``Predictive(parallel=True)``, PSIS).

Data are read from a user-given path: posteriordb's ``NAME.json.zip`` (or ``NAME.json``) data files, e.g.::

    model, args = load_posterior("eight_schools-eight_schools_noncentered", "path/to/posteriordb")
"""

from __future__ import annotations

import io
import json
import math
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoLaplaceApproximation, AutoMultivariateNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_value
from torch import Tensor

from pyro_flows.diagnostics import (
    compare_to_reference,
    fit_svi,
    importance_resample,
    psis_khat,
    read_posteriordb_draws,
    to_inference_data,
)
from pyro_flows.guides import AutoFlow, flow_optim_args

DTYPE = torch.float64
#: Scale of the vague proper priors standing in for Stan's flat priors.
VAGUE = 1000.0


def load_posteriordb_data(path: str | PathLike[str]) -> dict[str, Any]:
    """Read a posteriordb data file (``NAME.json.zip`` or ``NAME.json``): the Stan data block as a dict."""
    path = Path(path)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            (inner,) = [n for n in archive.namelist() if n.endswith(".json")]
            return json.load(io.TextIOWrapper(archive.open(inner), encoding="utf-8"))
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def _tensor(values: Any) -> Tensor:
    return torch.as_tensor(values, dtype=DTYPE)


def eight_schools_noncentered(sigma: Tensor, y: Tensor | None = None) -> None:
    """``theta_trans ~ N(0, 1)``, ``theta = mu + tau * theta_trans``, ``y ~ N(theta, sigma)``."""
    mu = pyro.sample("mu", dist.Normal(sigma.new_zeros(()), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(sigma.new_tensor(5.0)))
    with pyro.plate("school", sigma.shape[0]):
        theta_trans = pyro.sample("theta_trans", dist.Normal(sigma.new_zeros(()), 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_trans)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def eight_schools_centered(sigma: Tensor, y: Tensor | None = None) -> None:
    """``theta ~ N(mu, tau)``, ``y ~ N(theta, sigma)`` (the funnel-shaped parameterization)."""
    mu = pyro.sample("mu", dist.Normal(sigma.new_zeros(()), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(sigma.new_tensor(5.0)))
    with pyro.plate("school", sigma.shape[0]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def ar_k(lags: Tensor, y: Tensor | None = None) -> None:
    """AR(K): ``y[t] ~ N(alpha + sum_k beta[k] y[t-k], sigma)``, ``alpha, beta ~ N(0, 10)``, ``sigma ~ C+(2.5)``.

    ``lags[t, k] = y[K + t - k - 1]`` is the design matrix of the lagged series (``T - K`` rows, ``K`` columns).
    """
    num_lags = lags.shape[-1]
    alpha = pyro.sample("alpha", dist.Normal(lags.new_zeros(()), 10.0))
    beta = pyro.sample("beta", dist.Normal(lags.new_zeros(num_lags), 10.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfCauchy(lags.new_tensor(2.5)))
    with pyro.plate("time", lags.shape[0]):
        mean = alpha + (lags * beta).sum(-1)
        pyro.sample("y", dist.Normal(mean, sigma), obs=y)


def kidscore_momiq(mom_iq: Tensor, kid_score: Tensor | None = None) -> None:
    """``kid_score ~ N(beta[1] + beta[2] * mom_iq, sigma)``, flat (vague) ``beta``, ``sigma ~ C+(2.5)``."""
    beta = pyro.sample("beta", dist.Normal(mom_iq.new_zeros(2), VAGUE).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfCauchy(mom_iq.new_tensor(2.5)))
    with pyro.plate("child", mom_iq.shape[0]):
        mean = beta[..., 0] + beta[..., 1] * mom_iq
        pyro.sample("kid_score", dist.Normal(mean, sigma), obs=kid_score)


def logearn_interaction(design: Tensor, log_earn: Tensor | None = None) -> None:
    """``log(earn) ~ N(X beta, sigma)``, ``X = [1, height, male, height * male]``, vague ``beta``, ``sigma``."""
    beta = pyro.sample("beta", dist.Normal(design.new_zeros(4), VAGUE).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(design.new_tensor(VAGUE)))
    with pyro.plate("person", design.shape[0]):
        mean = (design * beta).sum(-1)
        pyro.sample("log_earn", dist.Normal(mean, sigma), obs=log_earn)


def arma11(y: Tensor) -> None:
    """ARMA(1, 1): ``err[t] = y[t] - (mu + phi * y[t-1] + theta * err[t-1])``, ``err ~ N(0, sigma)``.

    Priors ``mu ~ N(0, 10)``, ``phi, theta ~ N(0, 2)``, ``sigma ~ C+(2.5)``; the first prediction is
    ``mu + phi * mu`` (Stan's "``err[0] == 0``"). The errors are a recursion over the observed series, so ``y`` is
    required; the observed site ``y`` (one event of ``T`` values) carries ``N(y | nu, sigma)``, which equals Stan's
    ``err ~ normal(0, sigma)``.
    """
    mu = pyro.sample("mu", dist.Normal(y.new_zeros(()), 10.0))
    phi = pyro.sample("phi", dist.Normal(y.new_zeros(()), 2.0))
    theta = pyro.sample("theta", dist.Normal(y.new_zeros(()), 2.0))
    sigma = pyro.sample("sigma", dist.HalfCauchy(y.new_tensor(2.5)))
    nus = [mu + phi * mu]
    err = y[0] - nus[0]
    for t in range(1, y.shape[-1]):
        nus.append(mu + phi * y[t - 1] + theta * err)
        err = y[t] - nus[-1]
    # one event of T values (the errors are a chain over time, not independent plate members)
    nu = torch.stack(torch.broadcast_tensors(*nus), dim=-1)
    pyro.sample("y", dist.Normal(nu, sigma.unsqueeze(-1)).to_event(1), obs=y)


def kilpisjarvi(x: Tensor, prior: Tensor, y: Tensor | None = None) -> None:
    """``y ~ N(alpha + beta * x, sigma)`` with ``prior = [pmualpha, psalpha, pmubeta, psbeta]``, vague ``sigma``.

    ``x`` is the year (1952–2013 as 3952–4013 in posteriordb's ``kilpisjarvi_mod`` data), uncentred: ``alpha`` and
    ``beta`` are almost perfectly correlated a posteriori.
    """
    alpha = pyro.sample("alpha", dist.Normal(prior[0], prior[1]))
    beta = pyro.sample("beta", dist.Normal(prior[2], prior[3]))
    sigma = pyro.sample("sigma", dist.HalfNormal(x.new_tensor(VAGUE)))
    with pyro.plate("year", x.shape[0]):
        pyro.sample("y", dist.Normal(alpha + beta * x, sigma), obs=y)


def kidscore_interaction(design: Tensor, kid_score: Tensor | None = None) -> None:
    """``kid_score ~ N(X beta, sigma)``, ``X = [1, mom_hs, mom_iq, mom_hs * mom_iq]``, vague ``beta``.

    ``sigma ~ C+(2.5)``.
    """
    beta = pyro.sample("beta", dist.Normal(design.new_zeros(4), VAGUE).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfCauchy(design.new_tensor(2.5)))
    with pyro.plate("child", design.shape[0]):
        mean = (design * beta).sum(-1)
        pyro.sample("kid_score", dist.Normal(mean, sigma), obs=kid_score)


def _vague_regression(obs_name: str, design: Tensor, obs: Tensor | None) -> None:
    """``obs ~ N(X beta, sigma)`` with Stan's flat ``beta`` and ``sigma`` as vague proper priors."""
    beta = pyro.sample("beta", dist.Normal(design.new_zeros(design.shape[-1]), VAGUE).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(design.new_tensor(VAGUE)))
    with pyro.plate("obs", design.shape[0]):
        mean = (design * beta).sum(-1)
        pyro.sample(obs_name, dist.Normal(mean, sigma), obs=obs)


def logearn_height_male(design: Tensor, log_earn: Tensor | None = None) -> None:
    """``log(earn) ~ N(X beta, sigma)``, ``X = [1, height, male]``, vague ``beta`` and ``sigma``."""
    _vague_regression("log_earn", design, log_earn)


def logmesquite(design: Tensor, log_weight: Tensor | None = None) -> None:
    """``log(weight) ~ N(X beta, sigma)``, vague ``beta`` (7) and ``sigma``.

    ``X = [1, log diam1, log diam2, log canopy_height, log total_height, log density, group]``.
    """
    _vague_regression("log_weight", design, log_weight)


def gp_regr(x: Tensor, y: Tensor | None = None) -> None:
    """GP regression: ``y ~ MVN(0, K + diag(sigma))``, ``K[i, j] = alpha² exp(-(x_i - x_j)² / (2 rho²))``.

    Priors ``rho ~ Gamma(25, 4)`` (shape, rate), ``alpha ~ N+(0, 2)``, ``sigma ~ N+(0, 1)``. As in the Stan
    program the diagonal gets ``sigma`` itself (not ``sigma²``).
    """
    rho = pyro.sample("rho", dist.Gamma(x.new_tensor(25.0), 4.0))
    alpha = pyro.sample("alpha", dist.HalfNormal(x.new_tensor(2.0)))
    sigma = pyro.sample("sigma", dist.HalfNormal(x.new_tensor(1.0)))
    sq_dist = (x.unsqueeze(-1) - x.unsqueeze(-2)) ** 2
    rho_, alpha_, sigma_ = (v[..., None, None] for v in (rho, alpha, sigma))
    eye = torch.eye(x.shape[-1], dtype=x.dtype)
    cov = alpha_**2 * torch.exp(-0.5 * sq_dist / rho_**2) + sigma_ * eye
    pyro.sample("y", dist.MultivariateNormal(x.new_zeros(x.shape[-1]), scale_tril=torch.linalg.cholesky(cov)), obs=y)


class PositiveOrderedNormal(dist.TorchDistribution):
    r"""Independent normals restricted to the positive ordered cone $0 < x_1 < \dots < x_K$.

    ``log_prob`` is $\sum_k \log N(x_k \mid loc_k, scale_k)$ on the cone (``-inf`` outside), without the
    normalizer $\log P(0 < X_1 < \dots < X_K)$: the density of Stan's ``positive_ordered[K] mu`` with
    ``target += normal_lpdf(mu[k] | loc[k], scale[k])`` statements. Its support is
    ``constraints.positive_ordered_vector``, so autoguides map it to unconstrained space with
    ``biject_to`` (Pyro's ordered-then-exp transform, not Stan's ``mu[1] = exp(u[1])``,
    ``mu[k] = mu[k-1] + exp(u[k])``; each adds its own log-Jacobian, the constrained posterior is the same).

    ``sample`` draws exactly by rejection (redrawing only the rejected draws, at most 100 rounds); draws still
    outside the cone after that are sorted absolute values (a feasible point, not an exact draw).

    Examples:
        >>> import torch
        >>> d = PositiveOrderedNormal(torch.tensor([3.0, 10.0]), torch.tensor([1.0, 1.0]))
        >>> x = d.sample((5,))
        >>> bool(((x[..., 0] > 0) & (x[..., 1] > x[..., 0])).all())
        True
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "loc": constraints.real_vector,
        "scale": constraints.independent(constraints.positive, 1),
    }
    support = constraints.positive_ordered_vector

    def __init__(self, loc: Tensor, scale: Tensor, validate_args: bool | None = None) -> None:
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        super().__init__(self.loc.shape[:-1], self.loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape: Any, _instance: Any = None) -> PositiveOrderedNormal:
        """The distribution with its parameters expanded to ``batch_shape``."""
        shape = torch.Size(batch_shape) + self.event_shape
        return PositiveOrderedNormal(self.loc.expand(shape), self.scale.expand(shape))

    def _in_cone(self, x: Tensor) -> Tensor:
        return (x[..., :1] > 0).all(-1) & (x[..., 1:] > x[..., :-1]).all(-1)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:  # noqa: B008
        """Exact draws by rejection (see the class docstring)."""
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            x = torch.normal(self.loc.expand(shape), self.scale.expand(shape))
            for _ in range(100):
                bad = ~self._in_cone(x)
                if not bool(bad.any()):
                    return x
                fresh = torch.normal(self.loc.expand(shape), self.scale.expand(shape))
                x = torch.where(bad.unsqueeze(-1), fresh, x)
            bad = ~self._in_cone(x)
            return torch.where(bad.unsqueeze(-1), x.abs().sort(-1).values, x)

    def log_prob(self, value: Tensor) -> Tensor:
        """Sum of the normal log densities on the cone, ``-inf`` outside (unnormalized, see above)."""
        lp = dist.Normal(self.loc, self.scale).log_prob(value).sum(-1)
        return torch.where(self._in_cone(value), lp, lp.new_tensor(-math.inf))


def hmm_example(y: Tensor, num_states: int = 2) -> None:
    """Two-state Gaussian HMM with the discrete states marginalized by the forward algorithm.

    ``theta1``, ``theta2``: simplex rows of the transition matrix (Stan's implicit uniform prior is
    ``Dirichlet(1, 1)``); ``mu``: ``positive_ordered`` state means with ``N(3, 1)``, ``N(10, 1)`` prior terms
    (`PositiveOrderedNormal`); ``y[t] ~ N(mu[z[t]], 1)``. The forward recursion
    ``gamma[t, k] = logsumexp_j(gamma[t-1, j] + log theta[j, k]) + log N(y[t] | mu[k], 1)`` (with no initial-state
    term, as in the Stan program) gives ``log p(y | theta, mu) = logsumexp_k gamma[N, k]``, added by ``pyro.factor``.
    """
    if num_states != 2:
        raise ValueError("the hmm_example program has prior terms for exactly two states")
    ones = y.new_ones(num_states)
    theta1 = pyro.sample("theta1", dist.Dirichlet(ones))
    theta2 = pyro.sample("theta2", dist.Dirichlet(ones))
    mu = pyro.sample("mu", PositiveOrderedNormal(y.new_tensor([3.0, 10.0]), ones))
    theta = pyro.deterministic("theta", torch.stack(torch.broadcast_tensors(theta1, theta2), dim=-2))
    log_theta = theta.log()  # [..., j, k]: log p(z[t] = k | z[t-1] = j)
    emission = dist.Normal(mu.unsqueeze(-2), 1.0).log_prob(y.unsqueeze(-1))  # [..., t, k]
    gamma = emission[..., 0, :]
    for t in range(1, y.shape[-1]):
        gamma = torch.logsumexp(gamma.unsqueeze(-1) + log_theta, dim=-2) + emission[..., t, :]
    pyro.factor("y", torch.logsumexp(gamma, dim=-1))


def _eight_schools_args(data: dict[str, Any]) -> tuple[Tensor, Tensor]:
    return _tensor(data["sigma"]), _tensor(data["y"])


def _ar_k_args(data: dict[str, Any]) -> tuple[Tensor, Tensor]:
    y, k = _tensor(data["y"]), int(data["K"])
    lags = torch.stack([y[k - j - 1 : len(y) - j - 1] for j in range(k)], dim=-1)
    return lags, y[k:]


def _kidiq_args(data: dict[str, Any]) -> tuple[Tensor, Tensor]:
    return _tensor(data["mom_iq"]), _tensor(data["kid_score"])


def _earnings_args(data: dict[str, Any]) -> tuple[Tensor, Tensor]:
    height, male = _tensor(data["height"]), _tensor(data["male"])
    design = torch.stack([torch.ones_like(height), height, male, height * male], dim=-1)
    return design, _tensor(data["earn"]).log()


def _arma_args(data: dict[str, Any]) -> tuple[Tensor]:
    return (_tensor(data["y"]),)


def _kilpisjarvi_args(data: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    prior = _tensor([data["pmualpha"], data["psalpha"], data["pmubeta"], data["psbeta"]])
    return _tensor(data["x"]), prior, _tensor(data["y"])


def _kidiq_interaction_args(data: dict[str, Any]) -> tuple[Tensor, Tensor]:
    mom_hs, mom_iq = _tensor(data["mom_hs"]), _tensor(data["mom_iq"])
    design = torch.stack([torch.ones_like(mom_iq), mom_hs, mom_iq, mom_hs * mom_iq], dim=-1)
    return design, _tensor(data["kid_score"])


def _earnings_height_male_args(data: dict[str, Any]) -> tuple[Tensor, Tensor]:
    height, male = _tensor(data["height"]), _tensor(data["male"])
    return torch.stack([torch.ones_like(height), height, male], dim=-1), _tensor(data["earn"]).log()


def _mesquite_args(data: dict[str, Any]) -> tuple[Tensor, Tensor]:
    logs = [_tensor(data[k]).log() for k in ("diam1", "diam2", "canopy_height", "total_height", "density")]
    group = _tensor(data["group"])
    design = torch.stack([torch.ones_like(group), *logs, group], dim=-1)
    return design, _tensor(data["weight"]).log()


def _gp_args(data: dict[str, Any]) -> tuple[Tensor, Tensor]:
    return _tensor(data["x"]), _tensor(data["y"])


def _hmm_args(data: dict[str, Any]) -> tuple[Tensor]:
    return (_tensor(data["y"]),)


@dataclass(frozen=True)
class Posterior:
    """A posteriordb posterior: its model, data file name and how to turn the data into model arguments."""

    model: Callable[..., None]
    data_name: str
    make_args: Callable[[dict[str, Any]], tuple[Tensor, ...]]

    def build(self, data: dict[str, Any]) -> tuple[Callable[..., None], tuple[Tensor, ...]]:
        """The model and its arguments (observations last) for posteriordb data ``data``."""
        return self.model, self.make_args(data)


#: posteriordb posterior name -> model and data (the eleven with reference draws in ``../shared/data``).
POSTERIORS: dict[str, Posterior] = {
    "eight_schools-eight_schools_noncentered": Posterior(
        eight_schools_noncentered, "eight_schools", _eight_schools_args
    ),
    "arK-arK": Posterior(ar_k, "arK", _ar_k_args),
    "kidiq-kidscore_momiq": Posterior(kidscore_momiq, "kidiq", _kidiq_args),
    "earnings-logearn_interaction": Posterior(logearn_interaction, "earnings", _earnings_args),
    "arma-arma11": Posterior(arma11, "arma", _arma_args),
    "kilpisjarvi_mod-kilpisjarvi": Posterior(kilpisjarvi, "kilpisjarvi_mod", _kilpisjarvi_args),
    "kidiq-kidscore_interaction": Posterior(kidscore_interaction, "kidiq", _kidiq_interaction_args),
    "earnings-logearn_height_male": Posterior(logearn_height_male, "earnings", _earnings_height_male_args),
    "mesquite-logmesquite": Posterior(logmesquite, "mesquite", _mesquite_args),
    "gp_pois_regr-gp_regr": Posterior(gp_regr, "gp_pois_regr", _gp_args),
    "hmm_example-hmm_example": Posterior(hmm_example, "hmm_example", _hmm_args),
}


def load_posterior(name: str, root: str | PathLike[str]) -> tuple[Callable[..., None], tuple[Tensor, ...]]:
    """Model and arguments of posterior ``name`` with data from ``root/data/<data_name>.json.zip``."""
    posterior = POSTERIORS[name]
    return posterior.build(load_posteriordb_data(Path(root) / "data" / f"{posterior.data_name}.json.zip"))


def laplace_approximation(model: Callable[..., None], *args: Any, max_iter: int = 500) -> AutoMultivariateNormal:
    """Pyro's Laplace approximation (MAP by L-BFGS in unconstrained space, then the Hessian's inverse).

    Returns:
        An ``AutoMultivariateNormal`` centred at the MAP with the inverse Hessian as covariance.

    """
    guide = AutoLaplaceApproximation(model)
    guide(*args)
    optimizer = torch.optim.LBFGS(
        guide.parameters(),
        max_iter=max_iter,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )
    loss_fn = Trace_ELBO().differentiable_loss

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_fn(model, guide, *args)
        loss.backward()
        return loss

    optimizer.step(closure)
    return guide.laplace_approximation(*args)


def laplace_flow_guide(
    model: Callable[..., None], laplace: AutoMultivariateNormal, num_flows: int = 2, **iaf_kwargs: Any
) -> AutoFlow:
    r"""A flow guide that starts exactly at a Laplace (or any full-covariance Gaussian) approximation.

    ``AutoFlow.from_guide`` copies the location, the scales and the unit triangular factor of the correlations
    into the guide's affine base, $z = \mu + \mathrm{diag}(d)\, U u$; ``num_flows`` IAF layers (at the
    identity) act before it, on whitened coordinates, and learn what the Gaussian misses (skewness, funnels, heavy
    tails). Strongly correlated posteriors (regressions on uncentred predictors) then need no SVI steps to learn
    their linear structure. ``iaf_kwargs`` go to the ``"iaf"`` family (the guides' defaults: the affine update,
    hidden (32, 32)).
    """
    if laplace.latent_dim < 1:
        raise ValueError("the Laplace approximation has no latent dimension")
    return AutoFlow.from_guide(laplace, model, flow="iaf", num_flows=num_flows, **iaf_kwargs)


#: Guides compared on the reference posteriors (the flow guide is the recommended one).
GUIDES = ("flow", "AutoNormal", "AutoMultivariateNormal")


def fit_and_compare(
    name: str,
    root: str | PathLike[str],
    guide_name: str = "flow",
    num_steps: int = 1000,
    lr: float = 0.01,
    num_particles: int = 8,
    num_draws: int = 4000,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit one guide to one posteriordb posterior and compare it with the reference draws.

    Every guide starts from the Laplace approximation's location (the flow guide from the full Laplace Gaussian,
    see `laplace_flow_guide`) and runs ``num_steps`` of SVI (Adam, ``lr`` decayed tenfold over the run,
    ``num_particles`` vectorized particles).

    Returns:
        ``{"table": comparison of the guide, "psis_table": comparison of its PSIS-resampled draws, "khat",
        "elbo", "seconds"}``.

    """
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model, args = load_posterior(name, root)
    reference = read_posteriordb_draws(Path(root) / "reference_draws" / f"{name}.json.zip")
    start = time.perf_counter()
    laplace = laplace_approximation(model, *args)
    init = init_to_value(values=laplace.median(*args))
    guide: Any
    if guide_name == "flow":
        # affine IAF updates: the hierarchical scale (eight schools' tau) needs coordinates rescaled up and down
        guide = laplace_flow_guide(model, laplace, hidden_dims=(32, 32), gated=False)
    elif guide_name == "AutoNormal":
        guide = AutoNormal(model, init_loc_fn=init)
    elif guide_name == "AutoMultivariateNormal":
        guide = AutoMultivariateNormal(model, init_loc_fn=init)
    else:
        raise ValueError(f"unknown guide {guide_name!r}; choose from {GUIDES}")
    decay = 0.1 ** (1.0 / max(num_steps, 1))
    # the flow guide's layers move at a tenth of the base's learning rate (the setting of docs/posteriordb.md)
    optim = pyro.optim.ClippedAdam(
        flow_optim_args(lr, 0.1, lrd=decay) if guide_name == "flow" else {"lr": lr, "lrd": decay}
    )
    trace = fit_svi(
        model, guide, *args, num_steps=num_steps, optim=optim, num_particles=num_particles, vectorize_particles=True
    )
    seconds = time.perf_counter() - start
    idata = to_inference_data(model, guide, *args, num_samples=num_draws, posterior_predictive=False)
    corrected = importance_resample(
        model, guide, *args, num_samples=num_draws, posterior_predictive=False, log_likelihood=False
    )
    return {
        "table": compare_to_reference(idata, reference),
        "psis_table": compare_to_reference(corrected, reference),
        "khat": psis_khat(model, guide, *args, num_samples=2000),
        "elbo": trace.final(),
        "seconds": seconds,
    }
