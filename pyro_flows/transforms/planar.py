r"""Planar flows (Rezende & Mohamed 2015) with an exact inverse.

Also home of [`bracketed_newton`][pyro_flows.transforms.planar.bracketed_newton], the vectorized scalar root finder used
by the planar and Sylvester inverses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pyro_flows.transforms._utils import MIN_POSITIVE, RAW_ONE
from pyro_flows.transforms.base import ParametricFlow, expand_log_det
from pyro_flows.transforms.registry import registry

__all__ = ["Planar", "bracketed_newton"]

logger = logging.getLogger(__name__)

#: Largest number of iterations of `bracketed_newton` (bisection alone needs ~60 in float64).
MAX_NEWTON_ITERATIONS = 200


def bracketed_newton(
    fn: Callable[[Tensor], tuple[Tensor, Tensor]],
    lower: Tensor,
    upper: Tensor,
    start: Tensor,
    max_iter: int = MAX_NEWTON_ITERATIONS,
) -> tuple[Tensor, int]:
    r"""Solve $g(x) = 0$ element-wise for an increasing $g$ with a root in ``[lower, upper]``.

    Newton steps $x \leftarrow x - g(x) / g'(x)$, safeguarded by the bracket: the bracket shrinks to each
    evaluated point by the sign of $g$, and a Newton step that leaves it (or is NaN) is replaced by bisection.
    The iteration stops when every element's step or residual is at most $4\epsilon (1 + |x|)$ (``ε`` the
    dtype's machine epsilon) or its bracket is 16 times that, i.e. to machine precision; convergence is guaranteed
    (bisection halves the bracket) and is quadratic near simple roots. Runs without autograd: apply one
    differentiable Newton step at the returned root to get implicit-function gradients.

    Args:
        fn: ``x ↦ (g(x), g'(x))``, element-wise on tensors of the shape of ``start``.
        lower: lower ends of the brackets ($g \le 0$ there).
        upper: upper ends of the brackets ($g \ge 0$ there).
        start: initial guesses (clamped into the brackets).
        max_iter: iteration limit.

    Returns:
        The roots and the number of iterations used.

    Raises:
        ValueError: if ``start`` has non-finite values (the flow's input had NaN or ±inf).
        RuntimeError: if some element has not converged after ``max_iter`` iterations.

    Examples:
        >>> import torch
        >>> c = torch.tensor([0.5, 3.0], dtype=torch.float64)
        >>> root, _ = bracketed_newton(lambda a: (a + 0.5 * torch.tanh(a) - c, 1.5 - 0.5 * torch.tanh(a) ** 2),
        ...                            c - 0.5, c + 0.5, c)
        >>> torch.allclose(root + 0.5 * torch.tanh(root), c, atol=1e-14, rtol=0)
        True

    """
    with torch.no_grad():
        if not bool(torch.isfinite(start).all()):
            raise ValueError("the inverse got non-finite values (NaN or ±inf) in its input")
        shape = torch.broadcast_shapes(lower.shape, upper.shape, start.shape)
        lo, hi = lower.expand(shape).detach(), upper.expand(shape).detach()
        x = torch.minimum(torch.maximum(start.detach(), lo), hi)
        eps = 4.0 * torch.finfo(x.dtype).eps
        for iteration in range(1, max_iter + 1):
            g, dg = fn(x)
            lo = torch.where(g < 0, x, lo)
            hi = torch.where(g > 0, x, hi)
            newton = x - g / dg
            inside = (newton >= lo) & (newton <= hi)
            x_new = torch.where(inside, newton, 0.5 * (lo + hi))
            x_new = torch.where(g == 0, x, x_new)
            tol = eps * (1.0 + x_new.abs())
            # converged: a step, the bracket (whose last digits round-off can stall) or the residual at round-off
            done = ((x_new - x).abs() <= tol) | (hi - lo <= 16.0 * tol) | (g.abs() <= tol)
            x = x_new
            if bool(done.all()):
                return x, iteration
    raise RuntimeError(
        f"bracketed Newton did not converge in {max_iter} iterations "
        f"(largest remaining bracket {(hi - lo).abs().max().item():.3g})"
    )


def _dot(x: Tensor, v: Tensor) -> Tensor:
    """``x · v`` over the last dimension; one GEMV when ``v`` has no batch dimensions."""
    return x @ v if v.dim() == 1 else (x * v).sum(-1)


class _SharedPlanar(torch.autograd.Function):
    r"""One planar layer with shared (unbatched) parameters as one autograd node: forward, log-det, backward.

    ``apply(z, u, w, bias)`` with ``z`` of shape ``(N, D)`` returns ``y = z + \hat u \tanh(z w + b)`` and the log-dets
    ``(N,)``, with the operations of the autograd formulation (`Planar._autograd_forward`, the same values); the
    backward is the closed-form vector-Jacobian product, some 30 small operations in one node where autograd records
    about 60 (a guide's planar stack is dispatch-bound). With $t = \tanh(z^\top w + b)$, $k = 1 - t^2$,
    $\kappa = k / (1 + k s)$, $\hat u = u + c\, w$, $c = (s - a) / q$, $s = m(a)$, $a = w^\top u$,
    $q = w^\top w$ and output gradients $\bar y$, $\bar\ell$:

    $$
    \bar p = k\, \bar y^\top \hat u - 2 s\, \bar\ell\, t\, \kappa,\quad \bar z = \bar y + \bar p\, w,\quad
    \bar b = \textstyle\sum_n \bar p_n,\quad \bar{\hat u} = \sum_n t_n \bar y_n,\quad
    \bar s = \sum_n \bar\ell_n \kappa_n,
    $$

    $\gamma = \bar{\hat u}^\top w$, $\alpha = \gamma\, (m'(a) - 1) / q + \bar s\, m'(a)$,
    $\bar u = \bar{\hat u} + \alpha w$ and
    $\bar w = \sum_n \bar p_n z_n + c\, \bar{\hat u} + \alpha u - (2 \gamma c / q)\, w$ ($m'$ = sigmoid; the
    second projection of `Planar._u_hat` only removes round-off and has no derivative). For ``w = 0`` (a translation:
    $s = 0$, so $m' := 0$, and $q := 1$) $c$ and $\alpha$ are 0, as in the autograd formulation. Under
    ``create_graph=True`` (double backward) the intermediates are recomputed from the inputs, so that the backward is
    itself differentiable.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, u: Tensor, w: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        u_hat, s = Planar._u_hat(u, w)
        act = torch.tanh(torch.addmv(bias.expand(z.shape[0]), z, w))
        ctx.save_for_backward(z, u, w, bias, u_hat, act, s)
        return torch.addr(z, act, u_hat), Planar._log_det(act, s)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, grad_log_det: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        z, u, w, bias, u_hat, act, s = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the intermediates as differentiable functions of the inputs
            u_hat, s = Planar._u_hat(u, w)
            act = torch.tanh(torch.addmv(bias.expand(z.shape[0]), z, w))
        k = 1.0 - act * act
        kappa = k / (1.0 + k * s)
        grad_pre = torch.addcmul(k * (grad_y @ u_hat), grad_log_det * (act * kappa), s, value=-2.0)
        grad_u_hat = act @ grad_y
        sq, wu, gamma = w.dot(w), w.dot(u), grad_u_hat.dot(w)
        nonzero = sq > 0
        q = torch.where(nonzero, sq, 1.0)
        ds = torch.where(nonzero, torch.sigmoid(wu), 0.0)  # ds/da (s = 0 for w = 0)
        c = (s - wu) / q
        alpha = (gamma * (ds - 1.0) + q * ds * (grad_log_det @ kappa)) / q
        grad_w = torch.addcmul(torch.addcmul(grad_pre @ z, c, grad_u_hat), alpha, u)
        grad_w = torch.addcmul(grad_w, gamma * c / q, w, value=-2.0)
        grad_z = torch.addr(grad_y, grad_pre, w)
        return grad_z, torch.addcmul(grad_u_hat, alpha, w), grad_w, grad_pre.sum()


@registry.register("planar")
class Planar(ParametricFlow):
    r"""Planar flow $f(z) = z + \hat u\, \tanh(w^\top z + b)$ (Rezende & Mohamed 2015).

    Invertibility: with $h = \tanh$ ($0 < h' \le 1$), $f$ is invertible iff
    $w^\top \hat u \ge -1$. The raw $u$ is mapped to

    $$
    \hat u = u + \big(m(w^\top u) - w^\top u\big)\, \frac{w}{\lVert w \rVert^2},
    \qquad m(a) = -1 + \mathrm{softplus}(a) + 10^{-3},
    $$

    so $w^\top \hat u = m(w^\top u) > -0.999$ for any raw $u, w$ (the paper's reparameterization with a
    margin, so the log-det stays finite; ``w = 0`` is a translation and is guarded).

    * log-det: $\log\big(1 + h'(w^\top z + b)\, w^\top \hat u\big)$, O(D);
    * inverse: with $a = w^\top z + b$ and $s = w^\top \hat u$, $a$ solves the scalar, strictly
      increasing equation $a + s \tanh a = w^\top y + b$, whose root lies in
      $[w^\top y + b - |s|,\, w^\top y + b + |s|]$; it is found by
      [`bracketed_newton`][pyro_flows.transforms.planar.bracketed_newton] to machine precision (typically 3–6
      iterations, vectorized over the batch), then $z = y - \hat u \tanh a$. ``inverse_atol`` (1e-8) is a conservative
      bound in float64.

    Starts at the identity ($\hat u = 0$, random $w$ of norm ~1).

    Args:
        dim: event size D.
        **context: ``context_dim`` and ``context_hidden_dims`` of the amortized variant
            ([`ParametricFlow`][pyro_flows.transforms.base.ParametricFlow]).

    Examples:
        >>> import torch
        >>> flow = Planar(3)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(flow(x), x)
        True

    """

    inverse_atol = 1e-8

    def __init__(self, dim: int, **context: Any) -> None:
        super().__init__(dim, **context)
        w = torch.randn(dim) / dim**0.5
        w = torch.where(w.norm() > 0, w, torch.ones(dim) / dim**0.5)
        self.add_raw_param("u", RAW_ONE * w / w.pow(2).sum())
        self.add_raw_param("w", w)
        self.add_raw_param("bias", torch.zeros(()))
        #: Newton iterations used by the last inverse (a diagnostic).
        self.last_inverse_iterations = 0

    @staticmethod
    def _u_hat(u: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        r"""Return $\hat u$ and $s = w^\top \hat u$.

        $\hat u = u_\perp + m(w^\top u)\, w / \lVert w \rVert^2$ with $u_\perp$ the part of $u$
        orthogonal to $w$, projected twice (the second pass removes the round-off of a large parallel
        part), so $w^\top \hat u = m > -1$ holds to round-off of $\hat u$ itself for any raw values in
        float32 too. ``w = 0`` is a translation: $s = 0$.
        """
        if w.dim() == 1:  # shared parameters: dot products, 0-d coefficients (fewer operations)
            sq, wu = w.dot(w), w.dot(u)
            nonzero = sq > 0
            sq = torch.where(nonzero, sq, 1.0)
            u_perp = torch.addcmul(u, wu / sq, w, value=-1.0)
            u_perp = torch.addcmul(u_perp, w.dot(u_perp) / sq, w, value=-1.0)
            s = torch.where(nonzero, F.softplus(wu) + (MIN_POSITIVE - 1.0), 0.0)
            return torch.addcmul(u_perp, s / sq, w), s
        sq = w.pow(2).sum(-1, keepdim=True)
        nonzero = sq > 0
        sq = torch.where(nonzero, sq, torch.ones_like(sq))
        wu = (w * u).sum(-1, keepdim=True)
        u_perp = torch.addcmul(u, wu / sq, w, value=-1.0)
        u_perp = torch.addcmul(u_perp, (w * u_perp).sum(-1, keepdim=True) / sq, w, value=-1.0)
        s = torch.where(nonzero, F.softplus(wu) + (MIN_POSITIVE - 1.0), torch.zeros_like(wu))
        return torch.addcmul(u_perp, s / sq, w), s.squeeze(-1)

    @staticmethod
    def _log_det(act: Tensor, s: Tensor) -> Tensor:
        r"""$\log(1 + (1 - a^2) s)$ for the activation $a$."""
        return torch.log1p(torch.addcmul(s, act, act * s, value=-1.0))

    @classmethod
    def _autograd_forward(cls, z: Tensor, u: Tensor, w: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """`_SharedPlanar`'s map recorded op by op by autograd (``z`` of shape ``(N, D)``, unbatched parameters)."""
        u_hat, s = cls._u_hat(u, w)
        act = torch.tanh(torch.addmv(bias.expand(z.shape[0]), z, w))
        return torch.addr(z, act, u_hat), cls._log_det(act, s)

    def _forward_with(self, params: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        w = params["w"]
        if w.dim() == 1:
            # shared parameters: one autograd node; the plain operations without autograd, under torch.jit.trace
            # (JitTrace_ELBO records them) and under torch.func transforms (which differentiate them themselves)
            flat = x.reshape(-1, self.dim)
            if not torch.is_grad_enabled() or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active():
                y, log_det = self._autograd_forward(flat, params["u"], w, params["bias"])
            else:
                y, log_det = _SharedPlanar.apply(flat, params["u"], w, params["bias"])
            return y.reshape(x.shape), log_det.reshape(x.shape[:-1])
        u_hat, s = self._u_hat(params["u"], w)
        act = torch.tanh((x * w).sum(-1) + params["bias"])
        y = x + act.unsqueeze(-1) * u_hat
        return y, expand_log_det(self._log_det(act, s), x, 1)

    def _inverse_with(self, params: Mapping[str, Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        w, bias = params["w"], params["bias"]
        u_hat, s = self._u_hat(params["u"], w)
        c = _dot(y, w) + bias

        def equation(a: Tensor, s: Tensor = s, c: Tensor = c) -> tuple[Tensor, Tensor]:
            t = torch.tanh(a)
            return a + s * t - c, 1.0 + s * (1.0 - t * t)

        a0, self.last_inverse_iterations = bracketed_newton(equation, c - s.abs(), c + s.abs(), c)
        logger.debug("planar inverse: %d Newton iterations", self.last_inverse_iterations)
        g, dg = equation(a0)
        a = a0 - g / dg  # one differentiable Newton step: implicit-function gradients
        act = torch.tanh(a)
        x = y - act.unsqueeze(-1) * u_hat
        return x, expand_log_det(self._log_det(act, s), y, 1)
