r"""Masked autoregressive flows: IAF (fast sampling), MAF (fast density) and spline autoregressive flows.

All share one structure: an element-wise bijection $\tau(\cdot; \theta_i)$ whose parameters
$\theta_i$ come from a [`MADE`][pyro_flows.nn.MADE] and depend only on the coordinates *before* $i$ in
the flow's order, so the Jacobian is triangular in that order and
$\log|\det J| = \sum_i \log \tau'(\cdot; \theta_i)$. Which side feeds the network fixes the fast direction:

* **inverse autoregressive** (IAF, Kingma et al. 2016): $y_i = \tau(x_i; \theta_i(x_{<i}))$. The forward map
  (base → sample) is one network pass; the inverse needs sequential passes.
* **masked autoregressive** (MAF, Papamakarios et al. 2017): $y_i = \tau(x_i; \theta_i(y_{<i}))$. The inverse
  (data → base, i.e. ``log_prob``) is one pass; sampling is sequential.

The sequential direction solves for the unknown side by fixed-point passes: pass $k$ fixes every coordinate
whose dependency chain has length $\le k$, so $L \le D$ passes are exact, with $L$ the longest
chain of the network (``MADE.num_passes``: D for full-width networks, fewer when narrow hidden layers cut
connections; the loop stops there). Masked weights are computed once per call and reused by every pass, and the
last pass's parameters already give the log-det (no extra network call). Cost: one pass ≈ one MLP evaluation,
the sequential direction ≈ L of them.

Every family is one class; with ``context_dim > 0`` it is the conditional variant: the context enters the MADE's
first layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from pyro_flows.nn.made import MADE, Order
from pyro_flows.transforms._network_flows import (
    AffineMap,
    ElementwiseMap,
    GatedMap,
    NormalizingAffineMap,
    SplineMap,
)
from pyro_flows.transforms.base import Direction, Flow
from pyro_flows.transforms.registry import registry

__all__ = [
    "InverseAutoregressive",
    "MaskedAutoregressive",
    "SplineInverseAutoregressive",
    "SplineMaskedAutoregressive",
]

#: Default soft bound of affine log-scales: each layer scales by at most e^5.
LOG_SCALE_BOUND = 5.0
#: Default IAF gate bias: σ = sigmoid(3) ≈ 0.95 at initialization (near the identity).
GATE_BIAS = 3.0


class _Autoregressive(Flow):
    """A MADE and an element-wise map; the class's ``fast_direction`` says which side is one pass.

    Args:
        dim: event size D.
        elementwise: the element-wise bijection family.
        hidden_dims, order, residual, generator: see [`MADE`][pyro_flows.nn.MADE].
        context_dim: context size (0: unconditional).

    """

    fast_direction: ClassVar[Direction]
    needs_permutation = True

    def __init__(
        self,
        dim: int,
        elementwise: ElementwiseMap,
        hidden_dims: Sequence[int],
        order: Order,
        residual: bool,
        generator: torch.Generator | None,
        context_dim: int,
    ) -> None:
        super().__init__(dim, context_dim=context_dim)
        self.elementwise = elementwise
        self.made = MADE(
            dim, elementwise.num_params, hidden_dims, context_dim, order=order, residual=residual, generator=generator
        )

    def _one_pass(self, v: Tensor, context: Tensor | None, invert: bool) -> tuple[Tensor, Tensor]:
        """``τ(v; θ(v))`` (or ``τ⁻¹``): the parallel direction, one network call."""
        params = self.made(v, context)
        return (self.elementwise.inverse if invert else self.elementwise.forward)(v, params)

    def _sequential(self, w: Tensor, context: Tensor | None, invert: bool) -> tuple[Tensor, Tensor]:
        """Solve ``v = τ(w; θ(v))`` (or ``τ⁻¹``) by ``made.num_passes`` fixed-point passes (exact)."""
        weights = self.made.weights()
        context_term = self.made.context_term(context, weights)
        step = self.elementwise.inverse if invert else self.elementwise.forward
        v, params = torch.zeros_like(w), None
        log_det = w.new_zeros(())
        for _ in range(int(self.made.num_passes)):
            params = self.made.apply_weights(v, weights, context_term)
            v, log_det = step(w, params)
        error = None if params is None or not invert else self.elementwise.inverse_error(w, params)
        lost = error is not None and not torch.jit.is_tracing() and bool((error > 1 + v.abs()).any())
        if lost or (not bool(torch.isfinite(v).all()) and bool(torch.isfinite(w).all())):
            raise FloatingPointError(
                f"{type(self).__name__}: the sequential pass cannot recover its input (non-finite values, or a "
                "rounding error larger than the result); the map is numerically singular there (e.g. gate logits "
                f"below ≈ -16 in float32 or -36 in float64 squash coordinates past the precision of {w.dtype}); use "
                "gated=False, float64 or smaller parameters"
            )
        return v, log_det

    def _forward_and_log_det(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.fast_direction == "forward":
            return self._one_pass(x, context, invert=False)
        return self._sequential(x, context, invert=False)

    def _inverse_and_log_det(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.fast_direction == "forward":
            return self._sequential(y, context, invert=True)
        return self._one_pass(y, context, invert=True)


@registry.register("iaf")
class InverseAutoregressive(_Autoregressive):
    r"""Inverse autoregressive flow (Kingma et al. 2016): one-pass forward (sampling), sequential inverse.

    With $(m, g) = \mathrm{MADE}(x)$ (outputs for coordinate $i$ read $x_{<i}$ only):

    * gated (default): $y = \sigma \odot x + (1 - \sigma) \odot m$, $\sigma = \mathrm{sigmoid}(g + b)$;
      log-det $\sum_i \log \sigma_i$; inverse per pass $x = m + (y - m)(1 + e^{-(g + b)})$.
      The gate bias $b$ = ``gate_bias`` puts $\sigma \approx 0.95$ at initialization (the MADE's output
      layer starts near zero), so the layer starts near the identity;
    * ``gated=False``: $y = m + e^{s} \odot x$ with $s = B \tanh(g / B)$, log-det $\sum_i s_i$
      (starts near the identity). Prefer it where scales vary by orders of magnitude (funnels) and for VAE
      posteriors (``examples/vae.py``).

    Forward and its log-det: one MADE pass. Inverse: ``made.num_passes`` (≤ D) sequential passes, exact.

    Args:
        dim: event size D.
        hidden_dims: MADE hidden widths (may be smaller than D).
        order: autoregressive order: ``"random"`` (default; a buffer), ``"natural"``, ``"reverse"`` or explicit
            indices (first to last). Stacks interleave reversals (`needs_permutation`).
        gated: use the gated update (default) instead of the affine one.
        gate_bias: $b$ of the gated update (only with ``gated=True``).
        log_scale_bound: $B$ of the affine update (only with ``gated=False``).
        residual: residual MADE (equal hidden widths).
        generator: random generator for ``order="random"``.
        context_dim: context size of the amortized variant (0: unconditional); the context enters the MADE.

    Raises:
        ValueError: a setting of the update that is not used (``gate_bias`` with ``gated=False``,
            ``log_scale_bound`` with ``gated=True``), or a non-finite or non-positive bound.

    Examples:
        >>> import torch
        >>> flow = InverseAutoregressive(4, hidden_dims=(16,))
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(flow.inv(flow(x)), x, atol=1e-5)
        True

    """

    fast_direction = "forward"

    def __init__(
        self,
        dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        order: Order = "random",
        gated: bool = True,
        gate_bias: float | None = None,
        log_scale_bound: float | None = None,
        residual: bool = False,
        generator: torch.Generator | None = None,
        context_dim: int = 0,
    ) -> None:
        if gated and log_scale_bound is not None:
            raise ValueError("log_scale_bound sets the affine update: it needs gated=False")
        if not gated and gate_bias is not None:
            raise ValueError("gate_bias sets the gated update: it needs gated=True")
        if gated:
            elementwise: ElementwiseMap = GatedMap(GATE_BIAS if gate_bias is None else gate_bias)
        else:
            elementwise = AffineMap(LOG_SCALE_BOUND if log_scale_bound is None else log_scale_bound)
        super().__init__(dim, elementwise, hidden_dims, order, residual, generator, context_dim)


@registry.register("maf")
class MaskedAutoregressive(_Autoregressive):
    r"""Masked autoregressive flow (Papamakarios et al. 2017): one-pass inverse (``log_prob``), sequential sampling.

    With $(\mu, \tilde s) = \mathrm{MADE}(y)$, $s = \tilde s / (1 + |\tilde s| / B)$ (outputs for coordinate
    $i$ read $y_{<i}$ only), the normalizing direction (data $y$ → base $x$) is

    * inverse (one MADE pass, parallel): $x = y \odot e^{s(y)} + \mu(y)$;
    * log-det of the forward map: $-\sum_i s_i$, from the same pass (so
      $\log p(y) = \log p_0(x) + \sum_i s_i$);
    * forward (base → data, sampling): $y_i = (x_i - \mu_i) e^{-s_i}$, solved in ``made.num_passes``
      (≤ D) sequential passes, exact.

    The shift is added after the scale in the one-pass direction; this trains better than the paper's equivalent
    $y = x e^{s} + \mu$ form (``benchmarks/bench_autoregressive.py``).

    Starts near the identity (the MADE's output layer starts near zero).

    Args:
        dim: event size D.
        hidden_dims: MADE hidden widths (may be smaller than D).
        order: ``"random"`` (default), ``"natural"``, ``"reverse"`` or explicit indices.
        log_scale_bound: soft bound $B$ of the log-scales.
        residual: residual MADE (equal hidden widths).
        generator: random generator for ``order="random"``.
        context_dim: context size of the amortized variant (conditional density estimation; 0: unconditional).

    Examples:
        >>> import torch
        >>> flow = MaskedAutoregressive(3, hidden_dims=(16,))
        >>> y = torch.randn(5, 3)
        >>> x = flow.inv(y)  # one pass: what log_prob uses
        >>> torch.allclose(flow(x), y, atol=1e-5)
        True

    """

    fast_direction = "inverse"

    def __init__(
        self,
        dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        order: Order = "random",
        log_scale_bound: float = LOG_SCALE_BOUND,
        residual: bool = False,
        generator: torch.Generator | None = None,
        context_dim: int = 0,
    ) -> None:
        elementwise = NormalizingAffineMap(log_scale_bound)
        super().__init__(dim, elementwise, hidden_dims, order, residual, generator, context_dim)


class _SplineAutoregressive(_Autoregressive):
    """Autoregressive rational-quadratic spline flow; subclasses fix the fast direction.

    Args:
        dim: event size D.
        hidden_dims: MADE hidden widths.
        num_bins: number of spline bins K (the MADE emits 3K - 1 values per coordinate).
        bound: the spline acts on [-bound, bound]; identity (linear tails) outside.
        order: ``"random"`` (default), ``"natural"``, ``"reverse"`` or explicit indices.
        residual: residual MADE (equal hidden widths).
        generator: random generator for ``order="random"``.
        context_dim: context size of the amortized variant (0: unconditional).

    """

    def __init__(
        self,
        dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        num_bins: int = 8,
        bound: float = 3.0,
        order: Order = "random",
        residual: bool = False,
        generator: torch.Generator | None = None,
        context_dim: int = 0,
    ) -> None:
        super().__init__(dim, SplineMap(num_bins, bound), hidden_dims, order, residual, generator, context_dim)


@registry.register("spline_iaf")
class SplineInverseAutoregressive(_SplineAutoregressive):
    r"""Autoregressive rational-quadratic spline flow (Durkan et al. 2019), IAF direction: one-pass forward.

    $y_i = \mathrm{RQS}(x_i; \theta_i(x_{<i}))$, a monotonic rational-quadratic spline with K bins on
    $[-B, B]$ and identity tails. Log-det: $\sum_i \log \mathrm{RQS}'(x_i)$ from the same pass. Inverse:
    ``made.num_passes`` (≤ D) sequential passes, each spline inverted in closed form (quadratic root).
    Starts near the identity. Same direction as Pyro's ``spline_autoregressive``; for density estimation use
    [`SplineMaskedAutoregressive`][pyro_flows.transforms.autoregressive.SplineMaskedAutoregressive]. Arguments: see
    `_SplineAutoregressive` (``dim``, ``hidden_dims``, ``num_bins``, ``bound``, ``order``, ``residual``, ``generator``,
    ``context_dim``).
    """

    fast_direction = "forward"


@registry.register("spline_maf")
class SplineMaskedAutoregressive(_SplineAutoregressive):
    r"""Autoregressive rational-quadratic spline flow, MAF direction: one-pass inverse (density evaluation).

    $y_i = \mathrm{RQS}(x_i; \theta_i(y_{<i}))$: the inverse
    $x_i = \mathrm{RQS}^{-1}(y_i; \theta_i(y_{<i}))$ and the log-det are one pass;
    sampling takes ``made.num_passes`` (≤ D) sequential passes. Arguments: see `_SplineAutoregressive`.
    """

    fast_direction = "inverse"
