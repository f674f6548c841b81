"""AmortizedFlowGuide: a plain Pyro guide for local latents, with conditional flows on the encoder state."""

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
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from pyro_flows.guides.amortized import AmortizedFlowGuide
from pyro_flows.transforms import conditional_registry
from pyro_flows.transforms.linear import Permutation

DATA, HIDDEN, LATENT = 4, 6, 3
VAE_FLOWS = (
    "planar",
    "radial",
    "householder",
    "convex_triangular",
    "iaf",
    "sylvester_orthogonal",
    "sylvester_householder",
    "sylvester_triangular",
)


def encoder() -> nn.Module:
    return nn.Sequential(nn.Linear(DATA, HIDDEN), nn.Tanh())


def model(x: torch.Tensor, full_size: int | None = None) -> None:
    batch = x.shape[0]
    with pyro.plate("data", full_size or batch, subsample=torch.arange(batch)):
        z = pyro.sample("z", dist.Normal(x.new_zeros(LATENT), 1.0).to_event(1))
        loc = torch.cat([z, z[..., :1]], -1)
        pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)


def perturb(module: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.fixture(autouse=True)
def _fresh() -> None:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)


@pytest.mark.parametrize("flow", [None, "elementwise_affine", ("householder", "triangular")])
def test_svi_trains_encoder_heads_and_flows(flow: object) -> None:
    if flow is not None and any(f not in conditional_registry for f in ([flow] if isinstance(flow, str) else flow)):
        pytest.skip("flow not registered")
    guide = AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow=flow, num_flows=2)
    x = torch.randn(8, DATA)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    before = {
        k: v.detach().clone() for k, v in guide.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()
    }
    losses = [svi.step(x, full_size=40) for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = {k for k, v in guide.state_dict().items() if k in before and not torch.equal(v, before[k])}
    assert any(k.startswith("encoder") for k in changed)
    assert any(k.startswith("loc_head") for k in changed)
    if flow is not None:
        assert any(k.startswith("flows") for k in changed)


@pytest.mark.parametrize("flow", VAE_FLOWS)
def test_every_vae_flow_works_with_vectorized_particles(flow: str) -> None:
    if flow not in conditional_registry:
        pytest.skip(f"{flow} not registered yet")
    guide = AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow=flow, num_flows=2)
    perturb(guide)
    x = torch.randn(5, DATA)
    elbo = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.differentiable_loss(model, guide, x)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in guide.parameters())
    with pyro.plate("particles", 3, dim=-2):
        z = poutine.trace(guide).get_trace(x).nodes["z"]["value"]
    assert z.shape == (3, 5, LATENT)
    # Batched flows with per-datapoint contexts: each row equals the row computed alone.
    q_all = guide.posterior(x)
    z1 = q_all.sample((2,))
    lp_all = q_all.log_prob(z1)
    lp_one = torch.stack([guide.posterior(x[i : i + 1]).log_prob(z1[:, i : i + 1])[:, 0] for i in range(5)], -1)
    # Björck orthonormalization stops when the whole batch is orthonormal to float32 round-off (~1e-5 per entry)
    atol = 1e-3 if flow == "sylvester_orthogonal" else 1e-4
    assert torch.allclose(lp_all, lp_one, atol=atol)


def test_log_prob_of_own_samples_equals_recomputed_log_prob() -> None:
    guide = AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow=("elementwise_affine", "lu"), num_flows=3).double()
    perturb(guide)
    x = torch.randn(6, DATA, dtype=torch.float64)
    q = guide.posterior(x)
    z = q.rsample((4,))
    cached = q.log_prob(z)
    fresh = guide.posterior(x).log_prob(z.clone())
    assert torch.allclose(cached, fresh, atol=1e-8)
    # and the flows really depend on the encoder state (context)
    h = guide.encode(x)[2]
    z0 = torch.randn(6, LATENT, dtype=torch.float64)
    t1, t2 = guide.transforms(h), guide.transforms(h.flip(0))
    y1, y2 = z0, z0
    for a, b in zip(t1, t2, strict=True):
        y1, y2 = a(y1), b(y2)
    assert not torch.allclose(y1, y2)


def test_plate_scale_uses_full_size() -> None:
    guide = AmortizedFlowGuide(encoder(), HIDDEN, LATENT)
    site = poutine.trace(guide).get_trace(torch.randn(5, DATA), full_size=50).nodes["z"]
    assert site["scale"] == pytest.approx(10.0)
    assert site["value"].shape == (5, LATENT)
    with pytest.raises(ValueError, match="smaller than the batch"):
        guide(torch.randn(5, DATA), full_size=3)


def test_subsampling_plate_shares_indices_with_the_model() -> None:
    data = torch.randn(20, DATA)
    seen: dict[str, torch.Tensor] = {}

    def subsampled_model(x: torch.Tensor) -> None:
        with pyro.plate("data", len(x), subsample_size=4) as idx:
            seen["idx"] = idx
            z = pyro.sample("z", dist.Normal(x.new_zeros(LATENT), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(torch.cat([z, z[..., :1]], -1), 1.0).to_event(1), obs=x[idx])

    guide = AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow="elementwise_affine", subsample_size=4)
    guide_trace = poutine.trace(guide).get_trace(data)
    poutine.replay(subsampled_model, trace=guide_trace)(data)
    assert torch.equal(seen["idx"], guide_trace.nodes["data"]["value"])
    assert guide_trace.nodes["z"]["scale"] == pytest.approx(5.0)
    assert torch.isfinite(torch.tensor(Trace_ELBO().loss(subsampled_model, guide, data)))


def test_permutation_rule_between_blocks() -> None:
    h = torch.randn(2, HIDDEN)
    tri = AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow="triangular", num_flows=3)
    assert len(tri.flows) == len(tri.transforms(h)) == 5
    assert isinstance(tri.transforms(h)[1], Permutation)
    aff = AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow="elementwise_affine", num_flows=3)
    assert len(aff.transforms(h)) == 3
    assert (
        len(AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow="triangular", num_flows=3, permutation=None).flows) == 3
    )


def test_a_block_is_repeated_num_flows_times() -> None:
    guide = AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow=("householder", "triangular"), num_flows=2)
    kinds = [type(layer).__name__ for layer in guide.flows]
    assert kinds == ["Householder", "Triangular", "Permutation", "Householder", "Triangular"]


@pytest.mark.parametrize("latent", [4, 5])
def test_coupling_moves_every_coordinate(latent: int) -> None:
    guide = AmortizedFlowGuide(encoder(), HIDDEN, latent, flow="affine_coupling", num_flows=4)
    perturb(guide)
    h = guide.encode(torch.randn(50, DATA))[2]
    z0 = torch.randn(50, latent)
    z = z0
    for transform in guide.transforms(h):
        z = transform(z)
    assert ((z - z0).abs().amax(0) > 1e-3).all()


def test_ready_made_layers_are_used_as_given() -> None:
    layers = [conditional_registry["elementwise_affine"](LATENT, HIDDEN), Permutation(LATENT)]
    layers.append(conditional_registry["lu"](LATENT, HIDDEN).flow)
    guide = AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow=layers)
    assert list(guide.flows) == layers
    assert math.isfinite(Trace_ELBO().loss(model, guide, torch.randn(3, DATA)))
    with pytest.raises(ValueError, match="event shape"):
        AmortizedFlowGuide(encoder(), HIDDEN, LATENT + 1, flow=layers)
    with pytest.raises(TypeError, match="registry names"):
        AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow=[layers[0], "lu"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="num_flows"):
        AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow=layers, num_flows=2)


def test_bad_configuration_and_inputs_raise_clear_errors() -> None:
    with pytest.raises(KeyError, match="registered flows are"):
        AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow="no_such_flow")
    with pytest.raises(ValueError, match="context_dim"):
        AmortizedFlowGuide(encoder(), 0, LATENT)
    with pytest.raises(TypeError, match="hiden_dims"):
        AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow="iaf", flow_kwargs={"hiden_dims": (8,)})
    with pytest.raises(ValueError, match="context_hidden_dims"):
        AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow="planar", flow_kwargs={"context_hidden_dims": 8})
    with pytest.raises(TypeError, match="gated"):
        AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow_kwargs={"gated": False})
    with pytest.raises(ValueError, match="num_flows"):
        AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow="planar", num_flows=-1)
    bad = AmortizedFlowGuide(nn.Linear(DATA, HIDDEN + 1), HIDDEN, LATENT)
    with pytest.raises(ValueError, match="encoder must return"):
        bad.posterior(torch.randn(3, DATA))
    with pytest.raises(TypeError, match="data tensor"):
        AmortizedFlowGuide(encoder(), HIDDEN, LATENT)([1.0, 2.0])  # type: ignore[arg-type]


def test_a_one_dimensional_latent_takes_coupling_flows() -> None:
    def scalar_model(x: torch.Tensor, full_size: int | None = None) -> None:
        with pyro.plate("data", full_size or len(x), subsample=torch.arange(len(x))):
            z = pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.expand(*z.shape[:-1], DATA), 1.0).to_event(1), obs=x)

    for flow, kind in (("affine_coupling", "ElementwiseAffine"), ("spline_coupling", "SplineInverseAutoregressive")):
        guide = AmortizedFlowGuide(encoder(), HIDDEN, 1, flow=flow, num_flows=2, flow_kwargs={"hidden_dims": (8,)})
        assert [type(layer).__name__ for layer in guide.flows] == [kind, kind]
        assert all(layer.context_dim == HIDDEN for layer in guide.flows)
        elbo = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
        assert math.isfinite(elbo.loss(scalar_model, guide, torch.randn(5, DATA)))


def _iaf_log_dets(guide: AmortizedFlowGuide, x: torch.Tensor) -> torch.Tensor:
    """Log-dets of each IAF layer of the guide at its own samples, shape ``(layers, batch)``."""
    _, _, h = guide.encode(x)
    z = torch.randn(len(x), LATENT)
    log_dets = []
    for layer, transform in zip(guide.flows, guide.transforms(h), strict=True):
        y = transform(z)
        if not isinstance(layer, Permutation):
            log_dets.append(transform.log_abs_det_jacobian(z, y))
        z = y
    return torch.stack(log_dets)


def test_iaf_defaults_to_the_affine_update_and_gated_is_one_option_away() -> None:
    from pyro_flows.guides.amortized import AMORTIZED_FAMILY_DEFAULTS
    from pyro_flows.transforms._network_flows import AffineMap, GatedMap

    assert AMORTIZED_FAMILY_DEFAULTS["iaf"] == {"gated": False}
    x = torch.randn(64, DATA)
    pyro.set_rng_seed(1)
    default = AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow="iaf", num_flows=2)
    pyro.set_rng_seed(1)
    explicit = AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow="iaf", num_flows=2, flow_kwargs={"gated": False})
    gated = AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow="iaf", num_flows=2, flow_kwargs={"gated": True})
    iaf_layers = [layer for layer in default.flows if not isinstance(layer, Permutation)]
    assert len(iaf_layers) == 2 and all(isinstance(layer.elementwise, AffineMap) for layer in iaf_layers)
    assert all(isinstance(layer.elementwise, GatedMap) for layer in gated.flows if not isinstance(layer, Permutation))
    # the default is the explicit affine guide, draw for draw (and setting for setting); the gated one has the same
    # parameters (shapes), and only its recorded settings tell its checkpoint apart
    tensors = {
        guide: {k: v for k, v in guide.state_dict().items() if k != "_extra_state"}
        for guide in (default, explicit, gated)
    }
    assert tensors[default].keys() == tensors[explicit].keys()
    assert all(torch.equal(value, tensors[explicit][key]) for key, value in tensors[default].items())
    assert default.state_dict()["_extra_state"] == explicit.state_dict()["_extra_state"]
    assert {k: v.shape for k, v in tensors[gated].items()} == {k: v.shape for k, v in tensors[default].items()}
    # behaviour: the affine update log e^s = s takes both signs (scales up and down); the gated one only shrinks
    for guide in (default, gated):
        perturb(guide)
    with torch.no_grad():
        affine_ld, gated_ld = _iaf_log_dets(default, x), _iaf_log_dets(gated, x)
    assert (affine_ld > 0).any() and (affine_ld < 0).any()
    assert (gated_ld < 0).all()
    # the defaults reach every block containing the family, and the gated options still work when asked for
    block = AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow=("planar", "iaf"), num_flows=1)
    assert isinstance(block.flows[1].elementwise, AffineMap)
    biased = AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow="iaf", flow_kwargs={"gated": True, "gate_bias": 3.0})
    assert biased.flows[0].elementwise.gate_bias == 3.0
    with pytest.raises(ValueError, match="gate_bias sets the gated update"):
        AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow="iaf", flow_kwargs={"gate_bias": 3.0})


@pytest.mark.parametrize("flow", ["iaf", "planar", "sylvester_householder"])
def test_pickle_deepcopy_and_torch_save_after_training(flow: str) -> None:
    # pyro.module tags each parameter with a weakref (param.unconstrained): the guide must pickle all the same
    guide = AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow=flow, num_flows=2)
    x = torch.randn(5, DATA)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    assert math.isfinite(svi.step(x))
    buffer = io.BytesIO()
    torch.save(guide, buffer)
    buffer.seek(0)
    expected = guide.posterior(x).base_dist.mean
    for clone in (pickle.loads(pickle.dumps(guide)), copy.deepcopy(guide), torch.load(buffer, weights_only=False)):
        assert torch.equal(clone.posterior(x).base_dist.mean, expected)
    assert math.isfinite(svi.step(x))  # the original trains on


def test_trace_module_traces_the_guide() -> None:
    guide = AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow="iaf", num_flows=2)
    perturb(guide)
    x = torch.randn(5, DATA)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace_module(guide, {"forward": (x,)}, check_trace=False)
    pyro.set_rng_seed(3)
    expected = guide(x)
    pyro.set_rng_seed(3)
    assert torch.allclose(traced(x), expected, atol=1e-6)


def test_a_checkpoint_of_other_flow_settings_is_refused_and_one_without_settings_loads() -> None:
    """The gated and the affine IAF have parameters of the same shapes: the recorded settings tell them apart."""
    affine = AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow="iaf", num_flows=2)
    gated = AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow="iaf", num_flows=2, flow_kwargs={"gated": True})
    assert affine.state_dict()["_extra_state"]["flow_kwargs"] == {"gated": False}
    with pytest.raises(ValueError, match=r"flow_kwargs: \{'gated': True\} in the checkpoint, \{'gated': False\} here"):
        affine.load_state_dict(gated.state_dict())
    for other, mismatch in (
        (AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow="iaf", num_flows=2, permutation=None), "permutation"),
        (AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow="iaf", num_flows=2, min_scale=1e-3), "min_scale"),
    ):
        with pytest.raises(ValueError, match=f"{mismatch}: .* in the checkpoint"):
            other.load_state_dict(affine.state_dict())
    # the same settings written out load; so does a checkpoint saved before guides recorded their settings
    explicit = AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow="iaf", num_flows=2, flow_kwargs={"gated": False})
    explicit.load_state_dict(affine.state_dict())
    legacy = {k: v for k, v in gated.state_dict().items() if k != "_extra_state"}
    affine.load_state_dict(legacy)
    assert all(torch.equal(v, affine.state_dict()[k]) for k, v in legacy.items())
    # ready-made layers record their classes
    ready = AmortizedFlowGuide(encoder(), HIDDEN, LATENT, flow=[conditional_registry["planar"](LATENT, HIDDEN)])
    assert ready.state_dict()["_extra_state"]["flow"] == ("ConditionalFlow",)
