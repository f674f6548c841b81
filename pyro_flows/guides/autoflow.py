r"""``AutoFlow``: a flow-based autoguide over all global latent variables of a Pyro model.

The guide packs every (unconstrained) latent site into one vector $z \in \mathbb{R}^D$, exactly like Pyro's
`AutoContinuous` guides (``biject_to`` of each site's support, plates handled as full
dimensions), and models it as

$$
\varepsilon \sim \mathcal{N}(0, I_D), \qquad u = f_K \circ \dots \circ f_1(\varepsilon), \qquad
z = \mu + \mathrm{diag}(\sigma)\, U u,
$$

with a learnable affine base: $\mu$, $\sigma > 0$ and, for $D \le$ `AutoFlow.dense_max_dim` (200), a unit
lower-triangular $U$ (so the base alone is a full-covariance Gaussian, $\Sigma = \mathrm{diag}(\sigma) U U^\top
\mathrm{diag}(\sigma)$; above, $U = I$), and flows $f_k$ that start at (or near) the identity.

**Where it starts.** By default (``start="laplace"``) the first call finds the MAP $\hat z$ of the model's log
joint in these coordinates and sets the base to the Laplace Gaussian $\mathcal{N}(\hat z, H^{-1})$
([`pyro_flows.guides.laplace`][pyro_flows.guides.laplace]: L-BFGS, then the exact Hessian; its diagonal above
`dense_max_dim`), so at step 0 the guide is the Laplace approximation and the flows only add what it misses
(skewness, varying scales, heavy tails). Where the MAP is degenerate (a funnel's mode sits at its neck) or
missing, the *cold start* is kept: $\mu$ from ``init_loc_fn``, $\sigma$ = ``init_scale``, $U = I$,
AutoNormal's initial distribution; the start with the higher ELBO estimate ($n = 64$ draws) wins, and
``guide.start_used`` says which. ``start="cold"`` skips the MAP (for a model whose log joint is expensive or a
start the user sets through ``init_loc_fn``).

**Where the flows act.** The flows act on the *standardized* coordinates $u$, before the affine map. Their
parameters are then scale-free: a planar or Sylvester layer bends an $O(1)$ cloud whatever the posterior scale
of each latent (a regression weight of scale $10^{-3}$ and a variance of scale $10^{3}$ look alike), the
same learning rate suits every model, and a near-identity initialization of a flow means the same thing everywhere.
Putting the flows after the affine map (in $z$-space) would make each flow re-learn the location and scale
of the posterior with parameters of the wrong order of magnitude; with a unit base and no affine at all (Pyro's
``AutoNormalizingFlow``) a planar stack can only move a few directions away from $\mathcal{N}(0, I)$.

The log-density of a draw is $\log q(z) = \log\mathcal{N}(\varepsilon; 0, I) - \sum_k \log|\det
J_{f_k}| - \sum_i \log\sigma_i$; flows of `pyro_flows.transforms` cache the log-det computed while sampling, so
scoring the guide's own draws (what every ELBO does) costs no inverse pass.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, ClassVar, Literal

import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoContinuous, AutoMultivariateNormal, AutoNormal, init_to_feasible
from pyro.nn import PyroParam
from torch import Tensor, nn
from torch.distributions import Transform, biject_to, transform_to

from pyro_flows._validation import check_real
from pyro_flows.guides.laplace import find_map, laplace_factors, log_joint_fn
from pyro_flows.transforms.stack import PermutationRule, build_flows, flow_names

__all__ = [
    "GUIDE_FAMILY_DEFAULTS",
    "ONE_DIM_FAMILIES",
    "AutoFlow",
    "FlowSpec",
    "family_defaults",
    "flow_optim_args",
    "guide_flows",
    "init_to_feasible_point",
]

logger = logging.getLogger(__name__)

#: Guide draws of the ELBO estimates that choose between the Laplace start and the cold start.
START_DRAWS = 64

#: What ``flow`` may be: a registry name, a block of registry names repeated ``num_flows`` times, or a callable
#: ``dim -> list of transforms``.
FlowSpec = str | Sequence[str] | Callable[[int], Sequence[Transform]]

#: The element-wise family that stands in a guide for each coupling family when the latent vector has one coordinate.
ONE_DIM_FAMILIES = {"affine_coupling": "elementwise_affine", "spline_coupling": "spline_iaf"}

#: The options a guide gives a family unless they are set (chosen on the development suite of reference posteriors,
#: ``docs/posterior-suite.md``): IAF layers with the affine update, which can rescale coordinates up and down (the
#: gated one only shrinks them: hierarchical scales suffer), and conditioners of width 32.
GUIDE_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {"iaf": {"gated": False, "hidden_dims": (32, 32)}}


def flow_optim_args(lr: float, flow_lr_scale: float = 0.1, **other: Any) -> Callable[[str], dict[str, Any]]:
    """Per-parameter arguments of a Pyro optimizer: the flows' parameters at ``lr * flow_lr_scale``, the rest at ``lr``.

    Pyro calls the returned function with each parameter's name in ``nn.Module`` style (``"AutoIAF.flows.0.bias"``,
    ``"AutoIAF.loc"``); the parameters of the flows of [`AutoFlow`][pyro_flows.guides.autoflow.AutoFlow] and of
    [`AmortizedFlowGuide`][pyro_flows.guides.amortized.AmortizedFlowGuide] are those whose name contains ``".flows."``.

    Args:
        lr: learning rate of every other parameter (the affine base, encoders, decoders).
        flow_lr_scale: factor of the flows' learning rate (``1.0``: the same rate everywhere).
        **other: further arguments of the optimizer for every parameter (``betas``, ``lrd``, ``clip_norm``, ...).

    Returns:
        ``param_name -> dict`` of optimizer arguments, for ``pyro.optim.Adam(...)``, ``ClippedAdam(...)``, etc.

    Raises:
        ValueError: a learning rate or factor that is not a positive finite number.

    Examples:
        >>> import pyro
        >>> optim_args = flow_optim_args(0.02, 0.5, betas=(0.9, 0.99))
        >>> optim_args("AutoIAF.flows.0.bias"), optim_args("AutoIAF.loc")
        ({'betas': (0.9, 0.99), 'lr': 0.01}, {'betas': (0.9, 0.99), 'lr': 0.02})
        >>> optim = pyro.optim.Adam(optim_args)

    """
    for name, value in (("lr", lr), ("flow_lr_scale", flow_lr_scale)):
        check_real(value, name, positive=True)

    def optim_args(param_name: str) -> dict[str, Any]:
        return {**other, "lr": lr * flow_lr_scale if ".flows." in param_name else lr}

    return optim_args


def init_to_feasible_point(site: dict[str, Any]) -> Tensor:
    """Pyro's ``init_to_feasible``, also for a site whose distribution cannot sample.

    The point is ``transform_to(support)(0)`` in unconstrained space, as in ``init_to_feasible``; its shape comes
    from a draw when the distribution has one, else from the distribution's shape: ``ImproperUniform`` (Stan's flat
    priors, e.g. an ``ordered_vector`` with no prior statement) then starts at that point too, in the default dtype.
    """
    try:
        return init_to_feasible(site)
    except NotImplementedError:
        support = transform_to(site["fn"].support)
        shape = support.inverse_shape(site["fn"].shape())
        return support(torch.zeros(shape, dtype=torch.get_default_dtype())).detach()


def _plain(value: Any) -> Any:
    """``value`` as plain data that survives ``torch.load(weights_only=True)`` and compares by value."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return tuple(_plain(item) for item in value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', f'<{type(value).__qualname__}>')}"


class CheckedSettings:
    """``state_dict`` hooks of the guides: the construction settings (``self._settings``) travel with the checkpoint.

    ``get_extra_state`` saves them under ``_extra_state``; ``set_extra_state`` (called by ``load_state_dict``) refuses
    a checkpoint of a guide built with other settings, naming every setting that differs. The settings are the
    resolved ones (a family's guide defaults included), so a checkpoint also records what a default meant when it
    was saved: a later change of default is caught, not loaded into layers that compute something else.
    """

    _settings: dict[str, Any]

    def get_extra_state(self) -> dict[str, Any]:
        """The construction settings, saved in ``state_dict`` under ``_extra_state``."""
        return dict(self._settings)

    def set_extra_state(self, state: Any) -> None:
        """Check that a checkpoint's settings are this guide's.

        Raises:
            ValueError: naming every setting that differs.

        """
        if state is None:  # a checkpoint from before the guide recorded its settings: nothing to compare
            return
        ours, state = self._settings, dict(state) if isinstance(state, Mapping) else {}
        if differ := [key for key in {**ours, **state} if state.get(key) != ours.get(key)]:
            text = "; ".join(f"{key}: {state.get(key)!r} in the checkpoint, {ours.get(key)!r} here" for key in differ)
            raise ValueError(f"the checkpoint's guide has other settings ({text}); build one with them to load it")


def family_defaults(flow: FlowSpec, table: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The options ``table`` (family name → options) gives the families of ``flow``, for ``build_flows(defaults=)``.

    Examples:
        >>> family_defaults(("planar", "iaf"), GUIDE_FAMILY_DEFAULTS)
        {'gated': False, 'hidden_dims': (32, 32)}

    """
    return {key: value for name in flow_names(flow) for key, value in table.get(name, {}).items()}


def guide_flows(flow: str | Sequence[str], dim: int, num_flows: int, **kwargs: Any) -> list[Transform]:
    """The layers of `build_flows` for a guide, in every dimension (coupling families fall back in one dimension).

    A coupling layer needs both conditioning and transformed coordinates, which a one-dimensional latent vector
    does not have. With nothing to condition on, the transformed part of a coupling layer is an element-wise map,
    so for D = 1 each coupling family of the block is replaced by its element-wise family of `ONE_DIM_FAMILIES`:
    `"affine_coupling"` by `"elementwise_affine"`, `"spline_coupling"` by `"spline_iaf"` (an autoregressive
    spline of one coordinate is an element-wise spline). Pyro's guides work on one-dimensional models, and so do
    these. The options are checked against `flow`; each replacement takes those it accepts (a coupling `mask`
    means nothing in one dimension). In every other case this is `build_flows` itself, which stays faithful to
    the families it is given.

    Examples:
        >>> [type(layer).__name__ for layer in guide_flows("affine_coupling", 1, 2, hidden_dims=(8,))]
        ['ElementwiseAffine', 'ElementwiseAffine']
        >>> [type(layer).__name__ for layer in guide_flows("affine_coupling", 2, 1)]
        ['AffineCoupling']

    """
    if dim > 1 or not ONE_DIM_FAMILIES.keys() & set(names := flow_names(flow)):
        return build_flows(flow, dim, num_flows, **kwargs)
    build_flows(flow, dim, 0, **kwargs)  # the options of the given families (no layer is built)
    fixed = {key: kwargs.pop(key) for key in ("context_dim", "permutation") if key in kwargs}
    defaults = {**(kwargs.pop("defaults", None) or {}), **kwargs}
    return build_flows([ONE_DIM_FAMILIES.get(name, name) for name in names], dim, num_flows, defaults=defaults, **fixed)


class AutoFlow(CheckedSettings, AutoContinuous):
    r"""Flow autoguide $z = \mu + \sigma \odot f(\varepsilon)$ over the packed unconstrained global latents.

    Works wherever Pyro's ``AutoContinuous`` guides work: constrained sites (through ``biject_to``), sites in
    plates (as full dimensions), ``Trace_ELBO`` with ``vectorize_particles=True``, ``Predictive``,
    [`get_posterior`][pyro_flows.guides.autoflow.AutoFlow.get_posterior] (``rsample`` and ``log_prob``).
    ``JitTrace_ELBO`` works with flows whose passes contain no data-dependent Python control flow (`traceable`):
    element-wise, linear, planar/radial, Sylvester, Householder, autoregressive and coupling flows; tracing a guide with
    an iterative flow (residual, FFJORD, orthogonal Sylvester) raises an error naming it. The same flows make the guide
    serializable with Pyro's pattern for autoguides: run the guide once (e.g. train it), then
    `torch.jit.trace_module(guide, {"call": args})` and `torch.jit.save`; the loaded module's `call(*args)` draws the
    latents. The same error refuses the other flows.

    Local latent variables inside subsampled plates are rejected with a clear error: a single joint flow over a
    subsample changes dimension from batch to batch (use an amortized guide for them, e.g. in an
    ``AutoGuideList`` with this guide on the global latents through ``poutine.block``).

    A model with a single scalar latent (D = 1) works with every flow: coupling families, which need two
    coordinates, are then replaced by element-wise ones (see `guide_flows`).

    The guide starts at the Laplace approximation (see the module documentation; ``start="cold"`` for
    AutoNormal's start). To start at another fitted Gaussian guide (an ``AutoNormal``, an
    ``AutoMultivariateNormal``, Pyro's ``AutoLaplaceApproximation``), use
    [`from_guide`][pyro_flows.guides.autoflow.AutoFlow.from_guide].

    **Learning rates.** From the Laplace start one learning rate for every parameter works (the suite of
    ``docs/posterior-suite.md`` trains with ClippedAdam at 1e-2 decaying to 1e-3). From a cold start the affine
    base should do the bulk of the work early (where the posterior is, how wide) while the flows refine its shape,
    so give the flows a smaller learning rate through the optimizer with
    [`flow_optim_args`][pyro_flows.guides.autoflow.flow_optim_args]:
    ``pyro.optim.Adam(flow_optim_args(0.01, flow_lr_scale=0.1))`` (``0.01`` for the wide conditioners of
    [`AutoSplineCoupling`][pyro_flows.guides.presets.AutoSplineCoupling]); with one learning rate for everything,
    cold-started flows can fall behind AutoNormal early or diverge with one particle (``benchmarks/README.md``).

    **Checkpoints.** ``state_dict`` stores the guide's construction settings (``flow``, ``num_flows``, the flow
    options, ``permutation``, ``init_scale``, ``start``) besides the parameters, and ``load_state_dict`` into a
    guide built with other settings raises a ``ValueError`` naming the ones that differ. ``torch.save(guide)``,
    ``pickle`` and ``copy.deepcopy`` work on a trained guide (the model, and a callable ``flow``, must be picklable:
    module-level functions, not lambdas).

    **Pitfalls inherited from Pyro's autoguides.** Reloading Pyro's parameter store
    (`pyro.get_param_store().load(path)`) restores parameter values, not the guide: the flows' structure (families,
    widths, permutations) lives in the module, so save the module itself (`torch.save(guide)`) or its
    `guide.state_dict()` (loaded into a guide built with the same settings). And every guide registers its
    parameters in the store under its name (`"AutoIAF.loc"`, ...), the class name by default: two guides of one
    class in one parameter store share their parameters unless their `name=` differs.

    Args:
        model: a Pyro model.
        flow: a name in [`pyro_flows.transforms.registry`][pyro_flows.transforms.registry] (``"iaf"``, ``"planar"``,
            ...), a sequence of names forming one block (e.g. ``("lu", "leaky_relu")``), or a callable ``dim -> list of
            transforms`` (then ``num_flows``, ``permutation`` and flow options must not be given). Default: the class's
            `flow`.
        num_flows: number of blocks of ``flow`` (the stack of
            [`build_flows`][pyro_flows.transforms.stack.build_flows], the same layers as the amortized guide and the
            density estimator build from the same spec); ``0`` leaves a diagonal Gaussian (with a warning).
            Default: the class's `num_flows`.
        init_loc_fn: per-site initialization of $\mu$ for the cold start, and the MAP search's starting point
            (see Pyro's ``autoguide.initialization``). The default,
            [`init_to_feasible_point`][pyro_flows.guides.autoflow.init_to_feasible_point], is AutoNormal's
            ``init_to_feasible`` (deterministic), extended to distributions that cannot sample
            (``ImproperUniform``); ``init_to_median`` (Pyro's ``AutoContinuous`` default) takes the median of 15
            prior draws.
        init_scale: $\sigma$ of the cold start (a positive float for every coordinate).
        permutation: the permutation rule between blocks: ``"auto"`` (a reversal where a family of the block
            needs one: autoregressive, coupling, triangular), ``"reverse"``, ``"random"`` or ``None`` (none).
        name: the prefix of the guide's parameters in Pyro's parameter store (default: the class name); give
            two guides of one class different names to keep their parameters apart.
        start: ``"laplace"`` (the Laplace approximation where it beats the cold start) or ``"cold"``.
        **flow_kwargs: options of the families of the block (e.g. ``hidden_dims``); each goes to every family
            that accepts it. They are checked here, at construction: an option no family accepts raises a
            ``TypeError`` and a bad value a ``ValueError``, both naming it (options sized by the model's dimension,
            such as a coupling ``mask`` sequence, are checked against it at the first call).

    Raises:
        KeyError: an unknown family.
        TypeError: a bad ``flow``, an unknown option, or options given with a callable ``flow``.
        ValueError: a bad ``num_flows``, ``init_scale``, ``permutation``, ``start`` or option value.

    Examples:
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro_flows.guides import AutoFlow, flow_optim_args
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> guide = AutoFlow(model, flow="triangular", num_flows=1)
        >>> guide()["x"].shape
        torch.Size([2])
        >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam(flow_optim_args(0.01)), pyro.infer.Trace_ELBO())
        >>> AutoFlow(model, flow="iaf", hiden_dims=(8,))
        Traceback (most recent call last):
            ...
        TypeError: unknown keyword argument(s) ['hiden_dims'] for flow 'iaf' (accepted: ...)

    """

    #: The default flow spec (presets set their family here).
    flow: ClassVar[FlowSpec] = "iaf"
    #: The default number of blocks.
    num_flows: ClassVar[int] = 4
    #: Number of (fixed-seed) draws used by `median` and `quantiles`.
    num_quantile_samples: int = 4096
    #: Largest latent dimension with a full-covariance base (the unit triangular factor $U$) and a dense Laplace
    #: start; above it the base is diagonal and the Laplace start uses the Hessian's diagonal.
    dense_max_dim: ClassVar[int] = 200

    def __init__(
        self,
        model: Callable[..., Any],
        flow: FlowSpec | None = None,
        num_flows: int | None = None,
        init_loc_fn: Callable[[dict], Tensor] = init_to_feasible_point,
        init_scale: float = 0.1,
        permutation: PermutationRule = "auto",
        name: str | None = None,
        start: Literal["laplace", "cold"] = "laplace",
        **flow_kwargs: Any,
    ) -> None:
        check_real(init_scale, "init_scale", positive=True)
        if start not in ("laplace", "cold"):
            raise ValueError(f"start must be 'laplace' or 'cold', got {start!r}")
        flow = self.flow if flow is None else flow
        defaults: dict[str, Any] = {}
        if callable(flow):
            given = ["num_flows"] * (num_flows is not None) + ["permutation"] * (permutation != "auto") + [*flow_kwargs]
            if given:
                raise TypeError(f"a callable flow builds its own layers: {given} cannot apply (pass them to it)")
            self._make_flows = flow
        else:
            if {"context_dim", "context_hidden_dims"} & set(flow_kwargs):
                raise TypeError("AutoFlow's flows are unconditional: context_dim and context_hidden_dims do not apply")
            num_flows = self.num_flows if num_flows is None else num_flows
            defaults = family_defaults(flow, GUIDE_FAMILY_DEFAULTS)
            # one throwaway stack checks the spec and every option, on the CPU, leaving every random state alone, at
            # a small size: 2, or the size a dimension-sized option names (a coupling mask, Sylvester's num_hidden)
            mask, hidden = flow_kwargs.get("mask"), flow_kwargs.get("num_hidden")
            probe = max(2, len(mask) if isinstance(mask, list | tuple) else 0, hidden if isinstance(hidden, int) else 0)
            with torch.random.fork_rng(devices=[]), torch.device("cpu"):
                build_flows(
                    flow, probe, num_flows, permutation=permutation, defaults=defaults, **copy.deepcopy(flow_kwargs)
                )
            self._make_flows = partial(
                guide_flows, flow, num_flows=num_flows, permutation=permutation, defaults=defaults, **flow_kwargs
            )
            if num_flows == 0:
                warnings.warn(f"{type(self).__name__} with num_flows=0 is a diagonal Gaussian guide.", stacklevel=2)
        resolved = {**defaults, **flow_kwargs}
        settings = {"flow": flow, "num_flows": num_flows, "flow_kwargs": resolved, "permutation": permutation}
        self._settings = _plain({**settings, "init_scale": float(init_scale), "start": start})
        self._warm_start: tuple[Tensor, Tensor, Tensor | None] | None = None
        #: How the base was initialized at the first call: ``"laplace"``, ``"cold"`` or ``"guide"`` (`from_guide`).
        self.start_used: str | None = None
        super().__init__(model, init_loc_fn=init_loc_fn)
        self._pyro_name = name or type(self).__name__

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_guide(
        cls, guide: AutoNormal | AutoContinuous, model: Callable[..., Any] | None = None, **kwargs: Any
    ) -> AutoFlow:
        r"""A flow guide whose affine base starts at a fitted Gaussian guide's location and scales.

        The returned guide's $(\mu, \sigma)$ are copies of the unconstrained locations and per-coordinate
        scales of ``guide`` (an `AutoNormal` or any ``AutoContinuous`` Gaussian guide, e.g.
        ``AutoDiagonalNormal``); from an ``AutoMultivariateNormal`` (or the Gaussian of Pyro's
        ``AutoLaplaceApproximation.laplace_approximation``) the correlations are copied too, into the base's unit
        triangular factor $U$ (for $D \le$ `dense_max_dim`). The flows start at the identity, so the initial
        guide is the fitted Gaussian (no Laplace start is run).

        Args:
            guide: a guide that has been run at least once (its parameters exist).
            model: the model; defaults to ``guide.model``.
            **kwargs: the other arguments of the guide class (``flow``, ``num_flows``, ...).

        Raises:
            ValueError: if ``guide`` has not been run yet or is of an unsupported type.

        """
        if getattr(guide, "prototype_trace", None) is None:
            raise ValueError("from_guide needs a guide that has been run (e.g. trained with SVI) at least once")
        if "init_scale" in kwargs:
            raise ValueError("from_guide takes the scales from the guide; do not pass init_scale")
        unit_tril = None
        if isinstance(guide, AutoNormal):
            pairs = [guide._get_loc_and_scale(name) for name, _ in guide.prototype_trace.iter_stochastic_nodes()]
            loc, scale = (torch.cat([pair[i].reshape(-1) for pair in pairs]) for i in (0, 1))
        elif isinstance(guide, AutoMultivariateNormal) and guide.latent_dim <= cls.dense_max_dim:
            # Σ's Cholesky factor L = diag(d) U: its diagonal d and the unit lower-triangular rest U (Pyro's own
            # factor is unit-diagonal, the Laplace approximation's is the correlations' Cholesky factor)
            tril = guide.scale.unsqueeze(-1) * guide.scale_tril
            scale = torch.diagonal(tril, dim1=-2, dim2=-1)
            loc, unit_tril = guide.loc, tril / scale.unsqueeze(-1)
        else:
            try:
                loc, scale = guide._loc_scale()
            except (AttributeError, NotImplementedError):
                raise ValueError(f"{type(guide).__name__} has no location and scale to warm-start from") from None
        new = cls(model if model is not None else guide.model, **kwargs)
        new._warm_start = tuple(None if v is None else v.detach().clone() for v in (loc, scale, unit_tril))
        return new

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            for frame in site["cond_indep_stack"]:
                if frame.full_size not in (None, frame.size):
                    raise NotImplementedError(
                        f"{type(self).__name__} cannot model the local latent site {name!r} inside the subsampled "
                        f"plate {frame.name!r} ({frame.size} of {frame.full_size}): guide local latents with an "
                        "amortized guide, and global ones with this guide: AutoGuideList and poutine.block"
                    )
        loc = self._init_loc()
        scale = torch.full_like(loc, self._settings["init_scale"])
        unit_tril = torch.eye(self.latent_dim).to(loc) if self.latent_dim <= self.dense_max_dim else None
        layers = list(self._make_flows(self.latent_dim))
        bad = sorted({type(f).__name__ for f in layers if not (isinstance(f, Transform) and isinstance(f, nn.Module))})
        if bad:
            raise TypeError(f"the flow callable must return transform modules (Transform and nn.Module), got {bad}")
        flows = nn.ModuleList(layers).to(device=loc.device, dtype=loc.dtype)
        self.start_used, unit = "cold", torch.ones_like(loc)
        if self._warm_start is not None:
            if (size := self._warm_start[0].numel()) != self.latent_dim:
                raise ValueError(f"the warm start has {size} unconstrained dimensions, the model {self.latent_dim}")
            loc, scale = (value.to(loc) for value in self._warm_start[:2])
            if unit_tril is not None and self._warm_start[2] is not None:
                unit_tril = self._warm_start[2].to(loc)
            self.start_used = "guide"
        elif self._settings["start"] == "laplace":
            loc, scale, unit_tril = self._laplace_start(flows, (loc, scale, unit_tril), args, kwargs)
        if self.start_used != "cold":
            unit = scale.clone()
        self.register_buffer("loc_origin", loc)
        self.register_buffer("loc_unit", unit)
        self.loc_shift = nn.Parameter(torch.zeros_like(loc))
        self.scale = PyroParam(scale, dist.constraints.softplus_positive)
        if unit_tril is not None:
            # contiguous: for a guide set up outside a call (as `fit` does), Pyro's param store registers a
            # contiguous copy of a strided parameter at the first call and the optimizers train that copy, not the
            # tensor the guide reads (the Laplace factor comes from a Cholesky factorization: column-major)
            self.unit_tril = nn.Parameter(unit_tril.contiguous())
        self.flows = flows
        # a family fact, read once: every access to ``self.flows`` re-registers it in Pyro's param store
        self._untraceable = sorted({type(f).__name__ for f in layers if not getattr(f, "traceable", True)})

    @property
    def loc(self) -> Tensor:
        r"""The base location $\mu = c + s \odot \delta$.

        $\delta$ is the learned shift (``loc_shift``, 0 at the start) in units $s$ (``loc_unit``) from the
        starting point $c$ (``loc_origin``). The units are the starting scales $\sigma_0$ of a Laplace or
        `from_guide` start and 1 for the cold start. An optimizer's step on $\delta$ then moves $\mu$ by a
        fraction of the posterior's width on every coordinate: Adam's steps have the size of the learning rate
        whatever the gradient's scale, so on $\mu$ itself a rate of $10^{-3}$ is a random walk of a tenth of the
        posterior sd per step for a coordinate of sd $10^{-2}$ (an AR coefficient, a regression slope), and the
        means end that far off.
        """
        return self.loc_origin + self.loc_unit * self.loc_shift

    @staticmethod
    def _base_transform(loc: Tensor, scale: Tensor, unit_tril: Tensor | None) -> Transform:
        r"""$u \mapsto \mu + \mathrm{diag}(\sigma)\, U u$ (``unit_tril`` read below its diagonal; ``None``: $U = I$)."""
        if unit_tril is None:
            return dist.transforms.AffineTransform(loc, scale, event_dim=1, cache_size=1)
        eye = torch.eye(loc.shape[-1], dtype=loc.dtype, device=loc.device)
        return dist.transforms.LowerCholeskyAffine(loc, scale.unsqueeze(-1) * (unit_tril.tril(-1) + eye), cache_size=1)

    def _elbo_estimate(self, log_joint: Callable[[Tensor], Tensor], flows: nn.ModuleList, base: tuple) -> float:
        r"""$\frac1n \sum_i \log p(x, z_i) - \log q(z_i)$ over `START_DRAWS` draws (one model call each).

        ``q`` is the guide with the given ``flows`` and base ``(loc, scale, unit_tril)``.
        """
        loc = base[0]
        with torch.no_grad():
            normal = dist.Normal(torch.zeros_like(loc), torch.ones_like(loc)).to_event(1)
            posterior = dist.TransformedDistribution(normal, [*flows, self._base_transform(*base)])
            draws = posterior.sample((START_DRAWS,))
            estimate = float((torch.stack([log_joint(z) for z in draws]) - posterior.log_prob(draws)).mean())
        return estimate if math.isfinite(estimate) else -math.inf

    def _laplace_start(
        self, flows: nn.ModuleList, cold: tuple[Tensor, Tensor, Tensor | None], args: tuple, kwargs: Mapping[str, Any]
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        r"""The base at the Laplace Gaussian of the MAP where its ELBO estimate beats the cold base's, else ``cold``.

        The Laplace factors are dense exactly when the base has its triangular factor ($D \le$ `dense_max_dim`).
        """
        log_joint = log_joint_fn(self.model, self, args, kwargs)
        mode = find_map(log_joint, cold[0])
        factors = None if mode is None else laplace_factors(log_joint, mode, self.dense_max_dim)
        if factors is None:
            logger.info("%s: no Laplace start (no finite MAP or curvature): cold start", self._pyro_name)
            return cold
        laplace = (mode, *factors)
        laplace_elbo, cold_elbo = (self._elbo_estimate(log_joint, flows, base) for base in (laplace, cold))
        logger.info("%s: ELBO at the start: Laplace %.4g, cold %.4g", self._pyro_name, laplace_elbo, cold_elbo)
        if laplace_elbo < cold_elbo:
            return cold
        self.start_used = "laplace"
        return laplace

    # ------------------------------------------------------------------------------------------------ the posterior
    def get_base_dist(self) -> dist.TorchDistribution:
        r"""The standard normal $\mathcal{N}(0, I_D)$ on the device and dtype of the guide's parameters."""
        zeros = torch.zeros_like(self.loc_origin)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def _transforms(self, *args: Any, **kwargs: Any) -> list[Transform]:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        loc, scale = self.loc, self.scale
        if not torch.jit.is_tracing() and not bool(torch.isfinite(loc).all() & torch.isfinite(scale).all()):
            raise FloatingPointError(
                f"{self._pyro_name}'s parameters are not finite: an optimizer step diverged (a non-finite loss or "
                "gradient). Restart with a smaller learning rate, flow_optim_args(lr, flow_lr_scale=0.1) or more "
                "particles, or train with pyro_flows.diagnostics.fit_svi, which stops at the first non-finite step "
                "and keeps the last finite parameters"
            )
        return [*self.flows, self._base_transform(loc, scale, getattr(self, "unit_tril", None))]

    def get_transform(self, *args: Any, **kwargs: Any) -> Transform:
        r"""The map $\varepsilon \mapsto \mu + \mathrm{diag}(\sigma)\, U f(\varepsilon)$ as one transform.

        Raises:
            FloatingPointError: the base's parameters are not finite (an optimizer step diverged); the message
                says what to try.

        """
        return dist.transforms.ComposeTransform(self._transforms(*args, **kwargs))

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.TransformedDistribution:
        """The guide's distribution over the packed unconstrained latents (``rsample`` and ``log_prob``)."""
        transforms = self._transforms(*args, **kwargs)
        if self._untraceable and torch.jit.is_tracing():
            raise NotImplementedError(
                f"{type(self).__name__} cannot be traced by torch.jit (JitTrace_ELBO, trace_module): the flow(s) "
                f"{self._untraceable} are iterative (data-dependent control flow); use Trace_ELBO, and torch.save to "
                "save"
            )
        return dist.TransformedDistribution(self.get_base_dist(), transforms)

    # ------------------------------------------------------------------------------------------------- summaries
    def _fixed_draws(self, *args: Any, **kwargs: Any) -> Tensor:
        """`num_quantile_samples` unconstrained latents from a fixed-seed base draw (reproducible summaries)."""
        transform = self.get_transform(*args, **kwargs)
        eps = torch.randn(self.num_quantile_samples, self.latent_dim, generator=torch.Generator().manual_seed(0))
        return transform(eps.to(self.loc_origin))

    def _constrain(self, latent: Tensor) -> dict[str, Tensor]:
        """Split ``(..., D)`` latents into the sites' constrained values of shape ``(...) + site shape``."""
        parts = latent.split([math.prod(shape) for shape in self._unconstrained_shapes.values()], dim=-1)
        return {  # the unconstrained shapes are in the packing order
            name: biject_to(self.prototype_trace.nodes[name]["fn"].support)(part.reshape(latent.shape[:-1] + shape))
            for (name, shape), part in zip(self._unconstrained_shapes.items(), parts, strict=True)
        }

    @torch.no_grad()
    def sample_posterior(self, num_samples: int, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Draw ``num_samples`` posterior samples of every latent site, in constrained space.

        Returns:
            a dict mapping site names to tensors of shape ``(num_samples,) + site shape``.

        """
        return self._constrain(self.get_posterior(*args, **kwargs).sample((num_samples,)))

    @torch.no_grad()
    def quantiles(self, quantiles: Sequence[float] | Tensor, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Per-coordinate posterior quantiles of every latent site, in constrained space.

        The quantiles are those of `num_quantile_samples` fixed-seed draws in unconstrained space, mapped
        through each site's (coordinate-wise monotone) ``biject_to``; for sites whose bijection mixes coordinates
        (simplex, correlation matrices) the result is the image of the unconstrained quantile point.

        Returns:
            a dict mapping site names to tensors of shape ``(len(quantiles),) + site shape``.

        """
        draws = self._fixed_draws(*args, **kwargs)
        qs = torch.as_tensor(quantiles, dtype=draws.dtype, device=draws.device).reshape(-1)
        if ((qs < 0) | (qs > 1)).any():
            raise ValueError(f"quantiles must lie in [0, 1], got {qs.tolist()}")
        return self._constrain(torch.quantile(draws, qs, dim=0))

    def median(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Per-coordinate posterior medians of every latent site, in constrained space (see `quantiles`)."""
        return {name: value[0] for name, value in self.quantiles([0.5], *args, **kwargs).items()}

    def _loc_scale(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Monte-Carlo mean and standard deviation of the unconstrained latents (fixed-seed draws)."""
        with torch.no_grad():
            draws = self._fixed_draws(*args, **kwargs)
        return draws.mean(0), draws.std(0)
