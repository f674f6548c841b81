"""Name → factory registries of flow layers.

Three registries are public API:

* :data:`registry` — ``factory(dim: int, **kwargs) -> TransformModule``, one layer acting on vectors of size
  ``dim``;
* :data:`conditional_registry` — ``factory(dim: int, context_dim: int, **kwargs) -> ConditionalTransformModule``;
* :data:`image_registry` — ``factory(event_shape: tuple[int, int, int], **kwargs) -> TransformModule`` for flows
  on ``(C, H, W)`` events.

A family joins by decorating its class (or a factory function) with ``@registry.register("name")``; the
conformance suite in ``tests/`` then checks it automatically.

Example:
    >>> from pyro_flows.transforms import registry
    >>> layer = registry["elementwise_affine"](3)
    >>> "elementwise_affine" in registry
    True

"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class FlowRegistry(Mapping[str, Callable[..., Any]]):
    """A read-only mapping from flow names to layer factories, filled by :meth:`register`.

    Args:
        kind: a short description of what the factories take, used in error messages.

    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Return a decorator that registers a factory (usually a class) under ``name``.

        Raises:
            ValueError: if ``name`` is already registered.

        """

        def decorator(factory: F) -> F:
            if name in self._factories:
                raise ValueError(f"flow {name!r} is already registered in the {self.kind} registry")
            self._factories[name] = factory
            return factory

        return decorator

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


registry = FlowRegistry("vector")
conditional_registry = FlowRegistry("conditional")
image_registry = FlowRegistry("image")
