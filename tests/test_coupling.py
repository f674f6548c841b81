"""Affine and spline coupling: masks, block-triangular Jacobian, bounded log-scale, large conditioner outputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from pyro_flows.transforms import (
    AffineCoupling,
    SplineCoupling,
    conditional_registry,
    coupling_mask,
)

DIM = 5


def _perturb(module: torch.nn.Module, scale: float = 0.5) -> torch.nn.Module:
    torch.manual_seed(0)
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else 1
            p.add_(scale / math.sqrt(fan_in) * torch.randn_like(p))
    return module


@pytest.mark.parametrize("cls", [AffineCoupling, SplineCoupling], ids=lambda c: c.__name__)
def test_starts_at_identity(cls: type) -> None:
    x = torch.randn(10, DIM)
    flow = cls(DIM)
    assert torch.allclose(flow(x), x, atol=1e-6)
    assert torch.allclose(flow.log_abs_det_jacobian(x, flow(x)), torch.zeros(10), atol=1e-6)


@pytest.mark.parametrize("cls", [AffineCoupling, SplineCoupling], ids=lambda c: c.__name__)
@pytest.mark.parametrize("mask", ["even", "odd", [True, True, False, False, True]], ids=str)
def test_mask_coordinates_pass_through_and_jacobian_is_block_triangular(cls: type, mask: object) -> None:
    flow = _perturb(cls(DIM, hidden_dims=(16, 16), mask=mask))
    keep = coupling_mask(DIM, mask)
    x = 1.5 * torch.randn(DIM, dtype=torch.float64)
    y = flow(x)
    assert torch.equal(y[keep], x[keep])
    assert not torch.allclose(y[~keep], x[~keep])
    jac = jacobian(flow, x)
    assert torch.equal(jac[keep][:, keep], torch.eye(int(keep.sum()), dtype=torch.float64))
    assert jac[keep][:, ~keep].abs().max() == 0
    moved = jac[~keep][:, ~keep]
    assert torch.equal(moved, torch.diag(moved.diagonal())), "transformed coordinates are element-wise given x_A"
    assert torch.allclose(flow.log_abs_det_jacobian(x, y), moved.diagonal().log().sum(), atol=1e-10)


def test_alternating_masks_cover_every_coordinate() -> None:
    even, odd = coupling_mask(DIM, "even"), coupling_mask(DIM, "odd")
    assert torch.equal(even, ~odd)
    with pytest.raises(ValueError, match="both"):
        coupling_mask(1, "even")
    with pytest.raises(ValueError, match="both"):
        coupling_mask(3, [True, True, True])
    with pytest.raises(ValueError, match="entries"):
        coupling_mask(3, [True, False])
    with pytest.raises(ValueError, match="mask"):
        coupling_mask(3, "left")


def test_affine_log_scale_is_soft_clamped() -> None:
    flow = _perturb(AffineCoupling(DIM, hidden_dims=(16, 16), log_scale_bound=2.0), scale=1e3)
    x = torch.randn(50, DIM, dtype=torch.float64)
    y = flow(x)
    log_det = flow.log_abs_det_jacobian(x, y)
    transformed = int((~coupling_mask(DIM)).sum())
    assert (log_det.abs() <= 2.0 * transformed).all()
    flow.clear_cache()
    assert torch.allclose(flow.inv(y), x, atol=1e-6)


@pytest.mark.parametrize("scale", [5.0, 10.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_spline_coupling_round_trip_at_large_conditioner_outputs(scale: float, dtype: torch.dtype) -> None:
    flow = SplineCoupling(DIM, hidden_dims=(16, 16)).to(dtype)
    with torch.no_grad():
        flow.net.output.weight.normal_(0, scale / 4)
        flow.net.output.bias.normal_(0, scale)
    x = 2 * torch.randn(500, DIM, dtype=dtype)
    y = flow(x)
    flow.clear_cache()
    x_rec = flow.inv(y)
    flow.clear_cache()
    y_again = flow(x_rec)
    backward_error = (y_again - y).abs().max()
    assert backward_error < (1e-12 if dtype == torch.float64 else 5e-5)
    if dtype == torch.float64:
        assert (x_rec - x).abs().max() < 1e-7


@pytest.mark.parametrize("cls", [conditional_registry[n] for n in ("affine_coupling", "spline_coupling")], ids=str)
def test_conditional_coupling_broadcasts_context(cls: type) -> None:
    flow = _perturb(cls(DIM, 3, hidden_dims=(16, 16)))
    c = torch.randn(4, 1, 3, dtype=torch.float64)
    x = torch.randn(2, DIM, dtype=torch.float64)
    t = flow.condition(c)
    y = t(x)
    assert y.shape == (4, 2, DIM)
    assert t.log_abs_det_jacobian(x, y).shape == (4, 2)
    t.clear_cache()
    assert torch.allclose(t.inv(y), x.expand(4, 2, DIM), atol=1e-9)
    assert torch.equal(y[..., 0], x[..., 0].expand(4, 2))


def test_plain_mlp_conditioner_option() -> None:
    flow = _perturb(AffineCoupling(DIM, hidden_dims=(16, 8), residual=False))
    x = torch.randn(3, DIM, dtype=torch.float64)
    assert torch.allclose(flow.inv(flow(x)), x, atol=1e-10)
