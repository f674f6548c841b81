r"""Per-family presets of [`AutoFlow`][pyro_flows.guides.autoflow.AutoFlow], in the style of Pyro's ``AutoIAFNormal``.

A preset is [`AutoFlow`][pyro_flows.guides.autoflow.AutoFlow] with a default family (`AutoFlow.flow`) and depth
(`AutoFlow.num_flows`): it takes every other argument of [`AutoFlow`][pyro_flows.guides.autoflow.AutoFlow] by keyword
(``num_flows``, ``init_loc_fn``, ``init_scale``, ``permutation`` and the family's options, e.g. ``hidden_dims``),
checked at construction. Every preset starts at the Laplace approximation (`AutoFlow`'s ``start="laplace"``). The
default family and depth of ``AutoIAF`` (and of ``AutoFlow``: four affine IAF layers 32 x 32) were chosen on the
development suite of reference posteriors (``docs/posterior-suite.md``); the other presets' depths on the benchmarks
of ``benchmarks/bench_guides.py`` (``benchmarks/README.md``).

Which preset:

* ``AutoIAF`` (the recommended default): one parallel pass to sample and score, expressive, robust.
* ``AutoSylvester`` / ``AutoPlanar`` / ``AutoRadial``: few parameters, cheap, good at bending a Gaussian.
* ``AutoHouseholder`` / ``AutoConvexTriangular``: full-covariance Gaussians (linear flows), cheap and stable.
* ``AutoSplineCoupling``: the most flexible per layer (multi-modal, heavy tails); more parameters.
* ``AutoMAF``: exact as IAF but sampling is sequential in the dimension (slow guide; for small D).
* ``AutoResidual`` / ``AutoFFJORD``: free-form Jacobians; slower (numerical inverse / ODE solve), not JIT-traceable.

Examples:
    >>> import pyro, pyro.distributions as dist, torch
    >>> from pyro_flows.guides import AutoIAF
    >>> def model():
    ...     pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    >>> guide = AutoIAF(model, num_flows=3, hidden_dims=(16,), permutation=None)
    >>> guide()["x"].shape
    torch.Size([3])

"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pyro_flows.guides.autoflow import AutoFlow, FlowSpec

__all__ = [
    "AutoConvexTriangular",
    "AutoFFJORD",
    "AutoHouseholder",
    "AutoIAF",
    "AutoMAF",
    "AutoPlanar",
    "AutoRadial",
    "AutoResidual",
    "AutoSplineCoupling",
    "AutoSylvester",
]


class _Preset(AutoFlow):
    """`AutoFlow` with a fixed family: the model positionally, every other argument by keyword."""

    def __init_subclass__(cls, flow: FlowSpec | None = None, num_flows: int | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.flow, cls.num_flows = flow or cls.flow, num_flows or cls.num_flows

    def __init__(self, model: Callable[..., Any], **kwargs: Any) -> None:
        if "flow" in kwargs:
            raise TypeError(f"{type(self).__name__} fixes its flow; use AutoFlow(model, flow=...) for another one")
        super().__init__(model, **kwargs)


class AutoIAF(_Preset, flow="iaf", num_flows=4):
    r"""Inverse autoregressive flow guide (Kingma et al. 2016): ``num_flows`` IAF layers (4), reversed in between.

    Sampling and scoring its own draws are one parallel pass per layer. In a guide the layers default to the
    affine update $z' = \mu(z) + e^{s(z)} \odot z$ ($|s| < 5$) with MADE conditioners of widths (32, 32)
    (`pyro_flows.guides.autoflow.GUIDE_FAMILY_DEFAULTS`): it rescales coordinates up and
    down, which hierarchical scales and funnels need. The ``"iaf"`` family's own default elsewhere is the gated
    update $z' = \sigma \odot z + (1 - \sigma) \odot m$ (``gated=True``), numerically the most stable, which
    can only shrink a coordinate. The defaults were chosen on the development suite of reference posteriors
    (``docs/posterior-suite.md``).
    """


class AutoMAF(_Preset, flow="maf", num_flows=2):
    """Masked autoregressive flow guide (Papamakarios et al. 2017): density in one pass, sampling in D passes.

    ``num_flows`` MAF layers (2), reversed in between.
    """


class AutoPlanar(_Preset, flow="planar", num_flows=8):
    r"""Planar flow guide (Rezende & Mohamed 2015): ``num_flows`` layers (8) $u + a\,h(w^\top u + b)$."""


class AutoRadial(_Preset, flow="radial", num_flows=8):
    """Radial flow guide (Rezende & Mohamed 2015): ``num_flows`` radial contractions/expansions (8)."""


class AutoSylvester(_Preset, flow="sylvester_householder", num_flows=4):
    r"""Sylvester flow guide (van den Berg et al. 2018): ``num_flows`` layers (4) $u + A\,h(B u + b)$.

    Args:
        model: a Pyro model.
        kind: how the orthogonal factor is parameterized: ``"householder"`` (default; fast, exact),
            ``"orthogonal"`` (iterative orthogonalization, not JIT-traceable) or ``"triangular"`` (alternating
            permutations); the family is ``"sylvester_<kind>"``.
        **kwargs: every other argument of [`AutoFlow`][pyro_flows.guides.autoflow.AutoFlow] (``num_flows``,
                  ``init_scale``, family options, ...).

    Raises:
        ValueError: for an unknown ``kind``.

    """

    KINDS: ClassVar[tuple[str, ...]] = ("householder", "orthogonal", "triangular")

    def __init__(
        self,
        model: Callable[..., Any],
        kind: Literal["householder", "orthogonal", "triangular"] = "householder",
        **kwargs: Any,
    ) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        self.kind, self.flow = kind, f"sylvester_{kind}"
        super().__init__(model, **kwargs)


class AutoHouseholder(_Preset, flow=("elementwise_affine", "householder"), num_flows=4):
    r"""Householder flow guide (Tomczak & Welling 2016): a full-covariance Gaussian.

    Each of the ``num_flows`` blocks (4) rescales the coordinates and then reflects them,
    $u \mapsto H (a + e^{s} \odot u)$ with $H$ a product of ``num_reflections`` Householder
    reflections (2): a rotation alone would leave the standard normal unchanged (it is rotation invariant), hence
    the element-wise affine in each block. With a rescaling in every block (not only in the first) the stack is
    the one every other guide builds from this spec, and it covers every Gaussian that one rescaling followed by
    the same reflections does.
    """


class AutoConvexTriangular(_Preset, flow="convex_triangular", num_flows=1):
    """Convex-combination linear IAF guide (Tomczak & Welling 2017): a full-covariance Gaussian (1 layer)."""


class AutoSplineCoupling(_Preset, flow="spline_coupling", num_flows=2):
    """Rational-quadratic spline coupling guide (Durkan et al. 2019): ``num_flows`` layers (2), reversed in between.

    Its conditioner networks are wide: from a cold start train its flows at a hundredth of the base's learning rate
    (``flow_optim_args(lr, flow_lr_scale=0.01)``; the logistic-regression benchmark in ``benchmarks/README.md``).
    """


class AutoResidual(_Preset, flow="residual", num_flows=2):
    """Invertible residual flow guide (Behrmann et al. 2019; Chen et al. 2019): ``num_flows`` blocks (2)."""


class AutoFFJORD(_Preset, flow="ffjord", num_flows=1):
    """Continuous normalizing flow guide (FFJORD, Grathwohl et al. 2019): ``num_flows`` ODE blocks (1)."""
