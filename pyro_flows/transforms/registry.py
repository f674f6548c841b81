"""Name → factory registries of flow layers.

Three registries are public API:

* [`registry`][pyro_flows.transforms.registry] — ``factory(dim: int, **kwargs) -> Flow``, one layer acting on vectors of
  size ``dim``;
* `conditional_registry` — ``factory(dim: int, context_dim: int, **kwargs) -> ConditionalFlow``, derived
  from the unconditional family (same keyword arguments: it *is* the family class built with ``context_dim``);
* `image_registry` — ``factory(event_shape: tuple[int, int, int], **kwargs) -> Flow`` for flows on
  ``(C, H, W)`` events.

A family joins by decorating its class with ``@registry.register("name")``: that registers the class and, when
the family has an amortized variant (`has_conditional`), its conditional
factory; the conformance suite in ``tests/`` then checks both automatically.

Examples:
    >>> from pyro_flows.transforms import conditional_registry, registry
    >>> layer = registry["elementwise_affine"](3)
    >>> "elementwise_affine" in registry, "elementwise_affine" in conditional_registry
    (True, True)

"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from pyro_flows._validation import check_size
from pyro_flows.transforms.base import ConditionalFlow, Flow, ParametricFlow

F = TypeVar("F", bound=Callable[..., Any])


def _keyword_parameters(factory: Callable[..., Any]) -> list[inspect.Parameter]:
    """A factory's parameters after the event size, with a flow class's ``**context`` spelled out.

    A family whose ``__init__`` forwards ``**context`` to its base class takes the base's keyword-only arguments
    (``context_dim``, and ``context_hidden_dims`` for a
    [`ParametricFlow`][pyro_flows.transforms.base.ParametricFlow]).
    """
    parameters = list(inspect.signature(factory).parameters.values())[1:]
    explicit = [p for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if any(p.kind is p.VAR_KEYWORD for p in parameters) and isinstance(factory, type):
        base = ParametricFlow if issubclass(factory, ParametricFlow) else Flow
        explicit += [p for p in inspect.signature(base.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
    return explicit


def factory_keywords(factory: Callable[..., Any]) -> frozenset[str]:
    """The keyword arguments a layer factory accepts, besides the event size (``context_dim`` included)."""
    return frozenset(p.name for p in _keyword_parameters(factory))


class ConditionalFactory:
    """``(dim, context_dim, **kwargs) -> ConditionalFlow(family(dim, context_dim=context_dim, **kwargs))``.

    The conditional variant of a family is the family class itself built with a context; this factory only wraps
    it in a Pyro ``ConditionalTransformModule``, so its keyword arguments cannot drift from the family's.

    Args:
        family: a [`Flow`][pyro_flows.transforms.base.Flow] subclass with ``has_conditional``.

    """

    def __init__(self, family: type[Flow]) -> None:
        self.family = family
        self.__name__ = self.__qualname__ = f"Conditional{family.__name__}"
        self.__doc__ = f"Amortized `{family.__module__}.{family.__name__}` (see that class)."
        first = next(iter(inspect.signature(family).parameters.values()))
        context = inspect.Parameter("context_dim", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int)
        rest = [p for p in _keyword_parameters(family) if p.name != "context_dim"]
        self.__signature__ = inspect.Signature([first, context, *rest])

    def __call__(self, dim: int, context_dim: int, **kwargs: Any) -> ConditionalFlow:
        """Build the conditional flow."""
        check_size(context_dim, "context_dim")
        return ConditionalFlow(self.family(dim, context_dim=context_dim, **kwargs))

    def __repr__(self) -> str:
        return f"<conditional factory of {self.family.__name__}>"


class FlowRegistry(Mapping[str, Callable[..., Any]]):
    """A read-only mapping from flow names to layer factories, filled by `register`.

    Args:
        kind: a short description of what the factories take, used in error messages.
        conditional: the registry that receives the derived conditional factories of the families registered here.

    """

    def __init__(self, kind: str, conditional: FlowRegistry | None = None) -> None:
        self.kind = kind
        self.conditional = conditional
        self._factories: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Return a decorator that registers a factory (usually a `Flow` subclass) under ``name``.

        Raises:
            ValueError: if ``name`` is already registered.

        """

        def decorator(factory: F) -> F:
            self._add(name, factory)
            if self.conditional is not None and isinstance(factory, type) and factory.has_conditional:
                self.conditional._add(name, ConditionalFactory(factory))
            return factory

        return decorator

    def _add(self, name: str, factory: Callable[..., Any]) -> None:
        if name in self._factories:
            raise ValueError(f"flow {name!r} is already registered in the {self.kind} registry")
        self._factories[name] = factory

    def __getitem__(self, name: str) -> Callable[..., Any]:
        try:
            return self._factories[name]
        except KeyError:
            known = ", ".join(sorted(self._factories))
            raise KeyError(f"unknown {self.kind} flow {name!r}; registered flows are: {known}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._factories)

    def __len__(self) -> int:
        return len(self._factories)

    def __repr__(self) -> str:
        return f"FlowRegistry({self.kind!r}, {sorted(self._factories)})"


conditional_registry = FlowRegistry("conditional")
registry = FlowRegistry("vector", conditional=conditional_registry)
image_registry = FlowRegistry("image")
