"""Tests of the image flows beyond the conformance suite: dense-matrix equivalence, masks, Squeeze."""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F

from pyro_flows.transforms import image_registry
from pyro_flows.transforms._utils import positive
from pyro_flows.transforms.conv import EmergingConv2d, InvertibleConv1x1, Squeeze

DTYPE = torch.float64


def perturb(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    module = module.to(DTYPE)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def raster_matrix(fn, shape: tuple[int, int, int]) -> torch.Tensor:
    """Dense matrix of a linear map on (C, H, W) images, in the raster ordering of (h, w, c)."""
    c, h, w = shape
    n = c * h * w
    basis = torch.eye(n, dtype=DTYPE).reshape(n, h, w, c).permute(0, 3, 1, 2)
    out = fn(basis).permute(0, 2, 3, 1).reshape(n, n)
    return out.T


def test_conv1x1_is_a_per_pixel_matrix() -> None:
    flow = perturb(InvertibleConv1x1((3, 2, 5)))
    matrix, diag = flow.weight()
    x = torch.randn(4, 3, 2, 5, dtype=DTYPE)
    y = flow(x)
    assert torch.allclose(y, torch.einsum("ij,njhw->nihw", matrix, x))
    log_det = flow.log_abs_det_jacobian(x, y)
    assert torch.allclose(log_det, 10 * torch.linalg.slogdet(matrix)[1].expand(4))
    assert torch.allclose(log_det, 10 * diag.log().sum().expand(4))


def test_conv1x1_starts_at_a_channel_permutation() -> None:
    flow = InvertibleConv1x1((3, 2, 2), permutation=[2, 0, 1]).to(DTYPE)
    x = torch.randn(2, 3, 2, 2, dtype=DTYPE)
    assert torch.allclose(flow(x), x[:, [2, 0, 1]])


def test_conv1x1_can_be_amortized() -> None:
    flow = perturb(InvertibleConv1x1((3, 2, 2), context_dim=2, context_hidden_dims=(8,)))
    c = torch.randn(4, 2, dtype=DTYPE)
    x = torch.randn(4, 3, 2, 2, dtype=DTYPE)
    t = flow.condition(c)
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    for i in range(4):
        single = flow.condition(c[i])
        assert torch.allclose(single(x[i]), y[i])
        assert torch.allclose(single.log_abs_det_jacobian(x[i], single(x[i])), log_det[i])
    t.clear_cache()
    assert torch.allclose(t.inv(y), x)


def test_emerging_conv_rejects_batched_parameters() -> None:
    flow = EmergingConv2d((2, 3, 3))
    params = {name: p.expand(2, *p.shape) for name, p in flow.raw_params().items()}
    with pytest.raises(ValueError, match="batched"):
        flow._forward_with(params, torch.randn(2, 2, 3, 3))


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_emerging_conv_equals_dense_autoregressive_matrices(kernel_size: int) -> None:
    shape = (2, 3, 4)
    flow = perturb(EmergingConv2d(shape, kernel_size=kernel_size, bias=False))
    kernel1, kernel2, diag1, diag2 = flow.masked_kernels()
    pad = kernel_size // 2
    m1 = raster_matrix(lambda z: F.conv2d(z, kernel1.detach(), padding=pad), shape)
    m2 = raster_matrix(lambda z: F.conv2d(z, kernel2.detach(), padding=pad), shape)
    assert torch.equal(m1, m1.tril()), "the first convolution must be causal (lower triangular)"
    assert torch.equal(m2, m2.triu()), "the second convolution must be anti-causal (upper triangular)"
    assert torch.allclose(m1.diagonal(), diag1.detach().repeat(12))
    assert torch.allclose(m2.diagonal(), diag2.detach().repeat(12))
    full = raster_matrix(lambda z: flow(z), shape)
    assert torch.allclose(full, m2 @ m1)
    x = torch.randn(shape, dtype=DTYPE)
    assert torch.allclose(flow.log_abs_det_jacobian(x, flow(x)), torch.linalg.slogdet(full)[1])


def test_emerging_conv_receptive_field_emerges() -> None:
    flow = perturb(EmergingConv2d((1, 7, 7), kernel_size=3, bias=False))
    x = torch.zeros(1, 7, 7, dtype=DTYPE, requires_grad=True)
    flow(x)[0, 3, 3].backward()
    support = x.grad[0] != 0
    assert support[2:5, 2:5].all(), "the composition covers at least the 3×3 window of a standard convolution"
    assert support[2, 5] and support[4, 1], "it reaches beyond it along the rows"
    assert not support[:2].any() and not support[5:].any(), "but only within the kernel's rows"


def test_emerging_conv_inverse_on_a_larger_image_and_log_det() -> None:
    flow = perturb(EmergingConv2d((3, 6, 5)))
    x = torch.randn(2, 3, 6, 5, dtype=DTYPE)
    y = flow(x)
    flow.clear_cache()
    assert torch.allclose(flow.inv(y), x, atol=1e-10)
    expected = 30 * (positive(flow.raw_diag1).log().sum() + positive(flow.raw_diag2).log().sum())
    assert torch.allclose(flow.log_abs_det_jacobian(x, y), expected.detach().expand(2))


def test_emerging_conv_inverse_is_differentiable() -> None:
    flow = perturb(EmergingConv2d((2, 3, 3)))
    y = torch.randn(2, 3, 3, dtype=DTYPE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: flow.inv(v.clone()), (y,))
    flow.inv(y).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.parameters())


def test_emerging_conv_starts_at_identity() -> None:
    x = torch.randn(3, 2, 4, 4)
    assert torch.allclose(EmergingConv2d((2, 4, 4))(x), x)


def test_squeeze_round_trip_and_layout() -> None:
    squeeze = Squeeze((2, 4, 6))
    x = torch.arange(48.0).reshape(2, 4, 6)
    y = squeeze(x)
    assert y.shape == (8, 2, 3)
    assert torch.equal(y[0], x[0, 0::2, 0::2])
    assert torch.equal(y[1], x[0, 0::2, 1::2])
    assert torch.equal(y[2], x[0, 1::2, 0::2])
    assert torch.equal(y[4], x[1, 0::2, 0::2])
    assert torch.equal(squeeze.inv(y), x)
    batch = torch.randn(3, 5, 2, 4, 6)
    assert torch.equal(squeeze.inv(squeeze(batch)), batch)
    assert squeeze.log_abs_det_jacobian(batch, squeeze(batch)).shape == (3, 5)
    assert Squeeze((1, 6, 9), factor=3)(torch.randn(1, 6, 9)).shape == (9, 2, 3)


def test_squeeze_shapes_and_errors() -> None:
    squeeze = Squeeze((2, 4, 6))
    assert squeeze.forward_shape((7, 2, 4, 6)) == (7, 8, 2, 3)
    assert squeeze.inverse_shape((7, 8, 2, 3)) == (7, 2, 4, 6)
    with pytest.raises(ValueError, match="divisible"):
        Squeeze((2, 4, 5))
    with pytest.raises(ValueError, match="shape"):
        squeeze(torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        squeeze.inv(torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match="shape"):
        squeeze.forward_shape((8, 2, 3))


def test_squeeze_in_a_transformed_distribution() -> None:
    shape = (2, 4, 4)
    base = dist.Normal(torch.zeros(shape), 1.0).to_event(3)
    d = dist.TransformedDistribution(base, [EmergingConv2d(shape), Squeeze(shape), InvertibleConv1x1((8, 2, 2))])
    z = d.sample((5,))
    assert z.shape == (5, 8, 2, 2)
    assert d.event_shape == (8, 2, 2)
    assert d.log_prob(z).shape == (5,)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: InvertibleConv1x1((3, 4)), "C, H, W"),
        (lambda: EmergingConv2d((2, 4, 4), kernel_size=2), "odd"),
        (lambda: Squeeze((2, 4, 4, 4)), "C, H, W"),
    ],
)
def test_bad_arguments_raise(factory, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()


def test_image_flows_are_registered() -> None:
    assert {"conv1x1", "emerging_conv"} <= set(image_registry)
