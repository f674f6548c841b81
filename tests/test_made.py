"""MADE masks and the context-aware residual conditioner."""

from __future__ import annotations

import io

import pytest
import torch
from torch.autograd.functional import jacobian

from pyro_flows.nn import MADE, ResidualNet, made_degrees

DIM = 6


def _randomize(module: torch.nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))


def _dependencies(net: MADE, context: torch.Tensor | None = None) -> torch.Tensor:
    """``[p, i, j]``: does output (p, i) depend on input j, at a few random points (union)."""
    deps = torch.zeros(net.num_params, net.dim, net.dim, dtype=torch.bool)
    for seed in range(4):
        torch.manual_seed(seed)
        x = torch.randn(net.dim, dtype=torch.float64)
        deps |= jacobian(lambda v: net(v, context), x).abs() > 0
    return deps


ORDERS = ["natural", "reverse", "random", [2, 0, 5, 1, 4, 3]]
HIDDEN = [(32,), (3,), (1,), (16, 8), (), (4, 4)]


@pytest.mark.parametrize("order", ORDERS, ids=str)
@pytest.mark.parametrize("hidden", HIDDEN, ids=str)
def test_outputs_depend_only_on_earlier_inputs(order: object, hidden: tuple[int, ...]) -> None:
    net = MADE(DIM, num_params=3, hidden_dims=hidden, order=order, activation=torch.nn.Tanh, output_scale=1.0)
    net = net.double()
    _randomize(net)
    deps = _dependencies(net)
    rank = net.degrees
    allowed = rank[None, :] < rank[:, None]
    assert not (deps & ~allowed).any()
    assert torch.equal(deps.any(0), net.connectivity() & deps.any(0))
    if hidden and min(hidden) >= DIM - 1:
        assert torch.equal(deps[0], allowed), "a full-width MADE connects every allowed pair"
        assert int(net.num_passes) == DIM


@pytest.mark.parametrize("hidden", [(8, 8), (3, 3)], ids=str)
def test_residual_blocks_keep_the_autoregressive_property(hidden: tuple[int, ...]) -> None:
    net = MADE(DIM, 2, hidden, order="random", residual=True, output_scale=1.0).double()
    _randomize(net)
    deps = _dependencies(net)
    rank = net.degrees
    assert not (deps & ~(rank[None, :] < rank[:, None])).any()
    assert deps.any()


def test_context_reaches_every_output_and_keeps_the_mask() -> None:
    net = MADE(DIM, 2, (16,), context_dim=3, order="reverse", activation=torch.nn.Tanh, output_scale=1.0).double()
    _randomize(net)
    c = torch.randn(3, dtype=torch.float64)
    deps = _dependencies(net, c)
    rank = net.degrees
    assert not (deps & ~(rank[None, :] < rank[:, None])).any()
    x = torch.randn(DIM, dtype=torch.float64)
    dc = jacobian(lambda v: net(x, v), c)
    assert (dc.abs().sum(-1) > 0).all(), "every output reads the context"
    assert net(torch.randn(4, 5, DIM, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)).shape == (
        4,
        5,
        2,
        6,
    )
    with pytest.raises(ValueError, match="context"):
        net(x)
    with pytest.raises(ValueError, match="context"):
        MADE(DIM, 2, (16,))(x.float(), c.float())


def test_masks_are_buffers_built_once_and_follow_the_module() -> None:
    net = MADE(DIM, 2, (8, 8), order="random")
    buffers = dict(net.named_buffers())
    assert {"degrees", "num_passes", "raw_mask"} <= set(buffers)
    mask = net.raw_mask
    net(torch.randn(3, DIM))
    assert net.raw_mask is mask
    net = net.double()
    assert net.raw_mask.dtype == torch.float64 and net.masks()[0].dtype == torch.float64
    clone = MADE(DIM, 2, (8, 8), order="natural")
    buffer = io.BytesIO()
    torch.save(net.float().state_dict(), buffer)
    buffer.seek(0)
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(clone.degrees, net.degrees)
    x = torch.randn(2, DIM)
    assert torch.equal(clone(x), net(x))


@pytest.mark.parametrize("context_dim", [0, 3])
def test_weights_are_one_packed_parameter_and_former_checkpoints_load(context_dim: int) -> None:
    # one tensor for Pyro's parameter store and optimizers instead of two per layer
    net = MADE(DIM, 2, (8, 8), context_dim=context_dim, order="random").double()
    _randomize(net)
    assert [name for name, _ in net.named_parameters()] == ["raw"]
    views = net.layout.views(net.raw)
    assert views["layers.0.weight"].shape == (8, DIM) and views["output.bias"].shape == (2 * DIM,)
    with torch.no_grad():  # views write through
        views["output.bias"][0] = 7.0
    assert net.layout.views(net.raw.detach())["output.bias"][0] == 7.0
    # the former format: one nn.Linear per layer (layers.k.weight/bias/mask, output.*, context.*)
    legacy = {key: value for key, value in net.state_dict().items() if key not in ("raw", "raw_mask")}
    legacy.update({key: value.clone() for key, value in net.layout.views(net.raw.detach()).items()})
    masks = net.masks()
    legacy.update({"layers.0.mask": masks[0], "layers.1.mask": masks[1], "output.mask": masks[2]})
    torch.manual_seed(9)
    clone = MADE(DIM, 2, (8, 8), context_dim=context_dim, order="random").double()
    clone.load_state_dict(legacy)
    x = torch.randn(5, DIM, dtype=torch.float64)
    c = torch.randn(5, 3, dtype=torch.float64) if context_dim else None
    assert torch.equal(clone(x, c), net(x, c))


def test_narrow_hidden_layers_need_fewer_passes() -> None:
    wide = MADE(10, 2, (64,))
    narrow = MADE(10, 2, (2,))
    assert int(wide.num_passes) == 10
    assert int(narrow.num_passes) < 10
    assert sum(p.numel() for p in narrow.parameters()) < 100


def test_output_layer_starts_small() -> None:
    net = MADE(DIM, 2, (32, 32))
    assert net(torch.randn(100, DIM)).abs().max() < 0.5


def test_made_degrees_and_errors() -> None:
    assert made_degrees(4, [3, 1, 0, 2]).tolist() == [3, 2, 4, 1]
    assert made_degrees(3).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="permutation"):
        made_degrees(3, [0, 0, 1])
    with pytest.raises(ValueError, match="order"):
        made_degrees(3, "sideways")
    with pytest.raises(ValueError, match="equal hidden"):
        MADE(3, 2, (4, 8), residual=True)
    with pytest.raises(ValueError, match="positive"):
        MADE(3, 2, (0,))


def test_made_of_one_dimension_is_constant_in_x() -> None:
    net = MADE(1, 2, (4,), output_scale=1.0)
    assert torch.equal(net(torch.zeros(1)), net(torch.ones(1)))
    assert int(net.num_passes) == 1


@pytest.mark.parametrize("residual", [True, False])
def test_residual_net_with_context(residual: bool) -> None:
    net = ResidualNet(3, 4, (8, 8), context_dim=2, residual=residual).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    c = torch.randn(5, 2, dtype=torch.float64)
    out = net(x, c)
    assert out.shape == (5, 4)
    assert torch.allclose(out[1], net(x[1], c[1]))
    assert not torch.allclose(out, net(x, c + 1))
    assert net(x, c[0]).shape == (5, 4)
    with pytest.raises(ValueError, match="context"):
        net(x)
    with pytest.raises(ValueError, match="context"):
        ResidualNet(3, 4)(x.float(), c.float())
    with pytest.raises(ValueError, match="equal hidden"):
        ResidualNet(3, 4, (8, 4), residual=True)
    assert ResidualNet(3, 4, (8,), zero_last=True)(x.float()).abs().max() == 0
