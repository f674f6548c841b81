r"""One stack builder for every consumer (autoguides, amortized guides, densities): `build_flows`.

A *spec* is a registry name or a sequence of names (one block, e.g. ``("lu", "leaky_relu")``); the stack is the
block repeated ``num_flows`` times, so the same spec gives the same layers wherever it is used.

Permutation rule. With ``permutation="auto"`` a reversal [`Permutation`][pyro_flows.transforms.linear.Permutation] is
inserted between consecutive blocks when a family of the block declares
`needs_permutation` (its dependencies follow a fixed coordinate order:
autoregressive, coupling, triangular). The reversal makes every such order alternate; together with the coupling
layers' default ``"half"`` mask (the last $\lceil D/2 \rceil$ coordinates are transformed), every coordinate
is transformed by one of any two consecutive coupling layers, in every dimension $D \ge 2$.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch import Tensor
from torch.distributions import Transform

from pyro_flows._validation import check_size
from pyro_flows.transforms.base import Flow
from pyro_flows.transforms.linear import Permutation
from pyro_flows.transforms.registry import factory_keywords, registry

__all__ = ["FlowSpec", "PermutationRule", "build_flows", "condition_flows", "flow_names"]

#: A registry name, or a block of names repeated ``num_flows`` times.
FlowSpec = str | Sequence[str]
#: ``"auto"``: a reversal between blocks of families that need one; ``"reverse"``/``"random"``: that permutation
#: between all blocks; ``None``: none.
PermutationRule = Literal["auto", "reverse", "random"] | None


def flow_names(flow: FlowSpec) -> list[str]:
    """The block of registry names of a spec (validated: unknown names raise ``KeyError`` listing the known ones).

    Raises:
        TypeError: ``flow`` is neither a name nor a non-empty sequence of names.
        KeyError: an unknown name.

    """
    names = [flow] if isinstance(flow, str) else list(flow) if isinstance(flow, Sequence) else None
    if not names or not all(isinstance(name, str) for name in names):
        raise TypeError(f"flow must be a registry name or a non-empty sequence of names, got {flow!r}")
    for name in names:
        registry[name]
    return names


def build_flows(
    flow: FlowSpec,
    dim: int,
    num_flows: int,
    *,
    context_dim: int = 0,
    permutation: PermutationRule = "auto",
    defaults: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> list[Flow]:
    """Build the layers of ``flow`` repeated ``num_flows`` times on vectors of size ``dim``.

    Args:
        flow: a registry name or a block of names.
        dim: event size D.
        num_flows: number of blocks (0: no layers).
        context_dim: context size of conditional layers (0: unconditional); permutations take no context.
        permutation: the permutation rule between blocks (see the module docs).
        defaults: keyword arguments given to the families that accept them, silently skipped by the others (a
            consumer's own defaults, e.g. wider networks for density estimation).
        **kwargs: keyword arguments of the families; each goes to every family of the block that accepts it.

    Returns:
        The layers in order, ready for ``TransformedDistribution`` (conditional ones through
        [`condition_flows`][pyro_flows.transforms.stack.condition_flows]).

    Raises:
        TypeError: a keyword argument that no family of the block accepts (named in the message), or a bad spec.
        ValueError: a bad size or permutation rule.

    Examples:
        >>> layers = build_flows(("lu", "leaky_relu"), 3, num_flows=2)
        >>> [type(layer).__name__ for layer in layers]
        ['LU', 'LeakyReLU', 'LU', 'LeakyReLU']
        >>> [type(layer).__name__ for layer in build_flows("iaf", 3, 2, hidden_dims=(8,))]
        ['InverseAutoregressive', 'Permutation', 'InverseAutoregressive']

    """
    names = flow_names(flow)
    dim = check_size(dim, "dim")
    num_flows = check_size(num_flows, "num_flows", minimum=0)
    if permutation not in ("auto", "reverse", "random", None):
        raise ValueError(f"permutation must be 'auto', 'reverse', 'random' or None, got {permutation!r}")
    families = [registry[name] for name in names]
    accepted = [factory_keywords(family) for family in families]
    unknown = sorted(set(kwargs) - set().union(*accepted))
    if unknown:
        offered = ", ".join(
            f"{name}: {sorted(keys - {'context_dim'})}" for name, keys in zip(names, accepted, strict=True)
        )
        raise TypeError(f"unknown keyword argument(s) {unknown} for flow {flow!r} (accepted: {offered})")
    if context_dim:
        kwargs["context_dim"] = check_size(context_dim, "context_dim")
    if permutation == "auto":
        needed = any(getattr(family, "needs_permutation", False) for family in families)
        permutation = "reverse" if needed else None
    layers: list[Flow] = []
    for k in range(num_flows):
        if k > 0 and permutation is not None and dim > 1:
            layers.append(Permutation(dim, permutation))
        for family, keys in zip(families, accepted, strict=True):
            options = {key: value for key, value in (defaults or {}).items() if key in keys}
            options.update({key: value for key, value in kwargs.items() if key in keys})
            layers.append(family(dim, **options))
    return layers


def condition_flows(layers: Sequence[Flow], context: Tensor | None) -> list[Transform]:
    """The layers at ``context``: conditional ones conditioned, the others (permutations) as they are.

    Raises:
        ValueError: a conditional layer and no context.

    """
    if context is None:
        return list(layers)
    return [layer.condition(context) if layer.context_dim else layer for layer in layers]
