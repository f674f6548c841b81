r"""Density estimation with a stack of registered flows: :class:`FlowDensity`.

The model is a normalizing flow from a base distribution :math:`p_u` (standard normal by default) to the data,

.. math::

    x = m + s \odot f_K \circ \dots \circ f_1(u), \qquad u \sim p_u,

where :math:`f_k` are the layers of :func:`~pyro_flows.transforms.stack.build_flows` (a registry name or a block
of names repeated ``num_flows`` times, with permutations between blocks by the builder's rule; conditional layers
for :math:`p(x \mid c)`), and :math:`(m, s)` is the standardization of the data (per-dimension mean and standard
deviation of the training set, frozen at the first :meth:`FlowDensity.fit`). The change of variables gives the
log-density *in the units of the data*:

.. math::

    \log p(x) = \log p_u(u) - \sum_k \log\left|\det \frac{\partial f_k}{\partial u_{k-1}}\right| - \sum_i \log s_i,
    \qquad u = f_1^{-1} \circ \dots \circ f_K^{-1}\left(\frac{x - m}{s}\right),

so the standardization's Jacobian :math:`-\sum_i \log s_i` is part of every reported log-density and NLL. A
context :math:`c` is standardized the same way before it reaches the conditional layers (this changes no
log-density: the context is not modelled).

One code path. :meth:`~FlowDensity.log_prob`, :meth:`~FlowDensity.sample` and :meth:`~FlowDensity.rsample` all go
through :meth:`~FlowDensity.distribution`, a ``TransformedDistribution``; each flow caches the log-det it computes
with its output, so scoring data costs one pass per layer.

Orientation. Density estimation needs :math:`f_k^{-1}` (data → base) to be cheap. A layer whose one-pass
direction is its inverse (``fast_direction == "inverse"``, e.g. MAF) is used as it is; a layer whose one-pass
direction is its forward map (IAF-style, or a layer without a closed-form inverse) is used inverted, so that its
forward map scores the data; permutations are one gather both ways and are used as they are. Sampling then needs
the other direction, which may be sequential (O(D) passes) or unavailable; :meth:`FlowDensity.sample` raises
``NotImplementedError`` in the latter case.

Training is :func:`~pyro_flows.density.fit.fit_density` (:meth:`FlowDensity.fit` delegates to it).

References: Papamakarios, Pavlakou, Murray (2017), *Masked Autoregressive Flow for Density Estimation*;
Dinh, Sohl-Dickstein, Bengio (2017), *Density estimation using Real NVP*.
"""

from __future__ import annotations

import os
from typing import Any

import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import AffineTransform, Transform

from pyro_flows.density.fit import EVAL_BATCH, FitHistory, fit_density
from pyro_flows.transforms.linear import Permutation
from pyro_flows.transforms.stack import FlowSpec, PermutationRule, build_flows, condition_flows

__all__ = ["FitHistory", "FlowDensity"]

ArrayLike = Any

_BASES = ("normal", "laplace")
_MAX_LISTED_ROWS = 10
#: FlowDensity's own default for the families that take ``hidden_dims`` (wider than the families' defaults).
_DEFAULTS = {"hidden_dims": (128, 128)}


def _check_serializable(value: Any, where: str) -> None:
    """Raise unless ``value`` is made of types that ``torch.load(weights_only=True)`` accepts."""
    if value is None or isinstance(value, bool | int | float | str):
        return
    if isinstance(value, list | tuple):
        for item in value:
            _check_serializable(item, where)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _check_serializable(key, where)
            _check_serializable(item, where)
        return
    raise TypeError(
        f"cannot save {where}: {type(value).__name__} values are not loadable with torch.load(weights_only=True); "
        "use numbers, strings, lists and dicts as flow keyword arguments"
    )


def _positive(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive" if minimum == 1 else "a non-negative"
        raise ValueError(f"{name} must be {kind} integer, got {value!r}")
    return value


class FlowDensity(nn.Module):
    r"""A normalizing-flow density :math:`p(x)` or :math:`p(x \mid c)` on :math:`\mathbb{R}^D`, usable in Pyro.

    See the module documentation for the model, the standardization and the orientation of the layers.
    :meth:`distribution` gives a Pyro distribution (``pyro.sample("x", d, obs=x)``, or a learned prior: register
    the module with ``pyro.module``); :meth:`fit` trains it by maximum likelihood
    (:func:`~pyro_flows.density.fit.fit_density`).

    Args:
        dim: event size :math:`D`.
        flow: a registry name (``"maf"`` by default), or a block of names repeated ``num_flows`` times (e.g.
            ``("lu", "leaky_relu")``), as in :func:`~pyro_flows.transforms.stack.build_flows`.
        num_flows: number of blocks :math:`K`.
        context_dim: size of the context :math:`c` (0: unconditional; > 0 builds the families' conditional
            variants).
        base: ``"normal"`` (standard normal), ``"laplace"`` (standard Laplace), or a distribution with
            ``event_shape == (dim,)`` (a custom base is neither moved by ``.to()`` nor saved by :meth:`save`: pass
            it again to :meth:`load`).
        permutation: the builder's permutation rule between blocks: ``"auto"`` (a reversal where a family of the
            block needs one), ``"reverse"``, ``"random"`` (drawn once, saved with the weights) or ``None``.
        standardize: standardize data (and context) with training-set statistics at the first :meth:`fit`.
        **flow_kwargs: keyword arguments of the families (each goes to every family of the block that takes it;
            one that none takes raises ``TypeError``), e.g. ``hidden_dims`` (default ``(128, 128)`` for the
            families that take it). Numbers, strings, lists and dicts, so that :meth:`save` can store them.

    Raises:
        KeyError: an unknown flow name (the message lists the registered ones).
        TypeError: a flow keyword argument that no family of the block accepts.
        ValueError: a non-positive size, a bad permutation rule, or a base of the wrong event shape.

    Examples:
        >>> import pyro, torch
        >>> density = FlowDensity(2, flow="maf", num_flows=3, hidden_dims=(32, 32))
        >>> x = torch.randn(256, 2) @ torch.tensor([[1.0, 0.9], [0.0, 0.4]])
        >>> history = density.fit(x, epochs=3, progress=False, seed=0)
        >>> density.log_prob(x[:5]).shape
        torch.Size([5])
        >>> density.sample(7).shape
        torch.Size([7, 2])
        >>> def model(data):
        ...     with pyro.plate("data", len(data)):
        ...         pyro.sample("x", density.distribution(), obs=data)
        >>> trace = pyro.poutine.trace(model).get_trace(x)
        >>> torch.allclose(trace.log_prob_sum(), density.log_prob(x).sum())
        True
        >>> FlowDensity(2, flow="planar", hidden_dims=(7,))
        Traceback (most recent call last):
        ...
        TypeError: unknown keyword argument(s) ['hidden_dims'] for flow 'planar' ...

    """

    def __init__(
        self,
        dim: int,
        flow: FlowSpec = "maf",
        num_flows: int = 5,
        *,
        context_dim: int = 0,
        base: str | torch.distributions.Distribution = "normal",
        permutation: PermutationRule = "auto",
        standardize: bool = True,
        **flow_kwargs: Any,
    ) -> None:
        super().__init__()
        self.dim = _positive(dim, "dim")
        self.context_dim = _positive(context_dim, "context_dim", minimum=0)
        _positive(num_flows, "num_flows")
        self.standardize = bool(standardize)
        layers = build_flows(
            flow,
            dim,
            num_flows,
            context_dim=context_dim,
            permutation=permutation,
            defaults=_DEFAULTS,
            **flow_kwargs,
        )
        self.config: dict[str, Any] = {
            "dim": dim,
            "flow": flow if isinstance(flow, str) else list(flow),
            "num_flows": num_flows,
            "context_dim": context_dim,
            "base": base if isinstance(base, str) else None,
            "permutation": permutation,
            "standardize": self.standardize,
            "flow_kwargs": dict(flow_kwargs),
        }
        self.layers = nn.ModuleList(layers)
        # a permutation is one gather both ways; any other layer is used inverted when its forward is the fast side
        self._inverted = [not isinstance(layer, Permutation) and layer.fast_direction == "forward" for layer in layers]
        self._init_base(base)
        self.register_buffer("data_shift", torch.zeros(dim))
        self.register_buffer("data_scale", torch.ones(dim))
        self.register_buffer("context_shift", torch.zeros(context_dim))
        self.register_buffer("context_scale", torch.ones(context_dim))
        self.register_buffer("standardized", torch.tensor(False))

    def _init_base(self, base: str | torch.distributions.Distribution) -> None:
        self._custom_base: torch.distributions.Distribution | None = None
        if isinstance(base, str):
            if base not in _BASES:
                raise ValueError(f"base must be one of {_BASES} or a distribution, got {base!r}")
            self._base_name = base
        else:
            if tuple(base.event_shape) != (self.dim,) or tuple(base.batch_shape) != ():
                raise ValueError(
                    f"a custom base must have event_shape ({self.dim},) and no batch shape, got "
                    f"event_shape {tuple(base.event_shape)} and batch_shape {tuple(base.batch_shape)}"
                )
            self._base_name = "custom"
            self._custom_base = base
        self.register_buffer("base_loc", torch.zeros(self.dim))
        self.register_buffer("base_scale", torch.ones(self.dim))

    # ------------------------------------------------------------------ distribution
    @property
    def is_conditional(self) -> bool:
        r"""Whether the density is conditional, :math:`p(x \mid c)`."""
        return self.context_dim > 0

    def _base(self, batch_shape: torch.Size, validate_args: bool | None) -> torch.distributions.Distribution:
        if self._custom_base is not None:
            return self._custom_base.expand(batch_shape) if batch_shape else self._custom_base
        shape = (*batch_shape, self.dim)
        loc, scale = self.base_loc.expand(shape), self.base_scale.expand(shape)
        family = dist.Normal if self._base_name == "normal" else dist.Laplace
        return family(loc, scale, validate_args=validate_args).to_event(1)

    def _check_context(self, context: Tensor | None) -> Tensor | None:
        if self.is_conditional:
            if context is None:
                raise ValueError(f"this density is conditional (context_dim={self.context_dim}); pass a context")
            if not isinstance(context, Tensor):
                raise TypeError(f"context must be a torch.Tensor, got {type(context).__name__}")
            if context.dim() < 1 or context.shape[-1] != self.context_dim:
                raise ValueError(
                    f"context must have shape (..., {self.context_dim}), got a tensor of shape {tuple(context.shape)}"
                )
            return (context - self.context_shift) / self.context_scale
        if context is not None:
            raise ValueError("this density is unconditional (context_dim=0) but a context was given")
        return None

    def clear_cache(self) -> None:
        """Drop the layers' cached ``(x, y, log-det)`` values (and with them any autograd graph they hold)."""
        for layer in self.layers:
            layer.clear_cache()

    def transforms(self, context: Tensor | None = None) -> list[Transform]:
        """The transforms from the base to the data (standardization last), conditioned on ``context`` if needed."""
        layers = condition_flows(self.layers, self._check_context(context))
        transforms = [layer.inv if inverted else layer for layer, inverted in zip(layers, self._inverted, strict=True)]
        transforms.append(AffineTransform(self.data_shift, self.data_scale, event_dim=1))
        return transforms

    def distribution(self, context: Tensor | None = None, validate_args: bool | None = None) -> dist.Distribution:
        r"""The density as a Pyro distribution, :math:`p(x)` or :math:`p(x \mid c)`.

        Args:
            context: ``(..., context_dim)`` context of a conditional density (its batch shape becomes the
                distribution's batch shape); ``None`` for an unconditional one.
            validate_args: passed to the distribution and its base (``None``: torch's default).

        Returns:
            A ``pyro.distributions.TransformedDistribution`` with ``event_shape == (dim,)``; ``log_prob`` is in the
            units of the data, ``rsample`` is reparameterized through every layer.

        Raises:
            ValueError: a missing, unexpected or malformed context.

        Examples:
            >>> density = FlowDensity(3, flow="lu", num_flows=2)
            >>> d = density.distribution()
            >>> d.event_shape, d.rsample(torch.Size([4])).shape
            (torch.Size([3]), torch.Size([4, 3]))

        """
        self.clear_cache()
        transforms = self.transforms(context)
        batch_shape = context.shape[:-1] if context is not None else torch.Size()
        base = self._base(batch_shape, validate_args)
        return dist.TransformedDistribution(base, transforms, validate_args=validate_args)

    def _check_points(self, x: Tensor, who: str) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{who} expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"{who} expects points of shape (..., {self.dim}), got a tensor of shape {tuple(x.shape)}")

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Log-density of ``x`` (``(..., dim)``, data units) given ``context``; shape ``x.shape[:-1]``.

        This is ``distribution(context).log_prob(x)`` without torch's argument validation (the support is all of
        R^D and the shapes are checked here), so a diverging fit gives a non-finite value, not a
        support error, in both of torch's validation modes. The layers' caches are dropped afterwards: the module
        keeps no autograd graph.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` does not end in ``dim``, or a missing, unexpected or malformed context.

        Examples:
            >>> density = FlowDensity(2, flow="lu", num_flows=1)
            >>> density.log_prob(torch.zeros(3, 2)).shape
            torch.Size([3])

        """
        self._check_points(x, "log_prob")
        try:
            return self.distribution(context, validate_args=False).log_prob(x)
        finally:
            self.clear_cache()

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Same as :meth:`log_prob`."""
        return self.log_prob(x, context)

    def rsample(self, num_samples: int, context: Tensor | None = None) -> Tensor:
        """Draw ``num_samples`` reparameterized points (per context): ``(num_samples, *context.shape[:-1], dim)``.

        Examples:
            >>> density = FlowDensity(2, flow="lu", num_flows=1)
            >>> density.rsample(5).requires_grad
            True

        """
        try:
            return self.distribution(context).rsample(torch.Size([num_samples]))
        finally:
            self.clear_cache()

    @torch.no_grad()
    def sample(self, num_samples: int, context: Tensor | None = None) -> Tensor:
        """Draw ``num_samples`` points (per context) without gradients: shape as :meth:`rsample`."""
        return self.rsample(num_samples, context)

    # ------------------------------------------------------------------ data checks
    def _as_points(self, x: ArrayLike, name: str, width: int) -> Tensor:
        reference = next(iter(self.parameters()), self.data_shift)
        dtype, device = reference.dtype, reference.device
        if not isinstance(x, Tensor):
            x = torch.as_tensor(x)
        if x.dim() != 2 or x.shape[1] != width:
            raise ValueError(f"{name} must be a 2-d array of shape (n, {width}), got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is empty (0 rows); fit needs data")
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must be real-valued, got dtype {x.dtype}")
        x = x.to(device=device, dtype=dtype)
        bad = (~torch.isfinite(x)).any(dim=1).nonzero().flatten().tolist()
        if bad:
            listed = ", ".join(str(i) for i in bad[:_MAX_LISTED_ROWS]) + (", …" if len(bad) > _MAX_LISTED_ROWS else "")
            raise ValueError(f"{name} has non-finite values (NaN or ±inf) in {len(bad)} row(s): [{listed}]")
        return x

    def _prepare(self, x: ArrayLike, context: ArrayLike | None, name: str) -> tuple[Tensor, Tensor | None]:
        points = self._as_points(x, name, self.dim)
        if self.is_conditional:
            if context is None:
                raise ValueError(f"this density is conditional (context_dim={self.context_dim}); pass a context")
            ctx = self._as_points(context, f"context of {name}", self.context_dim)
            if ctx.shape[0] != points.shape[0]:
                raise ValueError(f"{name} has {points.shape[0]} rows but its context has {ctx.shape[0]}")
            return points, ctx
        if context is not None:
            raise ValueError("this density is unconditional (context_dim=0) but a context was given")
        return points, None

    def _set_standardization(self, x: Tensor, context: Tensor | None) -> None:
        def stats(values: Tensor) -> tuple[Tensor, Tensor]:
            shift = values.mean(0)
            scale = values.std(0, correction=0) if len(values) > 1 else torch.ones_like(shift)
            return shift, torch.where(scale > 1e-12, scale, torch.ones_like(scale))

        self.data_shift, self.data_scale = stats(x)
        if context is not None:
            self.context_shift, self.context_scale = stats(context)
        self.standardized.fill_(True)

    @torch.no_grad()
    def evaluate(self, x: ArrayLike, context: ArrayLike | None = None, batch_size: int = EVAL_BATCH) -> float:
        """Mean NLL (nats per point, data units) of a data set, evaluated in batches without gradients.

        Raises:
            ValueError: non-finite values (naming the rows), a wrong width, empty data or a context mismatch.

        """
        points, ctx = self._prepare(x, context, "x")
        return self._mean_nll(points, ctx, batch_size)

    def _mean_nll(self, x: Tensor, context: Tensor | None, batch_size: int) -> float:
        was_training = self.training
        self.eval()
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                cb = None if context is None else context[start : start + batch_size]
                total -= self.log_prob(x[start : start + batch_size], cb).sum().item()
        self.train(was_training)
        return total / len(x)

    def fit(self, x: ArrayLike, context: ArrayLike | None = None, **options: Any) -> FitHistory:
        """Fit by maximum likelihood: ``fit_density(self, x, context, **options)``.

        See :func:`~pyro_flows.density.fit.fit_density` for the options (``epochs``, ``batch_size``, ``lr``,
        ``validation_fraction``, ``patience``, ``lr_schedule``, ``grad_clip``, ``progress``, ``seed``, ...).
        """
        return fit_density(self, x, context, **options)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | os.PathLike[str] | Any) -> None:
        """Save the configuration and weights (standardization included) with ``torch.save``.

        The file loads with ``torch.load(path, weights_only=True)``; use :meth:`load` to rebuild the module.

        Raises:
            TypeError: flow keyword arguments that ``weights_only`` loading cannot read.

        """
        _check_serializable(self.config, "the density's configuration")
        torch.save({"config": self.config, "state_dict": self.state_dict()}, path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | Any,
        map_location: Any = "cpu",
        base: torch.distributions.Distribution | None = None,
    ) -> FlowDensity:
        """Rebuild a density saved by :meth:`save` (``torch.load(weights_only=True)``), in eval mode.

        The module takes the dtype of the saved weights and the device they are loaded to, so a float64 density
        reloads as float64 with identical log-densities.

        Args:
            path: file path or file-like object.
            map_location: where to load the tensors, as for ``torch.load`` (a device, a string, a dict or a
                function; ``None``: where they were saved).
            base: the custom base distribution, if the saved density had one.

        Raises:
            ValueError: the file is not a saved :class:`FlowDensity`, or a custom base is missing.

        Examples:
            >>> import io
            >>> density = FlowDensity(2, flow="lu", num_flows=1).double()
            >>> buffer = io.BytesIO()
            >>> density.save(buffer)
            >>> _ = buffer.seek(0)
            >>> FlowDensity.load(buffer).data_shift.dtype
            torch.float64

        """
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(checkpoint, dict) or set(checkpoint) != {"config", "state_dict"}:
            raise ValueError("not a FlowDensity checkpoint (expected a dict with 'config' and 'state_dict')")
        config = dict(checkpoint["config"])
        if config["base"] is None:
            if base is None:
                raise ValueError("this density was saved with a custom base distribution; pass it as base=")
            config["base"] = base
        state = checkpoint["state_dict"]
        density = cls(**{key: value for key, value in config.items() if key != "flow_kwargs"}, **config["flow_kwargs"])
        reference = next(tensor for tensor in state.values() if tensor.is_floating_point())
        density.to(device=reference.device, dtype=reference.dtype)
        density.load_state_dict(state)
        return density.eval()
