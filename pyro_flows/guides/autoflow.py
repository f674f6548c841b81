r"""``AutoFlow``: a flow-based autoguide over all global latent variables of a Pyro model.

The guide packs every (unconstrained) latent site into one vector :math:`z \in \mathbb{R}^D`, exactly like Pyro's
:class:`~pyro.infer.autoguide.AutoContinuous` guides (``biject_to`` of each site's support, plates handled as full
dimensions), and models it as

.. math::

    \varepsilon \sim \mathcal{N}(0, I_D), \qquad u = f_K \circ \dots \circ f_1(\varepsilon), \qquad
    z = \mu + \sigma \odot u,

with a learnable affine base (:math:`\mu` from ``init_loc_fn``, :math:`\sigma > 0` starting at ``init_scale``) and
flows :math:`f_k` that start at (or near) the identity. At step 0 the guide is therefore AutoNormal's initial
distribution :math:`\mathcal{N}(\mu, \mathrm{diag}\,\sigma^2)`, and the flows only add what a diagonal Gaussian misses.

**Where the flows act.** The flows act on the *standardized* coordinates :math:`u`, before the affine map. Their
parameters are then scale-free: a planar or Sylvester layer bends an :math:`O(1)` cloud whatever the posterior scale
of each latent (a regression weight of scale :math:`10^{-3}` and a variance of scale :math:`10^{3}` look alike), the
same learning rate suits every model, and a near-identity initialization of a flow means the same thing everywhere.
Putting the flows after the affine map (in :math:`z`-space) would make each flow re-learn the location and scale
of the posterior with parameters of the wrong order of magnitude; with a unit base and no affine at all (Pyro's
``AutoNormalizingFlow``) a planar stack can only move a few directions away from :math:`\mathcal{N}(0, I)`.

The log-density of a draw is :math:`\log q(z) = \log\mathcal{N}(\varepsilon; 0, I) - \sum_k \log|\det
J_{f_k}| - \sum_i \log\sigma_i`; flows of :mod:`pyro_flows.transforms` cache the log-det computed while sampling, so
scoring the guide's own draws (what every ELBO does) costs no inverse pass.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import AffineTransform, ComposeTransform
from pyro.infer.autoguide import AutoContinuous, AutoNormal
from pyro.infer.autoguide.initialization import init_to_feasible
from pyro.nn import PyroParam
from torch import Tensor, nn
from torch.distributions import Transform, biject_to

from pyro_flows.transforms.base import check_size
from pyro_flows.transforms.stack import PermutationRule, build_flows

__all__ = ["AutoFlow", "FlowSpec", "flow_optim_args"]

#: What ``flow`` may be: a registry name, a block of registry names repeated ``num_flows`` times, or a callable
#: ``dim -> list of transforms``.
FlowSpec = str | Sequence[str] | Callable[[int], Sequence[Transform]]


def flow_optim_args(lr: float, flow_lr_scale: float = 0.1, **other: Any) -> Callable[[str], dict[str, Any]]:
    """Per-parameter arguments of a Pyro optimizer: the flows' parameters at ``lr * flow_lr_scale``, the rest at ``lr``.

    Pyro calls the returned function with each parameter's name in ``nn.Module`` style (``"AutoIAF.flows.0.bias"``,
    ``"AutoIAF.loc"``); the parameters of the flows of :class:`AutoFlow` and of
    :class:`~pyro_flows.guides.AmortizedFlowGuide` are those whose name contains ``".flows."``.

    Args:
        lr: learning rate of every other parameter (the affine base, encoders, decoders).
        flow_lr_scale: factor of the flows' learning rate (``1.0``: the same rate everywhere).
        **other: further arguments of the optimizer for every parameter (``betas``, ``lrd``, ``clip_norm``, ...).

    Returns:
        ``param_name -> dict`` of optimizer arguments, for ``pyro.optim.Adam(...)``, ``ClippedAdam(...)``, etc.

    Raises:
        ValueError: a learning rate or factor that is not a positive number.

    Examples:
        >>> import pyro
        >>> optim_args = flow_optim_args(0.02, 0.5, betas=(0.9, 0.99))
        >>> optim_args("AutoIAF.flows.0.bias"), optim_args("AutoIAF.loc")
        ({'betas': (0.9, 0.99), 'lr': 0.01}, {'betas': (0.9, 0.99), 'lr': 0.02})
        >>> optim = pyro.optim.Adam(optim_args)

    """
    for name, value in (("lr", lr), ("flow_lr_scale", flow_lr_scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")

    def optim_args(param_name: str) -> dict[str, Any]:
        return {**other, "lr": lr * flow_lr_scale if ".flows." in param_name else lr}

    return optim_args


def _plain(value: Any) -> Any:
    """``value`` as plain data that survives ``torch.load(weights_only=True)`` and compares by value."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, Sequence):
        return tuple(_plain(item) for item in value)
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__qualname__)}"
    return f"<{type(value).__qualname__}>"


def _probe_dim(flow_kwargs: Mapping[str, Any]) -> int:
    """A small event size at which ``flow_kwargs`` can be checked: 2, or the size a dimension-sized option names."""
    mask, num_hidden = flow_kwargs.get("mask"), flow_kwargs.get("num_hidden")
    sizes = [2]
    if isinstance(mask, Sequence) and not isinstance(mask, str):
        sizes.append(len(mask))
    if isinstance(num_hidden, int):
        sizes.append(num_hidden)
    return max(sizes)


def _check_options(flow: FlowSpec, permutation: PermutationRule, flow_kwargs: Mapping[str, Any]) -> None:
    """Build one throwaway block of ``flow`` (on the CPU, leaving every random state as it was) to check the options.

    Raises:
        KeyError: an unknown family.
        TypeError: a bad spec or an option no family of the block accepts.
        ValueError: a bad option value or permutation rule.

    """
    generators = [value for value in flow_kwargs.values() if isinstance(value, torch.Generator)]
    states = [generator.get_state() for generator in generators]
    try:
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            build_flows(flow, _probe_dim(flow_kwargs), 1, permutation=permutation, **flow_kwargs)
    finally:
        for generator, state in zip(generators, states, strict=True):
            generator.set_state(state)


class AutoFlow(AutoContinuous):
    r"""Flow autoguide :math:`z = \mu + \sigma \odot f(\varepsilon)` over the packed unconstrained global latents.

    Works wherever Pyro's ``AutoContinuous`` guides work: constrained sites (through ``biject_to``), sites in
    plates (as full dimensions), ``Trace_ELBO`` with ``vectorize_particles=True``, ``Predictive``,
    :meth:`get_posterior` (``rsample`` and ``log_prob``). ``JitTrace_ELBO`` works with flows whose passes contain
    no data-dependent Python control flow (:attr:`~pyro_flows.transforms.base.Flow.traceable`): element-wise,
    linear, planar/radial, Sylvester, Householder, autoregressive and coupling flows; tracing a guide with an
    iterative flow (residual, FFJORD, orthogonal Sylvester) raises an error naming it.

    Local latent variables inside subsampled plates are rejected with a clear error: a single joint flow over a
    subsample changes dimension from batch to batch (use an amortized guide for them, e.g. in an
    ``AutoGuideList`` with this guide on the global latents through ``poutine.block``).

    Recommended workflow for hard posteriors: fit ``AutoNormal`` (cheap, robust), then warm-start a flow guide
    from it with :meth:`from_guide` (its location and per-coordinate scales become the affine base, so the flows
    start from the fitted Gaussian and only learn the non-Gaussian part). ``init_loc_fn=init_to_value(values=...)``
    from a MAP fit is the lighter alternative.

    **Learning rates.** From a cold start the affine base should do the bulk of the work early (where the
    posterior is, how wide) while the flows refine its shape without injecting gradient noise, so give the flows a
    smaller learning rate through the optimizer with :func:`flow_optim_args`:
    ``pyro.optim.Adam(flow_optim_args(0.01, flow_lr_scale=0.1))``. On the 50-d logistic regression of
    ``benchmarks/bench_guides.py`` (300 Adam steps at lr 0.01) a single learning rate leaves most presets 1–3 nats
    of ELBO *below* AutoNormal and ``flow_lr_scale=0.1`` puts them above it (``0.01`` for the wide conditioners of
    :class:`~pyro_flows.guides.AutoSplineCoupling`). After :meth:`from_guide` the base is already fitted and one
    learning rate for everything is fine.

    **Checkpoints.** ``state_dict`` stores the guide's construction settings (``flow``, ``num_flows``, the flow
    options, ``permutation``, ``init_scale``) besides the parameters, and ``load_state_dict`` into a guide built
    with other settings raises a ``ValueError`` naming the ones that differ. ``torch.save(guide)``, ``pickle`` and
    ``copy.deepcopy`` work on a trained guide (the model, and a callable ``flow``, must be picklable: module-level
    functions, not lambdas).

    Args:
        model: a Pyro model.
        flow: a name in :data:`pyro_flows.transforms.registry` (``"iaf"``, ``"planar"``, ...), a sequence of names
            forming one block (e.g. ``("lu", "leaky_relu")``), or a callable ``dim -> list of transforms`` (then
            ``num_flows``, ``permutation`` and flow options must not be given). Default: the class's :attr:`flow`.
        num_flows: number of blocks of ``flow`` (the stack of
            :func:`~pyro_flows.transforms.stack.build_flows`, the same layers as the amortized guide and the
            density estimator build from the same spec); ``0`` leaves a diagonal Gaussian (with a warning).
            Default: the class's :attr:`num_flows`.
        init_loc_fn: per-site initialization of :math:`\mu` (see Pyro's ``autoguide.initialization``). The
            default, ``init_to_feasible``, is AutoNormal's (so step 0 is exactly AutoNormal's initial
            distribution) and is deterministic; ``init_to_median`` (Pyro's ``AutoContinuous`` default) takes the
            median of 15 prior draws, whose noise cost about 3 nats of ELBO after 300 steps on the 50-d logistic
            regression of ``benchmarks/bench_guides.py``.
        init_scale: initial :math:`\sigma` (a positive float for every coordinate).
        permutation: the permutation rule between blocks: ``"auto"`` (a reversal where a family of the block
            needs one: autoregressive, coupling, triangular), ``"reverse"``, ``"random"`` or ``None`` (none).
        **flow_kwargs: options of the families of the block (e.g. ``hidden_dims``); each goes to every family
            that accepts it. They are checked here, at construction: an option no family accepts raises a
            ``TypeError`` and a bad value a ``ValueError``, both naming it (options sized by the model's dimension,
            such as a coupling ``mask`` sequence, are checked against it at the first call).

    Raises:
        KeyError: an unknown family.
        TypeError: a bad ``flow``, an unknown option, or options given with a callable ``flow``.
        ValueError: a bad ``num_flows``, ``init_scale``, ``permutation`` or option value.

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
    num_flows: ClassVar[int] = 2
    #: Number of (fixed-seed) draws used by :meth:`median` and :meth:`quantiles`.
    num_quantile_samples: int = 4096

    def __init__(
        self,
        model: Callable[..., Any],
        flow: FlowSpec | None = None,
        num_flows: int | None = None,
        init_loc_fn: Callable[[dict], Tensor] = init_to_feasible,
        init_scale: float = 0.1,
        permutation: PermutationRule = "auto",
        **flow_kwargs: Any,
    ) -> None:
        if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)) or not init_scale > 0:
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
        if flow is None:
            flow = type(self).flow
        if callable(flow):
            given = ["num_flows"] if num_flows is not None else []
            given += ["permutation"] if permutation != "auto" else []
            given += list(flow_kwargs)
            if given:
                raise TypeError(
                    f"a callable flow builds its own layers: {given} cannot apply (pass them to the callable)"
                )
        else:
            num_flows = check_size(type(self).num_flows if num_flows is None else num_flows, "num_flows", minimum=0)
            context = sorted({"context_dim", "context_hidden_dims"} & set(flow_kwargs))
            if context:
                raise TypeError(f"AutoFlow's flows are unconditional: {context} do not apply (see AmortizedFlowGuide)")
            _check_options(flow, permutation, flow_kwargs)
            if num_flows == 0:
                warnings.warn(f"{type(self).__name__} with num_flows=0 is a diagonal Gaussian guide.", stacklevel=2)
        self._flow = flow
        self._num_flows = num_flows
        self._init_scale = float(init_scale)
        self._permutation = permutation
        self._flow_kwargs = dict(flow_kwargs)
        self._warm_start: tuple[Tensor, Tensor] | None = None
        super().__init__(model, init_loc_fn=init_loc_fn)

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_guide(
        cls, guide: AutoNormal | AutoContinuous, model: Callable[..., Any] | None = None, **kwargs: Any
    ) -> AutoFlow:
        r"""A flow guide whose affine base starts at a fitted Gaussian guide's location and marginal scales.

        The returned guide's :math:`(\mu, \sigma)` are copies of the unconstrained locations and per-coordinate
        scales of ``guide`` (an :class:`~pyro.infer.autoguide.AutoNormal` or any ``AutoContinuous`` Gaussian guide,
        e.g. ``AutoDiagonalNormal``), and its flows start at the identity, so its initial ELBO is the fitted one.

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
        with torch.no_grad():
            if isinstance(guide, AutoNormal):
                locs, scales = [], []
                for name, _ in guide.prototype_trace.iter_stochastic_nodes():
                    loc, scale = guide._get_loc_and_scale(name)
                    locs.append(loc.detach().reshape(-1))
                    scales.append(scale.detach().reshape(-1))
                loc, scale = torch.cat(locs), torch.cat(scales)
            elif isinstance(guide, AutoContinuous):
                try:
                    loc, scale = guide._loc_scale()
                except NotImplementedError:
                    raise ValueError(f"{type(guide).__name__} has no location/scale to warm-start from") from None
                loc, scale = loc.detach(), scale.detach()
            else:
                raise ValueError(
                    f"from_guide supports AutoNormal and AutoContinuous guides, got {type(guide).__name__}"
                )
        new = cls(model if model is not None else guide.model, **kwargs)
        new._warm_start = (loc.clone(), scale.clone())
        return new

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            for frame in site["cond_indep_stack"]:
                if frame.full_size is not None and frame.full_size != frame.size:
                    raise NotImplementedError(
                        f"{type(self).__name__} cannot model the local latent site {name!r} inside the subsampled "
                        f"plate {frame.name!r} (subsample of {frame.size} out of {frame.full_size}): a joint flow "
                        "over the global latents cannot follow a subsample. Guide local latents with an amortized "
                        "(conditional) guide and use this guide on the global ones, e.g. AutoGuideList with "
                        "poutine.block(model, hide=[...])."
                    )
        if self._warm_start is not None:
            loc, scale = self._warm_start
            if loc.shape != (self.latent_dim,):
                raise ValueError(
                    f"the warm-start guide has {loc.numel()} unconstrained dimensions, the model has {self.latent_dim}"
                )
            reference = self._init_loc()
            loc = loc.to(reference)
            scale = scale.to(reference)
        else:
            loc = self._init_loc()
            scale = torch.full_like(loc, self._init_scale)
        self.loc = nn.Parameter(loc)
        self.scale = PyroParam(scale, constraints.softplus_positive)
        if callable(self._flow):
            layers = list(self._flow(self.latent_dim))
            bad = sorted(
                {type(f).__name__ for f in layers if not isinstance(f, Transform) or not isinstance(f, nn.Module)}
            )
            if bad:
                raise TypeError(f"the flow callable must return transform modules (Transform and nn.Module), got {bad}")
        else:
            layers = build_flows(
                self._flow, self.latent_dim, self._num_flows, permutation=self._permutation, **self._flow_kwargs
            )
        self.flows = nn.ModuleList(layers).to(device=loc.device, dtype=loc.dtype)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _settings(self) -> dict[str, Any]:
        """The construction settings as plain data (what checkpoints store and compare)."""
        return {
            "flow": _plain(self._flow),
            "num_flows": self._num_flows,
            "flow_kwargs": _plain(self._flow_kwargs),
            "permutation": self._permutation,
            "init_scale": self._init_scale,
        }

    def get_extra_state(self) -> dict[str, Any]:
        """The construction settings, saved in ``state_dict`` under ``_extra_state``."""
        return self._settings()

    def set_extra_state(self, state: Any) -> None:
        """Check that a checkpoint's settings are this guide's (called by ``load_state_dict``).

        Raises:
            ValueError: naming every setting that differs.

        """
        ours = self._settings()
        if not isinstance(state, Mapping):
            raise ValueError(f"{type(self).__name__} checkpoint settings must be a dict, got {type(state).__name__}")
        differ = [key for key in (*ours, *(key for key in state if key not in ours)) if state.get(key) != ours.get(key)]
        if differ:
            details = "; ".join(
                f"{key}: {state.get(key)!r} in the checkpoint, {ours.get(key)!r} here" for key in differ
            )
            raise ValueError(
                f"the checkpoint was saved from a guide built with other settings ({details}); "
                f"build the {type(self).__name__} with the checkpoint's settings to load it"
            )

    # ------------------------------------------------------------------------------------------------ the posterior
    def get_base_dist(self) -> dist.TorchDistribution:
        r"""The standard normal :math:`\mathcal{N}(0, I_D)` on the device and dtype of the guide's parameters."""
        return dist.Normal(torch.zeros_like(self.loc), torch.ones_like(self.loc)).to_event(1)

    def _transforms(self) -> list[Transform]:
        return [*self.flows, AffineTransform(self.loc, self.scale, event_dim=1, cache_size=1)]

    def get_transform(self, *args: Any, **kwargs: Any) -> Transform:
        r"""The map :math:`\varepsilon \mapsto \mu + \sigma \odot f(\varepsilon)` as one transform."""
        return ComposeTransform(self._transforms())

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.TransformedDistribution:
        """The guide's distribution over the packed unconstrained latents (``rsample`` and ``log_prob``)."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if torch.jit.is_tracing():
            untraceable = sorted(
                {type(layer).__name__ for layer in self.flows if not getattr(layer, "traceable", True)}
            )
            if untraceable:
                raise NotImplementedError(
                    f"{type(self).__name__} cannot be traced by torch.jit (JitTrace_ELBO): the flow(s) {untraceable} "
                    "have data-dependent control flow (iterative solvers); use Trace_ELBO"
                )
        return dist.TransformedDistribution(self.get_base_dist(), self._transforms())

    # ------------------------------------------------------------------------------------------------- summaries
    def _fixed_draws(self, num_samples: int) -> Tensor:
        """``num_samples`` unconstrained latents from a fixed-seed base draw (so summaries are reproducible)."""
        generator = torch.Generator().manual_seed(0)
        eps = torch.randn(num_samples, self.latent_dim, generator=generator, dtype=self.loc.dtype)
        eps = eps.to(self.loc.device)
        z = eps
        for transform in self._transforms():
            z = transform(z)
        return z

    def _unpack_draws(self, latent: Tensor) -> Iterator[tuple[dict, Tensor]]:
        """Split ``(..., D)`` latents into per-site unconstrained values of shape ``(...) + site shape``."""
        batch = latent.shape[:-1]
        pos = 0
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            shape = self._unconstrained_shapes[name]
            size = math.prod(shape)
            yield site, latent[..., pos : pos + size].reshape(batch + shape)
            pos += size

    def _constrain(self, latent: Tensor) -> dict[str, Tensor]:
        return {site["name"]: biject_to(site["fn"].support)(value) for site, value in self._unpack_draws(latent)}

    @torch.no_grad()
    def sample_posterior(self, num_samples: int, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Draw ``num_samples`` posterior samples of every latent site, in constrained space.

        Returns:
            a dict mapping site names to tensors of shape ``(num_samples,) + site shape``.

        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        latent = self.get_posterior(*args, **kwargs).sample((num_samples,))
        return self._constrain(latent)

    @torch.no_grad()
    def quantiles(self, quantiles: Sequence[float] | Tensor, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Per-coordinate posterior quantiles of every latent site, in constrained space.

        The quantiles are those of :attr:`num_quantile_samples` fixed-seed draws in unconstrained space, mapped
        through each site's (coordinate-wise monotone) ``biject_to``; for sites whose bijection mixes coordinates
        (simplex, correlation matrices) the result is the image of the unconstrained quantile point.

        Returns:
            a dict mapping site names to tensors of shape ``(len(quantiles),) + site shape``.

        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        qs = torch.as_tensor(quantiles, dtype=self.loc.dtype, device=self.loc.device).reshape(-1)
        if ((qs < 0) | (qs > 1)).any():
            raise ValueError(f"quantiles must lie in [0, 1], got {qs.tolist()}")
        latent = torch.quantile(self._fixed_draws(self.num_quantile_samples), qs, dim=0)
        return self._constrain(latent)

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Per-coordinate posterior medians of every latent site, in constrained space (see :meth:`quantiles`)."""
        return {name: value[0] for name, value in self.quantiles([0.5], *args, **kwargs).items()}

    def _loc_scale(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Monte-Carlo mean and standard deviation of the unconstrained latents (fixed-seed draws)."""
        with torch.no_grad():
            draws = self._fixed_draws(self.num_quantile_samples)
        return draws.mean(0), draws.std(0)
