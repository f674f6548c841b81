r"""Density estimation with a stack of registered flows: [`FlowDensity`][pyro_flows.density.flow_density.FlowDensity].

The model is a normalizing flow from a base distribution $p_u$ (standard normal by default) to the data,

$$
x = m + s \odot f_K \circ \dots \circ f_1(u), \qquad u \sim p_u,
$$

where $f_k$ are the layers of [`build_flows`][pyro_flows.transforms.stack.build_flows] (a registry name or a block
of names repeated ``num_flows`` times, with permutations between blocks by the builder's rule; conditional layers
for $p(x \mid c)$), and $(m, s)$ is the standardization of the data (per-dimension mean and standard
deviation of the training set, frozen at the first
[`FlowDensity.fit`][pyro_flows.density.flow_density.FlowDensity.fit]). The change of variables gives the log-density *in
the units of the data*:

$$
\log p(x) = \log p_u(u) - \sum_k \log\left|\det \frac{\partial f_k}{\partial u_{k-1}}\right| - \sum_i \log s_i,
\qquad u = f_1^{-1} \circ \dots \circ f_K^{-1}\left(\frac{x - m}{s}\right),
$$

so the standardization's Jacobian $-\sum_i \log s_i$ is part of every reported log-density and NLL. A
context $c$ is standardized the same way before it reaches the conditional layers (this changes no
log-density: the context is not modelled).

One code path. [`log_prob`][pyro_flows.density.flow_density.FlowDensity.log_prob],
[`sample`][pyro_flows.density.flow_density.FlowDensity.sample] and
[`rsample`][pyro_flows.density.flow_density.FlowDensity.rsample] all go through
[`distribution`][pyro_flows.density.flow_density.FlowDensity.distribution], a ``TransformedDistribution``; each flow
caches the log-det it computes with its output, so scoring data costs one pass per layer.

Orientation. Density estimation needs $f_k^{-1}$ (data → base) to be cheap. A layer whose one-pass
direction is its inverse (``fast_direction == "inverse"``, e.g. MAF) is used as it is; a layer whose one-pass
direction is its forward map (IAF-style, or a layer without a closed-form inverse) is used inverted, so that its
forward map scores the data; permutations are one gather both ways and are used as they are. Sampling then needs
the other direction, which may be sequential (O(D) passes) or unavailable;
[`FlowDensity.sample`][pyro_flows.density.flow_density.FlowDensity.sample] raises ``NotImplementedError`` in the latter
case.

Training is [`fit_density`][pyro_flows.density.fit.fit_density]
([`FlowDensity.fit`][pyro_flows.density.flow_density.FlowDensity.fit] delegates to it): from arrays or from a
``DataLoader``, in one process or data-parallel under ``torchrun``, resumable from a checkpoint.

References: Papamakarios, Pavlakou, Murray (2017), *Masked Autoregressive Flow for Density Estimation*;
Dinh, Sohl-Dickstein, Bengio (2017), *Density estimation using Real NVP*.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import AffineTransform, Transform

from pyro_flows._validation import check_size
from pyro_flows.density.fit import EVAL_BATCH, FitHistory, fit_density
from pyro_flows.transforms.linear import Permutation
from pyro_flows.transforms.stack import FlowSpec, PermutationRule, build_flows, condition_flows

__all__ = ["FitHistory", "FlowDensity"]

ArrayLike = Any

#: FlowDensity's own default for the families that take ``hidden_dims`` (wider than the families' defaults).
_DEFAULTS = {"hidden_dims": (128, 128)}


def _check_shape(value: Any, width: int, what: str) -> None:
    """Raise unless ``value`` is a tensor of shape ``(..., width)``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() < 1 or value.shape[-1] != width:
        raise ValueError(f"{what} of shape (..., {width}) expected, got a tensor of shape {tuple(value.shape)}")


class FlowDensity(nn.Module):
    r"""A normalizing-flow density $p(x)$ or $p(x \mid c)$ on $\mathbb{R}^D$, usable in Pyro.

    See the module documentation for the model, the standardization and the orientation of the layers.
    [`distribution`][pyro_flows.density.flow_density.FlowDensity.distribution] gives a Pyro distribution
    (``pyro.sample("x", d, obs=x)``, or a learned prior: register the module with ``pyro.module``);
    [`fit`][pyro_flows.density.flow_density.FlowDensity.fit] trains it by maximum likelihood
    ([`fit_density`][pyro_flows.density.fit.fit_density]).

    Args:
        dim: event size $D$.
        flow: a registry name (``"maf"`` by default), or a block of names repeated ``num_flows`` times (e.g.
            ``("lu", "leaky_relu")``), as in [`build_flows`][pyro_flows.transforms.stack.build_flows].
        num_flows: number of blocks $K$.
        context_dim: size of the context $c$ (0: unconditional; > 0 builds the families' conditional
            variants).
        base: ``"normal"`` (standard normal), ``"laplace"`` (standard Laplace), or a distribution with
            ``event_shape == (dim,)`` (a custom base is neither moved by ``.to()`` nor saved by
            [`save`][pyro_flows.density.flow_density.FlowDensity.save]: pass it again to
            [`load`][pyro_flows.density.flow_density.FlowDensity.load]).
        permutation: the builder's permutation rule between blocks: ``"auto"`` (a reversal where a family of the
            block needs one), ``"reverse"``, ``"random"`` (drawn once, saved with the weights) or ``None``.
        standardize: standardize data (and context) with training-set statistics at the first
            [`fit`][pyro_flows.density.flow_density.FlowDensity.fit].
        **flow_kwargs: keyword arguments of the families (each goes to every family of the block that takes it;
            one that none takes raises ``TypeError``), e.g. ``hidden_dims`` (default ``(128, 128)`` for the
            families that take it). Numbers, strings, lists and dicts, so that
            [`save`][pyro_flows.density.flow_density.FlowDensity.save] can store them.

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
        self.context_dim = check_size(context_dim, "context_dim", minimum=0)
        num_flows = check_size(num_flows, "num_flows")
        layers = build_flows(
            flow, dim, num_flows, context_dim=context_dim, permutation=permutation, defaults=_DEFAULTS, **flow_kwargs
        )
        if base not in ("normal", "laplace") and (getattr(base, "event_shape", None) != (dim,) or base.batch_shape):
            raise ValueError(
                f"base must be 'normal', 'laplace' or a distribution of event shape ({dim},), got {base!r}"
            )
        self.dim, self.base, self.standardize = dim, base, bool(standardize)  # base: a name or the distribution
        self.config = {"dim": dim, "flow": flow if isinstance(flow, str) else list(flow), "num_flows": num_flows}
        self.config |= {"context_dim": context_dim, "base": base if isinstance(base, str) else None}
        self.config |= {"permutation": permutation, "standardize": self.standardize, "flow_kwargs": dict(flow_kwargs)}
        self.layers = nn.ModuleList(layers)
        # a permutation is one gather both ways; any other layer is used inverted when its forward is the fast side
        self._inverted = [not isinstance(layer, Permutation) and layer.fast_direction == "forward" for layer in layers]
        for name, size in (("data", dim), ("context", context_dim)):
            self.register_buffer(f"{name}_shift", torch.zeros(size))
            self.register_buffer(f"{name}_scale", torch.ones(size))
        self.register_buffer("standardized", torch.tensor(False))

    # ------------------------------------------------------------------ distribution
    def _base(self, batch_shape: torch.Size, validate_args: bool | None) -> torch.distributions.Distribution:
        if not isinstance(self.base, str):
            return self.base.expand(batch_shape)
        zeros = self.data_shift.new_zeros((*batch_shape, self.dim))
        family = dist.Normal if self.base == "normal" else dist.Laplace
        return family(zeros, torch.ones_like(zeros), validate_args=validate_args).to_event(1)

    def _check_context(self, context: Any) -> None:
        """Raise unless a context is given exactly when the density is conditional."""
        if self.context_dim and context is None:
            raise ValueError(f"this density is conditional (context_dim={self.context_dim}); pass a context")
        if not self.context_dim and context is not None:
            raise ValueError("this density is unconditional (context_dim=0) but a context was given")

    def clear_cache(self) -> None:
        """Drop the layers' cached ``(x, y, log-det)`` values (and with them any autograd graph they hold)."""
        for layer in self.layers:
            layer.clear_cache()

    def transforms(self, context: Tensor | None = None) -> list[Transform]:
        """The transforms from the base to the data (standardization last), conditioned on ``context`` if needed."""
        self._check_context(context)
        if context is not None:
            _check_shape(context, self.context_dim, "the context")
            context = (context - self.context_shift) / self.context_scale
        layers = condition_flows(self.layers, context)
        transforms = [layer.inv if inverted else layer for layer, inverted in zip(layers, self._inverted, strict=True)]
        return [*transforms, AffineTransform(self.data_shift, self.data_scale, event_dim=1)]

    def distribution(self, context: Tensor | None = None, validate_args: bool | None = None) -> dist.Distribution:
        r"""The density as a Pyro distribution, $p(x)$ or $p(x \mid c)$.

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
        base = self._base(context.shape[:-1] if context is not None else torch.Size(), validate_args)
        return dist.TransformedDistribution(base, transforms, validate_args=validate_args)

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
        _check_shape(x, self.dim, "log_prob: points")
        try:
            return self.distribution(context, validate_args=False).log_prob(x)
        finally:
            self.clear_cache()

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Same as [`log_prob`][pyro_flows.density.flow_density.FlowDensity.log_prob]."""
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
        """Draw ``num_samples`` points (per context) without gradients: shape as `rsample`."""
        return self.rsample(num_samples, context)

    # ------------------------------------------------------------------ data checks
    def _as_points(self, x: ArrayLike, name: str, width: int) -> Tensor:
        """``x`` as a finite ``(n, width)`` tensor (n > 0) of the module's dtype and device, or a clear error."""
        x = torch.as_tensor(x)
        if x.dim() != 2 or x.shape[1] != width:
            raise ValueError(f"{name} must be a 2-d array of shape (n, {width}), got shape {tuple(x.shape)}")
        if not len(x):
            raise ValueError(f"{name} is empty (0 rows); fit needs data")
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must be real-valued, got dtype {x.dtype}")
        x = x.to(self.data_shift)
        if bad := (~torch.isfinite(x)).any(dim=1).nonzero().flatten().tolist():
            raise ValueError(f"{name} has non-finite values (NaN or ±inf) in {len(bad)} row(s): {bad[:10]}")
        return x

    def _prepare(self, x: ArrayLike, context: ArrayLike | None, name: str) -> tuple[Tensor, Tensor | None]:
        """The data and context of a fit or evaluation as checked tensors (see `_as_points`)."""
        self._check_context(context)
        points = self._as_points(x, name, self.dim)
        if context is None:
            return points, None
        context = self._as_points(context, f"context of {name}", self.context_dim)
        if len(context) != len(points):
            raise ValueError(f"{name} has {len(points)} rows but its context has {len(context)}")
        return points, context

    def _set_standardization(self, x: Tensor, context: Tensor | None) -> None:
        """Standardize with the mean and standard deviation (divisor $n$) of the rows of ``x`` (and ``context``)."""

        def moments(values: Tensor) -> tuple[Tensor, Tensor]:
            return values.mean(0), values.std(0, correction=0)

        self._use_moments(moments(x), None if context is None else moments(context))

    def _use_moments(self, data: tuple[Tensor, Tensor], context: tuple[Tensor, Tensor] | None) -> None:
        """Store ``(mean, sd)`` of the data (and context) as the standardization, in the module's dtype."""

        def shift_scale(mean: Tensor, sd: Tensor) -> tuple[Tensor, Tensor]:
            # sd is 0 for a single row: then 1, as for every constant coordinate
            return mean.to(self.data_shift), torch.where(sd > 1e-12, sd, torch.ones_like(sd)).to(self.data_shift)

        self.data_shift, self.data_scale = shift_scale(*data)
        if context is not None:
            self.context_shift, self.context_scale = shift_scale(*context)
        self.standardized.fill_(True)

    def evaluate(self, x: ArrayLike, context: ArrayLike | None = None, batch_size: int = EVAL_BATCH) -> float:
        """Mean NLL (nats per point, data units) of a data set, evaluated in batches without gradients.

        Raises:
            ValueError: non-finite values (naming the rows), a wrong width, empty data or a context mismatch.

        """
        return self._mean_nll(*self._prepare(x, context, "x"), batch_size)

    def _mean_nll(self, x: Tensor, context: Tensor | None, batch_size: int) -> float:
        was_training = self.training
        self.eval()
        chunks = x.split(batch_size)
        contexts = context.split(batch_size) if context is not None else [None] * len(chunks)
        with torch.no_grad():
            total = sum(self.log_prob(xb, cb).sum().item() for xb, cb in zip(chunks, contexts, strict=True))
        self.train(was_training)
        return -total / len(x)

    def fit(self, x: ArrayLike, context: ArrayLike | None = None, **options: Any) -> FitHistory:
        """Fit by maximum likelihood: ``fit_density(self, x, context, **options)``.

        ``x`` is an array or a ``DataLoader`` of batches (one pass per epoch); under ``torchrun`` the fit is
        data-parallel across the processes, and ``checkpoint=path`` makes it resumable. See
        [`fit_density`][pyro_flows.density.fit.fit_density] for these and the other options (``epochs``,
        ``batch_size``, ``lr``, ``validation_fraction``, ``patience``, ``lr_schedule``, ``grad_clip``, ``progress``,
        ``seed``, ``distributed``, ...).
        """
        return fit_density(self, x, context, **options)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: Any) -> None:
        """Save the configuration and weights (standardization included) with ``torch.save``.

        The file loads with ``torch.load(path, weights_only=True)``; use
        [`load`][pyro_flows.density.flow_density.FlowDensity.load] to rebuild the module.

        Raises:
            TypeError: flow keyword arguments that ``weights_only`` loading cannot read.

        """
        buffer = io.BytesIO()  # the configuration must load as load() reads it
        torch.save(self.config, buffer)
        try:
            torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        except pickle.UnpicklingError as error:
            raise TypeError(
                f"torch.load(weights_only=True) cannot read the flow options {self.config['flow_kwargs']}; "
                "use numbers, strings, lists and dicts"
            ) from error
        torch.save({"config": self.config, "state_dict": self.state_dict()}, path)

    @classmethod
    def load(
        cls, path: Any, map_location: Any = "cpu", base: torch.distributions.Distribution | None = None
    ) -> FlowDensity:
        """Rebuild a density saved by `save` (``torch.load(weights_only=True)``), in eval mode.

        The module takes the dtype of the saved weights and the device they are loaded to, so a float64 density
        reloads as float64 with identical log-densities.

        Args:
            path: file path or file-like object.
            map_location: where to load the tensors, as for ``torch.load`` (a device, a string, a dict or a
                function; ``None``: where they were saved).
            base: the custom base distribution, if the saved density had one.

        Raises:
            ValueError: the file is not a saved [`FlowDensity`][pyro_flows.density.flow_density.FlowDensity], or a
                custom base is missing.

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
        config, state = dict(checkpoint["config"]), checkpoint["state_dict"]
        flow_kwargs, config["base"] = config.pop("flow_kwargs"), config["base"] or base
        if config["base"] is None:
            raise ValueError("this density was saved with a custom base distribution; pass it as base=")
        density = cls(**config, **flow_kwargs)
        density.to(next(tensor for tensor in state.values() if tensor.is_floating_point()))  # its dtype and device
        density.load_state_dict(state)
        return density.eval()
