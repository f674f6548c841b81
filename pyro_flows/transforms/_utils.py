"""Small numerical helpers shared by the flow families."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: Lower bound added to softplus-parameterized positive quantities, so that no raw value gives a singular map.
MIN_POSITIVE = 1e-3
#: Raw value whose :func:`positive` is exactly 1.
RAW_ONE = math.log(math.expm1(1.0 - MIN_POSITIVE))


def positive(raw: Tensor) -> Tensor:
    """Map an unconstrained tensor to ``softplus(raw) + MIN_POSITIVE`` (≥ 1e-3 for any raw value)."""
    return F.softplus(raw) + MIN_POSITIVE


def tril_from_packed(packed: Tensor, dim: int, diagonal: Tensor | None = None, upper: bool = False) -> Tensor:
    """Build (batched) triangular matrices from their strictly-off-diagonal entries.

    Args:
        packed: ``(..., dim * (dim - 1) // 2)`` entries below (or above, with ``upper``) the diagonal.
        dim: matrix size.
        diagonal: ``(..., dim)`` diagonal; zeros when ``None``.
        upper: fill the strict upper triangle instead of the lower one.

    """
    offset = 1 if upper else -1
    rows, cols = (torch.triu_indices if upper else torch.tril_indices)(dim, dim, offset, device=packed.device)
    matrix = packed.new_zeros(*packed.shape[:-1], dim, dim)
    matrix[..., rows, cols] = packed
    if diagonal is not None:
        matrix = matrix + torch.diag_embed(diagonal)
    return matrix


def matvec(matrix: Tensor, x: Tensor) -> Tensor:
    """``matrix @ x`` for ``x`` of shape ``(..., n)``; one GEMM when the matrix has no batch dimensions."""
    if matrix.dim() == 2:
        return x @ matrix.transpose(-1, -2)
    return (matrix @ x.unsqueeze(-1)).squeeze(-1)


def solve_triangular_vec(matrix: Tensor, y: Tensor, upper: bool, unit_diagonal: bool = False) -> Tensor:
    """Solve ``matrix @ x = y`` for triangular ``matrix`` and ``y`` of shape ``(..., n)``.

    With an unbatched matrix all points are solved as the columns of one right-hand side.
    """
    if matrix.dim() == 2:
        flat = y.reshape(-1, y.shape[-1]).transpose(0, 1)
        x = torch.linalg.solve_triangular(matrix, flat, upper=upper, unitriangular=unit_diagonal)
        return x.transpose(0, 1).reshape(y.shape)
    batch = torch.broadcast_shapes(matrix.shape[:-2], y.shape[:-1])
    matrix = matrix.expand(*batch, *matrix.shape[-2:])
    rhs = y.expand(*batch, y.shape[-1]).unsqueeze(-1)
    return torch.linalg.solve_triangular(matrix, rhs, upper=upper, unitriangular=unit_diagonal).squeeze(-1)
