r"""One parameter tensor per module: named tensors stored flattened, back to back, in one ``nn.Parameter``.

Pyro's optimizers run one torch optimizer per parameter tensor, and a guide's parameters each pass through Pyro's
parameter store and trace at every step, a cost per tensor whatever its size (measured in
``benchmarks/README.md``). A module that keeps its tensors in one flat parameter ``raw`` and reads them as views
(``raw.split(sizes)`` and ``view(shape)``, no copies) pays that once. In-place updates of a view under
``torch.no_grad()`` write through to ``raw``.

[`PackedLayout`][pyro_flows.nn.PackedLayout] is the bookkeeping (names, shapes, offsets) that
[`ParametricFlow`][pyro_flows.transforms.base.ParametricFlow] and [`MADE`][pyro_flows.nn.MADE] share, including
loading checkpoints of the former format (one state-dict entry per named tensor).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PackedLayout", "named_tensors"]


class PackedLayout:
    """Names, shapes and sizes of the tensors packed into one flat parameter, in packing order.

    Examples:
        >>> layout = PackedLayout()
        >>> raw = layout.append(None, "w", torch.ones(2, 3))
        >>> raw = layout.append(raw, "b", torch.zeros(2))
        >>> raw.shape, layout.views(raw)["w"].shape
        (torch.Size([8]), torch.Size([2, 3]))

    """

    def __init__(self) -> None:
        self.shapes: dict[str, torch.Size] = {}
        self.sizes: list[int] = []

    def append(self, packed: Tensor | None, name: str, init: Tensor) -> nn.Parameter:
        """Record ``name`` with ``init``'s shape; return ``packed`` with ``init`` appended, as a new parameter.

        Raises:
            ValueError: ``name`` is already packed.

        """
        if name in self.shapes:
            raise ValueError(f"{name!r} is already packed")
        flat = init.detach().reshape(-1)
        self.shapes[name] = init.shape
        self.sizes.append(flat.numel())
        return nn.Parameter(flat.clone() if packed is None else torch.cat([packed.detach(), flat.to(packed)]))

    def tensors(self, packed: Tensor) -> list[Tensor]:
        """The packed tensors in packing order, as views of ``packed``."""
        return [v.view(shape) for v, shape in zip(packed.split(self.sizes), self.shapes.values(), strict=True)]

    def views(self, packed: Tensor) -> dict[str, Tensor]:
        """The packed tensors by name, as views of ``packed``."""
        return dict(zip(self.shapes, self.tensors(packed), strict=True))

    def pack_legacy(self, state_dict: dict[str, Any], prefix: str, key: str = "raw") -> None:
        """In a checkpoint with one entry per named tensor (the former format), replace them by the packed ``key``.

        Only a complete set of entries of the right shapes is packed; anything else is left for
        ``load_state_dict`` to report.
        """
        legacy = [prefix + name for name in self.shapes]
        if (
            prefix + key not in state_dict
            and legacy
            and all(
                name in state_dict and state_dict[name].shape == shape
                for name, shape in zip(legacy, self.shapes.values(), strict=True)
            )
        ):
            state_dict[prefix + key] = torch.cat([state_dict.pop(name).reshape(-1) for name in legacy])


def named_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    """``module.named_parameters()`` with each packed ``raw`` replaced by the tensors packed in it (views of it).

    The names are those of the former format (``"flows.0.made.layers.0.weight"``, ``"flows.1.u"``). Under
    ``torch.no_grad()`` the views may be updated in place (e.g. to perturb every weight matrix by its own scale).
    """
    tensors = []
    for name, p in module.named_parameters():
        owner, _, leaf = name.rpartition(".")
        layout = getattr(module.get_submodule(owner) if owner else module, "layout", None)
        if leaf == "raw" and isinstance(layout, PackedLayout):
            tensors += [(f"{owner}.{key}" if owner else key, value) for key, value in layout.views(p).items()]
        else:
            tensors.append((name, p))
    return tensors
