"""AutoLocalFlow (a global AutoFlow and amortized local flows in a subsampled plate); the export's subsample refusal."""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal, init_to_sample

from pyro_flows.diagnostics import samples_to_inference_data, to_inference_data
from pyro_flows.guides import AutoLocalFlow, flow_optim_args

GROUPS, POINTS, DIM = 60, 5, 2
SMALL = {"hidden_dims": (8,), "local_flow": "affine_coupling", "local_num_flows": 1, "num_flows": 1}


def regression(x: torch.Tensor, y: torch.Tensor, subsample_size: int | None = None, subsample=None) -> None:
    """Hierarchical logistic regression: global (mu, tau), one coefficient vector per group."""
    mu = pyro.sample("mu", dist.Normal(x.new_zeros(DIM), 2.0).to_event(1))
    tau = pyro.sample("tau", dist.HalfNormal(x.new_ones(DIM)).to_event(1))
    with pyro.plate("groups", len(x), subsample_size=subsample_size, subsample=subsample) as idx:
        beta = pyro.sample("beta", dist.Normal(mu, tau).to_event(1))
        logits = (x[idx] * beta.unsqueeze(-2)).sum(-1)
        pyro.sample("y", dist.Bernoulli(logits=logits).to_event(1), obs=y[idx])


def covariates(idx: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return torch.cat([x[idx].flatten(1), y[idx]], -1)


def nested(y: torch.Tensor, subsample_size: int | None = None) -> None:
    """Data plate at dim -2 with an inner plate; a positive local vector and a real local scalar per group."""
    loc = pyro.sample("loc", dist.Normal(0.0, 3.0))
    with pyro.plate("groups", len(y), subsample_size=subsample_size, dim=-2) as idx:
        scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5).expand([1, 2]).to_event(1))
        shift = pyro.sample("shift", dist.Normal(loc, 1.0))
        with pyro.plate("points", y.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(shift, scale.mean(-1)), obs=y[idx])


def only_locals(y: torch.Tensor, subsample_size: int | None = None) -> None:
    with pyro.plate("groups", len(y), subsample_size=subsample_size) as idx:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(z, 1.0), obs=y[idx])


def only_globals(y: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


@pytest.fixture(autouse=True)
def _fresh() -> None:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(GROUPS, POINTS, DIM, generator=gen)
    return x, torch.bernoulli(torch.full((GROUPS, POINTS), 0.5), generator=gen)


def trained(data: tuple[torch.Tensor, torch.Tensor], steps: int = 3, **options: object) -> AutoLocalFlow:
    guide = AutoLocalFlow(regression, covariates, **{**SMALL, **options})
    svi = SVI(regression, guide, pyro.optim.Adam(flow_optim_args(0.01)), Trace_ELBO())
    for _ in range(steps):
        svi.step(*data, subsample_size=16)
    return guide


# ------------------------------------------------------------------------------------------------ the trace split
def test_sites_are_split_and_every_part_trains(data) -> None:
    guide = AutoLocalFlow(regression, covariates, **SMALL)
    guide(*data, subsample_size=8)
    assert (guide.global_sites, guide.local_sites) == (["mu", "tau"], ["beta"])
    assert guide.global_guide.latent_dim == 2 * DIM and guide.local_guide.latent_dim == DIM
    before = {k: v.detach().clone() for k, v in guide.state_dict().items() if torch.is_tensor(v)}
    svi = SVI(regression, guide, pyro.optim.Adam(flow_optim_args(0.05)), Trace_ELBO())
    losses = [svi.step(*data, subsample_size=size) for size in (16, 7, 31, 16)]  # the size may change every step
    assert all(math.isfinite(loss) for loss in losses)
    changed = {k.split(".")[0] for k, v in guide.state_dict().items() if k in before and not torch.equal(v, before[k])}
    assert {"global_guide", "local_guide"} <= changed
    names = set(pyro.get_param_store().keys())
    assert any(".flows." in n.replace("$$$", ".") and n.startswith("AutoLocalFlow.local_guide") for n in names)
    assert any(".flows." in n.replace("$$$", ".") and n.startswith("AutoLocalFlow.global_guide") for n in names)


def test_the_guide_follows_the_models_subsample_and_scales_by_it(data) -> None:
    guide = trained(data)
    guide_trace = poutine.trace(guide).get_trace(*data, subsample_size=12)
    model_trace = poutine.trace(poutine.replay(regression, trace=guide_trace)).get_trace(*data, subsample_size=12)
    indices = guide_trace.nodes["groups"]["value"]
    assert torch.equal(model_trace.nodes["groups"]["value"], indices) and len(indices) == 12
    assert guide_trace.nodes["beta"]["value"].shape == (12, DIM)
    assert guide_trace.nodes["beta"]["scale"] == pytest.approx(GROUPS / 12)
    assert guide_trace.nodes["mu"]["scale"] == 1.0
    given = torch.tensor([3, 1, 40])  # a data loader's indices are followed
    guide_trace = poutine.trace(guide).get_trace(*data, subsample=given)
    assert torch.equal(guide_trace.nodes["groups"]["value"], given)


def test_vectorized_particles_and_a_plate_at_dim_minus_two() -> None:
    y = torch.randn(40, 3)
    guide = AutoLocalFlow(nested, **SMALL)
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True)
    svi = SVI(nested, guide, pyro.optim.Adam(flow_optim_args(0.01)), elbo)
    assert all(math.isfinite(svi.step(y, subsample_size=size)) for size in (8, 5))
    assert guide.local_sites == ["scale", "shift"] and guide.local_guide.latent_dim == 3
    with pyro.plate("particles", 4, dim=-3):
        draw = guide(y, subsample_size=6)
    assert draw["scale"].shape == (4, 6, 1, 2) and draw["shift"].shape == (4, 6, 1) and draw["loc"].shape == (4, 1, 1)
    assert (draw["scale"] > 0).all()
    assert guide(y, subsample_size=6)["scale"].shape == (6, 1, 2)


def test_a_model_without_globals_and_the_default_encoder_input() -> None:
    y = torch.randn(30)
    guide = AutoLocalFlow(only_locals, **SMALL)
    svi = SVI(only_locals, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO(num_particles=3, vectorize_particles=True))
    assert math.isfinite(svi.step(y, subsample_size=10))
    assert guide.global_guide is None and guide.local_sites == ["z"]
    assert guide(y, subsample_size=4)["z"].shape == (4,)


def test_the_guide_density_is_the_change_of_variables_of_the_packed_locals() -> None:
    y = torch.randn(20, 3)
    guide = AutoLocalFlow(nested, **SMALL)
    trace = poutine.trace(guide).get_trace(y, subsample_size=5)
    log_q = {name: site["fn"].log_prob(site["value"]) for name, site in trace.nodes.items() if site["type"] == "sample"}
    packed = trace.nodes[guide._aux_name]["value"]
    scale, shift = trace.nodes["scale"]["value"], trace.nodes["shift"]["value"]
    assert torch.allclose(packed.reshape(5, 3), torch.cat([scale.log().reshape(5, 2), shift.reshape(5, 1)], -1))
    # q(scale, shift) = q(log scale, shift) / prod(scale): the Delta sites carry -log|d scale / d log scale|
    total = log_q[guide._aux_name] + log_q["scale"] + log_q["shift"]
    expected = log_q[guide._aux_name].reshape(5) - scale.log().reshape(5, 2).sum(-1)
    assert torch.allclose(total.reshape(5), expected, atol=1e-5)
    assert trace.nodes["scale"]["scale"] == trace.nodes[guide._aux_name]["scale"] == 4.0  # 20 points, 5 drawn


def test_the_score_input_is_the_gradient_of_each_points_log_density() -> None:
    def normal(y: torch.Tensor, subsample_size: int | None = None) -> None:
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("groups", len(y), subsample_size=subsample_size) as idx:
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            with pyro.plate("points", y.shape[1]):
                pyro.sample("y", dist.Normal(z, 2.0), obs=y[idx].T)

    y = torch.randn(10, 4) + 1.0
    guide = AutoLocalFlow(normal, **SMALL)
    guide(y, subsample_size=5)
    indices, features, _ = guide._probe(y)
    mu = guide.global_guide.loc.detach()  # the scores are taken at the globals' location and z = its prior mean
    assert torch.equal(indices, torch.arange(10))
    assert torch.allclose(features[:, :4], y) and torch.allclose(features[:, -1], (y - mu).sum(-1) / 4.0)


# ------------------------------------------------------------------------------------------ Predictive and ArviZ
def test_predictive_on_the_full_data_and_on_given_indices(data) -> None:
    guide = trained(data)
    for parallel in (True, False):
        draws = Predictive(regression, guide=guide, num_samples=3, parallel=parallel)(*data)
        assert draws["beta"].shape == (3, GROUPS, DIM) and draws["y"].shape == (3, GROUPS, POINTS)
    given = torch.tensor([5, 2])
    draws = Predictive(regression, guide=guide, num_samples=4, parallel=True)(*data, subsample=given)
    assert draws["beta"].shape == (4, 2, DIM)
    with pytest.warns(UserWarning, match="random subsample of the plate 'groups'.*Predictive"):
        Predictive(regression, guide=guide, num_samples=2)(*data, subsample_size=10)


def test_arviz_exports_the_full_data_and_refuses_a_subsample(data) -> None:
    guide = trained(data)
    idata = to_inference_data(regression, guide, *data, num_samples=8)
    assert idata.posterior["beta"].shape == (1, 8, GROUPS, DIM)
    assert idata.posterior["beta"].dims[2] == "groups"
    assert idata.log_likelihood["y"].shape == (1, 8, GROUPS) and idata.observed_data["y"].shape == (GROUPS, POINTS)
    with pytest.raises(ValueError, match=r"plate 'groups' subsamples 16 of 60 points.*subsample_size=None"):
        to_inference_data(regression, guide, *data, subsample_size=16, num_samples=8)


def test_the_export_refuses_every_kind_of_subsampled_plate() -> None:
    data = torch.randn(300)

    def full_size_plate(batch: torch.Tensor, full_size: int = 300) -> None:  # AmortizedFlowGuide's convention
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("data", full_size, subsample=torch.arange(len(batch))):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=batch)

    def sequential(data: torch.Tensor) -> None:
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        for i in pyro.plate("data", len(data), subsample_size=20):
            pyro.sample(f"x_{i}", dist.Normal(mu, 1.0), obs=data[i])

    for model, args in ((full_size_plate, (data[:40],)), (sequential, (data,))):
        guide = AutoNormal(poutine.block(model, hide=[]))
        with pytest.raises(ValueError, match=r"to_inference_data needs the full data, but the plate 'data'"):
            to_inference_data(model, guide, *args, num_samples=5)
        with pytest.raises(ValueError, match=r"samples_to_inference_data needs the full data"):
            samples_to_inference_data(model, {"mu": torch.zeros(5)}, *args)


def test_the_export_warns_about_a_minibatch_scaled_by_hand() -> None:
    def scaled(batch: torch.Tensor) -> None:
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("data", len(batch)), poutine.scale(scale=10.0):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=batch)

    batch = torch.randn(30)
    with pytest.warns(UserWarning, match=r"\['x'\] are scaled by \[10.0\].*mini-batch"):
        samples_to_inference_data(scaled, {"mu": torch.zeros(5)}, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        samples_to_inference_data(only_globals, {"mu": torch.zeros(5)}, batch)


# --------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"encoder_input": 3}, TypeError, "encoder_input must be None, an observed site's name"),
        ({"encoder_input": []}, TypeError, "encoder_input must be"),
        ({"plate": 1}, TypeError, "plate must be a string"),
        ({"local_flow": 3}, TypeError, "local_flow must be a registry name"),
        ({"local_flow": "nonexistent"}, KeyError, "nonexistent"),
        ({"flow": "nonexistent"}, KeyError, "nonexistent"),
        ({"local_flow_kwargs": {"hiden_dims": (8,)}}, TypeError, "hiden_dims"),
        ({"flow_kwargs": {"hiden_dims": (8,)}}, TypeError, "hiden_dims"),
        ({"flow_kwargs": {"init_scale": 1.0}}, TypeError, "arguments of the guide"),
        ({"hidden_dims": ()}, ValueError, "hidden_dims must name at least one width"),
        ({"hidden_dims": (0,)}, ValueError, "hidden_dims"),
        ({"init_scale": -1.0}, ValueError, "init_scale must be a positive"),
        ({"local_num_flows": -1}, ValueError, "local_num_flows"),
        ({"score_input": 1}, TypeError, "score_input must be True or False"),
    ],
)
def test_construction_errors_name_the_argument(options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        AutoLocalFlow(regression, **options)


def test_errors_at_the_first_call_name_the_argument(data) -> None:
    def two_plates(y: torch.Tensor) -> None:
        with pyro.plate("a", len(y), subsample_size=5):
            pyro.sample("u", dist.Normal(0.0, 1.0))
        with pyro.plate("b", len(y), subsample_size=5) as idx:
            pyro.sample("v", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(0.0, 1.0), obs=y[idx])

    def discrete(y: torch.Tensor) -> None:
        with pyro.plate("groups", len(y), subsample_size=5) as idx:
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("y", dist.Normal(c, 1.0), obs=y[idx])

    y = torch.randn(20)
    cases = [
        (AutoLocalFlow(regression, "yy"), data, ValueError, "encoder_input names 'yy', which is no site of the model"),
        (AutoLocalFlow(regression, "beta"), data, ValueError, "'beta', which is no observed site inside the plate"),
        (AutoLocalFlow(regression, lambda idx, x, y, **kw: x[:3]), data, ValueError, "one row per data point"),
        (AutoLocalFlow(only_globals), (y,), ValueError, "no local latent site: no latent site is inside a subsampled"),
        (AutoLocalFlow(only_globals, plate="nope"), (y,), ValueError, "plate='nope' is not a plate of the model"),
        (AutoLocalFlow(only_globals, plate="data"), (y,), ValueError, "no latent site is inside plate='data'"),
        (AutoLocalFlow(two_plates), (y,), NotImplementedError, r"several subsampled plates \['a', 'b'\]"),
        (AutoLocalFlow(discrete), (y,), ValueError, "discrete sample site 'c'"),  # Pyro's own check
        (AutoLocalFlow(discrete, init_loc_fn=init_to_sample), (y,), ValueError, "local site 'c' is discrete"),
    ]
    for guide, args, error, match in cases:
        with pytest.raises(error, match=match):
            guide(*args, subsample_size=16) if args is data else guide(*args)
    guide = trained(data)
    with pytest.raises(NotImplementedError, match=r"global_guide.median"):
        guide.median(*data)
    assert set(guide.global_guide.median(*data)) == {"mu", "tau"}
    parent = AutoGuideList(regression)
    parent.append(AutoLocalFlow(regression, covariates))
    with pytest.raises(NotImplementedError, match="must be the whole guide"):
        parent(*data, subsample_size=16)


# --------------------------------------------------------------------------------------------------- checkpoints
def test_pickle_deepcopy_torch_save_and_state_dict_round_trips(data) -> None:
    guide = trained(data)
    given = torch.tensor([0, 7, 9])

    def draw(g: AutoLocalFlow) -> dict:
        pyro.set_rng_seed(3)
        return g(*data, subsample=given)

    expected = draw(guide)
    buffer = io.BytesIO()
    torch.save(guide, buffer)
    buffer.seek(0)
    clones = [pickle.loads(pickle.dumps(guide)), copy.deepcopy(guide), torch.load(buffer, weights_only=False)]
    for clone in clones:  # each in a store of its own (guides of one name share the store's parameters)
        pyro.clear_param_store()
        assert all(torch.equal(draw(clone)[k], v) for k, v in expected.items())
        svi = SVI(regression, clone, pyro.optim.Adam(flow_optim_args(0.01)), Trace_ELBO())
        assert math.isfinite(svi.step(*data, subsample_size=8))  # trains on after the round trip
    pyro.clear_param_store()
    assert all(torch.equal(draw(guide)[k], v) for k, v in expected.items())  # the original works on
    fresh = AutoLocalFlow(regression, covariates, **SMALL, name="fresh")
    fresh(*data, subsample_size=4)
    fresh.load_state_dict(guide.state_dict())
    assert all(torch.allclose(draw(fresh)[k], v) for k, v in expected.items())
    other = AutoLocalFlow(regression, covariates, **{**SMALL, "hidden_dims": (4,)}, name="other")
    other(*data, subsample_size=4)
    with pytest.raises(ValueError, match=r"hidden_dims: \(8,\) in the checkpoint, \(4,\) here"):
        other.load_state_dict(guide.state_dict())
    untrained = AutoLocalFlow(regression, covariates, **SMALL, name="untrained")
    assert pickle.loads(pickle.dumps(untrained))(*data, subsample_size=4)["beta"].shape == (4, DIM)


def test_trace_module_traces_the_guides_call(data) -> None:
    guide = trained(data)
    given = torch.tensor([0, 7, 9])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace_module(guide, {"call": (*data,)}, check_trace=False)
    pyro.set_rng_seed(3)
    expected = guide.call(*data)
    pyro.set_rng_seed(3)
    actual = traced.call(*data)
    assert len(actual) == len(expected) > 0
    assert all(torch.allclose(a, e, atol=1e-5) for a, e in zip(actual, expected, strict=True))
    assert guide(*data, subsample=given)["beta"].shape == (3, DIM)  # the guide itself is unchanged


def test_the_local_iaf_has_the_amortized_guides_affine_default() -> None:
    from pyro_flows.transforms import Permutation
    from pyro_flows.transforms._network_flows import AffineMap, GatedMap

    y = torch.randn(40, 3)
    for local_flow_kwargs, kind in ((None, AffineMap), ({"gated": True}, GatedMap)):
        pyro.clear_param_store()
        guide = AutoLocalFlow(nested, hidden_dims=(8,), num_flows=1, local_flow_kwargs=local_flow_kwargs)
        guide(y, subsample_size=8)
        iaf = [layer for layer in guide.local_guide.flows if not isinstance(layer, Permutation)]
        assert len(iaf) == 2 and all(isinstance(layer.elementwise, kind) for layer in iaf)


def test_amortized_guide_init_scale_starts_at_a_constant_gaussian() -> None:
    from torch import nn

    from pyro_flows.guides import AmortizedFlowGuide

    guide = AmortizedFlowGuide(nn.Linear(3, 4), 4, 2, init_scale=0.2)
    base = guide.posterior(torch.randn(5, 3)).base_dist.base_dist
    assert torch.equal(base.loc, torch.zeros(5, 2)) and torch.allclose(base.scale, torch.full((5, 2), 0.2))
    with pytest.raises(ValueError, match="init_scale"):
        AmortizedFlowGuide(nn.Linear(3, 4), 4, 2, init_scale=0.0)


# ------------------------------------------------------------------------------------------------------- quality
def conjugate(y: torch.Tensor, subsample_size: int | None = None) -> None:
    """mu ~ N(0, 10), z_i ~ N(mu, 1), y_i ~ N(z_i, 2): mean-field guides get sd(mu) about sqrt(1/5) too small."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("groups", len(y), subsample_size=subsample_size) as idx:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("y", dist.Normal(z, 2.0), obs=y[idx])


@pytest.mark.slow
def test_the_guide_recovers_a_posterior_that_autonormal_gets_wrong() -> None:
    groups = 200
    y = 1.0 + torch.randn(groups, generator=torch.Generator().manual_seed(0)) * math.sqrt(5.0)
    precision = 1 / 100 + groups / 5  # the exact posterior of mu (z marginalized: y_i ~ N(mu, 1 + 4))
    exact_mean, exact_sd = (y.sum() / 5 / precision).item(), precision**-0.5
    guides = {
        "flow": AutoLocalFlow(conjugate, hidden_dims=(16,), local_flow=None, num_flows=1),
        "normal": AutoNormal(conjugate),
    }
    for guide in guides.values():
        optim = pyro.optim.ClippedAdam({"lr": 0.02, "lrd": 0.05 ** (1 / 1500)})
        svi = SVI(conjugate, guide, optim, Trace_ELBO(num_particles=8, vectorize_particles=True))
        for _ in range(1500):
            svi.step(y, subsample_size=50)
    mu = Predictive(conjugate, guide=guides["flow"], num_samples=4000, return_sites=["mu"], parallel=True)(y)["mu"]
    assert abs(mu.mean().item() - exact_mean) < 0.3 * exact_sd
    assert mu.std().item() == pytest.approx(exact_sd, rel=0.12)
    assert guides["normal"].scales.mu.item() < 0.6 * exact_sd  # mean-field: sqrt(1/5) = 0.45 of the exact sd
