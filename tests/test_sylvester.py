"""Sylvester flows beyond the conformance suite: exact log-dets away from init, Q construction, extreme parameters."""

from __future__ import annotations

import pytest
import torch
from test_planar_radial import block_log_dets, check_flow, randomize

from pyro_flows.transforms import (
    SylvesterHouseholder,
    SylvesterOrthogonal,
    SylvesterTriangular,
    bjorck_orthonormalize,
    householder_columns,
)
from pyro_flows.transforms._utils import householder_product
from pyro_flows.transforms.sylvester import IMPLICIT_Q_SIZE, _CompactWY

DIMS = [2, 5, 16]
VARIANTS = {
    "orthogonal": lambda d: SylvesterOrthogonal(d),
    "orthogonal_m_half": lambda d: SylvesterOrthogonal(d, num_hidden=max(1, d // 2)),
    "householder": lambda d: SylvesterHouseholder(d),
    "householder_m_half": lambda d: SylvesterHouseholder(d, num_hidden=max(1, d // 2), num_reflections=3),
    "triangular": lambda d: SylvesterTriangular(d),
    "triangular_reverse": lambda d: SylvesterTriangular(d, reverse=True),
}
CONDITIONAL = {
    "orthogonal": SylvesterOrthogonal,
    "householder": SylvesterHouseholder,
    "triangular": SylvesterTriangular,
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dim", DIMS)
def test_log_det_matches_autograd_at_random_parameters(variant: str, dim: int) -> None:
    """Random O(1) parameters, far from the initialization (where Pyro's Sylvester log-det goes wrong)."""
    flow = randomize(VARIANTS[variant](dim), 1.0, dim)
    check_flow(flow, torch.randn(5, dim, dtype=torch.float64))


@pytest.mark.parametrize("variant", sorted(CONDITIONAL))
@pytest.mark.parametrize("dim", DIMS)
def test_conditional_log_det_matches_autograd_with_a_batch_of_contexts(variant: str, dim: int) -> None:
    module = randomize(CONDITIONAL[variant](dim, context_dim=3, context_hidden_dims=(8,)), 0.5, 0)
    check_flow(module.condition(torch.randn(4, 3, dtype=torch.float64)), torch.randn(4, dim, dtype=torch.float64))


@pytest.mark.parametrize(("dim", "num_hidden"), [(120, None), (150, 80)])
def test_householder_q_is_applied_through_its_factors_in_large_dimensions(dim: int, num_hidden: int | None) -> None:
    # D·M above IMPLICIT_Q_SIZE and fewer than M points: Q is never formed; the factors apply the same matrix
    flow = randomize(SylvesterHouseholder(dim, num_hidden=num_hidden), 0.1, 3)
    m = flow.num_hidden
    assert dim * m > IMPLICIT_Q_SIZE
    basis = flow._basis(flow.raw_params())
    assert isinstance(basis, _CompactWY)
    q = householder_columns(flow.reflections, m)
    x, v = torch.randn(2, 3, dim, dtype=torch.float64), torch.randn(2, 3, m, dtype=torch.float64)
    assert torch.allclose(basis.project(x), x @ q, atol=1e-12)
    assert torch.allclose(basis.lift(v), v @ q.T, atol=1e-12)
    check_flow(flow, torch.randn(2, dim, dtype=torch.float64))
    # a batch of M points folds Q into the triangles instead: the same map
    points = torch.randn(m, dim, dtype=torch.float64)
    folded = flow(points)
    assert torch.allclose(torch.cat([flow(p) for p in points.split(7)]), folded, atol=1e-12)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dim", DIMS)
def test_extreme_parameters_keep_the_flow_invertible(variant: str, dim: int) -> None:
    """Every raw parameter ×10: diagonals saturate, off-diagonals are large; the inverse still converges."""
    flow = randomize(VARIANTS[variant](dim), 10.0, 7)
    x = 3.0 * torch.randn(16, dim, dtype=torch.float64)
    y = flow(x)
    ld = flow.log_abs_det_jacobian(x, y)
    assert torch.isfinite(y).all() and torch.isfinite(ld).all()
    flow.clear_cache()
    x_rec = flow.inv(y.clone())
    assert torch.allclose(x_rec, x, atol=1e-6, rtol=0), (x_rec - x).abs().max()
    assert torch.allclose(flow.log_abs_det_jacobian(x_rec, y), ld, atol=1e-6, rtol=0)


def test_log_det_is_exact_where_the_diagonal_product_approaches_minus_one() -> None:
    flow = SylvesterTriangular(3).double()
    with torch.no_grad():
        flow.diag.copy_(torch.tensor([[20.0, -20.0, 1.0], [-20.0, 20.0, 1.0]]))
        flow.upper.normal_()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = flow(x)
    expected = block_log_dets(lambda v: flow(v), x)
    assert torch.allclose(flow.log_abs_det_jacobian(x, y), expected, atol=1e-8)


def test_bjorck_reaches_its_tolerance_and_rejects_rank_deficient_input() -> None:
    torch.manual_seed(0)
    q, iterations = bjorck_orthonormalize(torch.randn(3, 16, 10, dtype=torch.float64))
    assert iterations > 0
    eye = torch.eye(10, dtype=torch.float64)
    assert ((q.transpose(-1, -2) @ q - eye).abs().max() <= 1e-12).item()
    _, iterations_near = bjorck_orthonormalize(torch.eye(16, 10, dtype=torch.float64) + 1e-3)
    assert iterations_near <= 6
    deficient = torch.randn(8, 4, dtype=torch.float64)
    deficient[:, 3] = deficient[:, 2]
    with pytest.raises(RuntimeError, match="rank deficient"):
        bjorck_orthonormalize(deficient)


def test_householder_columns_match_the_sequential_product() -> None:
    torch.manual_seed(0)
    v = torch.randn(2, 5, 7, dtype=torch.float64)
    v[1, 2] = 0.0  # a zero vector is the identity reflection
    q = householder_columns(v, 4)
    expected = householder_product(v.unsqueeze(-3), torch.eye(7, dtype=torch.float64)[:4]).transpose(-1, -2)
    assert torch.allclose(q, expected, atol=1e-12)
    assert torch.allclose(q.transpose(-1, -2) @ q, torch.eye(4, dtype=torch.float64), atol=1e-12)


def test_inverse_gradients_match_finite_differences() -> None:
    flow = randomize(SylvesterTriangular(3), 1.0, 4)
    y = torch.randn(2, 3, dtype=torch.float64)
    names = list(flow.param_shapes)

    def inverse(*values: torch.Tensor) -> torch.Tensor:
        return flow._inverse_with(dict(zip(names, values, strict=True)), y)[0]

    params = tuple(getattr(flow, n).detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(inverse, params)


def test_identity_at_initialization_and_argument_checks() -> None:
    x = torch.randn(5, 6)
    for flow in (SylvesterOrthogonal(6), SylvesterHouseholder(6), SylvesterTriangular(6, reverse=True)):
        y = flow(x)
        assert torch.allclose(y, x) and torch.allclose(flow.log_abs_det_jacobian(x, y), torch.zeros(5))
    with pytest.raises(ValueError, match="num_hidden"):
        SylvesterOrthogonal(4, num_hidden=5)
    with pytest.raises(ValueError, match="num_reflections"):
        SylvesterHouseholder(4, num_reflections=0)
