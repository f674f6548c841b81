"""Plain multi-layer perceptrons used as conditioners and hypernetworks."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """A fully connected network ``in_features → hidden_dims → out_features``.

    Args:
        in_features: input size.
        out_features: output size.
        hidden_dims: widths of the hidden layers (may be empty: a single affine layer).
        activation: activation module class inserted after every hidden layer.
        zero_last: initialize the last layer's weight and bias at zero, so the network starts as the constant 0
            (flows built on it then start at their context-independent / identity initialization).

    Examples:
        >>> import torch
        >>> net = MLP(3, 2, (16,), zero_last=True)
        >>> net(torch.randn(5, 3)).abs().max().item()
        0.0

    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_dims: Sequence[int] = (64, 64),
        activation: Callable[[], nn.Module] = nn.ReLU,
        zero_last: bool = False,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1 or any(h < 1 for h in hidden_dims):
            raise ValueError(
                f"MLP sizes must be positive, got in={in_features}, out={out_features}, hidden={tuple(hidden_dims)}"
            )
        layers: list[nn.Module] = []
        sizes = [in_features, *hidden_dims]
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), activation()]
        last = nn.Linear(sizes[-1], out_features)
        if zero_last:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the network to ``x`` of shape ``(..., in_features)``."""
        return self.net(x)
