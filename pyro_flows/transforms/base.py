r"""Base classes shared by every flow of `pyro_flows.transforms`.

A flow is a bijection $y = f(x; c)$ on events of a fixed shape, optionally conditioned on a context vector
$c$. A family is **one class**: a subclass of [`Flow`][pyro_flows.transforms.base.Flow] that implements

* ``_forward_and_log_det(x, context) -> (y, log|det ∂y/∂x|)`` and
* ``_inverse_and_log_det(y, context) -> (x, log|det ∂y/∂x|)`` (the log-det is always that of the *forward* map),

where ``context`` is ``None`` for an unconditional flow (``context_dim=0``, the default). The same class with
``context_dim > 0`` is the amortized variant: [`Flow.condition`][pyro_flows.transforms.base.Flow.condition] returns the
flow at a given context, and [`ConditionalFlow`][pyro_flows.transforms.base.ConditionalFlow] wraps it as a Pyro
``ConditionalTransformModule`` (what `conditional_registry` returns). How the context enters is the family's
business: conditioner networks (MADE, coupling, residual, ODE nets) read it as an input; closed-form families
subclass [`ParametricFlow`][pyro_flows.transforms.base.ParametricFlow], whose raw parameters become $\theta(c) =
\theta_0 + g(c)$ with a hypernetwork $g$ whose output layers start at zero (so every context starts at the unconditional
flow).

The base class provides the rest of Pyro's `Transform` protocol:

* input validation: wrong event shape, dtype or device raises a clear error instead of broadcasting;
* one pass for output and log-det: the log-det computed with ``y`` is cached with its ``(x, y)`` pair (unless the
  transform's cache is disabled, ``cache_size=0``), so scoring a sample the flow has just produced never calls its
  network again;
* family facts as class attributes: `Flow.fast_direction` (which direction is one parallel pass),
  `Flow.inverse_atol`, `Flow.needs_permutation` (whether stacks interleave permutations, see
  [`build_flows`][pyro_flows.transforms.stack.build_flows]), `Flow.traceable` (``torch.jit.trace``) and
  `Flow.has_conditional` (whether the family has an amortized variant).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn
from torch.distributions import Transform, constraints

from pyro_flows._validation import check_size, check_widths
from pyro_flows.nn.packed import PackedLayout

Direction = Literal["forward", "inverse"]
EventShape = int | Sequence[int]


def as_event_shape(event_shape: EventShape) -> torch.Size:
    """Normalize an ``int`` or a sequence of ints into a `torch.Size` of positive sizes.

    Raises:
        ValueError: if a size is not a positive integer.

    """
    shape = torch.Size([event_shape]) if isinstance(event_shape, int) else torch.Size(event_shape)
    if len(shape) == 0 or any(int(s) < 1 for s in shape):
        raise ValueError(f"event shape must be one or more positive sizes, got {tuple(shape)}")
    return shape


def check_tensor(x: Tensor, event_shape: torch.Size, reference: Tensor | None, who: str) -> None:
    """Raise a clear error unless ``x`` ends in ``event_shape`` and matches ``reference``'s dtype and device.

    ``reference`` is a tensor of the flow's state (``None``: no state to match; an integer buffer only fixes the
    device).

    Raises:
        TypeError: ``x`` is not a floating-point tensor of the state's dtype.
        ValueError: ``x`` does not end in ``event_shape`` or lives on another device.

    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{who} expects a torch.Tensor, got {type(x).__name__}")
    n = len(event_shape)
    if x.dim() < n or x.shape[x.dim() - n :] != event_shape:
        raise ValueError(
            f"{who} expects events of shape {tuple(event_shape)} (trailing dimensions), "
            f"got a tensor of shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{who} expects a floating-point tensor, got dtype {x.dtype}")
    if reference is None:
        return
    if reference.is_floating_point() and x.dtype != reference.dtype:
        raise TypeError(
            f"{who} has parameters of dtype {reference.dtype} but got input of dtype {x.dtype}; "
            f"convert one of them (e.g. flow.to({x.dtype}))"
        )
    if x.device != reference.device:
        raise ValueError(
            f"{who} has parameters on device {reference.device} but got input on {x.device}; "
            f"move one of them (e.g. flow.to({str(x.device)!r}))"
        )


def expand_log_det(log_det: Tensor, x: Tensor, event_dim: int) -> Tensor:
    """Broadcast a log-det to the batch shape of ``x`` (its shape without the ``event_dim`` last dims)."""
    batch_shape = x.shape[: x.dim() - event_dim]
    if log_det.shape == batch_shape:
        return log_det
    return log_det.expand(broadcast_shape(log_det.shape, batch_shape))


def broadcast_shape(a: Sequence[int], b: Sequence[int]) -> torch.Size:
    """NumPy-style broadcast of two shapes (a fast pure-Python ``torch.broadcast_shapes`` for two operands).

    Raises:
        ValueError: if the shapes do not broadcast.

    """
    n = max(len(a), len(b))
    a = (1,) * (n - len(a)) + tuple(a)
    b = (1,) * (n - len(b)) + tuple(b)
    out = []
    for i, j in zip(a, b, strict=True):
        if i != j and i != 1 and j != 1:
            raise ValueError(f"shapes {a} and {b} do not broadcast")
        out.append(j if i == 1 else i)
    return torch.Size(out)


def check_traceable(flow: Flow) -> None:
    """Refuse ``torch.jit.trace`` of a flow whose passes are data dependent (`Flow.traceable` is False).

    Raises:
        RuntimeError: naming the flow, while tracing.

    """
    if not flow.traceable and torch.jit.is_tracing():
        raise RuntimeError(
            f"{type(flow).__name__} cannot be traced by torch.jit (its computation depends on the data, so a trace "
            "would freeze it); use Trace_ELBO instead of JitTrace_ELBO, or another flow"
        )


class _OnePass:
    """The cached one-pass ``Transform`` protocol shared by `Flow` and `ConditionedFlow`."""

    bijective = True
    event_shape: torch.Size
    fast_direction: Direction
    _cache_size: int
    _cached_x_y: tuple[Tensor | None, Tensor | None]

    def _evaluate(self, v: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _call(self, x: Tensor) -> Tensor:
        y, log_det = self._evaluate(x, inverse=False)
        if self._cache_size:
            self.__dict__["_ld_cache"] = (x, y, log_det)
        return y

    def _inverse(self, y: Tensor) -> Tensor:
        x, log_det = self._evaluate(y, inverse=True)
        if self._cache_size:
            self.__dict__["_ld_cache"] = (x, y, log_det)
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        r"""Return $\log|\det ∂y/∂x|$ with the batch shape of ``x``.

        Uses the value computed together with ``y`` (or ``x``) when this pair was produced by the flow itself and
        the cache is on, otherwise recomputes it along `fast_direction`.
        """
        cache = self.__dict__.get("_ld_cache") if self._cache_size else None
        if cache is not None and cache[0] is x and cache[1] is y:
            return cache[2]
        if self.fast_direction == "inverse":
            return self._evaluate(y, inverse=True)[1]
        return self._evaluate(x, inverse=False)[1]

    def clear_cache(self) -> None:
        """Forget the cached ``(x, y)`` pair and its log-det."""
        self.__dict__.pop("_ld_cache", None)
        if self._cache_size == 1:
            self._cached_x_y = None, None


class Flow(_OnePass, TransformModule):
    """Base class of every flow family: a Pyro ``TransformModule`` on events of ``event_shape``.

    With ``context_dim > 0`` the flow is conditional: use [`condition`][pyro_flows.transforms.base.Flow.condition] (or
    wrap it in [`ConditionalFlow`][pyro_flows.transforms.base.ConditionalFlow]); calling it without a context raises a
    ``ValueError``.

    Args:
        event_shape: size of vector events (``int``) or the full event shape, e.g. ``(C, H, W)``.
        context_dim: size of the context vector (0: unconditional).

    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    #: Which direction is one parallel pass: ``"forward"`` (sampling) or ``"inverse"`` (density evaluation).
    fast_direction: ClassVar[Direction] = "forward"
    #: Absolute accuracy of the inverse (closed-form inverses: round-off).
    inverse_atol: ClassVar[float] = 1e-6
    #: Whether consecutive layers of this family need a permutation between them (the layer's dependencies
    #: follow a fixed coordinate order: autoregressive, coupling, triangular).
    needs_permutation: ClassVar[bool] = False
    #: Whether ``torch.jit.trace`` records the flow exactly (no data-dependent control flow).
    traceable: ClassVar[bool] = True
    #: Whether the family has an amortized variant (``context_dim > 0``).
    has_conditional: ClassVar[bool] = True

    def __init__(self, event_shape: EventShape, *, context_dim: int = 0) -> None:
        super().__init__(cache_size=1)
        self.event_shape = as_event_shape(event_shape)
        self.context_dim = check_size(context_dim, "context_dim", minimum=0)
        if self.context_dim and not self.has_conditional:
            raise ValueError(f"{type(self).__name__} has no conditional variant (got context_dim={context_dim})")

    @property
    def dim(self) -> int:
        """Number of scalar dimensions of one event."""
        return math.prod(self.event_shape)

    @property
    def sign(self) -> int:
        """Not defined for general flows (only element-wise monotone maps have a sign)."""
        raise AttributeError(f"{type(self).__name__} is not an element-wise map and has no sign")

    def reference_tensor(self) -> Tensor | None:
        """A tensor of the flow's state that fixes its dtype and device (``None`` for a stateless flow).

        The first floating-point parameter or buffer (else the first buffer); the module that owns it is found
        once and kept, so ``.to()``, ``.double()`` and ``load_state_dict(..., assign=True)`` are followed.
        """
        where = self.__dict__.get("_reference")
        if where is None:
            named = [*self.named_parameters(), *self.named_buffers()]
            named.sort(key=lambda item: not item[1].is_floating_point())
            if not named:
                return None
            path, _, leaf = named[0][0].rpartition(".")
            owner = self.get_submodule(path) if path else self
            where = self.__dict__["_reference"] = (owner, leaf)
        owner, leaf = where
        tensor = owner._parameters.get(leaf)
        return owner._buffers.get(leaf) if tensor is None else tensor

    def check_context(self, context: Tensor) -> None:
        """Raise a clear error unless ``context`` is ``(..., context_dim)`` of the flow's dtype and device.

        Raises:
            ValueError: the flow is unconditional, or the context has the wrong size or device.
            TypeError: the context has the wrong dtype.

        """
        if not self.context_dim:
            raise ValueError(f"{type(self).__name__} is unconditional (context_dim=0) but a context was given")
        check_tensor(context, torch.Size([self.context_dim]), self.reference_tensor(), f"{type(self).__name__} context")
        if not bool(torch.isfinite(context).all()):
            raise ValueError(f"{type(self).__name__} got a context with non-finite values (NaN or ±inf)")

    def condition(self, context: Tensor) -> ConditionedFlow:
        """Return the flow at ``context`` of shape ``(..., context_dim)`` (its batch dims broadcast with events).

        The returned transform reads the live parameters at every call, so it can be reused across optimizer
        steps.
        """
        self.check_context(context)
        return ConditionedFlow(self, context)

    def _evaluate(self, v: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        if self.context_dim:
            raise ValueError(
                f"{type(self).__name__} is conditional (context_dim={self.context_dim}): use flow.condition(context)"
            )
        check_tensor(v, self.event_shape, self.reference_tensor(), type(self).__name__)
        check_traceable(self)
        return (self._inverse_and_log_det if inverse else self._forward_and_log_det)(v, None)

    def _forward_and_log_det(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _inverse_and_log_det(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no inverse")

    def with_cache(self, cache_size: int = 1) -> Flow:
        """Set the transform cache size in place (``0`` disables both caches; modules are not copied)."""
        if cache_size not in (0, 1):
            raise ValueError(f"cache_size must be 0 or 1, got {cache_size!r}")
        self.clear_cache()
        self._cache_size = cache_size
        self._cached_x_y = None, None
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_ld_cache", None)
        state.pop("_reference", None)
        state["_cached_x_y"] = None, None
        return state

    def extra_repr(self) -> str:
        """Show the event shape (and the context size of a conditional flow) in ``repr``."""
        context = f", context_dim={self.context_dim}" if self.context_dim else ""
        return f"event_shape={tuple(self.event_shape)}{context}"


class ParametricFlow(Flow):
    r"""A flow whose map is a closed-form function of named raw (unconstrained) parameter tensors.

    Subclasses register their raw parameters with
    [`add_raw_param`][pyro_flows.transforms.base.ParametricFlow.add_raw_param] and implement ``_forward_with(params,
    x)`` and ``_inverse_with(params, y)``, where ``params`` maps names to tensors of shape ``batch + shape``: no batch
    dimensions for the module's own parameters, the context's batch dimensions for a conditional flow. Any raw values
    give an invertible map (constraints are applied inside).

    **One parameter tensor per layer.** The raw parameters are stored flattened and concatenated in one
    ``nn.Parameter``, ``raw`` (in registration order); ``flow.<name>`` and `raw_params` are views of it, so in-place
    updates under ``torch.no_grad()`` (``flow.w.copy_(...)``) write through. A layer is then one tensor for an
    optimizer: Pyro's optimizers run one torch optimizer per parameter tensor, so a planar layer costs one optimizer
    step instead of three. ``load_state_dict`` also accepts the former format, one entry per raw parameter
    (``"u"``, ``"w"``, ``"bias"``, ...), and packs it.

    Amortization: with ``context_dim > 0`` a hypernetwork $g$ (an ELU MLP of widths
    ``context_hidden_dims`` and one zero-initialized linear head per amortized parameter) gives
    $\theta(c) = \theta_0 + g(c)$, one batched forward for the whole batch of contexts — the amortized
    setting of the planar / Sylvester / Householder VAE papers, where the encoder emits the flow parameters.

    Args:
        event_shape: the event shape.
        context_dim: size of the context vector (0: unconditional).
        context_hidden_dims: hidden widths of the hypernetwork $g$ (only with ``context_dim > 0``; default
            ``(64,)``).

    """

    def __init__(
        self, event_shape: EventShape, *, context_dim: int = 0, context_hidden_dims: Sequence[int] | None = None
    ) -> None:
        super().__init__(event_shape, context_dim=context_dim)
        if context_hidden_dims is not None and not self.context_dim:
            raise ValueError("context_hidden_dims sets the hypernetwork of conditional flows: it needs context_dim > 0")
        widths = check_widths((64,) if context_hidden_dims is None else context_hidden_dims, "context_hidden_dims")
        self.layout = PackedLayout()
        if self.context_dim:
            layers: list[nn.Module] = []
            for a, b in itertools.pairwise([self.context_dim, *widths]):
                layers += [nn.Linear(a, b), nn.ELU()]
            self.context_net = nn.Sequential(*layers)
            self.context_heads = nn.ModuleDict()
            self._head_width = widths[-1] if widths else self.context_dim

    def add_raw_param(self, name: str, init: Tensor, amortized: bool = True) -> None:
        """Register ``init`` as the learnable raw parameter ``name`` (``amortized``: offset by the context).

        It is appended to the packed parameter ``raw`` and read back as ``flow.<name>`` (a view).

        Raises:
            ValueError: ``name`` is already a raw parameter or another attribute of the module.

        """
        if name in self.param_shapes or hasattr(self, name):
            raise ValueError(f"{type(self).__name__} already has an attribute {name!r}")
        self.raw = self.layout.append(self._parameters.get("raw"), name, init)
        if self.context_dim and amortized and init.numel():
            head = nn.Linear(self._head_width, init.numel())
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            self.context_heads[name] = head

    @property
    def param_shapes(self) -> dict[str, torch.Size]:
        """The raw parameters' shapes by name, in packing order."""
        return self.layout.shapes

    def __getattr__(self, name: str) -> Any:
        layout = self.__dict__.get("layout")
        if layout is not None and name in layout.shapes:  # a raw parameter: its view of the packed one
            return self.raw_params()[name]
        return super().__getattr__(name)

    def raw_params(self, context: Tensor | None = None) -> dict[str, Tensor]:
        r"""The raw parameters by name: views of the packed ``raw``, or $\theta_0 + g(c)$ for a context ``c``."""
        if not self.param_shapes:
            return {}
        params = self.layout.views(self.raw)
        if context is None:
            return params
        h = self.context_net(context)
        batch = context.shape[:-1]
        for name, head in self.context_heads.items():
            params[name] = params[name] + head(h).reshape(batch + self.param_shapes[name])
        return params

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Pack a checkpoint of the former format (one entry per raw parameter) into ``raw``, then load it."""
        self.layout.pack_legacy(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _forward_with(self, params: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _inverse_with(self, params: Mapping[str, Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no inverse")

    def _forward_and_log_det(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._forward_with(self.raw_params(context), x)

    def _inverse_and_log_det(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._inverse_with(self.raw_params(context), y)


class ConditionedFlow(_OnePass, Transform):
    """A conditional `Flow` at a fixed (batched) context: a plain ``Transform``, returned by ``condition``.

    Every call evaluates the flow with its current parameters (nothing is frozen at ``condition`` time).

    Args:
        flow: the conditional flow.
        context: ``(..., context_dim)``; its batch dims broadcast with those of the events.

    """

    def __init__(self, flow: Flow, context: Tensor) -> None:
        super().__init__(cache_size=1)
        self.flow = flow
        self.context = context
        self.event_shape = flow.event_shape
        self.fast_direction = flow.fast_direction
        self.inverse_atol = flow.inverse_atol
        self.domain = flow.domain
        self.codomain = flow.codomain

    def _evaluate(self, v: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        flow = self.flow
        name = f"{type(flow).__name__} (conditioned)"
        check_tensor(v, self.event_shape, flow.reference_tensor(), name)
        check_traceable(flow)
        n = len(self.event_shape)
        try:
            broadcast_shape(v.shape[: v.dim() - n], self.context.shape[:-1])
        except ValueError:
            raise ValueError(
                f"{name}: the batch shape {tuple(v.shape[: v.dim() - n])} of the input does not broadcast with the "
                f"context's batch shape {tuple(self.context.shape[:-1])}"
            ) from None
        return (flow._inverse_and_log_det if inverse else flow._forward_and_log_det)(v, self.context)

    def __repr__(self) -> str:
        return f"ConditionedFlow({type(self.flow).__name__})"


class ConditionalFlow(ConditionalTransformModule):
    """A conditional flow as a Pyro ``ConditionalTransformModule``: ``condition(context)`` gives a transform.

    A thin wrapper around one [`Flow`][pyro_flows.transforms.base.Flow] built with ``context_dim > 0`` (this is what
    `conditional_registry` returns); family facts are read from it.

    Args:
        flow: a [`Flow`][pyro_flows.transforms.base.Flow] with ``context_dim > 0``.

    """

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        if not isinstance(flow, Flow) or not flow.context_dim:
            raise ValueError(f"ConditionalFlow needs a Flow with context_dim > 0, got {flow!r}")
        self.flow = flow

    @property
    def event_shape(self) -> torch.Size:
        """The event shape of the conditioned flows."""
        return self.flow.event_shape

    @property
    def context_dim(self) -> int:
        """Size of the context vector."""
        return self.flow.context_dim

    @property
    def fast_direction(self) -> Direction:
        """The one-pass direction of the conditioned flows."""
        return self.flow.fast_direction

    @property
    def dim(self) -> int:
        """Number of scalar dimensions of one event."""
        return self.flow.dim

    def condition(self, context: Tensor) -> ConditionedFlow:
        """Return the flow for ``context`` of shape ``(..., context_dim)``."""
        return self.flow.condition(context)
