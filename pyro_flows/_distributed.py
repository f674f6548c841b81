"""torch.distributed plumbing of the training loop: who takes part in a run, and the few collectives it needs.

A [`World`][pyro_flows.training.World] is the set of processes of one data-parallel run: this process is ``rank``
of ``size``. [`World.current`][pyro_flows.training.World.current] finds it: the default process group if one is
initialized, else the one that ``torchrun`` (``python -m torch.distributed.run``) describes through its environment
variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, which it then initializes
with the backend for the machine: ``"cpu:gloo,cuda:nccl"`` (NCCL for CUDA tensors, gloo for CPU ones) where CUDA and
NCCL are available, ``"gloo"`` otherwise.

A world of one process needs no process group, and its collectives are the identity: the training code calls them
unconditionally, and a single process runs the same arithmetic as before this module existed.

Importing this module initializes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["World"]

#: The environment variables through which ``torchrun`` describes the process group.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def default_backend() -> str:
    """The backend a process group is initialized with: NCCL for CUDA tensors where available, gloo for CPU ones.

    Examples:
        >>> default_backend() in ("gloo", "cpu:gloo,cuda:nccl")
        True

    """
    if torch.cuda.is_available() and dist.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def _environment_size() -> int:
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the environment variable WORLD_SIZE must be an integer, got {value!r}") from None


@dataclass(frozen=True)
class World:
    """The processes of a data-parallel run: this one is ``rank`` of ``size`` (``World()``: this process alone).

    The collectives below run on every rank of the world, in the same order on each (``torch.distributed``'s
    rule); in a one-process world they return their input.

    Attributes:
        rank: this process's rank, in ``[0, size)``; rank 0 writes checkpoints, progress bars and logs.
        size: number of processes.
        local_rank: rank on this machine (selects the CUDA device ``cuda:local_rank``).
        comm_device: where the small statistics tensors are reduced: ``"cuda"`` for an NCCL-only process group,
            ``"cpu"`` otherwise.

    Examples:
        >>> world = World()
        >>> world.size, world.main, world.sum(torch.tensor([2.0, 3.0])).tolist()
        (1, True, [2.0, 3.0])

    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    comm_device: str = "cpu"

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the process that writes checkpoints, progress bars and logs."""
        return self.rank == 0

    @classmethod
    def current(cls, distributed: bool | None = None) -> World:
        """The world this process trains in.

        Args:
            distributed: ``None`` (default): the default process group when one is initialized, else the one the
                ``torchrun`` environment describes when ``WORLD_SIZE > 1`` (initialized here, see the module
                documentation), else this process alone. ``True``: the same, but a process that is in no process
                group is an error. ``False``: this process alone, whatever the environment (e.g. independent fits
                on every rank).

        Returns:
            The [`World`][pyro_flows.training.World].

        Raises:
            TypeError: ``distributed`` is not a bool or ``None``.
            ValueError: ``distributed=True`` outside a process group, or a malformed ``torchrun`` environment.

        Examples:
            >>> World.current(distributed=False)
            World(rank=0, size=1, local_rank=0, comm_device='cpu')

        """
        if distributed is not None and not isinstance(distributed, bool):
            raise TypeError(f"distributed must be True, False or None, got {distributed!r}")
        if distributed is False:
            return cls()
        available = dist.is_available()
        if not (available and dist.is_initialized()):
            size = _environment_size()
            if size > 1 and available:
                missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
                if missing:
                    raise ValueError(
                        f"WORLD_SIZE={size} is set but the environment lacks {missing}; launch with torchrun"
                    )
                local_rank = int(os.environ.get("LOCAL_RANK", "0"))
                if torch.cuda.is_available():
                    torch.cuda.set_device(local_rank % torch.cuda.device_count())
                dist.init_process_group(backend=default_backend())
            elif distributed:
                raise ValueError(
                    "distributed=True, but no torch.distributed process group is initialized and the torchrun "
                    f"environment ({', '.join(TORCHRUN_VARIABLES)}) does not describe one with WORLD_SIZE > 1"
                )
            else:
                return cls()
        backend = str(dist.get_backend())
        size = dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() % max(1, torch.cuda.device_count())))
        return cls(dist.get_rank(), size, local_rank, "cuda" if backend == "nccl" else "cpu")

    def device(self, device: str | torch.device | None) -> torch.device | None:
        """``device``, with this rank's CUDA device ``cuda:local_rank`` for a bare ``"cuda"`` when distributed."""
        if device is None:
            return None
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and self.size > 1:
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return device

    def sum(self, values: Tensor) -> Tensor:
        """The sum over the ranks of ``values`` (a float64 CPU tensor; exact for counts below $2^{53}$)."""
        values = values.detach().to(torch.float64)
        if self.size == 1:
            return values.cpu()
        total = values.to(self.comm_device, copy=True)
        dist.all_reduce(total)
        return total.cpu()

    def check_same(self, values: Tensor, what: str) -> None:
        """Raise ``ValueError`` on every rank unless ``values`` (e.g. a data fingerprint) is equal on all of them.

        One all-reduce of ``[values, -values]`` with ``MAX`` gives the maximum and minus the minimum over the ranks.
        """
        if self.size == 1:
            return
        values = values.detach().to(self.comm_device, torch.float64).flatten()
        both = torch.cat([values, -values])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        high, low = both[: len(values)], -both[len(values) :]
        if not torch.equal(high, low):
            raise ValueError(
                f"{what} differs across the {self.size} ranks; every rank must pass the same one (to give each rank "
                "its own shard, pass a DataLoader over it, or distributed=False for independent fits)"
            )

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank (any picklable object)."""
        if self.size == 1:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def broadcast_(self, tensors: Sequence[Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's values (one broadcast of their concatenation)."""
        if self.size == 1 or not tensors:
            return
        with torch.no_grad():
            flat = torch.cat([tensor.detach().reshape(-1) for tensor in tensors])
            dist.broadcast(flat, src=0)
            for tensor, part in zip(tensors, flat.split([tensor.numel() for tensor in tensors]), strict=True):
                tensor.copy_(part.view_as(tensor))

    def average(self, loss: Tensor, params: Sequence[Tensor] = ()) -> float:
        r"""The mean over the ranks of ``loss``; with ``params``, their gradients become their mean over the ranks too.

        One all-reduce carries the loss, the gradients and a has-a-gradient flag per tensor: a parameter that has
        no gradient on any rank keeps ``grad = None`` (the optimizer then skips it, as one process would), one that
        has a gradient on some rank gets $\frac1W \sum_r g_r$ (zero where a rank had none).

        Returns:
            The mean loss, a float.

        """
        if self.size == 1:
            return loss.item()
        grads = [param.grad for param in params]
        parts = [loss.detach().reshape(1)]
        parts += [param.new_zeros(param.numel()) if param.grad is None else param.grad.reshape(-1) for param in params]
        parts.append(torch.tensor([g is not None for g in grads], dtype=loss.dtype, device=loss.device))
        flat = torch.cat(parts)
        dist.all_reduce(flat)
        flat /= self.size
        pieces = flat.split([1, *(param.numel() for param in params), len(grads)])
        present = (pieces[-1] > 0).tolist()
        for param, piece, has_grad in zip(params, pieces[1:-1], present, strict=True):
            param.grad = piece.view_as(param).to(param.dtype) if has_grad else None
        return pieces[0].item()
