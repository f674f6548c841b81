"""Base classes shared by every flow of :mod:`pyro_flows.transforms`.

A flow is a bijection :math:`y = f(x)` on events of a fixed shape. Subclasses implement

* ``_forward_and_log_det(x) -> (y, log|det ∂y/∂x|)`` and
* ``_inverse_and_log_det(y) -> (x, log|det ∂y/∂x|)`` (the log-det is always that of the *forward* map at ``x``),

and the base classes provide the rest of Pyro's :class:`~torch.distributions.transforms.Transform` protocol:

* input validation: wrong event shape, dtype or device raises a clear error instead of broadcasting;
* one pass for output and log-det: the log-det computed by ``_call``/``_inverse`` is cached with its ``(x, y)``
  pair, so scoring a sample the flow has just produced never calls its network again;
* ``fast_direction``: which direction is one parallel pass (``"forward"``, e.g. IAF) or the inverse
  (``"inverse"``, e.g. MAF); :meth:`log_abs_det_jacobian` on an uncached pair uses the fast direction.

Conditional flows come in two shapes. Families with their own context-aware networks (MADE, coupling) subclass
:class:`ConditionalFlow` directly. Families whose map is a closed-form function of a few parameter tensors
subclass :class:`ParametricFlow`; :class:`HyperConditionalFlow` then amortizes any of them: a hypernetwork maps the
context to an offset of the raw parameters, ``θ(c) = θ₀ + g(c)``, with ``g``'s last layer initialized at zero so
that the conditional flow starts as the unconditional one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn
from torch.distributions import Transform, constraints

from pyro_flows.nn.mlp import MLP

Direction = Literal["forward", "inverse"]
EventShape = int | Sequence[int]


def as_event_shape(event_shape: EventShape) -> torch.Size:
    """Normalize an ``int`` or a sequence of ints into a :class:`torch.Size` of positive sizes.

    Raises:
        ValueError: if a size is not a positive integer.

    """
    shape = torch.Size([event_shape]) if isinstance(event_shape, int) else torch.Size(event_shape)
    if len(shape) == 0 or any(int(s) < 1 for s in shape):
        raise ValueError(f"event shape must be one or more positive sizes, got {tuple(shape)}")
    return shape


def check_tensor(
    x: Tensor, event_shape: torch.Size, dtype: torch.dtype | None, device: torch.device | None, who: str
) -> None:
    """Raise a clear error unless ``x`` ends in ``event_shape`` and has the given dtype and device.

    ``dtype``/``device`` ``None`` skip that check (e.g. a permutation has no floating-point state).

    Raises:
        TypeError: ``x`` is not a floating-point tensor of ``dtype``.
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
    if dtype is not None and x.dtype != dtype:
        raise TypeError(
            f"{who} has parameters of dtype {dtype} but got input of dtype {x.dtype}; "
            f"convert one of them (e.g. flow.to({x.dtype}))"
        )
    if device is not None and x.device != device:
        raise ValueError(
            f"{who} has parameters on device {device} but got input on {x.device}; "
            f"move one of them (e.g. flow.to({str(x.device)!r}))"
        )


def state_dtype_and_device(module: nn.Module) -> tuple[torch.dtype | None, torch.device | None]:
    """The dtype of a module's floating-point state and the device of any of its state (``None`` if stateless)."""
    dtype = device = None
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        device = tensor.device if device is None else device
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return dtype, device


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


class FlowMixin:
    """Validation, one-pass log-det caching and direction bookkeeping shared by all flows.

    :class:`Flow` (modules) and :class:`ConditionedFlow` use it; a conditional family with its own conditioned
    transform class (e.g. a MADE-based flow conditioned on a context) mixes it into a plain ``Transform``, sets
    ``event_shape`` and ``_ld_cache = None``, and implements ``_dtype_and_device``, ``_forward_and_log_det`` and
    ``_inverse_and_log_det``.
    """

    bijective = True
    #: Which direction is one parallel pass: ``"forward"`` (sampling) or ``"inverse"`` (density evaluation).
    fast_direction: ClassVar[Direction] = "forward"
    #: Absolute accuracy of the inverse (closed-form inverses: float64 round-off).
    inverse_atol: ClassVar[float] = 1e-6

    event_shape: torch.Size
    _ld_cache: tuple[Tensor, Tensor, Tensor] | None
    _cached_x_y: tuple[Tensor | None, Tensor | None]
    _cache_size: int

    @property
    def domain(self) -> constraints.Constraint:
        """Real-valued events of ``event_shape``."""
        return constraints.independent(constraints.real, len(self.event_shape))

    @property
    def codomain(self) -> constraints.Constraint:
        """Real-valued events of ``event_shape``."""
        return constraints.independent(constraints.real, len(self.event_shape))

    def _dtype_and_device(self) -> tuple[torch.dtype | None, torch.device | None]:
        raise NotImplementedError

    def _check(self, x: Tensor) -> None:
        check_tensor(x, self.event_shape, *self._dtype_and_device(), type(self).__name__)

    def _forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no inverse")

    def _call(self, x: Tensor) -> Tensor:
        self._check(x)
        y, log_det = self._forward_and_log_det(x)
        self.__dict__["_ld_cache"] = (x, y, log_det)
        return y

    def _inverse(self, y: Tensor) -> Tensor:
        self._check(y)
        x, log_det = self._inverse_and_log_det(y)
        self.__dict__["_ld_cache"] = (x, y, log_det)
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        r"""Return :math:`\log|\det ∂y/∂x|` with the batch shape of ``x``.

        Uses the value computed together with ``y`` (or ``x``) when this pair was produced by the flow itself,
        otherwise recomputes it along :attr:`fast_direction`.
        """
        cache = self._ld_cache
        if cache is not None and cache[0] is x and cache[1] is y:
            return cache[2]
        if self.fast_direction == "inverse":
            self._check(y)
            return self._inverse_and_log_det(y)[1]
        self._check(x)
        return self._forward_and_log_det(x)[1]

    def clear_cache(self) -> None:
        """Forget the cached ``(x, y)`` pair and its log-det."""
        self._ld_cache = None
        if self._cache_size == 1:
            self._cached_x_y = None, None


class Flow(FlowMixin, TransformModule):
    """Base class of the learnable flows: a Pyro ``TransformModule`` on events of ``event_shape``.

    Args:
        event_shape: size of vector events (``int``) or the full event shape, e.g. ``(C, H, W)``.
        cache_size: Pyro's transform cache (``1`` keeps the last ``(x, y)`` pair so ``log_prob`` of own samples
            does not invert the flow).

    """

    def __init__(self, event_shape: EventShape, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        self.event_shape = as_event_shape(event_shape)
        self._ld_cache = None

    @property
    def dim(self) -> int:
        """Number of scalar dimensions of one event."""
        return math.prod(self.event_shape)

    def _dtype_and_device(self) -> tuple[torch.dtype | None, torch.device | None]:
        cached = self.__dict__.get("_state_dtype_device")
        if cached is None:
            cached = self.__dict__["_state_dtype_device"] = state_dtype_and_device(self)
        return cached

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Flow:
        self.__dict__.pop("_state_dtype_device", None)
        return super()._apply(fn, *args, **kwargs)

    def with_cache(self, cache_size: int = 1) -> Flow:
        """Set Pyro's transform cache size in place (modules are not copied, so parameters stay shared)."""
        if cache_size not in (0, 1):
            raise ValueError("cache_size must be 0 or 1")
        self._cache_size = cache_size
        self._cached_x_y = None, None
        return self

    def extra_repr(self) -> str:
        """Show the event shape in ``repr``."""
        return f"event_shape={tuple(self.event_shape)}"


class ParametricFlow(Flow):
    """A flow whose map is a closed-form function of named raw (unconstrained) parameter tensors.

    Subclasses register their raw parameters with :meth:`add_raw_param` and implement ``_forward_with(params, x)``
    and ``_inverse_with(params, y)``, where ``params`` maps names to tensors of shape ``batch + shape``: no batch
    dimensions for the module's own parameters, the context's batch dimensions when produced by
    :class:`HyperConditionalFlow`. Any raw values give an invertible map (constraints are applied inside).
    """

    def __init__(self, event_shape: EventShape, cache_size: int = 1) -> None:
        super().__init__(event_shape, cache_size=cache_size)
        self.param_shapes: dict[str, torch.Size] = {}

    def add_raw_param(self, name: str, init: Tensor) -> None:
        """Register ``init`` as the learnable raw parameter ``name``."""
        self.register_parameter(name, nn.Parameter(init))
        self.param_shapes[name] = init.shape

    def raw_params(self) -> dict[str, Tensor]:
        """The module's raw parameters by name."""
        return {name: getattr(self, name) for name in self.param_shapes}

    def _forward_with(self, params: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _inverse_with(self, params: Mapping[str, Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no inverse")

    def _forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._forward_with(self.raw_params(), x)

    def _inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._inverse_with(self.raw_params(), y)


class ConditionedFlow(FlowMixin, Transform):
    """A :class:`ParametricFlow`'s map evaluated at given (batched) raw parameters, e.g. from a context.

    Returned by :meth:`HyperConditionalFlow.condition`; it is a plain ``Transform`` (its parameters are
    functions of the context and of the conditional module's weights).

    Args:
        template: the flow whose map is used (its buffers, e.g. fixed permutations, are used as they are).
        params: raw parameters by name, each of shape ``batch + template.param_shapes[name]``.

    """

    def __init__(self, template: ParametricFlow, params: Mapping[str, Tensor], cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        self.template = template
        self.params = dict(params)
        self.event_shape = template.event_shape
        self.fast_direction = template.fast_direction
        self.inverse_atol = template.inverse_atol
        self._ld_cache = None

    def _dtype_and_device(self) -> tuple[torch.dtype | None, torch.device | None]:
        reference = next(iter(self.params.values()), None)
        if reference is None:
            return state_dtype_and_device(self.template)
        return reference.dtype, reference.device

    def _check(self, x: Tensor) -> None:
        name = f"{type(self.template).__name__} (conditioned)"
        check_tensor(x, self.event_shape, *self._dtype_and_device(), name)

    def _forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.template._forward_with(self.params, x)

    def _inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.template._inverse_with(self.params, y)

    def __repr__(self) -> str:
        return f"ConditionedFlow({type(self.template).__name__})"


class ConditionalFlow(ConditionalTransformModule):
    """Base class of conditional flows: ``condition(context)`` returns a flow on events of ``event_shape``.

    Args:
        event_shape: the event shape of the conditioned flows.
        context_dim: size of the context vector (the last dimension of ``context``).

    """

    def __init__(self, event_shape: EventShape, context_dim: int) -> None:
        super().__init__()
        if context_dim < 1:
            raise ValueError(f"context_dim must be a positive integer, got {context_dim}")
        self.event_shape = as_event_shape(event_shape)
        self.context_dim = int(context_dim)

    @property
    def dim(self) -> int:
        """Number of scalar dimensions of one event."""
        return math.prod(self.event_shape)

    def check_context(self, context: Tensor) -> None:
        """Raise a clear error unless ``context`` is ``(..., context_dim)`` of the module's dtype and device."""
        name = f"{type(self).__name__} context"
        check_tensor(context, torch.Size([self.context_dim]), *state_dtype_and_device(self), name)

    def condition(self, context: Tensor) -> Transform:
        """Return the flow for ``context`` of shape ``(..., context_dim)``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        """Show the event shape and context size in ``repr``."""
        return f"event_shape={tuple(self.event_shape)}, context_dim={self.context_dim}"


class HyperConditionalFlow(ConditionalFlow):
    """Amortize a :class:`ParametricFlow`: its raw parameters become ``θ(c) = θ₀ + g(c)``.

    ``g`` is an MLP from the context to all raw parameters at once (one batched forward for the whole batch of
    contexts); its last layer starts at zero, so before training every context gives the unconditional flow
    ``θ₀`` (at or near the identity). This is the amortized setting of the planar/Sylvester/Householder VAE papers,
    where the encoder emits the flow parameters.

    Args:
        template: the unconditional flow whose parameters ``θ₀`` are the context-independent part.
        context_dim: size of the context vector.
        hidden_dims: hidden widths of ``g``.
        activation: activation module class of ``g``.

    """

    def __init__(
        self,
        template: ParametricFlow,
        context_dim: int,
        hidden_dims: Sequence[int] = (64,),
        activation: Callable[[], nn.Module] = nn.ELU,
    ) -> None:
        super().__init__(template.event_shape, context_dim)
        self.template = template
        sizes = [math.prod(s) for s in template.param_shapes.values()]
        self.hypernet = MLP(context_dim, sum(sizes), hidden_dims, activation=activation, zero_last=True)
        self._sizes = sizes

    def condition(self, context: Tensor) -> ConditionedFlow:
        """Return the template's map at parameters ``θ₀ + g(context)``; context batch dims become param batch dims."""
        self.check_context(context)
        batch = context.shape[:-1]
        deltas = self.hypernet(context).split(self._sizes, dim=-1)
        params = {
            name: base + delta.reshape(batch + shape)
            for (name, base), shape, delta in zip(
                self.template.raw_params().items(), self.template.param_shapes.values(), deltas, strict=True
            )
        }
        return ConditionedFlow(self.template, params)
