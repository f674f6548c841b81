"""Context-aware MLP / residual conditioner networks, e.g. for coupling layers."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from pyro_flows._validation import check_size, check_widths

__all__ = ["ResidualNet"]


class ResidualNet(nn.Module):
    r"""A fully connected network ``in_features → hidden_dims → out_features`` with an optional context input.

    The context enters the first layer through its own linear map (``h_1 = W x + V c + b``), so ``x`` and ``c``
    only need broadcastable batch shapes. With ``residual=True`` every hidden→hidden layer of equal width is a skip
    block $h + W\,\mathrm{act}(h)$; with ``residual=False`` it is a plain MLP.

    Args:
        in_features: input size.
        out_features: output size.
        hidden_dims: hidden widths (at least one; with ``residual`` they must be equal).
        context_dim: context size (0: no context).
        residual: use skip connections between hidden layers.
        activation: activation module class.
        zero_last: initialize the output layer at zero (flows built on the network then start at the identity).

    Examples:
        >>> import torch
        >>> net = ResidualNet(3, 4, (16, 16), context_dim=2)
        >>> net(torch.randn(5, 3), torch.randn(2)).shape
        torch.Size([5, 4])

    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_dims: Sequence[int] = (64, 64),
        context_dim: int = 0,
        residual: bool = True,
        activation: Callable[[], nn.Module] = nn.ReLU,
        zero_last: bool = False,
    ) -> None:
        super().__init__()
        hidden_dims = check_widths(hidden_dims, "hidden_dims", equal=residual)
        if not hidden_dims:
            raise ValueError("a ResidualNet needs at least one hidden layer (hidden_dims is empty)")
        in_features, out_features = check_size(in_features, "in_features"), check_size(out_features, "out_features")
        context_dim = check_size(context_dim, "context_dim", minimum=0)
        self.residual = residual
        self.context_dim = context_dim
        self.input = nn.Linear(in_features, hidden_dims[0])
        self.context = nn.Linear(context_dim, hidden_dims[0], bias=False) if context_dim else None
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(hidden_dims))
        self.output = nn.Linear(hidden_dims[-1], out_features)
        if zero_last:
            nn.init.zeros_(self.output.weight)
            nn.init.zeros_(self.output.bias)
        self.activation = activation()

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Apply the network to ``x`` of shape ``(..., in_features)`` and ``context`` ``(..., context_dim)``."""
        h = self.input(x)
        if self.context is not None:
            if context is None:
                raise ValueError(f"this network needs a context of size {self.context_dim}")
            h = h + self.context(context)
        elif context is not None:
            raise ValueError("this network has no context input (context_dim=0) but a context was given")
        for layer in self.hidden:
            update = layer(self.activation(h))
            h = h + update if self.residual else update
        return self.output(self.activation(h))
