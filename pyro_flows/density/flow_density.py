r"""Density estimation with a stack of registered flows: :class:`FlowDensity`.

The model is a normalizing flow from a base distribution :math:`p_u` (standard normal by default) to the data,

.. math::

    x = m + s \odot f_K \circ \dots \circ f_1(u), \qquad u \sim p_u,

where :math:`f_k` are layers from :data:`~pyro_flows.transforms.registry` (or
:data:`~pyro_flows.transforms.conditional_registry` for :math:`p(x \mid c)`), interleaved with fixed permutations,
and :math:`(m, s)` is the standardization of the data (per-dimension mean and standard deviation of the training
set, frozen at the first :meth:`FlowDensity.fit`). The change of variables gives the log-density *in the units of
the data*:

.. math::

    \log p(x) = \log p_u(u) - \sum_k \log\left|\det \frac{\partial f_k}{\partial u_{k-1}}\right| - \sum_i \log s_i,
    \qquad u = f_1^{-1} \circ \dots \circ f_K^{-1}\left(\frac{x - m}{s}\right),

so the standardization's Jacobian :math:`-\sum_i \log s_i` is part of every reported log-density and NLL. A
context :math:`c` is standardized the same way before it reaches the conditional layers (this changes no
log-density: the context is not modelled).

Orientation. Density estimation needs :math:`f_k^{-1}` (data → base) to be cheap. A layer whose one-pass
direction is its inverse (``fast_direction == "inverse"``, e.g. MAF) is used as it is; a layer whose one-pass
direction is its forward map (IAF-style, or a layer without a closed-form inverse) is used inverted, so that its
forward map scores the data. Sampling then needs the other direction, which may be sequential (O(D) passes) or
unavailable; :meth:`FlowDensity.sample` raises ``NotImplementedError`` in the latter case.

References: Papamakarios, Pavlakou, Murray (2017), *Masked Autoregressive Flow for Density Estimation*;
Dinh, Sohl-Dickstein, Bengio (2017), *Density estimation using Real NVP*.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import AffineTransform, Transform
from tqdm.auto import tqdm

from pyro_flows.transforms.linear import Permutation
from pyro_flows.transforms.registry import conditional_registry, registry

__all__ = ["FitHistory", "FlowDensity"]

logger = logging.getLogger(__name__)

ArrayLike = Any
LRSchedule = Literal["cosine", "plateau"] | Callable[[torch.optim.Optimizer], Any] | None

_BASES = ("normal", "laplace")
_MAX_LISTED_ROWS = 10
_EVAL_BATCH = 8192


@dataclass
class FitHistory:
    """Per-epoch record of :meth:`FlowDensity.fit` (NLLs are mean nats per data point, data units).

    Attributes:
        train_nll: mean training NLL of each epoch (averaged over its minibatches, weights changing).
        val_nll: validation NLL after each epoch (empty when no validation data was used).
        lr: learning rate used in each epoch.
        best_epoch: epoch (0-based) whose weights were restored, ``None`` without validation.
        stopped_early: whether training stopped because ``patience`` epochs passed without improvement.
        seconds: wall time of the fit.

    """

    train_nll: list[float] = field(default_factory=list)
    val_nll: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False
    seconds: float = 0.0

    @property
    def epochs(self) -> int:
        """Number of epochs run."""
        return len(self.train_nll)

    @property
    def best_val_nll(self) -> float | None:
        """Validation NLL of the restored weights (``None`` without validation)."""
        return None if self.best_epoch is None else self.val_nll[self.best_epoch]

    def plot(self, ax: Any = None) -> Any:
        """Plot the training and validation NLL per epoch (needs matplotlib, the ``examples`` extra).

        Args:
            ax: a matplotlib ``Axes`` to draw on; a new figure is made when ``None``.

        Returns:
            The ``Axes``.

        Raises:
            ImportError: matplotlib is not installed.

        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("FitHistory.plot needs matplotlib: pip install 'pyro-flows[examples]'") from error
        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.5))
        epochs = range(1, self.epochs + 1)
        ax.plot(epochs, self.train_nll, label="train")
        if self.val_nll:
            ax.plot(range(1, len(self.val_nll) + 1), self.val_nll, label="validation")
        if self.best_epoch is not None:
            ax.axvline(self.best_epoch + 1, color="grey", linestyle=":", label="restored")
        ax.set_xlabel("epoch")
        ax.set_ylabel("NLL (nats / point)")
        ax.legend()
        return ax


def _accepts(factory: Callable[..., Any], name: str) -> bool:
    """Whether ``factory`` takes a keyword argument ``name`` (explicitly or through ``**kwargs``)."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


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
        "use numbers, strings, lists and dicts in flow_kwargs"
    )


def _adam(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam (AdamW with weight decay), with the fused kernel where the parameters' device and dtype allow it."""
    kind = torch.optim.AdamW if weight_decay > 0 else torch.optim.Adam
    try:
        return kind(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return kind(params, lr=lr, weight_decay=weight_decay)


class FlowDensity(nn.Module):
    r"""A normalizing-flow density :math:`p(x)` or :math:`p(x \mid c)` on :math:`\mathbb{R}^D`, usable in Pyro.

    See the module documentation for the model, the standardization and the orientation of the layers.
    :meth:`distribution` gives a Pyro distribution (``pyro.sample("x", d, obs=x)``, or a learned prior: register
    the module with ``pyro.module``); :meth:`fit` trains it by maximum likelihood.

    Args:
        dim: event size :math:`D`.
        flow: a registry name (``"maf"`` by default), or a sequence of names used in turn for the ``num_flows``
            layers (e.g. ``("lu", "leaky_relu")``). With ``context_dim > 0`` the names are looked up in
            :data:`~pyro_flows.transforms.conditional_registry`.
        num_flows: number of flow layers :math:`K`.
        hidden_dims: hidden widths of the layers' networks, passed as ``hidden_dims`` to the factories that take it.
        context_dim: size of the context :math:`c` (0: unconditional).
        base: ``"normal"`` (standard normal), ``"laplace"`` (standard Laplace), or a distribution with
            ``event_shape == (dim,)`` (a custom base is neither moved by ``.to()`` nor saved by :meth:`save`: pass
            it again to :meth:`load`).
        permutation: permutation inserted between consecutive layers: ``"reverse"``, ``"random"`` (drawn once,
            saved with the weights) or ``None`` for none.
        standardize: standardize data (and context) with training-set statistics at the first :meth:`fit`.
        flow_kwargs: extra keyword arguments for every layer factory (numbers, strings, lists, dicts, so that
            :meth:`save` can store them).

    Raises:
        KeyError: an unknown flow name (the message lists the registered ones).
        ValueError: a non-positive size, or a base of the wrong event shape.

    Example:
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

    """

    def __init__(
        self,
        dim: int,
        flow: str | Sequence[str] = "maf",
        num_flows: int = 5,
        hidden_dims: Sequence[int] = (128, 128),
        context_dim: int = 0,
        base: str | torch.distributions.Distribution = "normal",
        permutation: Literal["reverse", "random"] | None = "reverse",
        standardize: bool = True,
        flow_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if not isinstance(num_flows, int) or num_flows < 1:
            raise ValueError(f"num_flows must be a positive integer, got {num_flows!r}")
        if not isinstance(context_dim, int) or context_dim < 0:
            raise ValueError(f"context_dim must be a non-negative integer, got {context_dim!r}")
        if permutation not in ("reverse", "random", None):
            raise ValueError(f"permutation must be 'reverse', 'random' or None, got {permutation!r}")
        names = [flow] if isinstance(flow, str) else list(flow)
        if not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"flow must be a registry name or a non-empty sequence of names, got {flow!r}")
        self.dim = dim
        self.context_dim = context_dim
        self.standardize = bool(standardize)
        self.config: dict[str, Any] = {
            "dim": dim,
            "flow": names[0] if isinstance(flow, str) else names,
            "num_flows": num_flows,
            "hidden_dims": [int(h) for h in hidden_dims],
            "context_dim": context_dim,
            "base": base if isinstance(base, str) else None,
            "permutation": permutation,
            "standardize": self.standardize,
            "flow_kwargs": dict(flow_kwargs or {}),
        }
        self.layers = nn.ModuleList()
        self._inverted: list[bool] = []
        self._conditional: list[bool] = []
        for k in range(num_flows):
            if k > 0 and permutation is not None:
                self._append(Permutation(dim, permutation), conditional=False)
            layer = self._make_layer(names[k % len(names)], hidden_dims, self.config["flow_kwargs"])
            self._append(layer, conditional=context_dim > 0)
        self._init_base(base)
        self.register_buffer("data_shift", torch.zeros(dim))
        self.register_buffer("data_scale", torch.ones(dim))
        self.register_buffer("context_shift", torch.zeros(context_dim))
        self.register_buffer("context_scale", torch.ones(context_dim))
        self.register_buffer("standardized", torch.tensor(False))

    # ------------------------------------------------------------------ construction
    def _make_layer(self, name: str, hidden_dims: Sequence[int], flow_kwargs: Mapping[str, Any]) -> nn.Module:
        conditional = self.context_dim > 0
        factory = (conditional_registry if conditional else registry)[name]
        kwargs = dict(flow_kwargs)
        if "hidden_dims" not in kwargs and _accepts(factory, "hidden_dims"):
            kwargs["hidden_dims"] = tuple(int(h) for h in hidden_dims)
        args = (self.dim, self.context_dim) if conditional else (self.dim,)
        try:
            return factory(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"cannot build flow {name!r} with arguments {sorted(kwargs)}: {error}") from error

    def _append(self, layer: nn.Module, conditional: bool) -> None:
        self.layers.append(layer)
        self._conditional.append(conditional)
        # a permutation is one gather both ways; any other layer is used inverted when its forward is the fast side
        fast = "both" if isinstance(layer, Permutation) else getattr(layer, "fast_direction", None)
        if fast is None and conditional:
            with torch.no_grad():
                fast = getattr(layer.condition(torch.zeros(1, self.context_dim)), "fast_direction", None)
        self._inverted.append(fast == "forward")

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

    def _base(self, batch_shape: torch.Size) -> torch.distributions.Distribution:
        if self._custom_base is not None:
            return self._custom_base.expand(batch_shape) if batch_shape else self._custom_base
        shape = (*batch_shape, self.dim)
        loc, scale = self.base_loc.expand(shape), self.base_scale.expand(shape)
        family = dist.Normal if self._base_name == "normal" else dist.Laplace
        return family(loc, scale).to_event(1)

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

    def transforms(self, context: Tensor | None = None) -> list[Transform]:
        """The transforms from the base to the data (standardization last), conditioned on ``context`` if needed."""
        context = self._check_context(context)
        transforms: list[Transform] = []
        for layer, conditional, inverted in zip(self.layers, self._conditional, self._inverted, strict=True):
            if hasattr(layer, "clear_cache"):
                layer.clear_cache()
            transform = layer.condition(context) if conditional else layer
            transforms.append(transform.inv if inverted else transform)
        transforms.append(AffineTransform(self.data_shift, self.data_scale, event_dim=1))
        return transforms

    def distribution(self, context: Tensor | None = None, validate_args: bool | None = None) -> dist.Distribution:
        r"""The density as a Pyro distribution, :math:`p(x)` or :math:`p(x \mid c)`.

        Args:
            context: ``(..., context_dim)`` context of a conditional density (its batch shape becomes the
                distribution's batch shape); ``None`` for an unconditional one.
            validate_args: passed to the distribution (``None``: torch's default).

        Returns:
            A ``pyro.distributions.TransformedDistribution`` with ``event_shape == (dim,)``; ``log_prob`` is in the
            units of the data, ``rsample`` is reparameterized through every layer.

        Raises:
            ValueError: a missing, unexpected or malformed context.

        """
        transforms = self.transforms(context)
        batch_shape = context.shape[:-1] if context is not None else torch.Size()
        return dist.TransformedDistribution(self._base(batch_shape), transforms, validate_args=validate_args)

    def _check_points(self, x: Tensor, who: str) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{who} expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"{who} expects points of shape (..., {self.dim}), got a tensor of shape {tuple(x.shape)}")

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Log-density of ``x`` (``(..., dim)``, data units) given ``context``; shape ``x.shape[:-1]``."""
        self._check_points(x, "log_prob")
        return self._log_prob(x, context)

    def _log_prob(self, x: Tensor, context: Tensor | None) -> Tensor:
        # the change of variables of ``distribution(context).log_prob`` without building the distribution
        transforms = self.transforms(context)
        log_det = x.new_zeros(())
        y = x
        for transform in reversed(transforms):
            u = transform.inv(y)
            log_det = log_det + transform.log_abs_det_jacobian(u, y)
            y = u
        batch_shape = context.shape[:-1] if context is not None else torch.Size()
        return self._base(batch_shape).log_prob(y) - log_det

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Same as :meth:`log_prob`."""
        return self.log_prob(x, context)

    @torch.no_grad()
    def sample(self, num_samples: int, context: Tensor | None = None) -> Tensor:
        """Draw ``num_samples`` points (per context): shape ``(num_samples, *context.shape[:-1], dim)``."""
        return self.distribution(context).sample(torch.Size([num_samples]))

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
    def evaluate(self, x: ArrayLike, context: ArrayLike | None = None, batch_size: int = _EVAL_BATCH) -> float:
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
                xb = x[start : start + batch_size]
                cb = None if context is None else context[start : start + batch_size]
                total -= self._log_prob(xb, cb).sum().item()
        self.train(was_training)
        return total / len(x)

    # ------------------------------------------------------------------ training
    def fit(
        self,
        x: ArrayLike,
        context: ArrayLike | None = None,
        *,
        epochs: int = 100,
        max_steps: int | None = None,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        validation_fraction: float = 0.1,
        validation_data: ArrayLike | tuple[ArrayLike, ArrayLike] | None = None,
        patience: int | None = 20,
        lr_schedule: LRSchedule = None,
        grad_clip: float | None = None,
        progress: bool = True,
        device: str | torch.device | None = None,
        seed: int | None = None,
    ) -> FitHistory:
        """Fit by maximum likelihood: minibatch Adam(W), validation NLL each epoch, early stopping.

        Adam uses PyTorch's fused kernel when the parameters allow it (same update as the default one).

        The validation set is ``validation_data`` if given, else a random ``validation_fraction`` of ``x`` held
        out (rows drawn with ``seed``). Standardization statistics come from the training rows at the first fit
        and stay fixed afterwards. After training the weights of the epoch with the best validation NLL are
        restored (:attr:`FitHistory.best_epoch`).

        Args:
            x: ``(n, dim)`` data (tensor or array).
            context: ``(n, context_dim)`` contexts of a conditional density.
            epochs: maximum number of passes over the training rows.
            max_steps: optional cap on the total number of optimizer steps.
            batch_size: minibatch size.
            lr: Adam learning rate.
            weight_decay: decoupled weight decay (AdamW); 0 for plain Adam.
            validation_fraction: fraction of ``x`` held out when ``validation_data`` is ``None`` (0: no validation,
                no early stopping, the last weights are kept).
            validation_data: ``x_val`` or ``(x_val, context_val)``.
            patience: stop after this many epochs without a better validation NLL (``None``: never stop early).
            lr_schedule: ``"cosine"`` (cosine decay to 0 over ``epochs``), ``"plateau"`` (halve the rate when the
                validation NLL stalls for ``max(1, patience // 4)`` epochs), a function ``optimizer -> scheduler``
                stepped once per epoch, or ``None``.
            grad_clip: clip the gradient norm to this value (``None``: no clipping).
            progress: show a ``tqdm`` progress bar over epochs.
            device: move the module (and the data) there before training.
            seed: seed of the validation split and of the minibatch order (``None``: torch's global generator).

        Returns:
            The :class:`FitHistory`.

        Raises:
            ValueError: non-finite values (the message names the rows), wrong width, empty data, mismatched
                context rows, or bad hyper-parameters.
            FloatingPointError: the training loss became non-finite (the best weights so far are restored).

        """
        if epochs < 1 or batch_size < 1 or lr <= 0:
            raise ValueError(f"need epochs ≥ 1, batch_size ≥ 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
        if not 0.0 <= validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        if device is not None:
            self.to(device)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        x_all, c_all = self._prepare(x, context, "x")
        x_val: Tensor | None = None
        c_val: Tensor | None = None
        if validation_data is not None:
            val_x, val_c = validation_data if isinstance(validation_data, tuple) else (validation_data, None)
            x_val, c_val = self._prepare(val_x, val_c, "validation_data")
            x_train, c_train = x_all, c_all
        elif validation_fraction > 0 and len(x_all) >= 2:
            order = torch.randperm(len(x_all), generator=generator).to(x_all.device)
            n_val = min(max(1, round(validation_fraction * len(x_all))), len(x_all) - 1)
            x_val, x_train = x_all[order[:n_val]], x_all[order[n_val:]]
            if c_all is not None:
                c_val, c_train = c_all[order[:n_val]], c_all[order[n_val:]]
            else:
                c_train = None
        else:
            x_train, c_train = x_all, c_all
        if self.standardize and not bool(self.standardized):
            self._set_standardization(x_train, c_train)

        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = _adam(params, lr, weight_decay)
        scheduler = self._scheduler(lr_schedule, optimizer, epochs, patience)
        history = FitHistory()
        best_state: dict[str, Tensor] | None = None
        best_nll = math.inf
        since_best = 0
        steps = 0
        start = time.perf_counter()
        n_train = len(x_train)
        bar = tqdm(range(epochs), desc="fit", disable=not progress, leave=False)
        self.train()
        for epoch in bar:
            order = torch.randperm(n_train, generator=generator).to(x_train.device)
            total, count = 0.0, 0
            for first in range(0, n_train, batch_size):
                index = order[first : first + batch_size]
                cb = None if c_train is None else c_train[index]
                loss = -self._log_prob(x_train[index], cb).mean()
                if not torch.isfinite(loss):
                    self._restore(best_state)
                    raise FloatingPointError(
                        f"the training NLL became non-finite at epoch {epoch}, step {steps}; try a smaller lr, "
                        f"grad_clip or fewer/smaller layers"
                        + (" (best weights restored)" if best_state is not None else "")
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(params, grad_clip)
                optimizer.step()
                total += loss.item() * len(index)
                count += len(index)
                steps += 1
                if max_steps is not None and steps >= max_steps:
                    break
            history.train_nll.append(total / count)
            history.lr.append(optimizer.param_groups[0]["lr"])
            postfix = {"train": f"{history.train_nll[-1]:.4g}"}
            val_nll = None
            if x_val is not None:
                val_nll = self._mean_nll(x_val, c_val, _EVAL_BATCH)
                history.val_nll.append(val_nll)
                postfix["val"] = f"{val_nll:.4g}"
                if val_nll < best_nll:
                    best_nll, since_best, history.best_epoch = val_nll, 0, epoch
                    best_state = copy.deepcopy(self.state_dict())
                else:
                    since_best += 1
            bar.set_postfix(postfix)
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(val_nll if val_nll is not None else history.train_nll[-1])
            elif scheduler is not None:
                scheduler.step()
            if patience is not None and x_val is not None and since_best >= patience:
                history.stopped_early = True
                break
            if max_steps is not None and steps >= max_steps:
                break
        bar.close()
        self._restore(best_state)
        self.eval()
        history.seconds = time.perf_counter() - start
        logger.info(
            "fit: %d epochs (%s), best validation NLL %s at epoch %s, %.1f s",
            history.epochs,
            "stopped early" if history.stopped_early else "all epochs",
            f"{history.best_val_nll:.4f}" if history.best_val_nll is not None else "n/a",
            history.best_epoch,
            history.seconds,
        )
        return history

    @staticmethod
    def _scheduler(schedule: LRSchedule, optimizer: torch.optim.Optimizer, epochs: int, patience: int | None) -> Any:
        if schedule is None:
            return None
        if schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        if schedule == "plateau":
            wait = max(1, (patience or 20) // 4)
            return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=wait)
        if callable(schedule):
            return schedule(optimizer)
        raise ValueError(f"lr_schedule must be 'cosine', 'plateau', a callable or None, got {schedule!r}")

    def _restore(self, state: dict[str, Tensor] | None) -> None:
        if state is not None:
            self.load_state_dict(state)
        for layer in self.layers:
            if hasattr(layer, "clear_cache"):
                layer.clear_cache()

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | os.PathLike[str] | Any) -> None:
        """Save the configuration and weights (standardization included) with ``torch.save``.

        The file loads with ``torch.load(path, weights_only=True)``; use :meth:`load` to rebuild the module.

        Raises:
            TypeError: ``flow_kwargs`` holds values that ``weights_only`` loading cannot read.

        """
        _check_serializable(self.config, "the density's configuration")
        torch.save({"config": self.config, "state_dict": self.state_dict()}, path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | Any,
        map_location: str | torch.device | None = "cpu",
        base: torch.distributions.Distribution | None = None,
    ) -> FlowDensity:
        """Rebuild a density saved by :meth:`save` (``torch.load(weights_only=True)``).

        Args:
            path: file path or file-like object.
            map_location: where to load the tensors.
            base: the custom base distribution, if the saved density had one.

        Raises:
            ValueError: the file is not a saved :class:`FlowDensity`, or a custom base is missing.

        """
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(checkpoint, dict) or set(checkpoint) != {"config", "state_dict"}:
            raise ValueError("not a FlowDensity checkpoint (expected a dict with 'config' and 'state_dict')")
        config = dict(checkpoint["config"])
        if config["base"] is None:
            if base is None:
                raise ValueError("this density was saved with a custom base distribution; pass it as base=")
            config["base"] = base
        density = cls(**config)
        density.load_state_dict(checkpoint["state_dict"])
        if map_location is not None:
            density.to(map_location)
        return density.eval()
