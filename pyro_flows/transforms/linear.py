r"""Linear flows $y = W x + b$ with structured, always-invertible $W$.

Each keeps $\log|\det W|$ cheap (O(D)) and its inverse exact (a permutation, triangular solves or
reflections in reverse order). Shared helpers live in `pyro_flows.transforms._utils`: `positive`
diagonals, packed triangular matrices, batched mat-vec and triangular solves, products of Householder reflections;
in this module the bias and log-det helpers and [`lu_factors`][pyro_flows.transforms.linear.lu_factors] (also used by
the 1×1 convolution). Every learnable flow here is a [`ParametricFlow`][pyro_flows.transforms.base.ParametricFlow], so
its raw parameters may carry batch dimensions and the conditional (amortized) variants reuse the same code. Linear flows
are sensitive to the coordinate ordering: interleave permutations between them.

Families (name in `registry`: matrix $W$; log-det; inverse):

* ``permutation``: $P$; 0; an index gather;
* ``triangular``: $L$ with positive diagonal; $\sum_i \log L_{ii}$; a triangular solve, O(D²);
* ``convex_triangular``: $\sum_k w_k L_k$, $w$ on the simplex; 0 (or $\sum_i \log d_i$); a
  triangular solve, O(D²);
* ``lu``: $P L U$; $\sum_i \log U_{ii}$; two triangular solves, O(D²);
* ``householder``: $H_1 \cdots H_K$; 0; the K reflections in reverse order, O(K·D);
* ``qr``: $H_1 \cdots H_K R$; $\sum_i \log R_{ii}$; reflections in reverse, then a triangular solve.

All but ``permutation`` have an amortized variant (``context_dim > 0``, in
`conditional_registry`): their raw parameters are offset by a hypernetwork of
the context ([`ParametricFlow`][pyro_flows.transforms.base.ParametricFlow]).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from pyro_flows._validation import check_size
from pyro_flows.transforms._utils import (
    RAW_ONE,
    householder_product,
    householder_product_reverse,
    matvec,
    positive,
    solve_triangular_vec,
    tril_from_packed,
)
from pyro_flows.transforms.base import Flow, ParametricFlow, expand_log_det
from pyro_flows.transforms.registry import registry

__all__ = [
    "LU",
    "QR",
    "ConvexTriangular",
    "Householder",
    "Permutation",
    "Triangular",
    "make_permutation",
]

PermutationSpec = Literal["reverse", "random"] | Sequence[int] | Tensor


def make_permutation(dim: int, permutation: PermutationSpec, generator: torch.Generator | None) -> Tensor:
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


def lu_factors(lower: Tensor, upper: Tensor, raw_diag: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    r"""Build the factors of $W = P L U$ from raw parameters (shared by `LU` and the 1×1 convolution).

    Args:
        lower: ``(..., dim(dim-1)/2)`` strictly lower entries of the unit lower-triangular $L$.
        upper: ``(..., dim(dim-1)/2)`` strictly upper entries of $U$.
        raw_diag: ``(..., dim)`` raw diagonal of $U$, mapped through `positive`.
        dim: matrix size.

    Returns:
        ``(L, U, diag(U))``; $\log|\det LU| = \sum_i \log U_{ii}$.

    """
    diag = positive(raw_diag)
    unit_lower = tril_from_packed(lower, dim, torch.ones_like(diag))
    upper_matrix = tril_from_packed(upper, dim, diag, upper=True)
    return unit_lower, upper_matrix, diag


def _add_bias(params: Mapping[str, Tensor], y: Tensor) -> Tensor:
    return y + params["bias"] if "bias" in params else y


def _remove_bias(params: Mapping[str, Tensor], y: Tensor) -> Tensor:
    return y - params["bias"] if "bias" in params else y


def _log_det_from_diag(diag: Tensor | None, x: Tensor) -> Tensor:
    """``Σ log diag`` broadcast to the batch shape of ``x`` (zero when there is no diagonal: volume preserving)."""
    if diag is None:
        return x.new_zeros(x.shape[:-1])
    return expand_log_det(diag.log().sum(-1), x, 1)


def _paired_vectors(count: int, dim: int) -> Tensor:
    """Random reflection vectors in identical consecutive pairs, so that their product is I for an even count."""
    vectors = torch.randn(count, dim)
    vectors[1::2] = vectors[0 : 2 * (count // 2) : 2]
    return vectors


@registry.register("permutation")
class Permutation(Flow):
    r"""Fixed permutation of the coordinates, $y_i = x_{\pi(i)}$.

    * log-det: 0 (volume preserving);
    * inverse (closed form): $x_{\pi(i)} = y_i$, an index gather in both directions.

    The permutation is a buffer, so it is saved in ``state_dict`` and moves with ``.to(device)``.

    Args:
        dim: event size D.
        permutation: ``"reverse"`` (default), ``"random"`` or an explicit sequence of indices.
        generator: random generator for ``"random"``.

    Examples:
        >>> import torch
        >>> Permutation(3)(torch.tensor([1.0, 2.0, 3.0]))
        tensor([3., 2., 1.])

    """

    has_conditional = False

    def __init__(
        self, dim: int, permutation: PermutationSpec = "reverse", generator: torch.Generator | None = None
    ) -> None:
        super().__init__(dim)
        perm = make_permutation(dim, permutation, generator)
        self.register_buffer("permutation", perm)
        self.register_buffer("inverse_permutation", torch.argsort(perm))

    def _forward_and_log_det(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return x[..., self.permutation], _log_det_from_diag(None, x)

    def _inverse_and_log_det(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return y[..., self.inverse_permutation], _log_det_from_diag(None, y)


@registry.register("triangular")
class Triangular(ParametricFlow):
    r"""Lower-triangular linear flow $y = L x + b$.

    $L$ has free entries below the diagonal and a positive diagonal $L_{ii} = \mathrm{softplus}(\rho_i)
    + 10^{-3}$, so it is invertible for any raw parameters.

    * log-det: $\sum_i \log L_{ii}$ (O(D));
    * forward: one matrix product, O(D²) per point; inverse: one triangular solve, O(D²) per point.

    Starts at the identity. This is the linear IAF of Kingma et al. (2016) with a learnable diagonal (a
    $D \times D$ autoregressive affine map).

    Args:
        dim: event size D.
        bias: learn the offset $b$ (default ``True``).
        **context: ``context_dim`` and ``context_hidden_dims`` of the amortized variant
            ([`ParametricFlow`][pyro_flows.transforms.base.ParametricFlow]).

    Examples:
        >>> import torch
        >>> flow = Triangular(3)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(flow(x), x)
        True

    """

    needs_permutation = True

    def __init__(self, dim: int, bias: bool = True, **context: Any) -> None:
        super().__init__(dim, **context)
        self.add_raw_param("lower", torch.zeros(dim * (dim - 1) // 2))
        self.add_raw_param("raw_diag", torch.full((dim,), RAW_ONE))
        if bias:
            self.add_raw_param("bias", torch.zeros(dim))

    def _matrix(self, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        diag = positive(params["raw_diag"])
        return tril_from_packed(params["lower"], self.dim, diag), diag

    def _forward_with(self, params: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        matrix, diag = self._matrix(params)
        return _add_bias(params, matvec(matrix, x)), _log_det_from_diag(diag, x)

    def _inverse_with(self, params: Mapping[str, Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        matrix, diag = self._matrix(params)
        x = solve_triangular_vec(matrix, _remove_bias(params, y), upper=False)
        return x, _log_det_from_diag(diag, x)


@registry.register("convex_triangular")
class ConvexTriangular(ParametricFlow):
    r"""Convex-combination linear IAF (ccLinIAF, Tomczak & Welling 2017): $y = (\sum_k w_k L_k) x + b$.

    The $L_k$ are lower-triangular with unit diagonal (free strictly-lower entries) and
    $w = \mathrm{softmax}(\alpha)$ lies on the simplex, so $L$ is unit lower-triangular for any raw
    parameters. With ``diagonal=True`` the shared diagonal becomes learnable and positive,
    $L_{ii} = \mathrm{softplus}(\rho_i) + 10^{-3}$.

    * log-det: 0 (the paper's volume-preserving case), or $\sum_i \log L_{ii}$ with ``diagonal=True``;
    * forward: combining the matrices costs O(K·D²) per call, then O(D²) per point; inverse: one triangular
      solve, O(D²) per point.

    Starts near the identity (the $L_k$ off-diagonals are drawn from $N(0, 10^{-4})$ so that the
    matrices are distinguishable and the weights get gradients). Amortized (``context_dim > 0``) as in the paper:
    the encoder state gives the weights, $w(c) = \mathrm{softmax}(\alpha_0 + g(c))$; the matrices, the
    diagonal and the bias stay global.

    Reference: J. M. Tomczak & M. Welling, "Improving Variational Auto-Encoders using convex combination linear
    Inverse Autoregressive Flow", Benelearn 2017.

    Args:
        dim: event size D.
        num_matrices: number K of triangular matrices.
        diagonal: learn a positive diagonal (default ``False``: unit diagonal, volume preserving).
        bias: learn the offset $b$ (default ``False``, as in the paper).
        **context: ``context_dim`` and ``context_hidden_dims`` of the amortized variant
            ([`ParametricFlow`][pyro_flows.transforms.base.ParametricFlow]).

    Examples:
        >>> import torch
        >>> flow = ConvexTriangular(4, num_matrices=3)
        >>> flow.weights().shape, torch.allclose(flow.weights().sum(), torch.tensor(1.0))
        (torch.Size([3]), True)

    """

    needs_permutation = True

    def __init__(
        self, dim: int, num_matrices: int = 4, diagonal: bool = False, bias: bool = False, **context: Any
    ) -> None:
        super().__init__(dim, **context)
        self.num_matrices = check_size(num_matrices, "num_matrices")
        self.add_raw_param("lowers", 1e-2 * torch.randn(num_matrices, dim * (dim - 1) // 2), amortized=False)
        self.add_raw_param("logits", torch.zeros(num_matrices))
        if diagonal:
            self.add_raw_param("raw_diag", torch.full((dim,), RAW_ONE), amortized=False)
        if bias:
            self.add_raw_param("bias", torch.zeros(dim), amortized=False)

    def weights(self, context: Tensor | None = None) -> Tensor:
        """The convex weights $w$ (or $w(c)$) on the simplex, of shape ``context batch + (K,)``."""
        if context is not None:
            self.check_context(context)
        return torch.softmax(self.raw_params(context)["logits"], dim=-1)

    def _matrix(self, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        weights = torch.softmax(params["logits"], dim=-1)
        packed = (weights.unsqueeze(-1) * params["lowers"]).sum(-2)
        diag = positive(params["raw_diag"]) if "raw_diag" in params else None
        ones = packed.new_ones(*packed.shape[:-1], self.dim)
        return tril_from_packed(packed, self.dim, ones if diag is None else diag.expand_as(ones)), diag

    def _forward_with(self, params: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        matrix, diag = self._matrix(params)
        return _add_bias(params, matvec(matrix, x)), _log_det_from_diag(diag, x)

    def _inverse_with(self, params: Mapping[str, Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        matrix, diag = self._matrix(params)
        x = solve_triangular_vec(matrix, _remove_bias(params, y), upper=False, unit_diagonal=diag is None)
        return x, _log_det_from_diag(diag, x)


@registry.register("lu")
class LU(ParametricFlow):
    r"""LU-parameterized linear flow $y = P L U x + b$ (Kingma & Dhariwal 2018, Glow).

    $P$ is a fixed permutation (random by default, a buffer), $L$ unit lower-triangular and $U$
    upper-triangular with positive diagonal $U_{ii} = \mathrm{softplus}(\rho_i) + 10^{-3}$; together they
    reach every matrix whose LU factorization under $P$ has a positive-diagonal $U$.

    * log-det: $\sum_i \log U_{ii}$ (O(D));
    * forward O(D²) per point (plus O(D³) per call to form $LU$); inverse: two triangular solves.

    Starts at the permutation $P$.

    Args:
        dim: event size D.
        permutation: ``"random"`` (default), ``"reverse"`` or explicit indices for $P$.
        bias: learn the offset $b$ (default ``True``).
        generator: random generator for the permutation.
        **context: ``context_dim`` and ``context_hidden_dims`` of the amortized variant
            ([`ParametricFlow`][pyro_flows.transforms.base.ParametricFlow]).

    """

    def __init__(
        self,
        dim: int,
        permutation: PermutationSpec = "random",
        bias: bool = True,
        generator: torch.Generator | None = None,
        **context: Any,
    ) -> None:
        super().__init__(dim, **context)
        perm = make_permutation(dim, permutation, generator)
        self.register_buffer("permutation", perm)
        self.register_buffer("inverse_permutation", torch.argsort(perm))
        self.add_raw_param("lower", torch.zeros(dim * (dim - 1) // 2))
        self.add_raw_param("upper", torch.zeros(dim * (dim - 1) // 2))
        self.add_raw_param("raw_diag", torch.full((dim,), RAW_ONE))
        if bias:
            self.add_raw_param("bias", torch.zeros(dim))

    def _factors(self, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return lu_factors(params["lower"], params["upper"], params["raw_diag"], self.dim)

    def _forward_with(self, params: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        lower, upper, diag = self._factors(params)
        y = matvec(lower @ upper, x)[..., self.permutation]
        return _add_bias(params, y), _log_det_from_diag(diag, x)

    def _inverse_with(self, params: Mapping[str, Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        lower, upper, diag = self._factors(params)
        y = _remove_bias(params, y)[..., self.inverse_permutation]
        x = solve_triangular_vec(upper, solve_triangular_vec(lower, y, upper=False, unit_diagonal=True), upper=True)
        return x, _log_det_from_diag(diag, x)


@registry.register("householder")
class Householder(ParametricFlow):
    r"""Householder flow (Tomczak & Welling 2016): $y = H_1 H_2 \cdots H_K x + b$.

    $H_k = I - 2 v_k v_k^\top / \lVert v_k \rVert^2$ reflects through the hyperplane orthogonal to
    $v_k$. A product of reflections is orthogonal for any (non-zero) $v_k$; a zero $v_k$ is treated as
    $H_k = I$. Each reflection is an O(D) vector update, never a $D \times D$ matrix
    (`householder_product`).

    * log-det: 0 (volume preserving);
    * forward: O(K·D) per point, $H_K$ applied first; inverse: the same reflections in reverse order
      ($Q^{-1} = Q^\top = H_K \cdots H_1$), O(K·D) per point.

    The vectors start random in identical consecutive pairs, so the flow starts at the identity when K is even
    (an odd K leaves one reflection).

    Reference: J. M. Tomczak & M. Welling, "Improving Variational Auto-Encoders using Householder Flow",
    NeurIPS workshop on Bayesian deep learning, 2016.

    Args:
        dim: event size D.
        num_reflections: number K of reflections.
        bias: learn the offset $b$ (default ``False``).
        **context: ``context_dim`` and ``context_hidden_dims`` of the amortized variant (the hypernetwork emits
            the reflection vectors, as the encoder does in the Householder-flow VAE).

    Examples:
        >>> import torch
        >>> flow = Householder(4, num_reflections=2)
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(flow(x), x, atol=1e-6)
        True

    """

    def __init__(self, dim: int, num_reflections: int = 2, bias: bool = False, **context: Any) -> None:
        super().__init__(dim, **context)
        self.add_raw_param("vectors", _paired_vectors(check_size(num_reflections, "num_reflections"), dim))
        if bias:
            self.add_raw_param("bias", torch.zeros(dim))

    def _forward_with(self, params: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        y = _add_bias(params, householder_product(params["vectors"], x))
        return y, _log_det_from_diag(None, y)

    def _inverse_with(self, params: Mapping[str, Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        x = householder_product_reverse(params["vectors"], _remove_bias(params, y))
        return x, _log_det_from_diag(None, x)


@registry.register("qr")
class QR(ParametricFlow):
    r"""QR linear flow $y = Q R x + b$ (Hoogeboom, van den Berg & Welling 2019).

    $Q = H_1 \cdots H_K$ is a product of Householder reflections (orthogonal; K = D reaches every orthogonal
    matrix), $R$ upper-triangular with positive diagonal $R_{ii} = \mathrm{softplus}(\rho_i)
    + 10^{-3}$, so $W = QR$ is invertible for any raw parameters and reaches every invertible matrix when
    K = D.

    * log-det: $\sum_i \log R_{ii}$ (O(D));
    * forward: O(D² + K·D) per point; inverse: reflections in reverse order, then a triangular solve with
      $R$, O(D² + K·D) per point. No $D \times D$ orthogonal matrix is formed.

    Starts at $R = I$ and $Q = I$ when K is even (paired reflection vectors).

    Reference: E. Hoogeboom, R. van den Berg & M. Welling, "Emerging Convolutions for Generative Normalizing
    Flows", ICML 2019 (Section 3.3, QR decomposition).

    Args:
        dim: event size D.
        num_reflections: number K of reflections in $Q$ (default D).
        bias: learn the offset $b$ (default ``True``).
        **context: ``context_dim`` and ``context_hidden_dims`` of the amortized variant
            ([`ParametricFlow`][pyro_flows.transforms.base.ParametricFlow]).

    Examples:
        >>> import torch
        >>> flow = QR(4)
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(flow.inv(flow(x)), x, atol=1e-5)
        True

    """

    def __init__(self, dim: int, num_reflections: int | None = None, bias: bool = True, **context: Any) -> None:
        super().__init__(dim, **context)
        count = dim if num_reflections is None else check_size(num_reflections, "num_reflections")
        self.add_raw_param("vectors", _paired_vectors(count, dim))
        self.add_raw_param("upper", torch.zeros(dim * (dim - 1) // 2))
        self.add_raw_param("raw_diag", torch.full((dim,), RAW_ONE))
        if bias:
            self.add_raw_param("bias", torch.zeros(dim))

    def _triangular(self, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        diag = positive(params["raw_diag"])
        return tril_from_packed(params["upper"], self.dim, diag, upper=True), diag

    def _forward_with(self, params: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        upper, diag = self._triangular(params)
        y = _add_bias(params, householder_product(params["vectors"], matvec(upper, x)))
        return y, _log_det_from_diag(diag, x)

    def _inverse_with(self, params: Mapping[str, Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        upper, diag = self._triangular(params)
        z = householder_product_reverse(params["vectors"], _remove_bias(params, y))
        x = solve_triangular_vec(upper, z, upper=True)
        return x, _log_det_from_diag(diag, x)
