"""Residual flows: Lipschitz bound by construction, fixed-point inverse and its gradient, log-det estimator."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from pyro_flows.nn.lipschitz import LipschitzMLP, LipSwish, SpectralNormLinear
from pyro_flows.transforms.residual import FixedPointError, Residual


def perturb(module: torch.nn.Module, scale: float = 1.0, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else 1
            p.add_(scale / math.sqrt(fan_in) * torch.randn_like(p))
    return module


def flat_grad(value: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat(
        [torch.zeros_like(p).flatten() if g is None else g.flatten() for g, p in zip(grads, params, strict=True)]
    )


def test_lipswish_slope_is_below_one_for_any_beta() -> None:
    act = LipSwish(5).double()
    with torch.no_grad():
        act.raw_beta.copy_(torch.tensor([-20.0, -1.0, 0.0, 3.0, 30.0]))
    x = torch.linspace(-50, 50, 2001, dtype=torch.float64).unsqueeze(-1).expand(-1, 5)
    value, slope = act.value_and_slope(x)
    assert slope.abs().max() < 1.0
    assert torch.allclose(value, act(x))
    x = x.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(act(x).sum(), x)
    assert torch.allclose(slope, auto, atol=1e-12)


def test_spectral_norm_bound_holds_for_any_raw_weights() -> None:
    torch.manual_seed(0)
    for scale in (1e-3, 1.0, 1e3):
        layer = SpectralNormLinear(7, 4, coeff=0.9).double()
        with torch.no_grad():
            layer.weight.copy_(scale * torch.randn(4, 7, dtype=torch.float64))
        weight, norm = layer.normalized_weight_and_norm()
        assert torch.linalg.matrix_norm(weight, 2) <= 0.9 + 1e-12
        assert norm == pytest.approx(float(torch.linalg.matrix_norm(weight.detach(), 2)), rel=1e-10)


@pytest.mark.parametrize("context_features", [0, 3])
def test_lipschitz_mlp_jacobian_and_bound(context_features: int) -> None:
    net = perturb(LipschitzMLP(4, (16, 8), coeff=0.9, context_features=context_features).double(), scale=5.0)
    x = torch.randn(6, 4, dtype=torch.float64)
    c = torch.randn(6, context_features, dtype=torch.float64) if context_features else None
    value, lin = net.linearize(x, c)
    assert torch.allclose(value, net(x, c))
    jac = lin.jacobian()
    auto = torch.stack([jacobian(lambda v, i=i: net(v, None if c is None else c[i]), x[i]) for i in range(6)])
    assert torch.allclose(jac, auto, atol=1e-12)
    u, v = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    assert torch.allclose(lin.vjp(u), (u.unsqueeze(-2) @ jac).squeeze(-2), atol=1e-12)
    assert torch.allclose(lin.jvp(v), (jac @ v.unsqueeze(-1)).squeeze(-1), atol=1e-12)
    bound = net.lipschitz_bound()
    assert bound <= 0.9**3 + 1e-12
    assert torch.linalg.matrix_norm(jac, 2).max() <= bound + 1e-12


def test_starts_at_identity_and_auto_mode() -> None:
    flow = Residual(3)
    x = torch.randn(5, 3)
    assert torch.equal(flow(x), x)
    assert Residual(16).log_det_mode == "exact"
    assert Residual(17).log_det_mode == "estimator"
    assert Residual(17, log_det="exact").log_det_mode == "exact"


@pytest.mark.parametrize("seed", range(3))
def test_inverse_converges_at_random_parameters(seed: int) -> None:
    flow = perturb(Residual(6, hidden_dims=(32, 32)).double(), scale=3.0, seed=seed)
    assert flow.net.lipschitz_bound() <= 0.97**3 + 1e-12
    y = 3 * torch.randn(50, 6, dtype=torch.float64)
    x = flow.inv(y)
    flow.clear_cache()
    assert torch.allclose(flow(x), y, atol=2e-6, rtol=0)
    ld = flow.log_abs_det_jacobian(x, y)
    expected = torch.stack([torch.linalg.slogdet(jacobian(flow, x[i]))[1] for i in range(3)])
    assert torch.allclose(ld[:3], expected, atol=1e-8)


def test_inverse_gradients_match_the_implicit_function_theorem() -> None:
    flow = perturb(Residual(4, hidden_dims=(16,)).double(), scale=2.0, seed=1)
    weights = torch.arange(1.0, 5.0, dtype=torch.float64)
    params = list(flow.net.parameters())
    y = torch.randn(4, dtype=torch.float64, requires_grad=True)
    x = flow.inv(y)
    loss = (x * weights).sum() + flow.log_abs_det_jacobian(x, y)
    implicit = torch.autograd.grad(loss, params, retain_graph=True)
    # d x / d y = (∂f/∂x)^{-1}
    jac_inv = torch.stack([torch.autograd.grad(x[i], y, retain_graph=True)[0] for i in range(4)])
    flow.clear_cache()
    assert torch.allclose(jac_inv, torch.linalg.inv(jacobian(flow, x.detach())), atol=1e-8)
    # parameter gradients equal backpropagation through a long unrolled fixed-point iteration
    z = y.detach()
    for _ in range(300):
        z = y.detach() - flow.net(z)
    _, lin = flow.net.linearize(z)
    eye = torch.eye(4, dtype=torch.float64)
    unrolled_loss = (z * weights).sum() + torch.linalg.slogdet(eye + lin.jacobian())[1]
    unrolled = torch.autograd.grad(unrolled_loss, params)
    for a, b in zip(implicit, unrolled, strict=True):
        assert torch.allclose(a, b, atol=1e-8)


def test_non_convergence_and_bad_values_raise_clear_errors() -> None:
    flow = perturb(Residual(5, max_iter=2).double(), scale=3.0)
    with pytest.raises(FixedPointError, match="did not converge in 2"):
        flow.inv(torch.randn(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        flow.inv(torch.full((2, 5), float("nan"), dtype=torch.float64))
    for kwargs in ({"coeff": 1.0}, {"log_det": "bogus"}, {"geom_p": 1.0}, {"inverse_tol": 1e-2}, {"num_samples": 0}):
        with pytest.raises(ValueError):
            Residual(5, **kwargs)


def test_float32_round_trip() -> None:
    flow = perturb(Residual(8), scale=2.0)
    x = torch.randn(16, 8)
    y = flow(x)
    flow.clear_cache()
    assert torch.allclose(flow.inv(y), x, atol=1e-4)


@pytest.mark.parametrize("conditional", [False, True], ids=["residual", "conditional"])
def test_estimator_is_unbiased_for_the_log_det_and_its_gradient(conditional: bool) -> None:
    """Mean of 300 estimates (50 probes each) vs the exact value: |mean - exact| < 5 standard errors."""
    torch.manual_seed(0)
    dim = 6
    kwargs = {"hidden_dims": (16,), "coeff": 0.9, "log_det": "estimator", "num_exact_terms": 1, "geom_p": 0.5}
    module = Residual(dim, context_dim=2 if conditional else 0, **kwargs)
    module = perturb(module.double(), scale=10.0, seed=3)
    flow = module.condition(torch.randn(2, dtype=torch.float64)) if conditional else module
    x = torch.randn(dim, dtype=torch.float64)
    params = list(module.parameters())

    module.log_det_mode = "exact"
    exact = flow.log_abs_det_jacobian(x, flow(x))
    exact_flat = flat_grad(exact, params)
    module.log_det_mode = "estimator"

    torch.manual_seed(0)
    xs = x.expand(50, dim)
    values, grads = [], []
    for _ in range(300):
        flow.clear_cache()
        ld = flow.log_abs_det_jacobian(xs, flow(xs)).mean()
        values.append(ld.detach())
        grads.append(flat_grad(ld, params))
    values_t, grads_t = torch.stack(values), torch.stack(grads)
    se = values_t.std() / math.sqrt(len(values))
    assert abs(float(exact.detach())) > 0.05
    assert abs(values_t.mean() - exact) < 5 * se
    grad_se = grads_t.std(0) / math.sqrt(len(grads))
    assert ((grads_t.mean(0) - exact_flat).abs() < 5 * grad_se + 1e-10).all()


def test_conditional_context_enters_and_gradients_reach_it() -> None:
    flow = perturb(Residual(3, context_dim=2).double(), scale=1.0)
    x = torch.randn(4, 3, dtype=torch.float64)
    c = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    t = flow.condition(c)
    y = t(x)
    x_rec = t.inv(y.detach().clone())
    assert torch.allclose(x_rec, x, atol=1e-6)
    (x_rec.sum() + t.log_abs_det_jacobian(x_rec, y).sum()).backward()
    assert c.grad is not None and c.grad.abs().sum() > 0
