"""Tests of the linear flows beyond the conformance suite: structure, exact formulas, options and edge cases."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from pyro_flows.transforms import conditional_registry, registry
from pyro_flows.transforms._utils import householder_product, householder_product_reverse, positive
from pyro_flows.transforms.linear import (
    QR,
    ConvexTriangular,
    Householder,
    make_permutation,
)

DTYPE = torch.float64


def dense_reflections(v: torch.Tensor) -> torch.Tensor:
    """H_1 H_2 ... H_K as a dense matrix (only for small D, as a reference)."""
    eye = torch.eye(v.shape[-1], dtype=v.dtype)
    q = eye
    for vk in v:
        q = q @ (eye - 2 * torch.outer(vk, vk) / vk.dot(vk))
    return q


def perturb(module: torch.nn.Module, scale: float = 0.5, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    module = module.to(DTYPE)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def dense_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    return jacobian(fn, x)


def test_householder_product_order_and_reverse() -> None:
    torch.manual_seed(0)
    v = torch.randn(4, 6, dtype=DTYPE)
    x = torch.randn(3, 6, dtype=DTYPE)
    q = dense_reflections(v)
    assert torch.allclose(householder_product(v, x), x @ q.T)
    assert torch.allclose(householder_product_reverse(v, x), x @ q)
    assert torch.allclose(householder_product_reverse(v, householder_product(v, x)), x)


def test_householder_product_broadcasts_batched_vectors() -> None:
    torch.manual_seed(1)
    v = torch.randn(2, 3, 3, 5, dtype=DTYPE)
    x = torch.randn(3, 5, dtype=DTYPE)
    y = householder_product(v, x)
    assert y.shape == (2, 3, 5)
    for i in range(2):
        for j in range(3):
            assert torch.allclose(y[i, j], dense_reflections(v[i, j]) @ x[j])


def test_zero_reflection_vector_is_identity_with_finite_gradients() -> None:
    v = torch.zeros(2, 4, dtype=DTYPE, requires_grad=True)
    x = torch.randn(3, 4, dtype=DTYPE)
    y = householder_product(v, x)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.isfinite(v.grad).all()


def test_householder_never_builds_dense_matrices() -> None:
    dim = 300_000
    flow = Householder(dim, num_reflections=4)
    x = torch.randn(2, dim)
    with torch.no_grad():
        y = flow(x)
        assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
        assert torch.allclose(flow.inv(y), x, atol=1e-4)


def test_householder_is_orthogonal_and_starts_at_identity() -> None:
    x = torch.randn(5, 6, dtype=DTYPE)
    assert torch.allclose(Householder(6, num_reflections=4).to(DTYPE)(x), x)
    flow = perturb(Householder(6, num_reflections=3))
    q = dense_jacobian(flow, x[0])
    assert torch.allclose(q @ q.T, torch.eye(6, dtype=DTYPE))
    assert torch.allclose(q, dense_reflections(flow.vectors.detach()))
    assert torch.allclose(flow.log_abs_det_jacobian(x, flow(x)), torch.zeros(5, dtype=DTYPE))


def test_householder_bias_and_inverse() -> None:
    flow = perturb(Householder(4, num_reflections=5, bias=True))
    x = torch.randn(7, 4, dtype=DTYPE)
    y = flow(x)
    assert torch.allclose(y, x @ dense_reflections(flow.vectors.detach()).T + flow.bias.detach())
    flow.clear_cache()
    assert torch.allclose(flow.inv(y), x)


def test_qr_matrix_structure_and_log_det() -> None:
    flow = perturb(QR(5))
    x = torch.randn(5, dtype=DTYPE)
    w = dense_jacobian(flow, x)
    q = dense_reflections(flow.vectors.detach())
    r = q.T @ w
    assert torch.allclose(r, r.triu(), atol=1e-12)
    assert (r.diagonal() > 0).all()
    assert torch.allclose(r.diagonal(), positive(flow.raw_diag.detach()))
    assert torch.allclose(flow.log_abs_det_jacobian(x, flow(x)), torch.linalg.slogdet(w)[1])


def test_qr_starts_at_identity_with_even_count() -> None:
    x = torch.randn(3, 4, dtype=DTYPE)
    assert torch.allclose(QR(4).to(DTYPE)(x), x)
    assert torch.allclose(QR(5, num_reflections=2).to(DTYPE)(x.new_ones(5)), x.new_ones(5))


@pytest.mark.parametrize(
    "flow",
    [
        ConvexTriangular(4, num_matrices=3, diagonal=True, bias=True),
        Householder(4, num_reflections=3, bias=True),
        QR(4, num_reflections=2, bias=False),
    ],
    ids=["cc_diag_bias", "householder3_bias", "qr_count2"],
)
def test_non_default_options_are_exact(flow: torch.nn.Module) -> None:
    flow = perturb(flow)
    x = torch.randn(4, dtype=DTYPE)
    y = flow(x)
    expected = torch.linalg.slogdet(dense_jacobian(flow, x))[1]
    assert torch.allclose(flow.log_abs_det_jacobian(x, y), expected)
    flow.clear_cache()
    assert torch.allclose(flow.inv(y), x)


def test_convex_triangular_weights_on_simplex_and_unit_triangular() -> None:
    flow = perturb(ConvexTriangular(5, num_matrices=4), scale=3.0)
    w = flow.weights()
    assert (w >= 0).all() and torch.allclose(w.sum(), torch.tensor(1.0, dtype=DTYPE))
    x = torch.randn(5, dtype=DTYPE)
    jac = dense_jacobian(flow, x)
    assert torch.allclose(jac, jac.tril())
    assert torch.allclose(jac.diagonal(), torch.ones(5, dtype=DTYPE))
    combined = sum(wk * lk for wk, lk in zip(w, flow.lowers.detach(), strict=True))
    rows, cols = torch.tril_indices(5, 5, -1)
    assert torch.allclose(jac[rows, cols], combined)
    assert torch.equal(flow.log_abs_det_jacobian(x, flow(x)), torch.zeros((), dtype=DTYPE))


def test_convex_triangular_positive_diagonal_log_det() -> None:
    flow = perturb(ConvexTriangular(3, diagonal=True))
    x = torch.randn(2, 3, dtype=DTYPE)
    expected = positive(flow.raw_diag.detach()).log().sum().expand(2)
    assert torch.allclose(flow.log_abs_det_jacobian(x, flow(x)), expected)


def test_conditional_convex_triangular_amortizes_weights_only() -> None:
    flow = perturb(ConvexTriangular(4, num_matrices=5, diagonal=True, context_dim=3))
    c = torch.randn(6, 3, dtype=DTYPE)
    w = flow.weights(c)
    assert w.shape == (6, 5)
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(6, dtype=DTYPE))
    assert not torch.allclose(w[0], w[1])
    params = flow.raw_params(c)
    for name in ("lowers", "raw_diag"):  # not amortized: the module's own parameter memory, without batch dimensions
        own = getattr(flow, name)
        assert params[name].shape == own.shape and params[name].data_ptr() == own.data_ptr()
    t = flow.condition(c[:2])
    x = torch.randn(2, 4, dtype=DTYPE)
    y = t(x)
    t.clear_cache()
    assert torch.allclose(t.inv(y), x)
    for i in range(2):
        single = flow.condition(c[i])
        expected = torch.linalg.slogdet(dense_jacobian(single, x[i]))[1]
        assert torch.allclose(t.log_abs_det_jacobian(x, y)[i], expected)


def test_conditional_householder_vectors_come_from_the_context() -> None:
    flow = perturb(Householder(4, num_reflections=3, context_dim=2))
    c = torch.randn(5, 2, dtype=DTYPE)
    t = flow.condition(c)
    vectors = flow.raw_params(c)["vectors"].detach()
    assert vectors.shape == (5, 3, 4)
    x = torch.randn(5, 4, dtype=DTYPE)
    y = t(x)
    for i in range(5):
        assert torch.allclose(y[i], dense_reflections(vectors[i]) @ x[i])


def test_all_linear_families_are_registered() -> None:
    names = {"permutation", "triangular", "lu", "convex_triangular", "householder", "qr"}
    assert names <= set(registry)
    assert names - {"permutation"} <= set(conditional_registry)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: Householder(3, num_reflections=0), "num_reflections"),
        (lambda: QR(3, num_reflections=0), "num_reflections"),
        (lambda: ConvexTriangular(3, num_matrices=0), "num_matrices"),
        (lambda: make_permutation(3, [0, 0, 1], None), "permutation"),
        (lambda: make_permutation(3, "sorted", None), "permutation"),
    ],
)
def test_bad_arguments_raise(factory, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()
