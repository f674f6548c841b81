"""Tests of pyro_flows.diagnostics: ArviZ export, PSIS k-hat on known answers, importance resampling, reference
comparison, ELBO traces. Every function is exercised with Pyro's own guides (any guide must work)."""

from __future__ import annotations

import json
import math
import warnings
import zipfile

import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from pyro_flows.diagnostics import (
    ELBOTrace,
    compare_to_reference,
    fit_svi,
    importance_resample,
    plot_elbo,
    psis_khat,
    read_posteriordb_draws,
    samples_to_inference_data,
    to_inference_data,
)
from pyro_flows.diagnostics.elbo import differentiable_loss, svi_parameters

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

matplotlib.use("Agg")

N_OBS, DIM = 10, 4


def regression_model(x, y=None):
    """Linear regression with a vector coefficient (event dim), a positive scale, a deterministic site."""
    weight = pyro.sample("weight", dist.Normal(torch.zeros(2), 5.0).to_event(1))
    bias = pyro.sample("bias", dist.Normal(0.0, 5.0))
    noise = pyro.sample("noise", dist.HalfNormal(2.0))
    pyro.deterministic("snr", weight.norm(dim=-1) / noise)
    with pyro.plate("obs", x.shape[0]):
        mean = bias + (x * weight).sum(-1)
        pyro.sample("y", dist.Normal(mean, noise), obs=y)


def regression_data(n=20):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=generator)
    y = 1.0 + x @ torch.tensor([2.0, -1.0]) + 0.5 * torch.randn(n, generator=generator)
    return x, y


def conjugate_model(y):
    """mu ~ N(0, I_D); y_i ~ N(mu, I_D): posterior N(sum(y) / (n + 1), I / (n + 1))."""
    mu = pyro.sample("mu", dist.Normal(torch.zeros(DIM), 1.0).to_event(1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0).to_event(1), obs=y)


def conjugate_data():
    return torch.randn(N_OBS, DIM, generator=torch.Generator().manual_seed(1)) + 1.5


def exact_posterior(y):
    n = y.shape[0]
    return y.sum(0) / (n + 1), torch.full((DIM,), 1.0 / math.sqrt(n + 1))


def gaussian_guide(loc, scale):
    def guide(y):
        pyro.sample("mu", dist.Normal(loc, scale).to_event(1))

    return guide


@pytest.fixture(autouse=True)
def _fresh():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)


@pytest.fixture(scope="module")
def fitted_regression():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x, y = regression_data()
    guide = AutoNormal(regression_model)
    fit_svi(regression_model, guide, x, y, num_steps=300, lr=0.05)
    return guide, x, y


# ------------------------------------------------------------------------------------------- to_inference_data
@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoMultivariateNormal])
def test_inference_data_groups_shapes_and_dims(guide_cls):
    x, y = regression_data()
    guide = guide_cls(regression_model)
    fit_svi(regression_model, guide, x, y, num_steps=50, lr=0.05)
    idata = to_inference_data(regression_model, guide, x, y, num_samples=200)
    assert set(idata.groups()) == {"posterior", "posterior_predictive", "log_likelihood", "observed_data"}
    post = idata.posterior
    assert post["weight"].shape == (1, 200, 2)
    assert post["bias"].shape == (1, 200)
    assert post["snr"].shape == (1, 200)
    assert post["weight"].dims == ("chain", "draw", "weight_dim_0")
    assert bool((post["noise"] > 0).all())  # constrained space
    np.testing.assert_allclose(post["snr"], np.linalg.norm(post["weight"], axis=-1) / post["noise"], rtol=1e-5)
    assert idata.posterior_predictive["y"].shape == (1, 200, 20)
    assert idata.posterior_predictive["y"].dims == ("chain", "draw", "obs")
    assert idata.log_likelihood["y"].shape == (1, 200, 20)
    np.testing.assert_allclose(idata.observed_data["y"], y.numpy())
    assert post.attrs["guide"] == guide_cls.__name__


def test_deterministic_site_inside_a_plate():
    def noncentered(sigma, y=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("school", len(sigma)):
            theta_trans = pyro.sample("theta_trans", dist.Normal(0.0, 1.0))
            theta = pyro.deterministic("theta", mu + tau * theta_trans)
            pyro.sample("y", dist.Normal(theta, sigma), obs=y)

    sigma, y = torch.tensor([15.0, 10.0, 16.0]), torch.tensor([28.0, 8.0, -3.0])
    guide = AutoNormal(noncentered)
    guide(sigma, y)
    idata = to_inference_data(noncentered, guide, sigma, y, num_samples=50)
    post = idata.posterior
    assert post["theta"].dims == ("chain", "draw", "school")
    np.testing.assert_allclose(post["theta"], post["mu"] + post["tau"] * post["theta_trans"], rtol=1e-5, atol=1e-5)
    assert idata.posterior_predictive["y"].shape == (1, 50, 3)


def test_log_likelihood_is_pointwise_and_matches_manual(fitted_regression):
    guide, x, y = fitted_regression
    idata = to_inference_data(regression_model, guide, x, y, num_samples=5, posterior_predictive=False)
    post = idata.posterior
    for s in range(5):
        weight = torch.as_tensor(post["weight"].values[0, s])
        mean = post["bias"].values[0, s] + x.double() @ weight.double()
        expected = dist.Normal(mean, float(post["noise"].values[0, s])).log_prob(y.double())
        np.testing.assert_allclose(idata.log_likelihood["y"].values[0, s], expected.numpy(), rtol=1e-4, atol=1e-5)
    assert "posterior_predictive" not in idata.groups()


def test_arviz_functions_accept_the_export(fitted_regression):
    guide, x, y = fitted_regression
    idata = to_inference_data(regression_model, guide, x, y, num_samples=300)
    summary = az.summary(idata, var_names=["weight", "bias", "noise"], kind="stats")
    assert list(summary.index) == ["weight[0]", "weight[1]", "bias", "noise"]
    assert abs(summary.loc["weight[0]", "mean"] - 2.0) < 0.5
    loo = az.loo(idata)
    assert np.isfinite(loo.elpd_loo) and loo.n_data_points == 20
    axes = az.plot_pair(idata, var_names=["bias", "noise"])
    assert axes is not None


def test_parallel_and_sequential_paths_agree(fitted_regression):
    _, x, y = fitted_regression
    with torch.no_grad():
        samples = {
            "weight": torch.randn(30, 2) * 0.1 + torch.tensor([2.0, -1.0]),
            "bias": torch.randn(30) * 0.1 + 1.0,
            "noise": torch.rand(30) + 0.3,
        }
    vec = samples_to_inference_data(regression_model, samples, x, y, parallel=True, posterior_predictive=False)
    seq = samples_to_inference_data(regression_model, samples, x, y, parallel=False, posterior_predictive=False)
    np.testing.assert_allclose(vec.log_likelihood["y"], seq.log_likelihood["y"], rtol=1e-5)
    np.testing.assert_allclose(vec.posterior["snr"], seq.posterior["snr"], rtol=1e-5)
    np.testing.assert_allclose(vec.posterior["weight"], samples["weight"].numpy()[None])


def test_non_vectorizable_model_falls_back_to_sequential():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
        for i in range(len(y)):  # a Python loop over observations: no plate, not vectorizable over draws
            pyro.sample(f"y_{i}", dist.Normal(float(mu), 1.0), obs=y[i])

    y = torch.tensor([0.3, 1.2, 0.8])
    guide = AutoNormal(model)
    fit_svi(model, guide, y, num_steps=20)
    idata = to_inference_data(model, guide, y, num_samples=40)
    assert idata.posterior["mu"].shape == (1, 40)
    assert sorted(idata.log_likelihood.data_vars) == ["y_0", "y_1", "y_2"]
    assert idata.posterior_predictive["y_1"].shape == (1, 40)


def test_bad_inputs_raise_clear_errors(fitted_regression):
    guide, x, y = fitted_regression
    with pytest.raises(ValueError, match="num_samples"):
        to_inference_data(regression_model, guide, x, y, num_samples=0)
    with pytest.raises(ValueError, match="no draws"):
        samples_to_inference_data(regression_model, {"bias": torch.zeros(3)}, x, y)

    def no_latent(y):
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

    with pytest.raises(ValueError, match="no latent"):
        to_inference_data(no_latent, lambda y: None, torch.tensor(0.0))


# -------------------------------------------------------------------------------------------------------- PSIS
def test_khat_of_exact_posterior_guide_is_small():
    y = conjugate_data()
    loc, scale = exact_posterior(y)
    assert psis_khat(conjugate_model, gaussian_guide(loc, scale), y, num_samples=2000) < 0.5
    # a slightly wider guide: bounded ratios, fitted by the Pareto estimator (not the constant-ratio shortcut)
    assert psis_khat(conjugate_model, gaussian_guide(loc, 1.2 * scale), y, num_samples=2000) < 0.5


def test_khat_of_too_narrow_guide_is_large():
    y = conjugate_data()
    loc, scale = exact_posterior(y)
    assert psis_khat(conjugate_model, gaussian_guide(loc, 0.4 * scale), y, num_samples=2000) > 0.7


def test_khat_with_autoguides_set_to_known_answers():
    y = conjugate_data()
    loc, scale = exact_posterior(y)
    guide = AutoNormal(conjugate_model)
    guide(y)
    guide.locs.mu = loc.clone()  # PyroModule assignment sets the constrained value
    guide.scales.mu = scale.clone()
    assert psis_khat(conjugate_model, guide, y, num_samples=2000) < 0.5
    guide.scales.mu = 0.4 * scale
    assert psis_khat(conjugate_model, guide, y, num_samples=2000) > 0.7


def test_importance_resample_corrects_a_shifted_guide():
    y = conjugate_data()
    loc, scale = exact_posterior(y)
    guide = gaussian_guide(loc + 0.5 * scale, 1.5 * scale)  # wide and shifted: bounded weights, k-hat < 0.5
    idata = importance_resample(conjugate_model, guide, y, num_samples=2000, num_proposals=20000)
    assert set(idata.groups()) == {"posterior", "posterior_predictive", "log_likelihood", "observed_data"}
    assert idata.posterior["mu"].shape == (1, 2000, DIM)
    assert idata.attrs["khat"] < 0.5 and 1000 < idata.attrs["ess"] <= 20000
    mean = idata.posterior["mu"].values.reshape(-1, DIM).mean(0)
    np.testing.assert_allclose(mean, loc.numpy(), atol=0.15 * float(scale[0]))
    sd = idata.posterior["mu"].values.reshape(-1, DIM).std(0)
    np.testing.assert_allclose(sd, scale.numpy(), rtol=0.1)


# --------------------------------------------------------------------------------------------------- reference
def test_compare_to_reference_with_dicts_and_inference_data():
    rng = np.random.default_rng(0)
    idata = az.from_dict(posterior={"a": rng.normal(1.0, 2.0, (1, 4000)), "b": rng.normal(0.0, 1.0, (1, 4000, 2))})
    ref = {"a": rng.normal(1.2, 2.0, (4, 1000)), "b": rng.normal(0.0, 0.5, (8000, 2))}
    table = compare_to_reference(idata, ref)
    assert list(table.index) == ["a", "b[0]", "b[1]"]
    assert abs(table.loc["a", "mean_error"] + 0.1) < 0.05
    np.testing.assert_allclose(table.loc[["b[0]", "b[1]"], "sd_ratio"], 2.0, rtol=0.05)
    same = compare_to_reference(idata, idata)
    np.testing.assert_allclose(same.mean_error, 0.0, atol=1e-12)
    np.testing.assert_allclose(same.sd_ratio, 1.0)
    with pytest.raises(ValueError, match="shape"):
        compare_to_reference(idata, {"b": rng.normal(size=(100, 3))})
    with pytest.raises(ValueError, match="no variable in common"):
        compare_to_reference(idata, {"c": rng.normal(size=100)})


def test_read_posteriordb_draws(tmp_path):
    rng = np.random.default_rng(0)
    chains = [
        {"mu": rng.normal(size=50).tolist(), "theta[1]": [1.0] * 50, "theta[2]": [2.0] * 50, "L[2,1]": [3.0] * 50}
        for _ in range(3)
    ]
    path = tmp_path / "post.json.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("post.json", json.dumps(chains))
    draws = read_posteriordb_draws(path)
    assert draws["mu"].shape == (3, 50)
    assert draws["theta"].shape == (3, 50, 2) and np.all(draws["theta"][..., 1] == 2.0)
    assert draws["L"].shape == (3, 50, 2, 1) and np.all(draws["L"][..., 1, 0] == 3.0)
    (tmp_path / "bad.json").write_text(json.dumps({"mu": [1.0]}))
    with pytest.raises(ValueError, match="list of chains"):
        read_posteriordb_draws(tmp_path / "bad.json")


# -------------------------------------------------------------------------------------------------------- ELBO
def test_fit_svi_records_and_plots_the_elbo():
    y = conjugate_data()
    guide = AutoNormal(conjugate_model)
    trace = fit_svi(conjugate_model, guide, y, num_steps=200, lr=0.05)
    assert isinstance(trace, ELBOTrace) and len(trace.elbo) == 200 and trace.seconds > 0
    assert np.mean(trace.elbo[-20:]) > np.mean(trace.elbo[:20])
    assert trace.smoothed().shape == (200,)
    ax = plot_elbo(trace, label="AutoNormal")
    assert ax.get_ylabel() == "ELBO (nats)" and len(ax.lines) == 2
    assert trace.plot(ax=ax) is ax
    assert plot_elbo([1.0, 2.0, 3.0]) is not None
    with pytest.raises(ValueError, match="num_steps"):
        fit_svi(conjugate_model, guide, y, num_steps=-1)


def test_the_traced_elbo_s_gradient_is_the_eager_one():
    """Regression: Pyro's `JitTrace_ELBO.differentiable_loss` doubles the gradient (its loss is not detached).

    `differentiable_loss` (used by `fit_svi` and `fit`) gives the eager `Trace_ELBO`'s loss and gradient at the same
    draws.
    """
    from pyro.infer import JitTrace_ELBO, Trace_ELBO

    y = conjugate_data()
    guide = AutoNormal(conjugate_model)
    eager, traced = Trace_ELBO(), JitTrace_ELBO(ignore_jit_warnings=True)
    params = svi_parameters(lambda _: eager.differentiable_loss(conjugate_model, guide, y))
    differentiable_loss(traced, conjugate_model, guide, y)  # compiles
    results = []
    for elbo in (eager, traced):
        torch.manual_seed(0)
        loss = differentiable_loss(elbo, conjugate_model, guide, y)
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    (eager_loss, eager_grads), (traced_loss, traced_grads) = results
    assert torch.allclose(traced_loss, eager_loss)
    for a, b in zip(eager_grads, traced_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    torch.manual_seed(0)
    pyro_grad = torch.autograd.grad(traced.differentiable_loss(conjugate_model, guide, y), params)
    assert torch.allclose(pyro_grad[0], 2 * eager_grads[0], rtol=1e-5)  # Pyro's, for the record


def test_fit_svi_with_jit_takes_the_eager_steps():
    y = conjugate_data()
    runs = []
    for jit in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        guide = AutoNormal(conjugate_model)
        runs.append(fit_svi(conjugate_model, guide, y, num_steps=30, jit=jit, progress=False))
    assert np.allclose(runs[0].elbo, runs[1].elbo, rtol=1e-5)
    with pytest.raises(TypeError, match="jit=True traces a Trace_ELBO"):
        fit_svi(conjugate_model, AutoNormal(conjugate_model), y, num_steps=1, jit=True, loss=TraceMeanField_ELBO())
    with pytest.raises(TypeError, match="jit="):
        fit_svi(conjugate_model, AutoNormal(conjugate_model), y, num_steps=1, jit="yes")


def test_plot_elbo_keeps_earlier_traces_on_a_shared_axis_in_view():
    # regression: each call set the y-limits from its own trace only, hiding the traces drawn before it
    ax = plot_elbo([-100.0] * 50, label="a")
    plot_elbo([-10.0 - 0.01 * i for i in range(50)], ax=ax, label="b")
    low, high = ax.get_ylim()
    assert low <= -100.0 and high >= -10.05  # both traces (past their first 10 %) in view


def _store_values() -> dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    return {name: store.get_param(name).unconstrained().detach().clone() for name in store.get_all_param_names()}


def test_fit_svi_progress_bar_is_switchable(capsys):
    y = conjugate_data()
    fit_svi(conjugate_model, AutoNormal(conjugate_model), y, num_steps=5, progress=False)
    assert capsys.readouterr().err == ""
    fit_svi(conjugate_model, AutoNormal(conjugate_model), y, num_steps=5, clear_param_store=True, progress=True)
    assert "svi" in capsys.readouterr().err


def test_the_demo_shows_progress_bars_with_an_off_switch(capsys, monkeypatch):
    import importlib
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    demo = importlib.import_module("demo")
    x, y, _ = demo.load()
    x, y = x[:64], y[:64]
    for progress in (False, True):
        pyro.clear_param_store()
        demo.train(AutoNormal(demo.model), x, y, steps=3, lr=0.01, progress=progress)
        assert ("svi" in capsys.readouterr().err) is progress

    class StopError(Exception):
        pass

    seen: list[bool] = []

    def first_fit(*args, progress, **kwargs):
        seen.append(progress)
        raise StopError

    monkeypatch.setattr(demo, "train", first_fit)
    for argv, expected in ((["demo.py"], True), (["demo.py", "--no-progress"], False)):
        seen.clear()
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(StopError):
            demo.main()
        assert seen == [expected]


def test_fit_svi_accepts_pyro_optimizers_and_checks_them():
    y = conjugate_data()
    for optim in (
        pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.999}),
        pyro.optim.Adam(lambda name: {"lr": 0.05 if "loc" in name else 0.01}),
    ):
        pyro.clear_param_store()
        trace = fit_svi(conjugate_model, AutoNormal(conjugate_model), y, num_steps=100, optim=optim, progress=False)
        assert np.mean(trace.elbo[-10:]) > np.mean(trace.elbo[:10])
    with pytest.raises(TypeError, match="grad_clip"):
        fit_svi(conjugate_model, AutoNormal(conjugate_model), y, optim=pyro.optim.Adam({"lr": 0.1}, {"clip_norm": 1.0}))
    with pytest.raises(ValueError, match="grad_clip"):
        fit_svi(conjugate_model, AutoNormal(conjugate_model), y, grad_clip=0.0)
    assert fit_svi(conjugate_model, AutoNormal(conjugate_model), y, num_steps=0).elbo == []


@pytest.mark.filterwarnings("ignore:Encountered NaN")
@pytest.mark.parametrize("validate_args", [True, False])
def test_fit_svi_divergence_is_a_clear_error_and_leaves_finite_parameters(validate_args):
    previous = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(validate_args)
    try:
        y = conjugate_data()
        guide = AutoNormal(conjugate_model)
        with pytest.raises(FloatingPointError, match=r"svi: non-finite .* step \d+; .*last finite values"):
            fit_svi(conjugate_model, guide, y, num_steps=50, lr=1e30, progress=False)
        values = _store_values()
        assert values and all(torch.isfinite(v).all() for v in values.values())
        # a NaN gradient at the first step: nothing is stepped
        pyro.clear_param_store()
        guide = AutoNormal(conjugate_model)
        fit_svi(conjugate_model, guide, y, num_steps=5, progress=False)
        before = _store_values()
        hooks = [pyro.param(name).unconstrained().register_hook(lambda g: g * math.nan) for name in before]
        with pytest.raises(FloatingPointError, match="gradient norm nan"):
            fit_svi(conjugate_model, guide, y, num_steps=5, progress=False)
        for hook in hooks:
            hook.remove()
        after = _store_values()
        assert all(torch.equal(after[name], before[name]) for name in before)
    finally:
        torch.distributions.Distribution.set_default_validate_args(previous)


# -------------------------------------------------------------------------------------------------- hardening
def test_the_export_refuses_a_subsampled_plate():
    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("data", 300, subsample_size=50) as idx:
            pyro.sample("x", dist.Normal(mu, 1.0), obs=data[idx])

    data = torch.randn(300)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=r"plate 'data' subsamples 50 of 300 points.*full data"):
        to_inference_data(model, AutoNormal(model), data, num_samples=10)
    with pytest.raises(ValueError, match=r"samples_to_inference_data .* plate 'data'"):
        samples_to_inference_data(model, {"mu": torch.zeros(10)}, data)


def test_importance_weights_refuse_enumerated_sites():
    def mixture(data):
        p = pyro.sample("p", dist.Beta(2.0, 2.0))
        loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Bernoulli(p), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(loc * z, 1.0), obs=data)

    data = torch.randn(20) + 2.0
    pyro.clear_param_store()
    guide = AutoNormal(pyro.poutine.block(mixture, hide=["z"]))
    for diagnostic in (psis_khat, importance_resample):
        with pytest.raises(ValueError, match=r"enumerated discrete sites \['z'\].*drawn by the guide"):
            diagnostic(mixture, guide, data, num_samples=100)
