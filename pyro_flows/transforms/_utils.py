"""Small numerical helpers shared by the flow families."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: Lower bound added to softplus-parameterized positive quantities, so that no raw value gives a singular map.
MIN_POSITIVE = 1e-3
#: Raw value whose `positive` is exactly 1.
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


def unit_vectors(v: Tensor) -> Tensor:
    r"""Normalize the last dimension of ``v`` to unit length; zero vectors stay zero (their reflection is $I$).

    The zero case uses a safe denominator, so gradients stay finite for any ``v``.
    """
    norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return v / torch.where(norm > 0, norm, torch.ones_like(norm))


def _reflect_all(u: Tensor, x: Tensor, order: Sequence[int]) -> Tensor:
    r"""Apply $H_k x = x - 2 u_k (u_k^\top x)$ for ``k`` in ``order`` (unit ``u`` of shape ``(..., K, D)``).

    With unbatched ``u`` the points are flattened into one matrix and the reflections are applied two at a time
    in closed form, $H_a H_b x = x - (2p - 4cq) u_a - 2q u_b$ with $p = u_a^\top x$,
    $q = u_b^\top x$, $c = u_a^\top u_b$ (two skinny GEMMs per pair: half the memory traffic of one
    reflection at a time, and as stable since $|c| \le 1$).
    """
    if u.dim() == 2:
        flat = x.reshape(-1, x.shape[-1])
        for i in range(0, len(order) - 1, 2):
            first, second = u[order[i]], u[order[i + 1]]
            pair = torch.stack([second, first])
            c = second.dot(first)
            mix = torch.stack([2.0 * second, 2.0 * first - 4.0 * c * second])
            flat = torch.addmm(flat, flat @ pair.transpose(0, 1), mix, alpha=-1.0)
        if len(order) % 2:
            last = u[order[-1]]
            flat = torch.addr(flat, flat @ last, last, alpha=-2.0)
        return flat.reshape(x.shape)
    for k in order:
        u_k = u[..., k, :]
        x = x - 2.0 * (x * u_k).sum(-1, keepdim=True) * u_k
    return x


def householder_product(v: Tensor, x: Tensor) -> Tensor:
    r"""Apply $Q = H_1 H_2 \cdots H_K$ to vectors: returns $Q x$, i.e. $H_K$ acts **first**.

    $H_k = I - 2 v_k v_k^\top / \lVert v_k \rVert^2$ is the reflection through the hyperplane orthogonal to
    $v_k$ (Householder 1958; as a flow: Tomczak & Welling 2016, "Improving variational auto-encoders using
    Householder flow"). Each reflection is one O(D) update $x \leftarrow x - 2 u (u^\top x)$ with
    $u = v / \lVert v \rVert$, so the cost is O(K·D) per point and no $D \times D$ matrix is ever formed.
    $Q$ is orthogonal ($|\det Q| = 1$); a zero $v_k$ gives $H_k = I$.

    Args:
        v: reflection vectors of shape ``(..., K, D)``, row ``k`` (0-based) is $v_{k+1}$; leading dimensions
            broadcast against those of ``x`` (unbatched ``(K, D)`` applies the same $Q$ to every point).
        x: points of shape ``(..., D)``.

    Returns:
        $Q x$ with the broadcast shape of the batch dimensions and ``D``.

    Examples:
        >>> import torch
        >>> v, x = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
        >>> torch.allclose(householder_product_reverse(v, householder_product(v, x)), x)
        True

    """
    return _reflect_all(unit_vectors(v), x, range(v.shape[-2] - 1, -1, -1))


def householder_product_reverse(v: Tensor, x: Tensor) -> Tensor:
    r"""Apply $Q^\top = Q^{-1} = H_K \cdots H_2 H_1$ to vectors: $H_1$ acts **first**.

    The inverse of `householder_product` for the same ``v`` (each $H_k$ is symmetric and its own inverse).
    Same shapes, cost O(K·D) per point, no $D \times D$ matrix.

    Args:
        v: reflection vectors of shape ``(..., K, D)`` (as in `householder_product`).
        x: points of shape ``(..., D)``.

    Returns:
        $Q^\top x$.

    """
    return _reflect_all(unit_vectors(v), x, range(v.shape[-2]))
