"""Continuous flows (FFJORD): trace estimators, adjoint gradients, solvers and the optional torchdiffeq dependency."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch.autograd.functional import jacobian

from pyro_flows.transforms.continuous import FFJORD, ODENet

pytest.importorskip("torchdiffeq")


def perturb(module: torch.nn.Module, scale: float = 0.5, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else 1
            p.add_(scale / math.sqrt(fan_in) * torch.randn_like(p))
    return module


def test_missing_torchdiffeq_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    flow = FFJORD(2)
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)
    with pytest.raises(ImportError, match=r"pip install pyro-flows\[ffjord\]"):
        FFJORD(2)
    with pytest.raises(ImportError, match=r"pip install pyro-flows\[ffjord\]"):
        FFJORD(2, context_dim=3)
    with pytest.raises(ImportError, match=r"pip install pyro-flows\[ffjord\]"):
        flow(torch.randn(3, 2))


def test_importing_pyro_flows_does_not_need_torchdiffeq() -> None:
    code = (
        "import sys; sys.modules['torchdiffeq'] = None\n"
        "import pyro_flows\n"
        "from pyro_flows.transforms import registry\n"
        "assert 'ffjord' in registry\n"
        "try:\n"
        "    registry['ffjord'](2)\n"
        "except ImportError as e:\n"
        "    assert 'pip install pyro-flows[ffjord]' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("context_dim", [0, 2])
def test_odenet_exact_trace_and_hutchinson_probe(context_dim: int) -> None:
    net = perturb(ODENet(4, (8, 8), context_dim).double(), scale=2.0)
    z = torch.randn(5, 4, dtype=torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64)
    c = torch.randn(5, context_dim, dtype=torch.float64) if context_dim else None
    f, trace = net.dynamics(z, t, c, None)
    jacs = torch.stack(
        [jacobian(lambda v, i=i: net.dynamics(v, t, None if c is None else c[i], None)[0], z[i]) for i in range(5)]
    )
    assert torch.allclose(trace, jacs.diagonal(dim1=-2, dim2=-1).sum(-1), atol=1e-12)
    eps = torch.randn(5, 4, dtype=torch.float64)
    f2, quad = net.dynamics(z, t, c, eps)
    assert torch.equal(f, f2)
    assert torch.allclose(quad, torch.einsum("bi,bij,bj->b", eps, jacs, eps), atol=1e-12)


def test_starts_at_identity_auto_mode_and_nfe() -> None:
    flow = FFJORD(3, method="rk4")
    x = torch.randn(4, 3)
    assert torch.equal(flow(x), x)
    assert flow.last_nfe == 40
    assert torch.allclose(FFJORD(3)(x), x)
    assert FFJORD(16).trace_mode == "exact" and FFJORD(17).trace_mode == "hutchinson"


def test_adaptive_solver_round_trip_and_log_det() -> None:
    flow = perturb(FFJORD(3, method="dopri5", rtol=1e-8, atol=1e-8).double(), scale=1.0)
    x = torch.randn(4, 3, dtype=torch.float64)
    y = flow(x)
    nfe = flow.last_nfe
    ld = flow.log_abs_det_jacobian(x, y)
    flow.clear_cache()
    x_rec = flow.inv(y)
    assert nfe > 6 and flow.last_nfe > 6
    assert torch.allclose(x_rec, x, atol=1e-6)
    expected = torch.linalg.slogdet(jacobian(flow, x[0]))[1]
    assert torch.allclose(ld[0], expected, atol=1e-6)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_log_det_is_unbiased(noise: str) -> None:
    """4000 independent probes in one solve: |mean - exact| < 5 standard errors (the grid is the same: exact mean)."""
    torch.manual_seed(0)
    flow = perturb(FFJORD(5, trace="hutchinson", noise=noise).double(), scale=2.0, seed=1)
    x = torch.randn(5, dtype=torch.float64)
    torch.manual_seed(0)
    with torch.no_grad():
        estimates = flow.log_abs_det_jacobian(x.expand(4000, 5), flow(x.expand(4000, 5)))
        flow.trace_mode = "exact"
        flow.clear_cache()
        exact = flow.log_abs_det_jacobian(x, flow(x))
    se = estimates.std() / math.sqrt(estimates.numel())
    assert abs(float(exact)) > 0.1 and estimates.std() > 0
    assert abs(estimates.mean() - exact) < 5 * se


@pytest.mark.parametrize("conditional", [False, True], ids=["ffjord", "conditional"])
def test_adjoint_and_direct_backprop_agree(conditional: bool) -> None:
    kwargs = {"hidden_dims": (8,), "method": "dopri5", "rtol": 1e-10, "atol": 1e-10}
    grads = []
    for adjoint in (True, False):
        torch.manual_seed(0)
        module = FFJORD(3, adjoint=adjoint, context_dim=2 if conditional else 0, **kwargs)
        module = perturb(module.double(), scale=1.0, seed=2)
        torch.manual_seed(3)
        x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        c = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
        flow = module.condition(c) if conditional else module
        y = flow(x)
        loss = (y**2).sum() + flow.log_abs_det_jacobian(x, y).sum()
        inputs = [x, *module.parameters(), *([c] if conditional else [])]
        grads.append(torch.autograd.grad(loss, inputs))
    for a, b in zip(*grads, strict=True):
        assert a.abs().sum() > 0
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)


def test_float32_with_adaptive_solver_defaults() -> None:
    flow = perturb(FFJORD(4, method="dopri5"), scale=1.0)
    x = torch.randn(8, 4)
    y = flow(x)
    flow.clear_cache()
    assert torch.allclose(flow.inv(y), x, atol=1e-3)


def test_bad_arguments_raise() -> None:
    for kwargs in ({"trace": "bogus"}, {"noise": "uniform"}, {"time": -1.0}, {"steps": 0}):
        with pytest.raises(ValueError):
            FFJORD(3, **kwargs)


@pytest.mark.slow
def test_the_default_solver_meets_the_stated_tolerance_at_random_parameters() -> None:
    flow = perturb(FFJORD(3).double(), scale=2.5)  # RK4 with 10 steps misses it here by 200x (2e-3)
    x = torch.randn(8, 3, dtype=torch.float64)
    y = flow(x)
    log_det = flow.log_abs_det_jacobian(x, y)
    flow.clear_cache()
    assert (flow.inv(y.clone()) - x).abs().max() < flow.inverse_atol
    flow.clear_cache()
    exact = torch.stack([torch.linalg.slogdet(jacobian(lambda v: flow(v), xi))[1] for xi in x])
    assert (log_det - exact).abs().max() < 10 * flow.inverse_atol
