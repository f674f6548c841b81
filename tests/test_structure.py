"""One definition per family, one stack builder: the structural guarantees of ``pyro_flows.transforms``.

Regression tests of the bugs that parallel class hierarchies caused (drifting conditional signatures, stacks that
never transform some coordinates, ignored keyword arguments, stale log-dets, frozen conditioned parameters).
"""

from __future__ import annotations

import copy
import inspect
import math
import pickle

import pytest
import torch

from pyro_flows.transforms import (
    MaskedAutoregressive,
    Permutation,
    Planar,
    build_flows,
    condition_flows,
    conditional_registry,
    registry,
)
from pyro_flows.transforms.registry import factory_keywords

NAMES = sorted(registry)


def _keywords(factory: object, skip: int) -> set[str]:
    parameters = list(inspect.signature(factory).parameters.values())[skip:]
    return {p.name for p in parameters if p.kind is not p.VAR_KEYWORD}


def _perturb(module: torch.nn.Module, scale: float = 0.5) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else 1
            p.add_(scale / math.sqrt(fan_in) * torch.randn_like(p))
    return module


@pytest.mark.parametrize("name", sorted(conditional_registry))
def test_conditional_factory_takes_exactly_the_unconditional_keywords(name: str) -> None:
    assert _keywords(conditional_registry[name], skip=2) == factory_keywords(registry[name]) - {"context_dim"}
    defaults = {
        p.name: p.default
        for p in inspect.signature(registry[name]).parameters.values()
        if p.default is not p.empty and p.name != "context_dim"
    }
    flow = conditional_registry[name](4, 2, **defaults)  # every unconditional keyword is accepted
    assert flow.context_dim == 2 and tuple(flow.event_shape) == (4,)


@pytest.mark.parametrize("name", ["lu", "householder", "triangular"])
def test_bias_keyword_works_for_the_conditional_variant(name: str) -> None:
    flow = conditional_registry[name](3, 2, bias=False)
    assert flow.condition(torch.randn(2))(torch.randn(3)).shape == (3,)


@pytest.mark.parametrize("name", NAMES)
def test_the_same_spec_gives_the_same_layers_with_and_without_context(name: str) -> None:
    plain = build_flows(name, 4, 3)
    if not registry[name].has_conditional:
        return
    conditional = build_flows(name, 4, 3, context_dim=2)
    assert [type(layer) for layer in plain] == [type(layer) for layer in conditional]
    expected = [registry[name], Permutation] * 2 + [registry[name]] if registry[name].needs_permutation else None
    assert [type(layer) for layer in plain] == (expected or [registry[name]] * 3)


def test_blocks_repeat_and_count_the_same_everywhere() -> None:
    layers = build_flows(("lu", "leaky_relu"), 3, num_flows=2)
    assert [type(layer).__name__ for layer in layers] == ["LU", "LeakyReLU", "LU", "LeakyReLU"]
    assert build_flows("planar", 3, 0) == []


@pytest.mark.parametrize("name", ["affine_coupling", "spline_coupling"])
@pytest.mark.parametrize("dim", range(2, 10))
@pytest.mark.parametrize("context", [False, True], ids=["plain", "conditional"])
def test_two_coupling_layers_transform_every_coordinate(name: str, dim: int, context: bool) -> None:
    layers = [_perturb(layer) for layer in build_flows(name, dim, 2, context_dim=2 if context else 0)]
    x = torch.randn(64, dim)
    y = x
    for transform in condition_flows(layers, torch.randn(64, 2) if context else None):
        y = transform(y)
    unmoved = [i for i in range(dim) if torch.equal(torch.sort(y[:, i]).values, torch.sort(x[:, i]).values)]
    assert not unmoved, f"coordinates {unmoved} pass through every layer"


def test_unknown_and_unused_keywords_fail_at_construction() -> None:
    with pytest.raises(TypeError, match="hidden_dims"):
        build_flows("planar", 3, 2, hidden_dims=(7,))
    with pytest.raises(TypeError, match="hiden_dims"):
        build_flows("iaf", 3, 2, hiden_dims=(7,))
    with pytest.raises(TypeError, match="hiden"):
        registry["lu"](3, hiden=1)
    with pytest.raises(ValueError, match="hidden_dims"):
        registry["iaf"](3, hidden_dims=-4)
    with pytest.raises(ValueError, match="gate_bias"):
        registry["iaf"](3, gated=False, gate_bias=2.0)
    with pytest.raises(ValueError, match="log_scale_bound"):
        registry["iaf"](3, log_scale_bound=2.0)
    with pytest.raises(ValueError, match="context_hidden_dims"):
        registry["planar"](3, context_dim=2, context_hidden_dims=64)
    # a keyword that only some families of a block take goes to those families
    layers = build_flows(("iaf", "lu"), 3, 1, hidden_dims=(8,))
    assert layers[0].made.hidden_dims == (8,)


@pytest.mark.parametrize("flow", [lambda: Planar(3), lambda: MaskedAutoregressive(3, (8,))], ids=["planar", "maf"])
def test_disabled_cache_recomputes_the_log_det_after_a_parameter_change(flow) -> None:
    module = _perturb(flow().double()).with_cache(0)
    x = torch.randn(4, 3, dtype=torch.float64)
    y = module(x)
    before = module.log_abs_det_jacobian(x, y)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(1.5)
    after = module.log_abs_det_jacobian(x, y)
    # a copy of the changed module has never seen (x, y): its log-det is computed from the current parameters
    fresh = copy.deepcopy(module)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, fresh.log_abs_det_jacobian(x.clone(), y.clone()), atol=1e-12)
    # the transform-level (x, y) cache is off too: the same x maps through the new parameters
    assert torch.allclose(module(x), fresh(x.clone()), atol=1e-12) and not torch.allclose(module(x), y)


@pytest.mark.parametrize("name", ["planar", "maf", "sylvester_householder"])
def test_a_conditioned_flow_reads_live_parameters_across_optimizer_steps(name: str) -> None:
    torch.manual_seed(0)
    flow = conditional_registry[name](3, 2)
    context = torch.randn(5, 2)
    conditioned = flow.condition(context)
    optimizer = torch.optim.SGD(flow.parameters(), lr=0.1)
    x0 = torch.randn(5, 3)
    outputs = []
    for _ in range(3):
        x = x0.clone()  # a new batch each step (the transform caches the last (x, y) pair by identity, as torch's do)
        y = conditioned(x)
        with torch.no_grad():  # conditioned once, before the steps: the same map as conditioning now
            assert torch.allclose(y, flow.condition(context)(x0.clone()), atol=1e-6)
        loss = (y**2).sum() - conditioned.log_abs_det_jacobian(x, y).sum()
        optimizer.zero_grad()
        loss.backward()  # no "backward through the graph a second time"
        optimizer.step()
        outputs.append(y.detach())
    assert not torch.allclose(outputs[0], outputs[-1])


def test_constraints_are_class_level_and_sign_is_safe_to_probe() -> None:
    flow = registry["iaf"](3)
    assert flow.domain is type(flow).domain and flow.codomain is type(flow).codomain
    assert not hasattr(flow, "sign")
    assert registry["elementwise_affine"](3).sign == 1


def test_load_state_dict_with_assign_follows_the_new_dtype() -> None:
    flow = registry["iaf"](3, hidden_dims=(8,))
    flow(torch.randn(2, 3))
    state = {k: v.double() for k, v in flow.state_dict().items()}
    flow.load_state_dict(state, assign=True)
    assert flow(torch.randn(2, 3, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(TypeError, match="dtype"):
        flow(torch.randn(2, 3))


@pytest.mark.parametrize("name", NAMES)
def test_flows_pickle_and_deepcopy_after_a_differentiable_call(name: str) -> None:
    flow = registry[name](3)
    x = torch.randn(4, 3, requires_grad=True)
    y = flow(x)
    flow.log_abs_det_jacobian(x, y)
    for clone in (copy.deepcopy(flow), pickle.loads(pickle.dumps(flow))):
        assert torch.allclose(clone(x.detach()), y.detach(), atol=1e-6)


def _one_line_error(kind: type[Exception], match: str, call) -> None:
    with pytest.raises(kind, match=match) as info:
        call()
    assert "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("name", ["maf", "planar", "affine_coupling", "sylvester_householder"])
def test_context_batch_mismatch_is_a_clear_error(name: str) -> None:
    flow = conditional_registry[name](3, 2)
    _one_line_error(
        ValueError, "does not broadcast with the context", lambda: flow.condition(torch.randn(4, 2))(torch.randn(5, 3))
    )
    _one_line_error(ValueError, "non-finite", lambda: flow.condition(torch.full((4, 2), math.nan)))
    with pytest.raises(ValueError, match="condition"):
        flow.flow(torch.randn(5, 3))


@pytest.mark.parametrize("name", NAMES)
def test_an_empty_batch_gives_empty_outputs(name: str) -> None:
    flow = registry[name](3)
    y = flow(torch.zeros(0, 3))
    assert y.shape == (0, 3) and flow.log_abs_det_jacobian(torch.zeros(0, 3), y).shape == (0,)


@pytest.mark.parametrize("name", ["planar", "sylvester_householder", "sylvester_triangular", "sylvester_orthogonal"])
def test_non_finite_input_to_a_newton_inverse_is_named(name: str) -> None:
    _one_line_error(ValueError, "non-finite", lambda: registry[name](3).inv(torch.full((2, 3), math.nan)))


@pytest.mark.parametrize("logit", [-1000.0, -100.0, -40.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_a_numerically_singular_gated_inverse_raises(dtype: torch.dtype, logit: float) -> None:
    """Gate logits far below the dtype's precision: the forward map squashes x into the rounding of m.

    At -1000 sigmoid underflows to 0 in both dtypes (the inverse would be non-finite); at -100 and -40 float64 keeps
    a positive gate, and the inverse returned finite values with no correct digit: both are refused.
    """
    torch.manual_seed(0)
    flow = registry["iaf"](3, hidden_dims=(8,)).to(dtype)
    with torch.no_grad():
        flow.made.layout.views(flow.made.raw)["output.bias"].fill_(logit)
    y = flow(torch.randn(4, 3, dtype=dtype))
    flow.clear_cache()
    with pytest.raises(FloatingPointError, match="gated=False"):
        flow.inv(y)


@pytest.mark.parametrize("logit", [90.0, 100.0, 1000.0])
def test_a_saturated_open_gate_inverts_exactly_in_float32(logit: float) -> None:
    """Gate logits beyond +90 in float32: sigma rounds to 1, the map is the identity and so is its inverse."""
    torch.manual_seed(0)
    flow = registry["iaf"](3, hidden_dims=(8,))
    with torch.no_grad():
        flow.made.layout.views(flow.made.raw)["output.bias"].view(2, 3)[1].fill_(logit)  # the gate row of (m, g)
    x = torch.randn(4, 3)
    y = flow(x)
    flow.clear_cache()
    x_rec = flow.inv(y)
    assert torch.isfinite(x_rec).all() and torch.allclose(x_rec, x, atol=1e-6)
    assert torch.isfinite(flow.log_abs_det_jacobian(x_rec, y)).all()


@pytest.mark.parametrize("name", ["sylvester_orthogonal", "residual"])
def test_tracing_a_data_dependent_flow_is_refused(name: str) -> None:
    flow = registry[name](3)
    with pytest.raises(RuntimeError, match="cannot be traced"):
        torch.jit.trace(flow, torch.randn(2, 3), check_trace=False)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: registry["spline_coupling"](3, bound=math.nan), "bound"),
        (lambda: registry["spline_coupling"](3, bound=math.inf), "bound"),
        (lambda: registry["spline_iaf"](3, num_bins=1500), "num_bins"),
        (lambda: registry["spline_maf"](3, num_bins=2.5), "num_bins"),
        (lambda: registry["affine_coupling"](3, log_scale_bound=math.inf), "log_scale_bound"),
        (lambda: registry["maf"](3, log_scale_bound=math.nan), "log_scale_bound"),
        (lambda: registry["iaf"](3, gate_bias=math.nan), "gate_bias"),
        (lambda: registry["householder"](3, num_reflections=0), "num_reflections"),
        (lambda: registry["residual"](3, num_samples=0), "num_samples"),
    ],
)
def test_bad_hyper_parameters_are_rejected_at_construction(make, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_planar_constraint_holds_for_extreme_raw_parameters(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    flow = Planar(5).to(dtype)
    with torch.no_grad():
        flow.u.copy_(-1e6 * flow.w / flow.w.pow(2).sum() + torch.randn(5, dtype=dtype))
    u_hat, _ = flow._u_hat(flow.u, flow.w)
    assert (flow.w.double() * u_hat.double()).sum() > -1.0  # the Jacobian's determinant stays positive
    x = torch.randn(50, 5, dtype=dtype)
    y = flow(x)
    assert torch.isfinite(flow.log_abs_det_jacobian(x, y)).all()
    with torch.no_grad():
        flow.w.zero_()  # w = 0: a translation, log-det 0, exact inverse
    x = x.clone()  # a new input (the transform caches the last pair by identity)
    y = flow(x)
    assert torch.equal(flow.log_abs_det_jacobian(x, y), torch.zeros(50, dtype=dtype))
    flow.clear_cache()
    assert torch.allclose(flow.inv(y), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_radial_stays_finite_for_extreme_raw_parameters(dtype: torch.dtype) -> None:
    flow = registry["radial"](4).to(dtype)
    with torch.no_grad():
        flow.raw_alpha.fill_(1e6)
    x = torch.randn(6, 4, dtype=dtype)
    y = flow(x)
    assert torch.isfinite(y).all() and torch.isfinite(flow.log_abs_det_jacobian(x, y)).all()
