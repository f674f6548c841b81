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
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import AffineTransform, ComposeTransform
from pyro.infer.autoguide import AutoContinuous, AutoNormal
from pyro.infer.autoguide.initialization import init_to_feasible
from pyro.nn import PyroParam
from torch import Tensor, nn
from torch.distributions import Transform, biject_to
from torch.nn.utils import parametrize

from pyro_flows.transforms.linear import Permutation
from pyro_flows.transforms.registry import registry

__all__ = ["AutoFlow", "FlowSpec"]

#: What ``flow`` may be: a registry name, a block of registry names repeated ``num_flows`` times, or a callable
#: ``dim -> list of transforms``.
FlowSpec = str | Sequence[str] | Callable[[int], Sequence[Transform]]


class _Scaled(nn.Module):
    r"""Parametrization :math:`\theta = c\,\phi` (stores :math:`\phi = \theta / c`)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, stored: Tensor) -> Tensor:
        return stored * self.factor

    def right_inverse(self, value: Tensor) -> Tensor:
        return value / self.factor


class AutoFlow(AutoContinuous):
    r"""Flow autoguide :math:`z = \mu + \sigma \odot f(\varepsilon)` over the packed unconstrained global latents.

    Works wherever Pyro's ``AutoContinuous`` guides work: constrained sites (through ``biject_to``), sites in
    plates (as full dimensions), ``Trace_ELBO`` with ``vectorize_particles=True``, ``Predictive``,
    :meth:`get_posterior` (``rsample`` and ``log_prob``). ``JitTrace_ELBO`` works with flows whose passes contain
    no data-dependent Python control flow: element-wise, linear, planar/radial, Sylvester, Householder,
    autoregressive and coupling flows; flows with iterative solvers (residual, FFJORD) are not traceable.

    Local latent variables inside subsampled plates are rejected with a clear error: a single joint flow over a
    subsample changes dimension from batch to batch (use an amortized guide for them, e.g. in an
    ``AutoGuideList`` with this guide on the global latents through ``poutine.block``).

    Recommended workflow for hard posteriors: fit ``AutoNormal`` (cheap, robust), then warm-start a flow guide
    from it with :meth:`from_guide` (its location and per-coordinate scales become the affine base, so the flows
    start from the fitted Gaussian and only learn the non-Gaussian part). ``init_loc_fn=init_to_value(values=...)``
    from a MAP fit is the lighter alternative.

    Args:
        model: a Pyro model.
        flow: a name in :data:`pyro_flows.transforms.registry` (``"iaf"``, ``"planar"``, ...), a sequence of names
            forming one block (e.g. ``("lu", "leaky_relu")``), or a callable ``dim -> list of transforms``
            (then ``num_flows``, ``permute`` and ``flow_kwargs`` are not used).
        num_flows: number of layers (or blocks) of ``flow``.
        init_loc_fn: per-site initialization of :math:`\mu` (see Pyro's ``autoguide.initialization``). The
            default, ``init_to_feasible``, is AutoNormal's (so step 0 is exactly AutoNormal's initial
            distribution) and is deterministic; ``init_to_median`` (Pyro's ``AutoContinuous`` default) takes the
            median of 15 prior draws, whose noise cost about 3 nats of ELBO after 300 steps on the 50-d logistic
            regression of ``benchmarks/bench_guides.py``.
        init_scale: initial :math:`\sigma` (a positive float for every coordinate).
        flow_lr_scale: the flows' parameters are stored divided by this factor (:math:`\theta = c\,\phi`, the
            optimizer sees :math:`\phi`), so with Adam-type optimizers they move ``flow_lr_scale`` times slower
            than the affine base. The base does the bulk of the work early (where the posterior is, how wide) and
            the flows refine its shape without injecting gradient noise: on the 50-d logistic regression after
            300 Adam steps at lr 0.01, ``1.0`` leaves most presets 1–3 nats *below* AutoNormal and ``0.1`` puts
            them above it. ``1.0`` disables the reparameterization.
        permute: insert a reversing permutation between consecutive layers (what autoregressive and coupling
            flows need so every coordinate gets to depend on every other one); ``None`` chooses it from ``flow``
            (on for the autoregressive and coupling families).
        **flow_kwargs: keyword arguments of the flow factory (e.g. ``hidden_dims``).

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro_flows.guides import AutoFlow
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> guide = AutoFlow(model, flow="triangular", num_flows=1)
        >>> guide()["x"].shape
        torch.Size([2])

    """

    #: Number of (fixed-seed) draws used by :meth:`median` and :meth:`quantiles`.
    num_quantile_samples: int = 4096
    #: Families whose layers only depend on a prefix of the coordinates, so reversing them between layers helps.
    ORDERED_FAMILIES: frozenset[str] = frozenset(
        {"iaf", "maf", "affine_coupling", "spline_coupling", "spline_autoregressive", "triangular", "convex_triangular"}
    )

    def __init__(
        self,
        model: Callable[..., Any],
        flow: FlowSpec = "iaf",
        num_flows: int = 2,
        init_loc_fn: Callable[[dict], Tensor] = init_to_feasible,
        init_scale: float = 0.1,
        permute: bool | None = None,
        flow_lr_scale: float = 0.1,
        **flow_kwargs: Any,
    ) -> None:
        if not isinstance(init_scale, (int, float)) or not init_scale > 0:
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
        if not isinstance(flow_lr_scale, (int, float)) or not flow_lr_scale > 0:
            raise ValueError(f"flow_lr_scale must be a positive number, got {flow_lr_scale!r}")
        if not isinstance(num_flows, int) or num_flows < 0:
            raise ValueError(f"num_flows must be a non-negative integer, got {num_flows!r}")
        if isinstance(flow, str):
            registry[flow]  # unknown names fail here, listing the registered ones
        elif isinstance(flow, Sequence):
            if not flow or not all(isinstance(name, str) for name in flow):
                raise ValueError("a flow block must be a non-empty sequence of registry names")
            for name in flow:
                registry[name]
        elif not callable(flow):
            raise TypeError(f"flow must be a registry name, a sequence of names or a callable, got {flow!r}")
        self._flow = flow
        self._num_flows = num_flows
        self._init_scale = float(init_scale)
        self._permute = permute
        self._flow_lr_scale = float(flow_lr_scale)
        self._flow_kwargs = flow_kwargs
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
        flows = nn.ModuleList(self._build_flows(self.latent_dim)).to(device=loc.device, dtype=loc.dtype)
        if self._flow_lr_scale != 1.0:
            for module in list(flows.modules()):
                for name in [name for name, _ in module.named_parameters(recurse=False)]:
                    parametrize.register_parametrization(module, name, _Scaled(self._flow_lr_scale), unsafe=True)
        self.flows = flows

    def _build_flows(self, dim: int) -> list[nn.Module]:
        flow = self._flow
        if callable(flow) and not isinstance(flow, str):
            layers = list(flow(dim))
            for layer in layers:
                if not isinstance(layer, Transform):
                    raise TypeError(f"the flow callable must return Transforms, got {type(layer).__name__}")
            return layers
        block = [flow] if isinstance(flow, str) else list(flow)
        permute = self._permute
        if permute is None:
            permute = any(name in self.ORDERED_FAMILIES for name in block)
        layers: list[nn.Module] = []
        for k in range(self._num_flows):
            if k > 0 and permute and dim > 1:
                layers.append(Permutation(dim, "reverse"))
            layers.extend(registry[name](dim, **self._flow_kwargs) for name in block)
        for layer in layers:
            if not isinstance(layer, nn.Module):
                raise TypeError(f"registry factories must return modules, got {type(layer).__name__}")
        return layers

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
