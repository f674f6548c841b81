"""IAF / MAF / spline autoregressive flows: triangular structure, pass counts, spline precision, initialization."""

from __future__ import annotations

import functools
import math

import pyro.distributions as dist
import pytest
import torch
from torch.autograd.functional import jacobian

from pyro_flows.nn.packed import named_tensors
from pyro_flows.transforms import (
    InverseAutoregressive,
    MaskedAutoregressive,
    SplineInverseAutoregressive,
    SplineMaskedAutoregressive,
    conditional_registry,
)
from pyro_flows.transforms._network_flows import rational_clamp, soft_clamp
from pyro_flows.transforms._splines import rational_quadratic_spline

DIM = 5
FLOWS = [InverseAutoregressive, MaskedAutoregressive, SplineInverseAutoregressive, SplineMaskedAutoregressive]
CONDITIONAL = [conditional_registry[name] for name in ("iaf", "maf", "spline_iaf", "spline_maf")]


def _perturb(module: torch.nn.Module, scale: float = 0.5, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for _, p in named_tensors(module):
            fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else 1
            p.add_(scale / math.sqrt(fan_in) * torch.randn_like(p))
    return module


def _count_passes(flow: torch.nn.Module) -> list[int]:
    calls = [0]
    made = flow.made
    original = made.apply_weights

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls[0] += 1
        return original(*args, **kwargs)

    made.apply_weights = counted
    return calls


@pytest.mark.parametrize("cls", FLOWS + CONDITIONAL, ids=lambda c: c.__name__)
@pytest.mark.parametrize("order", ["random", [3, 0, 4, 2, 1]], ids=["random", "explicit"])
def test_jacobian_is_triangular_in_the_flow_order(cls: type, order: object) -> None:
    conditional = cls in CONDITIONAL
    flow = _perturb(cls(DIM, 3, hidden_dims=(16, 16), order=order) if conditional else cls(DIM, (16, 16), order=order))
    t = flow.condition(torch.randn(3, dtype=torch.float64)) if conditional else flow
    rank = (flow.flow if conditional else flow).made.degrees
    for seed in range(3):
        torch.manual_seed(seed)
        x = 1.5 * torch.randn(DIM, dtype=torch.float64)
        jac = jacobian(lambda v, t=t: t(v), x, vectorize=True)
        later = rank[None, :] > rank[:, None]
        assert jac[later].abs().max() == 0, "output i must not depend on inputs later in the order"
        assert (jac.diagonal().abs() > 0).all()
        assert torch.allclose(t.log_abs_det_jacobian(x, t(x)), jac.diagonal().abs().log().sum(), atol=1e-10)


@pytest.mark.parametrize("cls", FLOWS, ids=lambda c: c.__name__)
def test_fast_direction_is_one_pass_and_the_other_takes_num_passes(cls: type) -> None:
    flow = _perturb(cls(DIM, (16,)))
    passes = _count_passes(flow)
    x = torch.randn(7, DIM, dtype=torch.float64)
    y = flow(x)
    forward_calls, passes[0] = passes[0], 0
    flow.clear_cache()
    x_rec = flow.inv(y)
    inverse_calls = passes[0]
    assert torch.allclose(x_rec, x, atol=1e-9)
    num_passes = int(flow.made.num_passes)
    assert num_passes == DIM
    expected = (1, num_passes) if flow.fast_direction == "forward" else (num_passes, 1)
    assert (forward_calls, inverse_calls) == expected


@pytest.mark.parametrize("cls", FLOWS, ids=lambda c: c.__name__)
def test_narrow_made_inverts_exactly_with_fewer_passes(cls: type) -> None:
    flow = _perturb(cls(8, (2,)))
    num_passes = int(flow.made.num_passes)
    assert num_passes < 8
    passes = _count_passes(flow)
    y = torch.randn(4, 8, dtype=torch.float64)
    x = flow.inv(y)
    flow.clear_cache()
    assert torch.allclose(flow(x), y, atol=1e-9)
    assert passes[0] == 1 + num_passes


@pytest.mark.parametrize("cls", [InverseAutoregressive, SplineInverseAutoregressive], ids=lambda c: c.__name__)
def test_sample_and_score_own_samples_is_one_network_pass(cls: type) -> None:
    flow = _perturb(cls(DIM, (16,)))
    passes = _count_passes(flow)
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(DIM, dtype=torch.float64), 1.0).to_event(1), [flow])
    z = d.rsample((10,))
    d.log_prob(z)
    assert passes[0] == 1


@pytest.mark.parametrize("cls", [MaskedAutoregressive, SplineMaskedAutoregressive], ids=lambda c: c.__name__)
def test_scoring_external_points_is_one_network_pass(cls: type) -> None:
    flow = _perturb(cls(DIM, (16,)))
    passes = _count_passes(flow)
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(DIM, dtype=torch.float64), 1.0).to_event(1), [flow])
    assert d.log_prob(torch.randn(10, DIM, dtype=torch.float64)).shape == (10,)
    assert passes[0] == 1


def test_iaf_gated_update_starts_near_identity_and_is_the_default() -> None:
    torch.manual_seed(0)
    x = torch.randn(100, DIM)
    gated = InverseAutoregressive(DIM)
    sigma = torch.sigmoid(torch.tensor(3.0))
    assert torch.allclose(gated(x), sigma * x, atol=0.05)
    ungated = InverseAutoregressive(DIM, gated=False)
    assert torch.allclose(ungated(x), x, atol=0.05)
    maf = MaskedAutoregressive(DIM)
    assert torch.allclose(maf(x), x, atol=0.05)


def test_affine_log_scale_is_bounded_for_huge_network_outputs() -> None:
    flow = _perturb(MaskedAutoregressive(DIM, (16,), log_scale_bound=2.0), scale=1e4)
    y = torch.randn(20, DIM, dtype=torch.float64)
    x = flow.inv(y)
    log_det = flow.log_abs_det_jacobian(x, y)
    assert torch.isfinite(x).all()
    assert (log_det.abs() <= 2.0 * DIM).all()


def _raw(scale: float, n: int, bins: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(int(scale))
    return scale * torch.randn(n, 3 * bins - 1, generator=generator, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("scale", [5.0, 10.0])
def test_spline_round_trip_at_large_conditioner_outputs_float64(scale: float) -> None:
    raw = _raw(scale, 20000, 8, torch.float64)
    x = torch.linspace(-3.5, 3.5, 20000, dtype=torch.float64)
    y, log_deriv = rational_quadratic_spline(x, raw, 3.0)
    x_rec, log_deriv_rec = rational_quadratic_spline(y, raw, 3.0, inverse=True)
    assert (x_rec - x).abs().max() < 1e-7
    assert (log_deriv_rec - log_deriv).abs().max() < 1e-6
    y_again, _ = rational_quadratic_spline(x_rec, raw, 3.0)
    assert (y_again - y).abs().max() < 1e-12


@pytest.mark.parametrize("scale", [1.0, 5.0, 10.0])
def test_spline_round_trip_at_large_conditioner_outputs_float32(scale: float) -> None:
    raw = _raw(scale, 20000, 8, torch.float32)
    x = torch.linspace(-3.5, 3.5, 20000)
    y, log_deriv = rational_quadratic_spline(x, raw, 3.0)
    x_rec, _ = rational_quadratic_spline(y, raw, 3.0, inverse=True)
    y_again, _ = rational_quadratic_spline(x_rec, raw, 3.0)
    # backward error: the recovered point maps back onto y up to float32 round-off of the interval
    assert (y_again - y).abs().max() < 5e-5
    # forward error relative to the conditioning of the inverse (|dx| ≈ |dy| / f'(x)); |dx| itself can be large in
    # float32 where the spline is nearly flat (slope down to ~1e-6), which no inverse can avoid
    assert ((x_rec - x).abs() * log_deriv.exp()).max() < 5e-5
    assert torch.isfinite(x_rec).all()


@pytest.mark.parametrize("seed", range(4))
def test_spline_flow_round_trip_with_scaled_conditioner(seed: int) -> None:
    """The sequential (sampling) direction of a spline MAF is backward stable at large conditioner scales.

    At scales 5-10 the map is ill-conditioned (steep bins, and parameters that move fast with the earlier
    coordinates), so ``flow(flow.inv(y))`` can miss ``y`` by far more than 1e-8 on some draws. That is the
    conditioning of the map, not an error of the passes: the computed ``y' = flow(x)`` maps back to ``x`` to
    round-off (backward error ~1e-15), and its forward error stays within the first-order bound
    ``||J|| ||x|| eps`` of a perfectly rounded input (``J`` the Jacobian of the map at ``x``, max norms).
    """
    torch.manual_seed(seed)
    eps = torch.finfo(torch.float64).eps
    for scale in (5.0, 10.0):
        flow = SplineMaskedAutoregressive(DIM, (16,)).double()
        with torch.no_grad():
            out = flow.made.layout.views(flow.made.raw)
            out["output.weight"].normal_(0, scale / 4)
            out["output.bias"].normal_(0, scale)
        y = 2 * torch.randn(20, DIM, dtype=torch.float64)
        x = flow.inv(y)
        flow.clear_cache()
        y_again = flow(x)
        flow.clear_cache()
        assert (flow.inv(y_again) - x).abs().max() < 1e-12
        forward = functools.partial(lambda f, v: f._forward_and_log_det(v, None)[0], flow)
        for x_i, y_i, y_again_i in zip(x, y, y_again, strict=True):
            jac = jacobian(forward, x_i)
            assert (y_again_i - y_i).abs().max() <= 8 * eps * jac.abs().sum(-1).max() * x_i.abs().max() + 1e-13


def test_spline_is_identity_at_zero_and_outside_the_bound() -> None:
    raw = torch.zeros(7, 23, dtype=torch.float64)
    x = torch.tensor([-5.0, -3.0, -1.2, 0.0, 0.7, 3.0, 4.0], dtype=torch.float64)
    y, log_deriv = rational_quadratic_spline(x, raw, 3.0)
    assert torch.allclose(y, x, atol=1e-12)
    assert torch.allclose(log_deriv, torch.zeros_like(x), atol=1e-12)
    raw = _raw(3.0, 2, 8, torch.float64)
    outside = torch.tensor([-7.0, 9.0], dtype=torch.float64)
    y, log_deriv = rational_quadratic_spline(outside, raw, 3.0)
    assert torch.equal(y, outside)
    assert torch.equal(log_deriv, torch.zeros(2, dtype=torch.float64))


def test_spline_derivative_matches_autograd_and_is_continuous() -> None:
    raw = _raw(2.0, 1, 6, torch.float64).expand(4001, -1)
    x = torch.linspace(-3.2, 3.2, 4001, dtype=torch.float64, requires_grad=True)
    y, log_deriv = rational_quadratic_spline(x, raw, 3.0)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(grad.log(), log_deriv, atol=1e-9)
    assert (y.diff() > 0).all(), "monotonic"
    lipschitz = log_deriv.exp().max() * (x[1] - x[0])
    assert (y.diff() <= 1.01 * lipschitz).all(), "continuous across knots and tails"


def test_conditional_context_broadcasts_against_event_batch() -> None:
    flow = _perturb(MaskedAutoregressive(DIM, hidden_dims=(16,), context_dim=3))
    c = torch.randn(4, 1, 3, dtype=torch.float64)
    y = torch.randn(2, DIM, dtype=torch.float64)
    t = flow.condition(c)
    x = t.inv(y)
    assert x.shape == (4, 2, DIM)
    assert t.log_abs_det_jacobian(x, y).shape == (4, 2)
    t.clear_cache()
    assert torch.allclose(t(x), y.expand(4, 2, DIM), atol=1e-9)


def test_random_order_is_saved_with_the_weights() -> None:
    a = InverseAutoregressive(DIM, (8,), order="random", generator=torch.Generator().manual_seed(1))
    b = InverseAutoregressive(DIM, (8,), order="random", generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a.made.degrees, b.made.degrees)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, DIM)
    assert torch.equal(a(x), b(x))
    assert torch.allclose(b.inv(a(x)), x, atol=1e-5)


def test_maf_s_log_scale_clamp_keeps_a_gradient_near_its_bound() -> None:
    """MAF's clamp is bounded with slope 1 at 0, and far out its slope decays polynomially (the tanh clamp's, which
    MAF had and IAF keeps, decays exponentially: log-scales pushed to the bound stopped learning)."""
    raw = torch.tensor([-1e3, -50.0, -10.0, 0.0, 10.0, 50.0, 1e3], dtype=torch.float64, requires_grad=True)
    for clamp in (rational_clamp, soft_clamp):
        clamped = clamp(raw, 5.0)
        (slope,) = torch.autograd.grad(clamped.sum(), raw)
        assert (clamped.abs() <= 5.0).all()
        assert slope[3] == 1.0
    assert (slope[[1, 5]] < 1e-8).all()  # the last clamp of the loop is tanh's: sech(10)^2 = 8.2e-9
    (slope,) = torch.autograd.grad(rational_clamp(raw, 5.0).sum(), raw)
    assert torch.allclose(slope[[1, 5]], torch.full((2,), 1 / 121, dtype=torch.float64))  # (1 + 50 / 5)^-2
    assert (slope > 0).all()
    assert MaskedAutoregressive(DIM).elementwise.clamp is rational_clamp
    assert InverseAutoregressive(DIM, gated=False).elementwise.clamp is soft_clamp
