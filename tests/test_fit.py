"""`pyro_flows.fit`: the one call from a model to a checked posterior.

Fast tests check the API on tiny budgets (shapes and supports of the draws, silence with `progress=False`, the
k-hat warning, `Predictive`, argument passthrough, the parameter store). Slow tests run the defaults on the four
posteriordb posteriors of `examples/posteriordb_models.py` (skipped without the posteriordb files) and on Neal's
10-d funnel, and check the bars: every mean within 0.1 reference sd, every sd within 10 %, funnel KL ≤ 0.05
nats and k-hat < 0.5 (at the defaults a known gap, xfail; met by the longer budget of docs/fit.md).
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive

import pyro_flows
from pyro_flows.inference import FitOptions, FitResult

REPO = Path(__file__).resolve().parents[1]
POSTERIORDB = next(
    (p for p in (Path("/work/shared/data/posteriordb"), REPO.parent / "shared" / "data" / "posteriordb") if p.is_dir()),
    None,
)

#: A budget that keeps the API tests fast (the quality of such a fit is not checked).
TINY = {"progress": False, "max_steps": 30, "check_every": 10, "khat_samples": 200}


def regression(x, y=None):
    loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
    scale = pyro.sample("scale", dist.HalfNormal(2.0))
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(3)))
    with pyro.plate("data", len(x)):
        slope = (weights * torch.arange(3.0)).sum(-1)
        pyro.sample("y", dist.Normal(loc + slope * x, scale), obs=y)


X = torch.linspace(-1.0, 1.0, 20)
Y = 0.5 + 1.2 * X + 0.3 * torch.randn(20, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def small_fit() -> FitResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a tiny budget may leave k-hat high
        return pyro_flows.fit(regression, X, Y, fit_options=TINY)


def test_a_flat_prior_site_that_cannot_sample_is_fitted() -> None:
    """Stan's flat priors written as ``ImproperUniform`` (Pyro's ``init_to_feasible`` cannot start them)."""
    from pyro.distributions import constraints

    def mixture(y):
        mu = pyro.sample("mu", dist.ImproperUniform(constraints.ordered_vector, (), (2,)))
        pyro.factor("mu_prior", dist.Normal(0.0, 5.0).log_prob(mu).sum(-1))
        sigma = pyro.sample("sigma", dist.HalfNormal(torch.ones(2)).to_event(1))
        parts = dist.Normal(mu.unsqueeze(-2), sigma.unsqueeze(-2)).log_prob(y.unsqueeze(-1))
        pyro.factor("y", torch.logsumexp(parts - math.log(2.0), -1).sum(-1))

    generator = torch.Generator().manual_seed(0)
    y = torch.cat([torch.randn(50, generator=generator) - 2.0, torch.randn(50, generator=generator) + 2.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = pyro_flows.fit(mixture, y, fit_options=TINY)
    draws = result.draws(200)
    assert draws["mu"].shape == (200, 2) and bool((draws["mu"][:, 0] < draws["mu"][:, 1]).all())
    assert result.start == "laplace"
    assert (draws["mu"].mean(0) - torch.tensor([-2.0, 2.0])).abs().max() < 0.5


def test_the_laplace_start_s_correlation_factor_is_trained(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: `fit` left the Laplace start's correlation factor at its start value.

    The factor comes from a Cholesky factorization, a column-major tensor in general (made so here); the guide was
    set up outside a call, and Pyro's parameter store kept a contiguous copy of the factor at the first step, so
    the optimizer trained the copy while the guide read the original.
    """
    from pyro_flows.guides import autoflow

    factors, start = autoflow.laplace_factors, []

    def column_major(*args, **kwargs):
        scale, unit_tril = factors(*args, **kwargs)
        start.append(unit_tril.clone())
        return scale, unit_tril.mT.contiguous().mT

    monkeypatch.setattr(autoflow, "laplace_factors", column_major)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = pyro_flows.fit(regression, X, Y, fit_options=TINY)
    assert result.start == "laplace"
    moved = (result.guide.unit_tril - start[0]).tril(-1).abs().max()
    assert moved > 1e-4


def test_draws_have_site_shapes_and_supports(small_fit: FitResult) -> None:
    draws = small_fit.draws(300)
    assert set(draws) == {"loc", "scale", "weights"}
    assert draws["loc"].shape == (300,) and draws["scale"].shape == (300,)
    assert draws["weights"].shape == (300, 3)
    assert bool((draws["scale"] > 0).all())
    assert bool((draws["weights"] > 0).all())
    assert torch.allclose(draws["weights"].sum(-1), torch.ones(300), atol=1e-5)
    assert len(small_fit.elbo_trace.elbo) <= TINY["max_steps"]


def test_arviz_exports(small_fit: FitResult) -> None:
    idata = small_fit.to_inference_data(100)
    assert {"posterior", "log_likelihood", "posterior_predictive", "observed_data"} <= set(idata.groups())
    assert idata.posterior["weights"].shape == (1, 100, 3)
    table = small_fit.summary(200)
    assert {"loc", "scale", "weights[0]"} <= set(table.index)
    assert "mean" in table.columns


def test_plot(small_fit: FitResult) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    elbo_axis, pair_axes = small_fit.plot(100, var_names=["loc", "scale"])
    assert elbo_axis.get_xlabel() == "SVI step"
    assert pair_axes is not None
    plt.close("all")


def test_predictive_with_the_guide(small_fit: FitResult) -> None:
    samples = Predictive(regression, guide=small_fit.guide, num_samples=50)(X)
    assert samples["y"].shape == (50, 20)
    assert samples["scale"].shape[0] == 50 and bool((samples["scale"] > 0).all())


def test_progress_false_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pyro_flows.fit(regression, X, Y, fit_options=TINY)
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_progress_shows_the_bar(capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pyro_flows.fit(regression, X, Y, fit_options={**TINY, "progress": True})
    assert "fit: -ELBO" in capsys.readouterr().err


def cauchy(dim: int = 5) -> None:
    pyro.sample("z", dist.StudentT(1.0, torch.zeros(dim), 1.0).to_event(1))


def test_high_khat_warns_once_and_does_not_resample() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pyro_flows.fit(cauchy, fit_options={**TINY, "max_steps": 10, "num_flows": 0, "khat_samples": 1000})
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "k-hat" in str(w.message)]
    assert len(messages) == 1, messages
    assert "richer flow" in messages[0] and "reparameterization" in messages[0]
    assert result.khat >= 0.7 and not result.resampled
    assert result.draws(50)["z"].shape == (50, 5)


def test_model_arguments_pass_through_whatever_their_names() -> None:
    seen = []

    def model(x, *, data, num_steps, seed, progress):
        seen.append((data, num_steps, seed, progress))
        loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
        with pyro.plate("obs", len(data)):
            pyro.sample("y", dist.Normal(loc + 0 * x, 1.0), obs=data)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = pyro_flows.fit(model, X, data=Y, num_steps=7, seed="model's", progress=None, fit_options=TINY)
    assert seen and all(d is Y and n == 7 and s == "model's" and p is None for d, n, s, p in seen)
    assert result.kwargs == {"data": Y, "num_steps": 7, "seed": "model's", "progress": None}
    assert result.draws(10)["loc"].shape == (10,)


def test_bad_options() -> None:
    with pytest.raises(TypeError, match="unknown fit option"):
        pyro_flows.fit(regression, X, Y, fit_options={"max_step": 10})
    with pytest.raises(TypeError, match="fit_options must be"):
        pyro_flows.fit(regression, X, Y, fit_options=10)
    with pytest.raises(ValueError, match="lr"):
        FitOptions(lr=-1.0)
    with pytest.raises(ValueError, match="final_lr"):
        FitOptions(lr=1e-3, final_lr=1e-2)
    with pytest.raises(TypeError, match="jit must be True or False"):
        FitOptions(jit="yes")


def test_the_traced_elbo_takes_the_eager_steps() -> None:
    """`jit=True` (the default) traces the ELBO where it is exact: the same ELBO trace as the eager run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        runs = [pyro_flows.fit(regression, X, Y, fit_options={**TINY, "jit": jit}) for jit in (True, False)]
    assert runs[0].traced and not runs[1].traced
    assert np.allclose(runs[0].elbo_trace.elbo, runs[1].elbo_trace.elbo, rtol=1e-5)
    assert runs[0].khat == pytest.approx(runs[1].khat, rel=1e-4)


def test_a_model_the_trace_would_freeze_runs_the_eager_elbo(caplog: pytest.LogCaptureFixture) -> None:
    """A model that reads a sampled value as a Python number: its trace freezes the number, and the check sees it."""

    def frozen_by_a_trace(y):
        loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
        scale = 1.0 + float(loc.detach().abs().max())
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(loc, scale), obs=y)

    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="pyro_flows"):
        warnings.simplefilter("ignore", UserWarning)
        runs = [pyro_flows.fit(frozen_by_a_trace, Y, fit_options={**TINY, "jit": jit}) for jit in (True, False)]
    assert "the eager ELBO runs" in caplog.text and not runs[0].traced
    assert runs[0].elbo_trace.elbo == runs[1].elbo_trace.elbo


def test_a_refining_pass_runs_at_high_khat_and_is_kept_only_if_better(monkeypatch: pytest.MonkeyPatch) -> None:
    """`refine_khat`: a second SVI pass (more particles, longer windows) from where the first ended."""
    from pyro_flows import inference

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plain = pyro_flows.fit(regression, X, Y, fit_options=TINY)
        refined = pyro_flows.fit(regression, X, Y, fit_options={**TINY, "refine_khat": 0.0})
    assert not plain.refined and len(plain.elbo_trace.elbo) == TINY["max_steps"]
    assert len(refined.elbo_trace.elbo) > TINY["max_steps"]  # the pass ran (k-hat >= 0 always)
    assert refined.elbo_trace.elbo[: TINY["max_steps"]] == plain.elbo_trace.elbo

    run_svi = inference._run_svi

    def worse(model, guide, args, kwargs, options, deadline):
        if options.num_particles == FitOptions().num_particles:
            return run_svi(model, guide, args, kwargs, options, deadline)
        with torch.no_grad():
            guide.loc_shift.add_(10.0)  # a pass that ends far off, with a lower ELBO
        trace = inference.ELBOTrace(elbo=[-1e9] * 10)
        return trace, True, False

    monkeypatch.setattr(inference, "_run_svi", worse)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        discarded = pyro_flows.fit(regression, X, Y, fit_options={**TINY, "refine_khat": 0.0})
    assert not discarded.refined
    assert torch.equal(discarded.guide.loc_shift, plain.guide.loc_shift)  # the first pass's guide, restored
    with pytest.raises(ValueError, match="refine_khat"):
        FitOptions(refine_khat="high")


def test_the_model_s_own_params_are_kept_for_the_draws() -> None:
    """Regression: a model's `pyro.param` was fitted in the fit's scope and lost after it.

    The draws then ran the model at the parameter's initial value: a wrong likelihood, and PSIS weights from it.
    """

    def learned_noise(x, y):
        loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
        noise = pyro.param("noise", torch.tensor(1.0), constraint=dist.constraints.positive)
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(loc + x, noise), obs=y)

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(200, generator=generator)
    y = 2.0 + x + 0.2 * torch.randn(200, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a high k-hat of the draws would warn
        result = pyro_flows.fit(learned_noise, x, y, fit_options={**TINY, "max_steps": 300})
        idata = result.to_inference_data(500)
    with pyro.get_param_store().scope(result.params):
        assert float(pyro.param("noise")) == pytest.approx(0.2, rel=0.3)
    assert idata.attrs["khat"] < 0.7
    assert "noise" not in pyro.get_param_store()


def test_a_subsampling_plate_is_refused_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """PSIS k-hat and the draws weigh the full likelihood: a subsample would make them noisy or wrong."""

    def subsampled(x, y):
        loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
        with pyro.plate("data", len(x), subsample_size=5) as index:
            pyro.sample("y", dist.Normal(loc + x[index], 1.0), obs=y[index])

    from pyro_flows import inference

    def no_start(*args, **kwargs):
        raise AssertionError("the MAP and SVI should not start")

    monkeypatch.setattr(inference, "_start", no_start)
    with pytest.raises(ValueError, match=r"needs the full data, but the plate 'data' subsamples 5 of 20"):
        pyro_flows.fit(subsampled, X, Y, fit_options=TINY)


def on_device(x, y):
    loc = pyro.sample("loc", dist.Normal(x.new_zeros(()), 5.0))
    scale = pyro.sample("scale", dist.HalfNormal(x.new_tensor(2.0)))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(loc + x, scale), obs=y)


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_the_traced_fit_runs_on_the_data_s_device(device: str) -> None:
    x, y = X.to(device), Y.to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = pyro_flows.fit(on_device, x, y, fit_options={**TINY, "max_steps": 100})
    assert result.traced and result.guide.loc.device.type == device
    draws = result.draws(100)
    assert draws["loc"].device.type == device and bool(torch.isfinite(draws["scale"]).all())


def test_parameter_store_is_left_alone() -> None:
    pyro.clear_param_store()
    user = pyro.param("user_param", torch.ones(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pyro_flows.fit(regression, X, Y, fit_options=TINY)
    store = pyro.get_param_store()
    assert list(store.keys()) == ["user_param"] and store["user_param"] is user


def test_seed_makes_fits_reproducible() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        first = pyro_flows.fit(regression, X, Y, fit_options=TINY)
        second = pyro_flows.fit(regression, X, Y, fit_options=TINY)
    assert first.elbo_trace.elbo == second.elbo_trace.elbo


def test_fit_is_exported_lazily() -> None:
    code = (
        "import sys, pyro_flows\n"
        "assert 'pyro_flows.guides' not in sys.modules and 'pyro_flows.inference' not in sys.modules\n"
        "from pyro_flows import fit, FitResult\n"
        "assert fit is sys.modules['pyro_flows.inference'].fit and FitResult.__name__ == 'FitResult'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------ quality (slow)
POSTERIORS = [
    "eight_schools-eight_schools_noncentered",
    "arK-arK",
    "kidiq-kidscore_momiq",
    "earnings-logearn_interaction",
]


@pytest.mark.slow
@pytest.mark.skipif(POSTERIORDB is None, reason="posteriordb data not found")
@pytest.mark.parametrize("name", POSTERIORS)
def test_posteriordb_posteriors_meet_the_bars(name: str) -> None:
    sys.path.insert(0, str(REPO / "examples"))
    from posteriordb_models import load_posterior

    from pyro_flows.diagnostics import compare_to_reference, read_posteriordb_draws, samples_to_inference_data

    torch.set_num_threads(1)
    model, args = load_posterior(name, POSTERIORDB)
    reference = read_posteriordb_draws(POSTERIORDB / "reference_draws" / f"{name}.json.zip")
    start = time.perf_counter()
    result = pyro_flows.fit(model, *args, fit_options={"progress": False})
    seconds = time.perf_counter() - start
    idata = samples_to_inference_data(
        model, result.draws(4000), *args, posterior_predictive=False, log_likelihood=False
    )
    table = compare_to_reference(idata, reference)
    print(f"{name}: k-hat {result.khat:.2f}, {seconds:.1f} s\n{table}")
    assert result.khat < 0.7
    assert (table.mean_error.abs() < 0.1).all(), table
    assert ((table.sd_ratio - 1.0).abs() < 0.1).all(), table


#: The longer budget of docs/fit.md that reaches the funnel's neck (seeds 0 and 1: KL 0.043 and 0.046 nats).
FUNNEL_RECIPE = {"num_particles": 32, "plateau_window": 2500, "max_steps": 20000, "max_seconds": 600}


def funnel(dim: int = 10) -> None:
    v = pyro.sample("v", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 3.0))
    scale = torch.exp(v / 2).unsqueeze(-1)
    pyro.sample("x", dist.Normal(torch.zeros(dim - 1, dtype=torch.float64), scale).to_event(1))


def _funnel_kl(options: dict) -> tuple[float, FitResult]:
    """KL(q || p) of `fit`'s guide on the funnel (exact: its density is normalized), from 20000 guide draws."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = pyro_flows.fit(funnel, fit_options={"progress": False, **options})
    seconds = time.perf_counter() - start
    with torch.no_grad():
        posterior = result.guide.get_posterior()
        z = posterior.sample((20000,))
        v, x = z[:, 0], z[:, 1:]
        log_p = dist.Normal(0.0, 3.0).log_prob(v) + dist.Normal(0.0, torch.exp(v / 2).unsqueeze(-1)).log_prob(x).sum(-1)
        kl = float((posterior.log_prob(z) - log_p).mean())
    steps = len(result.elbo_trace.elbo)
    print(f"funnel {options}: KL {kl:.4f} nats, k-hat {result.khat:.2f}, {steps} steps, {seconds:.1f} s")
    return kl, result


@pytest.mark.slow
@pytest.mark.xfail(reason="known gap: KL 0.29 nats at the default budget (bar 0.05), see docs/fit.md", strict=False)
def test_neals_funnel_kl() -> None:
    kl, result = _funnel_kl({})
    assert kl <= 0.05
    assert result.khat < 0.5


@pytest.mark.slow
def test_neals_funnel_kl_longer_budget() -> None:
    """The recipe of docs/fit.md for the funnel: 32 particles, 2500-step plateau windows (about 10^4 steps)."""
    kl, result = _funnel_kl(FUNNEL_RECIPE)
    assert kl <= 0.05
    assert result.khat < 0.5
