r"""Sylvester flows (van den Berg et al. 2018): orthogonal, Householder and triangular variants.

All three share the map

$$
f(z) = z + Q R\, h(\tilde R Q^\top z + b), \qquad h = \tanh,
$$

with $Q \in \mathbb{R}^{D \times M}$ having orthonormal columns ($M \le D$ hidden units),
$R, \tilde R \in \mathbb{R}^{M \times M}$ upper triangular and $b \in \mathbb{R}^M$. By Sylvester's
determinant identity and $Q^\top Q = I$, the Jacobian $I_D + Q R\, \mathrm{diag}(h')\, \tilde R Q^\top$
has determinant $\det(I_M + \mathrm{diag}(h') \tilde R R)$; $\tilde R R$ is upper triangular with
diagonal $\tilde R_{ii} R_{ii}$, so

$$
\log|\det J| = \sum_{i=1}^M \log\big(1 + h'(\tilde r_i)\, R_{ii} \tilde R_{ii}\big),
\qquad \tilde r = \tilde R Q^\top z + b,
$$

exactly (the triangular structure is real: only the strict upper triangles and the diagonals are parameters).
The diagonals are $R_{ii} = \tanh \rho_i$ and $\tilde R_{ii} = 0.999 \tanh \tilde\rho_i$, so
$R_{ii}\tilde R_{ii} > -0.999 \ge -1/\lVert h' \rVert_\infty$ for any raw values: every factor
$1 + h' R_{ii}\tilde R_{ii} \ge 10^{-3}$ and the map is a bijection.

Inverse (all variants): $z_\perp = y_\perp$ off the column space of $Q$, and $v = Q^\top z$ solves
$v + R\, h(\tilde R v + b) = Q^\top y$. Both matrices being upper triangular, this is solved by back
substitution from $v_M$ to $v_1$, each coordinate a strictly increasing scalar equation
$v_i + R_{ii} \tanh(\tilde R_{ii} v_i + c_i) = k_i$ (derivative ≥ 1e-3, root within $k_i \pm |R_{ii}|$)
solved by [`bracketed_newton`][pyro_flows.transforms.planar.bracketed_newton] to machine precision. The solve therefore
converges for every parameter value (no contraction condition); cost: $M$ sequential scalar solves of a few
Newton iterations each, vectorized over the batch, plus O(DM + M²) per point. ``inverse_atol`` = 1e-8 (float64).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from pyro_flows._validation import check_size
from pyro_flows.transforms._utils import matvec
from pyro_flows.transforms.base import ParametricFlow, expand_log_det
from pyro_flows.transforms.planar import bracketed_newton
from pyro_flows.transforms.registry import registry

__all__ = [
    "SylvesterHouseholder",
    "SylvesterOrthogonal",
    "SylvesterTriangular",
    "bjorck_orthonormalize",
    "householder_columns",
]

logger = logging.getLogger(__name__)

#: $\tilde R_{ii}$ is scaled by this factor so that $R_{ii}\tilde R_{ii} \ge -(1 - 10^{-3})$.
DIAGONAL_MARGIN = 1.0 - 1e-3
#: Size $D M$ of $Q$ above which `SylvesterHouseholder` applies $Q$ through its compact WY factors (`_CompactWY`)
#: instead of forming it, for shared parameters and batches of fewer than M points (the threshold is measured in
#: ``benchmarks/README.md``, "Pure-torch floor of the SVI step", change 4).
IMPLICIT_Q_SIZE = 10_000
#: Iteration limit of `bjorck_orthonormalize` (enough for a smallest singular value ~1e-16 of the scaled input).
MAX_BJORCK_ITERATIONS = 100


def bjorck_tolerance(dtype: torch.dtype, num_columns: int) -> float:
    r"""Stopping tolerance of `bjorck_orthonormalize`: $\max(10^{-12}, 100\,\epsilon\sqrt{M})$."""
    return max(1e-12, 100.0 * torch.finfo(dtype).eps * math.sqrt(num_columns))


def bjorck_orthonormalize(
    matrix: Tensor, tol: float | None = None, max_iter: int = MAX_BJORCK_ITERATIONS
) -> tuple[Tensor, int]:
    r"""Orthonormalize the columns of (a batch of) ``matrix`` by Björck & Bowie's iteration.

    $Q_0 = A / s$ with $s^2 = \tfrac12 \lVert A^\top A \rVert_\infty \ge \tfrac12 \sigma_{\max}(A)^2$,
    then $Q_{k+1} = Q_k \big(I + \tfrac12 (I - Q_k^\top Q_k)\big)$ (van den Berg et al. 2018, Eq. 19). Each
    singular value follows $\sigma \mapsto \sigma (3 - \sigma^2) / 2$, which converges to 1 from any
    $\sigma \in (0, \sqrt 3)$ (here $\sigma \le \sqrt 2$): the iteration converges iff $A$ has
    full column rank (linearly from tiny $\sigma$, quadratically near 1; 2–5 iterations for a nearly
    orthogonal $A$). It stops when $\max_{ij} |Q^\top Q - I|_{ij} \le$ ``tol`` (default
    [`bjorck_tolerance`][pyro_flows.transforms.sylvester.bjorck_tolerance]) and is differentiable.

    Args:
        matrix: ``(..., D, M)`` with ``M ≤ D``.
        tol: stopping tolerance on the entries of $Q^\top Q - I$.
        max_iter: iteration limit.

    Returns:
        The orthonormalized matrix and the number of iterations used.

    Raises:
        RuntimeError: if it has not converged after ``max_iter`` iterations (rank-deficient ``matrix``).

    Examples:
        >>> import torch
        >>> q, _ = bjorck_orthonormalize(torch.randn(6, 4, dtype=torch.float64))
        >>> torch.allclose(q.T @ q, torch.eye(4, dtype=torch.float64), atol=1e-12)
        True

    """
    m = matrix.shape[-1]
    tol = bjorck_tolerance(matrix.dtype, m) if tol is None else tol
    eye = torch.eye(m, dtype=matrix.dtype, device=matrix.device)
    gram = matrix.transpose(-1, -2) @ matrix
    sq_scale = 0.5 * gram.abs().sum(-1).amax(-1)[..., None, None]
    sq_scale = torch.where(sq_scale > 0, sq_scale, torch.ones_like(sq_scale))
    q, gram = matrix / sq_scale.sqrt(), gram / sq_scale
    for iteration in range(max_iter + 1):
        if iteration > 0:
            gram = q.transpose(-1, -2) @ q
        if torch.dist(gram.detach(), eye, float("inf")).item() <= tol:
            return q, iteration
        q = torch.addmm(q, q, gram, beta=1.5, alpha=-0.5) if q.dim() == 2 else 1.5 * q - 0.5 * (q @ gram)
    raise RuntimeError(
        f"Björck orthonormalization did not reach tolerance {tol:.1e} in {max_iter} iterations; "
        "the raw Q matrix is (numerically) rank deficient"
    )


def householder_columns(vectors: Tensor, num_columns: int) -> Tensor:
    r"""First ``num_columns`` columns of a product of Householder reflections $Q = H_1 \cdots H_K$.

    Each $H_k = I - 2 v_k v_k^\top / \lVert v_k \rVert^2$. Uses the compact WY form of a product of
    reflections (Joffrain et al. 2006, "Accumulating Householder transformations, revisited"): with
    $V = [v_1 \dots v_K]$ and the upper-triangular
    $T = \mathrm{striu}(V^\top V) + \tfrac12 \mathrm{diag}(V^\top V)$, $Q = I - V T^{-1} V^\top$; so
    $Q_{:, :M} = I_{:, :M} - V\, T^{-1} V_{:M, :}^\top$: one Gram product, one K×K triangular solve and one
    product, O(K²D + KDM), instead of K sequential reflections or D×D products. Equals
    `pyro_flows.transforms._utils.householder_product` applied to $e_1 \dots e_M$. A zero vector is the
    identity reflection (the dtype's smallest normal number is added to the diagonal of $T$).

    Args:
        vectors: ``(..., K, D)`` reflection vectors $v_k$ (any non-zero scale).
        num_columns: M ≤ D.

    Examples:
        >>> import torch
        >>> q = householder_columns(torch.randn(3, 5, dtype=torch.float64), 5)
        >>> torch.allclose(q.T @ q, torch.eye(5, dtype=torch.float64))
        True

    """
    d = vectors.shape[-1]
    corr = torch.linalg.solve_triangular(_wy_triangle(vectors), vectors[..., :num_columns], upper=True)
    eye = torch.eye(d, num_columns, dtype=vectors.dtype, device=vectors.device)
    if corr.dim() == 2:
        return torch.addmm(eye, vectors.transpose(0, 1), corr, alpha=-1.0)
    return eye - vectors.transpose(-1, -2) @ corr


def _wy_triangle(vectors: Tensor) -> Tensor:
    r"""The triangle $T = \mathrm{striu}(V^\top V) + \tfrac12 \mathrm{diag}(V^\top V)$ of `householder_columns`."""
    t = torch.triu(vectors @ vectors.transpose(-1, -2))
    t.diagonal(dim1=-2, dim2=-1).mul_(0.5).add_(torch.finfo(t.dtype).tiny)
    return t


class _CompactWY(NamedTuple):
    r"""$Q = I_{:, :M} - V^\top T^{-1} V_{:, :M}$ kept as its factors (unbatched $V$: ``(K, D)``, $T$: ``(K, K)``).

    Applying $Q$ or $Q^\top$ to $n$ points this way costs $O(nK(D + M))$ and two $K \times K$ triangular solves,
    against $O(KDM)$ to form $Q$ first (`householder_columns`): the cheaper way for few points in large dimensions.
    """

    vectors: Tensor
    triangle: Tensor
    num_columns: int

    def project(self, x: Tensor) -> Tensor:
        r"""$Q^\top x = x_{:M} - V_{:, :M}^\top T^{-\top} V x$ for ``x`` of shape ``(..., D)``."""
        v, m = self.vectors, self.num_columns
        flat = x.reshape(-1, x.shape[-1])
        coef = torch.linalg.solve_triangular(self.triangle, flat @ v.transpose(0, 1), upper=True, left=False)
        return torch.addmm(flat[:, :m], coef, v[:, :m], alpha=-1.0).reshape(*x.shape[:-1], m)

    def lift(self, u: Tensor) -> Tensor:
        r"""$Q u = (u, 0) - V^\top T^{-1} V_{:, :M} u$ for ``u`` of shape ``(..., M)``."""
        v, m = self.vectors, self.num_columns
        flat = u.reshape(-1, m)
        coef = torch.linalg.solve_triangular(
            self.triangle.transpose(0, 1), flat @ v[:, :m].transpose(0, 1), upper=False, left=False
        )
        padded = nn.functional.pad(flat, (0, v.shape[1] - m))
        return torch.addmm(padded, coef, v, alpha=-1.0).reshape(*u.shape[:-1], v.shape[1])

    def dense(self) -> Tensor:
        """$Q$ as a ``(D, M)`` matrix (`householder_columns`)."""
        return householder_columns(self.vectors, self.num_columns)


class _Sylvester(ParametricFlow):
    """Shared map, log-det and inverse; subclasses define $Q$ by ``_basis``, ``_project`` and ``_lift``."""

    inverse_atol = 1e-8

    def __init__(self, dim: int, num_hidden: int | None, **context: Any) -> None:
        super().__init__(dim, **context)
        m = dim if num_hidden is None else int(num_hidden)
        if not 1 <= m <= dim:
            raise ValueError(f"num_hidden must be between 1 and dim={dim}, got {num_hidden}")
        self.num_hidden = m
        packed = m * (m - 1) // 2
        # row 0: R, row 1: R̃ (strict upper triangles packed, raw diagonals)
        self.add_raw_param("upper", torch.zeros(2, packed))
        self.add_raw_param("diag", torch.stack([torch.zeros(m), torch.ones(m)]))
        self.add_raw_param("bias", torch.zeros(m))
        self.register_buffer("_diag_scale", torch.tensor([[1.0], [DIAGONAL_MARGIN]]), persistent=False)
        # gather index from [0, diagonal, strict upper triangle] to the M×M entries (0 → the zero below the diagonal)
        index = torch.zeros(m, m, dtype=torch.long)
        index[range(m), range(m)] = torch.arange(1, m + 1)
        rows, cols = torch.triu_indices(m, m, 1)
        index[rows, cols] = torch.arange(m + 1, m + 1 + packed)
        self.register_buffer("_triangle_index", index.flatten(), persistent=False)
        #: Newton iterations (summed over the M coordinates) used by the last inverse (a diagnostic).
        self.last_inverse_iterations = 0

    def _basis(self, params: Mapping[str, Tensor]) -> Tensor | None:
        """$Q$ as a ``(..., D, M)`` matrix, or ``None`` when it is a fixed permutation."""
        raise NotImplementedError

    def _project(self, q: Tensor | None, x: Tensor) -> Tensor:
        r"""$Q^\top x$ for ``x`` of shape ``(..., D)``."""
        assert q is not None
        return x @ q if q.dim() == 2 else matvec(q.transpose(-1, -2), x)

    def _lift(self, q: Tensor | None, v: Tensor) -> Tensor:
        """$Q v$ for ``v`` of shape ``(..., M)``."""
        assert q is not None
        return matvec(q, v)

    def _fold(self, q: Tensor | None, r: Tensor, rt: Tensor) -> tuple[Tensor, Tensor]:
        r"""Unbatched $A = Q R$ (D×M) and $B = \tilde R Q^\top$ (M×D)."""
        assert q is not None
        return q @ r, rt @ q.transpose(-1, -2)

    def _triangles(self, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        r"""$R$, $\tilde R$ and the products $R_{ii}\tilde R_{ii}$."""
        diag = torch.tanh(params["diag"]) * self._diag_scale
        entries = nn.functional.pad(torch.cat([diag, params["upper"]], dim=-1), (1, 0))
        m = self.num_hidden
        r, rt = entries.index_select(-1, self._triangle_index).view(*entries.shape[:-1], m, m).unbind(-3)
        return r, rt, diag[..., 0, :] * diag[..., 1, :]

    @staticmethod
    def _log_det(act: Tensor, diag_prod: Tensor) -> Tensor:
        r"""Sum of $\log(1 + (1 - a_i^2) R_{ii}\tilde R_{ii})$ for the activations $a = \tanh(\tilde r)$."""
        return torch.log1p(torch.addcmul(diag_prod, act, act * diag_prod, value=-1.0)).sum(-1)

    def _forward_with(self, params: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        q = self._basis(params)
        r, rt, diag_prod = self._triangles(params)
        bias = params["bias"]
        if r.dim() == 2 and x.numel() >= self.dim * self.num_hidden:
            # shared parameters and a batch of at least M points: fold Q into A = Q R and B = R̃ Qᵀ once (O(DM²)),
            # then two GEMMs for the whole batch; smaller batches apply the factors one by one (O(DM) per point)
            a, b = self._fold(q, r, rt)
            flat = x.reshape(-1, self.dim)
            act = torch.tanh(torch.addmm(bias, flat, b.transpose(0, 1)))
            y = torch.addmm(flat, act, a.transpose(0, 1)).reshape(x.shape)
            act = act.reshape(*x.shape[:-1], self.num_hidden)
        else:
            act = torch.tanh(matvec(rt, self._project(q, x)) + bias)
            y = x + self._lift(q, matvec(r, act))
        return y, expand_log_det(self._log_det(act, diag_prod), x, 1)

    def _inverse_with(self, params: Mapping[str, Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        q = self._basis(params)
        r, rt, diag_prod = self._triangles(params)
        bias = params["bias"]
        w = self._project(q, y)
        m = self.num_hidden
        shape = torch.broadcast_shapes(w.shape, r.shape[:-1], bias.shape)
        acc_pre = w.new_zeros(shape)  # Σ_{j>i} R̃_{:, j} v_j
        acc_out = w.new_zeros(shape)  # Σ_{j>i} R_{:, j} tanh(r̃_j)
        pres: list[Tensor] = []
        total = 0
        for i in range(m - 1, -1, -1):
            r_ii, rt_ii = r[..., i, i].unsqueeze(-1), rt[..., i, i].unsqueeze(-1)
            c = (acc_pre[..., i] + bias[..., i]).unsqueeze(-1)
            k = (w[..., i] - acc_out[..., i]).unsqueeze(-1)

            def equation(
                v: Tensor, r_ii: Tensor = r_ii, rt_ii: Tensor = rt_ii, c: Tensor = c, k: Tensor = k
            ) -> tuple[Tensor, Tensor]:
                t = torch.tanh(rt_ii * v + c)
                return v + r_ii * t - k, 1.0 + r_ii * rt_ii * (1.0 - t * t)

            v0, iterations = bracketed_newton(equation, k - r_ii.abs(), k + r_ii.abs(), k)
            total += iterations
            g, dg = equation(v0)
            v = v0 - g / dg  # one differentiable Newton step: implicit-function gradients
            pre_i = rt_ii * v + c
            acc_pre = acc_pre + rt[..., :, i] * v
            acc_out = acc_out + r[..., :, i] * torch.tanh(pre_i)
            pres.append(pre_i)
        self.last_inverse_iterations = total
        logger.debug("Sylvester inverse: %d Newton iterations over %d coordinates", total, m)
        act = torch.tanh(torch.cat(pres[::-1], dim=-1))
        x = y - self._lift(q, matvec(r, act))
        return x, expand_log_det(self._log_det(act, diag_prod), y, 1)

    def extra_repr(self) -> str:
        """Show the event shape and the number of hidden units."""
        return f"{super().extra_repr()}, num_hidden={self.num_hidden}"


@registry.register("sylvester_orthogonal")
class SylvesterOrthogonal(_Sylvester):
    r"""Orthogonal Sylvester flow: $Q$ = Björck orthonormalization of a free $D \times M$ matrix.

    $Q$ is recomputed from the raw matrix at every call by
    [`bjorck_orthonormalize`][pyro_flows.transforms.sylvester.bjorck_orthonormalize], stopped when $\max|Q^\top Q - I|
    \le 10^{-12}$ (float64; [`bjorck_tolerance`][pyro_flows.transforms.sylvester.bjorck_tolerance] otherwise), so the
    closed-form log-det is exact to that tolerance. Converges whenever the raw matrix has full column rank (it starts at
    $I_{:, :M}$). Cost per call: a few $O(DM^2)$ products, plus two GEMMs for the batch.

    Map, log-det, parameterization and inverse: see [`pyro_flows.transforms.sylvester`][pyro_flows.transforms.sylvester]
    (van den Berg et al. 2018, "Sylvester normalizing flows for variational inference"). Starts at the identity ($R =
    0$).

    Args:
        dim: event size D.
        num_hidden: number of hidden units M ≤ D (default D).
        **context: ``context_dim`` and ``context_hidden_dims`` of the amortized variant
            ([`ParametricFlow`][pyro_flows.transforms.base.ParametricFlow]).

    Examples:
        >>> import torch
        >>> flow = SylvesterOrthogonal(4, num_hidden=2)
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(flow(x), x)
        True

    """

    traceable = False  # the number of Björck iterations depends on the parameters

    def __init__(self, dim: int, num_hidden: int | None = None, **context: Any) -> None:
        super().__init__(dim, num_hidden, **context)
        self.add_raw_param("q", torch.eye(dim, self.num_hidden))
        #: Björck iterations used by the last call (a diagnostic).
        self.last_bjorck_iterations = 0

    def _basis(self, params: Mapping[str, Tensor]) -> Tensor:
        q, self.last_bjorck_iterations = bjorck_orthonormalize(params["q"])
        return q


@registry.register("sylvester_householder")
class SylvesterHouseholder(_Sylvester):
    r"""Householder Sylvester flow: $Q$ = first M columns of a product of H Householder reflections.

    $Q = H_1 \cdots H_H$, $H_k = I - 2 v_k v_k^\top / \lVert v_k \rVert^2$, is orthogonal to round-off for
    any raw vectors, built at each call by [`householder_columns`][pyro_flows.transforms.sylvester.householder_columns]
    in O(H²D + HDM) (no D×D matrix products).

    Map, log-det, parameterization and inverse: see [`pyro_flows.transforms.sylvester`][pyro_flows.transforms.sylvester]
    (van den Berg et al. 2018, "Sylvester normalizing flows for variational inference"). Starts at the identity ($R =
    0$).

    Args:
        dim: event size D.
        num_hidden: number of hidden units M ≤ D (default D).
        num_reflections: number H of reflections (default 8).
        **context: ``context_dim`` and ``context_hidden_dims`` of the amortized variant
            ([`ParametricFlow`][pyro_flows.transforms.base.ParametricFlow]).

    Examples:
        >>> import torch
        >>> flow = SylvesterHouseholder(4)
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(flow.inv(flow(x)), x)
        True

    """

    def __init__(self, dim: int, num_hidden: int | None = None, num_reflections: int = 8, **context: Any) -> None:
        super().__init__(dim, num_hidden, **context)
        self.add_raw_param("reflections", torch.randn(check_size(num_reflections, "num_reflections"), dim))

    def _basis(self, params: Mapping[str, Tensor]) -> Tensor | _CompactWY:
        vectors = params["reflections"]
        if vectors.dim() == 2 and self.dim * self.num_hidden > IMPLICIT_Q_SIZE:
            return _CompactWY(vectors, _wy_triangle(vectors), self.num_hidden)
        return householder_columns(vectors, self.num_hidden)

    def _project(self, q: Tensor | _CompactWY | None, x: Tensor) -> Tensor:
        return q.project(x) if isinstance(q, _CompactWY) else super()._project(q, x)

    def _lift(self, q: Tensor | _CompactWY | None, v: Tensor) -> Tensor:
        return q.lift(v) if isinstance(q, _CompactWY) else super()._lift(q, v)

    def _fold(self, q: Tensor | _CompactWY | None, r: Tensor, rt: Tensor) -> tuple[Tensor, Tensor]:
        return super()._fold(q.dense() if isinstance(q, _CompactWY) else q, r, rt)


@registry.register("sylvester_triangular")
class SylvesterTriangular(_Sylvester):
    r"""Triangular Sylvester flow: $Q$ is a fixed permutation, the identity or the reversal (M = D).

    Stacks alternate the direction of the triangular dependencies, as in the paper: the stack builder inserts a
    reversal between layers (`needs_permutation`), or set ``reverse`` by hand. No cost for $Q$ (an index
    gather, or nothing).

    Map, log-det, parameterization and inverse: see [`pyro_flows.transforms.sylvester`][pyro_flows.transforms.sylvester]
    (van den Berg et al. 2018, "Sylvester normalizing flows for variational inference"). Starts at the identity ($R =
    0$).

    Args:
        dim: event size D.
        reverse: use the reversal permutation instead of the identity.
        **context: ``context_dim`` and ``context_hidden_dims`` of the amortized variant
            ([`ParametricFlow`][pyro_flows.transforms.base.ParametricFlow]).

    Examples:
        >>> import torch
        >>> flow = SylvesterTriangular(4, reverse=True)
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(flow.inv(flow(x)), x)
        True

    """

    needs_permutation = True

    def __init__(self, dim: int, reverse: bool = False, **context: Any) -> None:
        super().__init__(dim, dim, **context)
        self.reverse = bool(reverse)

    def _basis(self, params: Mapping[str, Tensor]) -> None:
        return None

    def _project(self, q: Tensor | None, x: Tensor) -> Tensor:
        return x.flip(-1) if self.reverse else x

    def _lift(self, q: Tensor | None, v: Tensor) -> Tensor:
        return v.flip(-1) if self.reverse else v

    def _fold(self, q: Tensor | None, r: Tensor, rt: Tensor) -> tuple[Tensor, Tensor]:
        return (r.flip(0), rt.flip(1)) if self.reverse else (r, rt)

    def extra_repr(self) -> str:
        """Show the event shape and the permutation."""
        return f"{super().extra_repr()}, reverse={self.reverse}"
