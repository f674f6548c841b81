r"""Linear flows :math:`y = W x + b` with structured, always-invertible :math:`W`.

Each keeps :math:`\log|\det W|` cheap (O(D)) and its inverse exact (a permutation or triangular solves).
Shared helpers live in :mod:`pyro_flows.transforms._utils`: :func:`positive` diagonals, packed triangular
matrices, batched mat-vec and triangular solves, so the conditional (batched-parameter) variants reuse the same
code. Linear flows are sensitive to the coordinate ordering: interleave permutations between them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from pyro_flows.transforms._utils import (
    RAW_ONE,
    matvec,
    positive,
    solve_triangular_vec,
    tril_from_packed,
)
from pyro_flows.transforms.base import Flow, HyperConditionalFlow, ParametricFlow, expand_log_det
from pyro_flows.transforms.registry import conditional_registry, registry

__all__ = ["LU", "ConditionalLU", "ConditionalTriangular", "Permutation", "Triangular", "make_permutation"]


def make_permutation(
    dim: int,
    permutation: Literal["reverse", "random"] | Sequence[int] | Tensor,
    generator: torch.Generator | None,
) -> Tensor:
    """Return a permutation of ``range(dim)`` as a long tensor: reversed, random, or the one given (validated).

    Raises:
        ValueError: if a given permutation is not a permutation of ``range(dim)``.

    """
    if isinstance(permutation, str):
        if permutation == "reverse":
            return torch.arange(dim - 1, -1, -1)
        if permutation == "random":
            return torch.randperm(dim, generator=generator)
        raise ValueError(f"permutation must be 'reverse', 'random' or a sequence of indices, got {permutation!r}")
    perm = torch.as_tensor(permutation, dtype=torch.long).flatten()
    if perm.numel() != dim or not torch.equal(perm.sort().values, torch.arange(dim)):
        raise ValueError(f"permutation must be a permutation of range({dim}), got {perm.tolist()}")
    return perm


@registry.register("permutation")
class Permutation(Flow):
    r"""Fixed permutation of the coordinates, :math:`y_i = x_{\pi(i)}`.

    * log-det: 0 (volume preserving);
    * inverse (closed form): :math:`x_{\pi(i)} = y_i`, an index gather in both directions.

    The permutation is a buffer, so it is saved in ``state_dict`` and moves with ``.to(device)``.

    Args:
        dim: event size D.
        permutation: ``"reverse"`` (default), ``"random"`` or an explicit sequence of indices.
        generator: random generator for ``"random"``.

    Example:
        >>> import torch
        >>> Permutation(3)(torch.tensor([1.0, 2.0, 3.0]))
        tensor([3., 2., 1.])

    """

    def __init__(
        self,
        dim: int,
        permutation: Literal["reverse", "random"] | Sequence[int] | Tensor = "reverse",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(dim)
        perm = make_permutation(dim, permutation, generator)
        self.register_buffer("permutation", perm)
        self.register_buffer("inverse_permutation", torch.argsort(perm))

    def _forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[..., self.permutation], x.new_zeros(x.shape[:-1])

    def _inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return y[..., self.inverse_permutation], y.new_zeros(y.shape[:-1])


@registry.register("triangular")
class Triangular(ParametricFlow):
    r"""Lower-triangular linear flow :math:`y = L x + b`.

    :math:`L` has free entries below the diagonal and a positive diagonal :math:`L_{ii} = \mathrm{softplus}(\rho_i)
    + 10^{-3}`, so it is invertible for any raw parameters.

    * log-det: :math:`\sum_i \log L_{ii}` (O(D));
    * forward: one matrix product, O(D²) per point; inverse: one triangular solve, O(D²) per point.

    Starts at the identity. This is the linear IAF of Kingma et al. (2016) with a learnable diagonal (a
    :math:`D \times D` autoregressive affine map).

    Args:
        dim: event size D.
        bias: learn the offset :math:`b` (default ``True``).

    Example:
        >>> import torch
        >>> flow = Triangular(3)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(flow(x), x)
        True

    """

    def __init__(self, dim: int, bias: bool = True) -> None:
        super().__init__(dim)
        self.add_raw_param("lower", torch.zeros(dim * (dim - 1) // 2))
        self.add_raw_param("raw_diag", torch.full((dim,), RAW_ONE))
        if bias:
            self.add_raw_param("bias", torch.zeros(dim))

    def _matrix(self, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        diag = positive(params["raw_diag"])
        return tril_from_packed(params["lower"], self.dim, diag), diag

    def _forward_with(self, params: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        matrix, diag = self._matrix(params)
        y = matvec(matrix, x)
        if "bias" in params:
            y = y + params["bias"]
        return y, expand_log_det(diag.log().sum(-1), x, 1)

    def _inverse_with(self, params: Mapping[str, Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        matrix, diag = self._matrix(params)
        if "bias" in params:
            y = y - params["bias"]
        x = solve_triangular_vec(matrix, y, upper=False)
        return x, expand_log_det(diag.log().sum(-1), x, 1)


@registry.register("lu")
class LU(ParametricFlow):
    r"""LU-parameterized linear flow :math:`y = P L U x + b` (Kingma & Dhariwal 2018, Glow).

    :math:`P` is a fixed permutation (random by default, a buffer), :math:`L` unit lower-triangular and :math:`U`
    upper-triangular with positive diagonal :math:`U_{ii} = \mathrm{softplus}(\rho_i) + 10^{-3}`; together they
    reach every matrix whose LU factorization under :math:`P` has a positive-diagonal :math:`U`.

    * log-det: :math:`\sum_i \log U_{ii}` (O(D));
    * forward O(D²) per point (plus O(D³) per call to form :math:`LU`); inverse: two triangular solves.

    Starts at the permutation :math:`P`.

    Args:
        dim: event size D.
        permutation: ``"random"`` (default), ``"reverse"`` or explicit indices for :math:`P`.
        bias: learn the offset :math:`b` (default ``True``).
        generator: random generator for the permutation.

    """

    def __init__(
        self,
        dim: int,
        permutation: Literal["reverse", "random"] | Sequence[int] | Tensor = "random",
        bias: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(dim)
        perm = make_permutation(dim, permutation, generator)
        self.register_buffer("permutation", perm)
        self.register_buffer("inverse_permutation", torch.argsort(perm))
        self.add_raw_param("lower", torch.zeros(dim * (dim - 1) // 2))
        self.add_raw_param("upper", torch.zeros(dim * (dim - 1) // 2))
        self.add_raw_param("raw_diag", torch.full((dim,), RAW_ONE))
        if bias:
            self.add_raw_param("bias", torch.zeros(dim))

    def _factors(self, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        diag = positive(params["raw_diag"])
        lower = tril_from_packed(params["lower"], self.dim, torch.ones_like(diag))
        upper = tril_from_packed(params["upper"], self.dim, diag, upper=True)
        return lower, upper, diag

    def _forward_with(self, params: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        lower, upper, diag = self._factors(params)
        y = matvec(lower @ upper, x)[..., self.permutation]
        if "bias" in params:
            y = y + params["bias"]
        return y, expand_log_det(diag.log().sum(-1), x, 1)

    def _inverse_with(self, params: Mapping[str, Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        lower, upper, diag = self._factors(params)
        if "bias" in params:
            y = y - params["bias"]
        z = solve_triangular_vec(lower, y[..., self.inverse_permutation], upper=False, unit_diagonal=True)
        x = solve_triangular_vec(upper, z, upper=True)
        return x, expand_log_det(diag.log().sum(-1), x, 1)


@conditional_registry.register("triangular")
class ConditionalTriangular(HyperConditionalFlow):
    r"""Amortized :class:`Triangular`: the entries of :math:`L` and :math:`b` are :math:`\theta_0 + g(c)`.

    Args:
        dim: event size D.
        context_dim: context size.
        hidden_dims: hidden widths of the hypernetwork ``g``.

    """

    def __init__(self, dim: int, context_dim: int, hidden_dims: Sequence[int] = (64,)) -> None:
        super().__init__(Triangular(dim), context_dim, hidden_dims, activation=nn.ELU)


@conditional_registry.register("lu")
class ConditionalLU(HyperConditionalFlow):
    r"""Amortized :class:`LU`: the entries of :math:`L`, :math:`U` and :math:`b` are :math:`\theta_0 + g(c)`.

    Args:
        dim: event size D.
        context_dim: context size.
        hidden_dims: hidden widths of the hypernetwork ``g``.

    """

    def __init__(self, dim: int, context_dim: int, hidden_dims: Sequence[int] = (64,)) -> None:
        super().__init__(LU(dim), context_dim, hidden_dims, activation=nn.ELU)
