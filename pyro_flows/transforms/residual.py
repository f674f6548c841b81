r"""Residual flows $y = x + g(x)$ with $\mathrm{Lip}(g) < 1$ (i-ResNet / Residual Flows).

**Invertibility.** $g$ is a [`LipschitzMLP`][pyro_flows.nn.LipschitzMLP]: exact spectral normalization of
every linear layer with coefficient $c$ (default 0.97, exact largest singular value, not power iteration)
and LipSwish activations, so $\mathrm{Lip}(g) \le c^{L} < 1$ for any raw parameters and
$x \mapsto x + g(x)$ is a bijection of $\mathbb{R}^D$ (Behrmann et al. 2019).

**Inverse.** Banach fixed-point iteration $x_{k+1} = y - g(x_k)$, $x_0 = y$. With the guaranteed bound
$\ell = \prod_i \sigma_{\max}(\hat W_i)$ the error after a step is at most
$\ell/(1-\ell)\,\|x_{k+1} - x_k\|_2$, so iteration stops once this bound is below ``inverse_tol``
(default ``1e-6``; in float32 a round-off floor of ``16 · eps · |x|`` is added). Each step costs one network pass;
the number of steps is about $\log(\text{tol}) / \log(\mathrm{Lip}(g))$. If ``max_iter`` steps do not reach the
tolerance a [`FixedPointError`][pyro_flows.transforms.residual.FixedPointError] is raised. Gradients through the inverse
use the implicit function theorem: the incoming gradient $\bar x$ is replaced by the solution of $u = \bar x - J_g^T u$
(again a contraction), so memory does not grow with the number of iterations (first-order gradients only: the hook
builds no graph for a double backward).

**Log-det.** $\log\det(I + J_g(x))$ (positive determinant since $\|J_g\| < 1$).

* ``"exact"`` (default when ``dim ≤ 16``): the Jacobian in closed form from the network's layers, then ``slogdet``;
  O(B · D · Σ hᵢhᵢ₊₁ + B · D³).
* ``"estimator"`` (default when ``dim > 16``): the unbiased Russian-roulette power series of Chen et al. (2019),

    $$
    \log\det(I+J) = \mathbb{E}_{n, v}\Bigl[\sum_{k=1}^{n} \frac{(-1)^{k+1}}{k}
    \frac{v^T J^k v}{P(N \ge k)}\Bigr],
    $$

    $n$ = ``num_exact_terms`` + Geometric(``geom_p``) (one draw per call), $v$ standard normal
    (``num_samples`` probes). Its gradient uses the Neumann series
    $\partial \log\det(I+J) = \mathbb{E}\bigl[\sum_{k=0}^{n-1} (-1)^k v^T J^k (\partial J) v / P(N \ge k+1)\bigr]$:
    the vector $w^T = \sum_k (-1)^k v^T J^k / P(N\ge k+1)$ is built without autograd history and only the single
    product $w^T J v$ is differentiated, so memory is O(1) in the number of terms.
    Cost: E[n] = ``num_exact_terms + (1 - geom_p)/geom_p`` vector-Jacobian products per probe. Trade-offs: more
    ``num_exact_terms`` or probes lower the variance linearly in cost; a smaller ``geom_p`` makes long series
    likelier (lower variance of the truncation, higher mean cost). The variance is finite when
    $\mathrm{Lip}(g)^2 < 1 - p$ roughly; keep ``coeff`` moderate with the estimator.

References:
    Behrmann, Grathwohl, Chen, Duvenaud, Jacobsen. *Invertible Residual Networks*. ICML 2019.
    Chen, Behrmann, Duvenaud, Jacobsen. *Residual Flows for Invertible Generative Modeling*. NeurIPS 2019.

"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from pyro_flows._validation import check_size
from pyro_flows.nn.lipschitz import Linearization, LipschitzMLP
from pyro_flows.transforms.base import Flow, expand_log_det
from pyro_flows.transforms.registry import registry

__all__ = ["FixedPointError", "Residual"]

LogDetMode = Literal["auto", "exact", "estimator"]
#: Largest dimension for which ``log_det="auto"`` computes the exact log-det.
EXACT_MAX_DIM = 16


class FixedPointError(RuntimeError):
    """The fixed-point iteration of a residual flow's inverse (or of its gradient) did not converge."""


def _fixed_point(
    step: Callable[[Tensor], Tensor], start: Tensor, lip: float, tol: float, max_iter: int, what: str
) -> Tensor:
    r"""Iterate ``z ← step(z)`` (a contraction of constant ≤ ``lip``) until the error bound is below ``tol``.

    The bound is Banach's $\|z_k - z^*\|_2 \le \ell/(1-\ell)\,\|z_k - z_{k-1}\|_2$, per event (last dim).
    """
    step_tol = tol * (1.0 - lip) / lip if lip > 0 else float("inf")
    floor = 16 * torch.finfo(start.dtype).eps
    z = start
    for _ in range(max_iter):
        new = step(z)
        delta = torch.linalg.vector_norm(new - z, dim=-1)
        z = new
        if bool((delta <= step_tol + floor * torch.linalg.vector_norm(z, dim=-1)).all()):
            return z
    raise FixedPointError(
        f"{what} did not converge in {max_iter} fixed-point iterations (last step {float(delta.max()):.3g}, "
        f"needed {step_tol:.3g}; Lip(g) ≤ {lip:.4f}): raise max_iter, loosen inverse_tol or lower coeff"
    )


@registry.register("residual")
class Residual(Flow):
    r"""Invertible residual block $y = x + g(x)$, $\mathrm{Lip}(g) \le c^{L} < 1$ (Chen et al. 2019).

    * log-det: $\log\det(I + J_g(x))$, exact (closed-form Jacobian + ``slogdet``, default for ``dim ≤ 16``) or
      the unbiased Russian-roulette estimator with Neumann-series gradients (default above); see the module docs.
    * inverse: fixed-point iteration to ``inverse_tol`` (≤ 1e-4, default 1e-6; `inverse_atol` states it),
      at most ``max_iter`` network passes, [`FixedPointError`][pyro_flows.transforms.residual.FixedPointError]
      otherwise.

    ``g`` starts at zero (identity flow). Stack several blocks with ActNorm/permutations in between for capacity.

    Args:
        dim: event size D.
        hidden_dims: hidden widths of ``g``.
        coeff: spectral-norm coefficient $c \in (0, 1)$ of each layer.
        log_det: ``"auto"`` (exact iff ``dim ≤ 16``), ``"exact"`` or ``"estimator"``.
        num_exact_terms: power-series terms always computed by the estimator.
        geom_p: success probability of the geometric number of extra terms (Russian roulette).
        num_samples: Gaussian probe vectors per log-det estimate.
        inverse_tol: guaranteed absolute accuracy of the inverse (float64).
        max_iter: iteration cap of the inverse and of its gradient solve.
        context_dim: context size of the amortized variant (0: unconditional). The context enters the first layer
            of ``g`` additively ($\hat W_1 x + V c + b_1$, $V$ unconstrained), so every conditioned map
            is an invertible residual block.

    Examples:
        >>> import torch
        >>> flow = Residual(3)
        >>> with torch.no_grad():
        ...     _ = flow.net.linears[-1].weight.normal_()
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(flow.inv(flow(x)), x, atol=1e-5)
        True

    """

    traceable = False  # the fixed-point inverse and the roulette draw are data dependent

    def __init__(
        self,
        dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        coeff: float = 0.97,
        log_det: LogDetMode = "auto",
        num_exact_terms: int = 2,
        geom_p: float = 0.5,
        num_samples: int = 1,
        inverse_tol: float = 1e-6,
        max_iter: int = 1000,
        context_dim: int = 0,
    ) -> None:
        super().__init__(dim, context_dim=context_dim)
        if log_det not in ("auto", "exact", "estimator"):
            raise ValueError(f"log_det must be 'auto', 'exact' or 'estimator', got {log_det!r}")
        if not 0.0 < geom_p < 1.0:
            raise ValueError(f"geom_p must be in (0, 1), got {geom_p}")
        if not 0.0 < inverse_tol <= 1e-4:
            raise ValueError(f"inverse_tol must be in (0, 1e-4], got {inverse_tol}")
        self.log_det_mode = ("exact" if self.dim <= EXACT_MAX_DIM else "estimator") if log_det == "auto" else log_det
        self.num_exact_terms = check_size(num_exact_terms, "num_exact_terms")
        self.geom_p = float(geom_p)
        self.num_samples = check_size(num_samples, "num_samples")
        self.inverse_atol = self.inverse_tol = float(inverse_tol)
        self.max_iter = check_size(max_iter, "max_iter")
        self.net = LipschitzMLP(dim, hidden_dims, coeff, context_features=self.context_dim)

    def _log_det(self, lin: Linearization, x: Tensor) -> Tensor:
        if self.log_det_mode == "exact":
            jac = lin.jacobian()
            eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
            return expand_log_det(torch.linalg.slogdet(eye + jac)[1], x, 1)
        return expand_log_det(self._roulette_log_det(lin, x), x, 1)

    def _roulette_log_det(self, lin: Linearization, x: Tensor) -> Tensor:
        # N ~ Geometric(p) on {0, 1, ...} by inversion: P(N ≥ m) = (1 - p)^m.
        uniform = float(torch.rand(())) or 0.5
        n = self.num_exact_terms + math.floor(math.log(uniform) / math.log1p(-self.geom_p))
        batch = torch.broadcast_shapes(x.shape[:-1], *(s.shape[:-1] for s in lin.slopes))
        v = torch.randn(self.num_samples, *batch, x.shape[-1], dtype=x.dtype, device=x.device)
        frozen = lin.detach()
        estimate = torch.zeros(v.shape[:-1], dtype=x.dtype, device=x.device)
        w = torch.zeros_like(v)
        u = v
        with torch.no_grad():
            for k in range(1, n + 1):
                survival = (1.0 - self.geom_p) ** max(0, k - self.num_exact_terms)
                sign = 1.0 if k % 2 == 1 else -1.0
                w = w + (sign / survival) * u
                u = frozen.vjp(u)
                estimate = estimate + (sign / (k * survival)) * (u * v).sum(-1)
        surrogate = (lin.vjp(w) * v).sum(-1)
        return (estimate + surrogate - surrogate.detach()).mean(0)

    def _forward_and_log_det(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        g, lin = self.net.linearize(x, context)
        return x + g, self._log_det(lin, x)

    def _inverse_and_log_det(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        if not bool(torch.isfinite(y).all()):
            raise ValueError(f"{type(self).__name__} inverse got non-finite values")
        weights, lip = self.net.normalized_weights()
        with torch.no_grad():
            frozen = tuple(w.detach() for w in weights)
            ctx = None if context is None else context.detach()
            x_star = _fixed_point(
                lambda z: y - self.net(z, ctx, frozen),
                y.detach(),
                lip,
                self.inverse_tol,
                self.max_iter,
                f"{type(self).__name__} inverse",
            )
        x = y - self.net(x_star, context, weights)
        if x.requires_grad:
            x.register_hook(self._implicit_gradient_hook(x_star, ctx, frozen, lip))
        _, lin = self.net.linearize(x, context, weights)
        return x, self._log_det(lin, x)

    def _implicit_gradient_hook(
        self, x_star: Tensor, context: Tensor | None, weights: tuple[Tensor, ...], lip: float
    ) -> Callable[[Tensor], Tensor]:
        r"""Backward hook solving $u = \bar x - J_g(x^*)^T u$ (implicit function theorem)."""

        def hook(grad: Tensor) -> Tensor:
            with torch.no_grad():
                frozen = self.net.linearize(x_star, context, weights)[1]
                return _fixed_point(
                    lambda u: grad - frozen.vjp(u),
                    grad,
                    lip,
                    self.inverse_tol,
                    self.max_iter,
                    f"{type(self).__name__} inverse gradient",
                )

        return hook

    def extra_repr(self) -> str:
        """Show the event shape and the log-det mode."""
        return f"{super().extra_repr()}, log_det={self.log_det_mode!r}"
