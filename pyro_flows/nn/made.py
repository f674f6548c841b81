r"""MADE: masked autoencoder for distribution estimation (Germain et al. 2015), the autoregressive conditioner.

Every unit carries a *degree*. Input $i$ has degree $r_i \in \{1..D\}$, its rank in the
autoregressive order; hidden units have degrees in $\{1..D-1\}$. A hidden unit of degree $k$ may read
units of degree $\le k$, an output attached to input $i$ may read units of degree $< r_i$. The
output for coordinate $i$ is therefore a function of $\{x_j : r_j < r_i\}$ only, whatever the weights:
the Jacobian of the network's outputs w.r.t. its inputs is strictly triangular in the order.

All weights and biases are views of one packed parameter, ``raw`` ([`PackedLayout`][pyro_flows.nn.PackedLayout]):
one tensor for an optimizer and for Pyro's parameter store instead of two per layer. The masks are built once and
packed the same way (buffer ``raw_mask``, 1 on biases; saved in ``state_dict`` and moved with the module): each
forward masks every weight with one multiplication ``raw * raw_mask`` and runs plain ``F.linear`` layers. Hidden
widths may be smaller than D: hidden degrees are then spread evenly over $1..D-1$ (fewer connections, still
autoregressive). A context vector enters the first layer through an unmasked linear map (degree 0: every unit may
read it).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_flows._validation import check_size, check_widths
from pyro_flows.nn.packed import PackedLayout

__all__ = ["MADE", "MADEWeights", "MaskedLinear", "made_degrees"]

Order = Literal["natural", "reverse", "random"] | Sequence[int] | Tensor


def made_degrees(dim: int, order: Order = "natural", generator: torch.Generator | None = None) -> Tensor:
    """Input degrees ``r`` (1-based ranks) of an autoregressive order on ``range(dim)``.

    ``order`` is ``"natural"`` (0, 1, ..., D-1), ``"reverse"``, ``"random"`` or an explicit sequence listing the
    coordinates from first to last; coordinate ``order[k]`` gets degree ``k + 1``.

    Raises:
        ValueError: if an explicit order is not a permutation of ``range(dim)`` or the name is unknown.

    Examples:
        >>> made_degrees(3, "reverse").tolist()
        [3, 2, 1]

    """
    if isinstance(order, str):
        if order == "natural":
            perm = torch.arange(dim)
        elif order == "reverse":
            perm = torch.arange(dim - 1, -1, -1)
        elif order == "random":
            perm = torch.randperm(dim, generator=generator)
        else:
            raise ValueError(f"order must be 'natural', 'reverse', 'random' or a sequence of indices, got {order!r}")
    else:
        perm = torch.as_tensor(order, dtype=torch.long).flatten()
        if perm.numel() != dim or not torch.equal(perm.sort().values, torch.arange(dim)):
            raise ValueError(f"order must be a permutation of range({dim}), got {perm.tolist()}")
    degrees = torch.empty(dim, dtype=torch.long)
    degrees[perm] = torch.arange(1, dim + 1)
    return degrees


def _hidden_degrees(width: int, dim: int) -> Tensor:
    """Degrees of a hidden layer: cycle through 1..D-1 when wide enough, else spread evenly over 1..D-1."""
    top = max(dim - 1, 1)
    if width >= top:
        return torch.arange(width) % top + 1
    return torch.linspace(1, top, width).round().long()


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (a buffer) at every call.

    Args:
        mask: ``(out_features, in_features)`` mask; its shape sets the layer's sizes.
        bias: learn a bias.

    Examples:
        >>> layer = MaskedLinear(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        >>> layer.masked_weight()[0, 1].item()
        0.0

    """

    def __init__(self, mask: Tensor, bias: bool = True) -> None:
        out_features, in_features = mask.shape
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def masked_weight(self) -> Tensor:
        """The effective weight ``weight * mask``."""
        return self.weight * self.mask

    def forward(self, x: Tensor) -> Tensor:
        """``x @ (weight * mask).T + bias``."""
        return F.linear(x, self.masked_weight(), self.bias)


class MADEWeights(NamedTuple):
    """A MADE's weights read once for a call: ``(masked weight, bias)`` per layer (output last), context maps."""

    layers: list[tuple[Tensor, Tensor]]
    context_hidden: tuple[Tensor, Tensor] | None
    context_output: Tensor | None


class MADE(nn.Module):
    r"""Masked autoregressive network $x \in \mathbb{R}^D \mapsto \theta \in \mathbb{R}^{P \times D}$.

    Output ``theta[..., p, i]`` depends only on the inputs before coordinate ``i`` in the order (and on the
    context). Layers: masked linear maps with ``activation`` in between; with ``residual=True`` each hidden→hidden
    layer of equal width is a skip block $h + W\,\mathrm{act}(h)$ (the degrees are the same on both sides, so
    the skip keeps the autoregressive property).

    Args:
        dim: number of autoregressive inputs D.
        num_params: number of outputs per input coordinate P.
        hidden_dims: hidden widths (any positive sizes; may be smaller than D).
        context_dim: size of an optional context vector (0: unconditional).
        order: ``"natural"``, ``"reverse"``, ``"random"`` or an explicit order (first to last coordinate).
        residual: use skip connections between consecutive hidden layers (their widths must be equal).
        activation: activation module class.
        output_scale: the output layer's initial weights are scaled by this factor and its bias starts at 0, so the
            outputs start near 0 (flows then start near their identity parameters).
        generator: random generator for ``order="random"``.

    Attributes:
        raw: every weight and bias, flattened and packed (``layout.views(raw)`` gives them by their former names,
            ``"layers.0.weight"``, ..., ``"output.bias"``, ``"context.weight"``, ``"context_output.weight"``).
        degrees: input degrees (buffer), ``degrees[i]`` = 1-based rank of coordinate ``i`` in the order.
        num_passes: (0-d buffer) number of sequential passes that invert an autoregressive map built on this network:
            the length of the longest dependency chain between inputs (D for full-width networks, fewer when narrow
            hidden layers cut connections).

    Examples:
        >>> net = MADE(4, num_params=2, hidden_dims=(8,))
        >>> net(torch.randn(10, 4)).shape
        torch.Size([10, 2, 4])

    """

    def __init__(
        self,
        dim: int,
        num_params: int = 2,
        hidden_dims: Sequence[int] = (64, 64),
        context_dim: int = 0,
        order: Order = "natural",
        residual: bool = False,
        activation: Callable[[], nn.Module] = nn.ReLU,
        output_scale: float = 1e-2,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        hidden_dims = check_widths(hidden_dims, "hidden_dims", equal=residual)
        dim, num_params = check_size(dim, "dim"), check_size(num_params, "num_params")
        context_dim = check_size(context_dim, "context_dim", minimum=0)
        self.dim = dim
        self.num_params = num_params
        self.context_dim = context_dim
        self.residual = residual
        degrees = made_degrees(dim, order, generator)
        self.register_buffer("degrees", degrees)
        self.hidden_dims = hidden_dims
        layer_degrees = [degrees, *(_hidden_degrees(h, dim) for h in hidden_dims)]
        masks = [(d_out[:, None] >= d_in[None, :]) for d_in, d_out in itertools.pairwise(layer_degrees)]
        masks.append(degrees.repeat(num_params)[:, None] > layer_degrees[-1][None, :])
        self.num_masks = len(masks)
        # nn.Linear's initialization, drawn in the order of the former one-module-per-layer network (same draws for
        # a given seed); the output layer and the context's direct map start at output_scale times it
        self.layout = PackedLayout()
        raw = None
        for k, mask in enumerate(masks):
            name = f"layers.{k}" if k < len(hidden_dims) else "output"
            linear = nn.Linear(mask.shape[1], mask.shape[0])
            is_output = k == len(hidden_dims)
            weight, bias = linear.weight, linear.bias
            raw = self.layout.append(raw, f"{name}.weight", weight * output_scale if is_output else weight)
            raw = self.layout.append(raw, f"{name}.bias", torch.zeros_like(bias) if is_output else bias)
        if context_dim and hidden_dims:
            linear = nn.Linear(context_dim, hidden_dims[0])
            raw = self.layout.append(raw, "context.weight", linear.weight)
            raw = self.layout.append(raw, "context.bias", linear.bias)
        if context_dim:
            linear = nn.Linear(context_dim, dim * num_params, bias=False)
            raw = self.layout.append(raw, "context_output.weight", linear.weight * output_scale)
        self.raw = raw
        # the masks packed like ``raw`` (1 on biases and context maps): one multiplication masks every weight
        raw_mask = torch.ones_like(raw.detach())
        for (view, _), mask in zip(self._layers(self.layout.tensors(raw_mask)), masks, strict=True):
            view.copy_(mask)
        self.register_buffer("raw_mask", raw_mask)
        self.activation = activation()
        self._relu_in_place = type(self.activation) is nn.ReLU and not residual
        self.register_buffer("num_passes", torch.tensor(self._longest_chain()))

    def _layers(self, tensors: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """``(weight, bias)`` of each layer, output layer last, from the tensors of something packed like ``raw``."""
        return list(zip(tensors[0 : 2 * self.num_masks : 2], tensors[1 : 2 * self.num_masks : 2], strict=True))

    def masks(self) -> list[Tensor]:
        """The 0/1 connectivity masks of the layers (views of the buffer ``raw_mask``), output layer last."""
        return [mask for mask, _ in self._layers(self.layout.tensors(self.raw_mask))]

    def connectivity(self) -> Tensor:
        """``(D, D)`` boolean matrix: entry ``[i, j]`` is True when some path connects input ``j`` to output ``i``."""
        *hidden, output = self.masks()
        reach: Tensor | None = None
        for mask in hidden:
            skip = reach if self.residual else 0
            reach = mask if reach is None else (mask @ reach + skip).clamp(max=1)
        out = output[: self.dim]
        return (out if reach is None else out @ reach) > 0

    def _longest_chain(self) -> int:
        parents = self.connectivity()
        depth = torch.zeros(self.dim, dtype=torch.long)
        for i in torch.argsort(self.degrees).tolist():
            above = depth[parents[i]]
            depth[i] = 1 + (int(above.max()) if above.numel() else 0)
        return int(depth.max())

    def _activate(self, h: Tensor) -> Tensor:
        # hidden pre-activations are fresh tensors that nothing else reads (no skip connections): ReLU may overwrite
        # them (the linear maps' backward does not need their outputs), saving one allocation per layer. Not for a
        # view (F.linear of an unbatched vector returns one; an in-place op on it costs a CopySlices node in the
        # backward, slower than the allocation saved) and not under torch.jit.trace (JitTrace_ELBO), whose traced
        # graph rejects in-place updates of these tensors
        if self._relu_in_place and h._base is None and not torch.jit.is_tracing():
            return torch.relu_(h)
        return self.activation(h)

    def weights(self) -> MADEWeights:
        """The layers' masked weights and biases and the context maps, read once from ``raw``; reuse for many passes."""
        tensors = self.layout.tensors(self.raw * self.raw_mask)
        layers, context = self._layers(tensors), tensors[2 * self.num_masks :]
        if not context:
            return MADEWeights(layers, None, None)
        hidden = (context[0], context[1]) if len(context) == 3 else None
        return MADEWeights(layers, hidden, context[-1])

    def context_term(self, context: Tensor | None, weights: MADEWeights) -> tuple[Tensor | None, Tensor] | None:
        """The context's contributions to the first hidden layer and to the output layer (``None`` without context).

        The context has degree 0: it may feed every unit, including the outputs of the first coordinate in the
        order (which no hidden unit reaches), hence the direct context → output map.
        """
        if weights.context_output is None:
            if context is not None:
                raise ValueError("this MADE has no context input (context_dim=0) but a context was given")
            return None
        if context is None:
            raise ValueError(f"this MADE needs a context of size {self.context_dim}")
        hidden = F.linear(context, *weights.context_hidden) if weights.context_hidden is not None else None
        return hidden, F.linear(context, weights.context_output)

    def apply_weights(
        self, x: Tensor, weights: MADEWeights, context_term: tuple[Tensor | None, Tensor] | None = None
    ) -> Tensor:
        """Run the network on ``x`` with precomputed ``weights``; returns ``(..., num_params, dim)``."""
        *hidden, (out_weight, out_bias) = weights.layers
        h = x
        for i, (weight, bias) in enumerate(hidden):
            pre = F.linear(h if i == 0 else self._activate(h), weight, bias)
            if i == 0 and context_term is not None and context_term[0] is not None:
                pre = pre + context_term[0]
            h = pre + h if self.residual and i > 0 else pre
        out = F.linear(self._activate(h) if hidden else h, out_weight, out_bias)
        if context_term is not None:
            out = out + context_term[1]
        return out.unflatten(-1, (self.num_params, self.dim))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Autoregressive parameters ``(..., num_params, dim)`` for inputs ``x`` of shape ``(..., dim)``."""
        weights = self.weights()
        return self.apply_weights(x, weights, self.context_term(context, weights))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Load the former format too (one ``nn.Linear`` per layer: ``layers.0.weight``, ..., ``output.mask``)."""
        self.layout.pack_legacy(state_dict, prefix)
        old = [f"{prefix}layers.{k}.mask" for k in range(self.num_masks - 1)] + [f"{prefix}output.mask"]
        if prefix + "raw_mask" not in state_dict and all(key in state_dict for key in old):
            mask = torch.ones_like(self.raw_mask)
            for (view, _), key in zip(self._layers(self.layout.tensors(mask)), old, strict=True):
                view.copy_(state_dict.pop(key))
            state_dict[prefix + "raw_mask"] = mask
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        """Show the sizes in ``repr``."""
        return f"dim={self.dim}, num_params={self.num_params}, context_dim={self.context_dim}, residual={self.residual}"
