"""Planar and radial flows beyond the conformance suite: exact log-dets, constraints, extreme parameters, a U1 fit."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch.autograd.functional import jacobian

from pyro_flows.transforms import Planar, Radial, bracketed_newton

DIMS = [2, 5, 16]


def randomize(module: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """Set every parameter to ``scale`` × N(0, 1) (float64)."""
    torch.manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn_like(p))
    return module


def block_log_dets(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det| of the per-point Jacobians of a batched map ``(N, D) -> (N, D)`` (block diagonal)."""
    jac = jacobian(fn, x)
    n = x.shape[0]
    blocks = torch.stack([jac[i, :, i, :] for i in range(n)])
    sign, log_abs = torch.linalg.slogdet(blocks)
    assert (sign != 0).all()
    return log_abs


def check_flow(t, x: torch.Tensor, atol: float = 1e-9) -> None:
    """Log-det (forward and inverse paths) == autograd, and the inverse round trip, at points ``x``."""
    y = t(x)
    ld = t.log_abs_det_jacobian(x, y)
    t.clear_cache()
    x_rec = t.inv(y.clone())
    ld_inv = t.log_abs_det_jacobian(x_rec, y)
    t.clear_cache()
    expected = block_log_dets(lambda v: t(v), x)
    assert torch.isfinite(ld).all()
    assert torch.allclose(ld, expected, atol=atol, rtol=0), (ld - expected).abs().max()
    assert torch.allclose(ld_inv, expected, atol=atol, rtol=0)
    assert torch.allclose(x_rec, x, atol=1e-8, rtol=0), (x_rec - x).abs().max()


@pytest.mark.parametrize("cls", [Planar, Radial])
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("seed", [0, 1])
def test_log_det_matches_autograd_at_random_parameters(cls, dim: int, seed: int) -> None:
    flow = randomize(cls(dim), 1.0, seed)
    check_flow(flow, 2.0 * torch.randn(6, dim, dtype=torch.float64))


@pytest.mark.parametrize("cls", [Planar, Radial])
@pytest.mark.parametrize("dim", DIMS)
def test_conditional_log_det_matches_autograd_with_a_batch_of_contexts(cls, dim: int) -> None:
    module = randomize(cls(dim, context_dim=3, context_hidden_dims=(8,)), 0.5, 0)
    context = torch.randn(4, 3, dtype=torch.float64)
    check_flow(module.condition(context), torch.randn(4, dim, dtype=torch.float64))


@pytest.mark.parametrize("cls", [Planar, Radial])
@pytest.mark.parametrize("dim", DIMS)
def test_extreme_parameters_keep_the_flow_invertible(cls, dim: int) -> None:
    flow = randomize(cls(dim), 10.0, 3)
    x = 5.0 * torch.randn(32, dim, dtype=torch.float64)
    y = flow(x)
    assert torch.isfinite(y).all() and torch.isfinite(flow.log_abs_det_jacobian(x, y)).all()
    flow.clear_cache()
    x_rec = flow.inv(y.clone())
    assert torch.allclose(x_rec, x, atol=1e-8 * (1 + x.abs().max().item()), rtol=0)
    assert torch.isfinite(flow.log_abs_det_jacobian(x_rec, y)).all()


def test_planar_constraint_holds_for_any_raw_parameters() -> None:
    torch.manual_seed(0)
    u = 20.0 * torch.randn(1000, 7, dtype=torch.float64)
    w = 20.0 * torch.randn(1000, 7, dtype=torch.float64)
    u_hat, s = Planar._u_hat(u, w)
    assert torch.allclose((w * u_hat).sum(-1), s)
    assert (s > -1.0 + 0.9e-3).all()


def test_planar_near_the_constraint_boundary_inverts_to_machine_precision() -> None:
    flow = Planar(3).double()
    with torch.no_grad():
        flow.w.copy_(torch.tensor([1.0, 0.5, -0.5]))
        flow.u.copy_(-40.0 * flow.w)  # w·û = m(w·u) ≈ -0.999: the map is nearly flat along w
    x = torch.linspace(-3, 3, 61, dtype=torch.float64).unsqueeze(-1) * flow.w.detach()
    y = flow(x)
    flow.clear_cache()
    assert torch.allclose(flow.inv(y.clone()), x, atol=1e-10, rtol=0)
    assert flow.last_inverse_iterations < 60


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("seed", range(4))
def test_planar_inverse_converges_wherever_the_constraint_allows(dtype: torch.dtype, seed: int) -> None:
    # raw u = -100·ŵ + noise: the constraint maps it just inside w·û > -1, where the map is nearly flat along w
    torch.manual_seed(seed)
    flow = Planar(5).to(dtype)
    with torch.no_grad():
        flow.w.copy_(torch.randn(5, dtype=dtype))
        flow.u.copy_(-100.0 * flow.w / flow.w.norm() + 0.1 * torch.randn(5, dtype=dtype))
        flow.bias.copy_(torch.randn((), dtype=dtype))
    x = 3.0 * torch.randn(200, 5, dtype=dtype)
    y = flow(x)
    flow.clear_cache()
    x_rec = flow.inv(y.clone())
    assert torch.isfinite(x_rec).all() and flow.last_inverse_iterations < 60
    flow.clear_cache()
    eps = torch.finfo(dtype).eps
    assert torch.allclose(flow(x_rec), y, atol=100 * eps, rtol=0)  # the residual: at the dtype's rounding
    # the error in x: the rounding amplified by the map's conditioning along w (1 / (1 + w·û) ≈ 1e3 here)
    assert torch.allclose(x_rec, x, atol=1e3 * 10 * eps, rtol=0), (x_rec - x).abs().max()


def test_planar_inverse_gradients_match_finite_differences() -> None:
    flow = randomize(Planar(3), 1.0, 5)
    y = torch.randn(4, 3, dtype=torch.float64)

    def inverse(u: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return flow._inverse_with({"u": u, "w": w, "bias": b}, y)[0]

    params = tuple(p.detach().clone().requires_grad_() for p in (flow.u, flow.w, flow.bias))
    assert torch.autograd.gradcheck(inverse, params)


def _planar_inputs(seed: int, zero_w: bool = False) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(seed)
    z = torch.randn(4, 3, dtype=torch.float64)
    u, w = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    w = torch.zeros_like(w) if zero_w else w
    return tuple(t.requires_grad_() for t in (z, u, w, torch.randn((), dtype=torch.float64)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planar_forward_gradients_match_finite_differences_first_and_second_order(seed: int) -> None:
    # shared parameters run as one autograd node with a closed-form backward: check it, and its own derivative
    flow = Planar(3).double()

    def forward(z: torch.Tensor, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return flow._forward_with({"u": u, "w": w, "bias": b}, z)

    inputs = _planar_inputs(seed)
    assert torch.autograd.gradcheck(forward, inputs)
    assert torch.autograd.gradgradcheck(forward, inputs)


@pytest.mark.parametrize("zero_w", [False, True], ids=["w", "w=0"])
def test_planar_closed_form_backward_equals_autograd_of_the_operations(zero_w: bool) -> None:
    # w = 0 (a translation) is not differentiable by finite differences, but both backward passes agree there
    flow = Planar(3).double()
    z, u, w, b = _planar_inputs(3, zero_w)
    y, log_det = flow._forward_with({"u": u, "w": w, "bias": b}, z)
    y_ref, log_det_ref = Planar._autograd_forward(z, u, w, b)
    assert torch.equal(y, y_ref) and torch.equal(log_det, log_det_ref)
    weights = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    grads = torch.autograd.grad((y * weights[0]).sum() + (log_det * weights[1]).sum(), (z, u, w, b))
    ref = torch.autograd.grad((y_ref * weights[0]).sum() + (log_det_ref * weights[1]).sum(), (z, u, w, b))
    for g, r in zip(grads, ref, strict=True):
        assert torch.allclose(g, r, atol=1e-12, rtol=1e-12)


def test_planar_works_under_torch_func_transforms() -> None:
    flow = randomize(Planar(3), 1.0, 4)
    z = torch.randn(4, 3, dtype=torch.float64)
    jac = torch.func.jacrev(lambda v: flow(v))(z)
    flow.clear_cache()
    assert torch.allclose(jac, jacobian(lambda v: flow(v), z), atol=1e-12)
    points = torch.func.vmap(lambda v: flow(v))(z)
    flow.clear_cache()
    assert torch.allclose(points, flow(z), atol=1e-12)


def test_radial_inverse_near_and_far_from_the_centre() -> None:
    flow = randomize(Radial(4), 1.0, 2)
    center = flow.center.detach()
    x = center + torch.tensor([1e-12, 1e-6, 1.0, 1e6], dtype=torch.float64).unsqueeze(-1) * torch.ones(4)
    y = flow(x)
    flow.clear_cache()
    assert torch.allclose(flow.inv(y.clone()), x, rtol=1e-12, atol=1e-12)


def test_identity_at_initialization() -> None:
    x = torch.randn(5, 4)
    for flow in (Planar(4), Radial(4)):
        y = flow(x)
        assert torch.allclose(y, x, atol=1e-6)
        assert torch.allclose(flow.log_abs_det_jacobian(x, y), torch.zeros(5), atol=1e-6)


def test_bracketed_newton_raises_when_out_of_iterations() -> None:
    c = torch.tensor([100.0], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="did not converge"):
        bracketed_newton(lambda a: (a - c, torch.ones_like(a) * 1e-9), c - 1e6, c + 3e6, c - 1e6, max_iter=2)


def energy_u1(z: torch.Tensor) -> torch.Tensor:
    """Rezende & Mohamed (2015), Table 1, U1 (a ring with two modes)."""
    ring = 0.5 * ((z.norm(dim=-1) - 2.0) / 0.4) ** 2
    modes = torch.stack([-0.5 * ((z[..., 0] - 2.0) / 0.6) ** 2, -0.5 * ((z[..., 0] + 2.0) / 0.6) ** 2])
    return ring - torch.logsumexp(modes, dim=0)


def log_normalizer_u1() -> float:
    grid = torch.linspace(-5, 5, 801, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), dim=-1)
    cell = (grid[1] - grid[0]) ** 2
    return (torch.logsumexp(-energy_u1(z).flatten(), 0) + cell.log()).item()


def test_sixteen_planar_layers_fit_u1_by_reverse_kl() -> None:
    import pyro.distributions as dist

    torch.manual_seed(0)
    layers = torch.nn.ModuleList(Planar(2) for _ in range(16))
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    flow = dist.TransformedDistribution(base, list(layers))
    log_z = log_normalizer_u1()

    def kl(n: int) -> torch.Tensor:
        z = flow.rsample((n,))
        return (flow.log_prob(z) + energy_u1(z)).mean() + log_z

    with torch.no_grad():
        start = kl(2048).item()
    optimizer = torch.optim.Adam(layers.parameters(), lr=2e-2)
    begin = time.perf_counter()
    steps = 0
    while steps < 600 and time.perf_counter() - begin < 8.0:
        optimizer.zero_grad()
        loss = kl(256)
        loss.backward()
        optimizer.step()
        steps += 1
    with torch.no_grad():
        end = kl(2048).item()
    print(f"\nU1 reverse KL, 16 planar layers: {start:.3f} -> {end:.3f} nats after {steps} Adam steps")
    assert math.isfinite(end) and end < start
