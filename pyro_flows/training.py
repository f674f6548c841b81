r"""The package's one training loop: [`train`][pyro_flows.training.train] (used by density fitting and by SVI).

The loop knows nothing about models: it calls a user *step closure* that returns a scalar loss tensor, and does the
rest: Adam(W) with PyTorch's fused (else foreach) kernel, optional gradient-norm clipping, learning-rate schedules,
a ``tqdm`` bar with the running loss, an optional per-epoch validation with early stopping and restore of the
best parameters, and a check of the loss and gradient norm at every step. A non-finite loss or gradient stops the
run with a `FloatingPointError` naming the step; the parameters are restored first, so they are never left
NaN:

* with validation, to the best validated values (the initial ones before the first validation);
* without, to the last values whose loss and gradient were finite (the initial ones if the first step fails).

Data parallelism. Given a [`World`][pyro_flows.training.World] of several processes (``torchrun``), every rank runs
the same loop on its own share of each batch: the step's loss on rank $r$ is $L_r$, scaled so that the mean
$\frac1W \sum_r L_r$ is the loss of the whole (global) batch; the gradients are averaged over the ranks after each
backward (by ``DistributedDataParallel`` inside it, or here with one all-reduce), so every rank takes the same
optimizer step and the parameters stay identical. The loss the loop records, checks and shows is the global mean,
the validation loss must be the same on every rank (an all-reduced one), so the finite checks, the best epoch and
early stopping are decided identically everywhere; only rank 0 shows the progress bar, logs and writes checkpoints.

Checkpoints. With a [`Checkpoint`][pyro_flows.training.Checkpoint], the loop saves its whole state every few epochs
and a run started on an existing file resumes after its last saved epoch, so that a killed and restarted run ends as
the uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from pyro_flows._distributed import World
from pyro_flows._validation import check_real, check_size

__all__ = [
    "Checkpoint",
    "LRSchedule",
    "TrainOptions",
    "TrainResult",
    "World",
    "check_options",
    "make_adam",
    "tensors_close",
    "train",
]

logger = logging.getLogger(__name__)

#: ``"cosine"`` (cosine decay to 0 over the epochs), ``"plateau"`` (halve the rate when the monitored loss stalls
#: for ``max(1, patience // 4)`` epochs), a function ``optimizer -> scheduler`` stepped once per epoch, or ``None``.
LRSchedule = Literal["cosine", "plateau"] | Callable[[torch.optim.Optimizer], Any] | None

_RUNNING_DECAY = 0.9

#: Tag of the files that `Checkpoint` writes.
_FORMAT = "pyro_flows.training/1"


class TrainOptions(TypedDict, total=False):
    """The options of `train` that `check_options` validates, as keyword arguments (`fit_density` forwards them)."""

    epochs: int
    max_steps: int | None
    lr: float
    weight_decay: float
    grad_clip: float | None
    patience: int | None
    lr_schedule: LRSchedule


@dataclass
class TrainResult:
    """What [`train`][pyro_flows.training.train] did, one entry per epoch.

    Attributes:
        losses: mean training loss of each epoch (averaged over its steps).
        val_losses: validation loss after each epoch (empty without validation).
        lrs: learning rate of the first parameter group during each epoch.
        best_epoch: epoch (0-based) whose parameters were restored, ``None`` without validation.
        stopped_early: whether ``patience`` epochs passed without a better validation loss.
        steps: number of optimizer steps taken.
        seconds: wall time of the run.

    """

    losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False
    steps: int = 0
    seconds: float = 0.0


def check_options(
    *,
    epochs: int,
    max_steps: int | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    grad_clip: float | None = None,
    patience: int | None = None,
    lr_schedule: LRSchedule = None,
) -> None:
    """Validate the options of `train` (called by it; callers call it first to fail before side effects).

    Raises:
        ValueError: a bad option; the message names it.

    Examples:
        >>> check_options(epochs=10, lr=1e-3, grad_clip=5.0)
        >>> check_options(epochs=10, grad_clip=0.0)
        Traceback (most recent call last):
        ...
        ValueError: grad_clip must be a positive finite number or None, got 0.0

    """
    check_size(epochs, "epochs")
    check_size(max_steps, "max_steps", optional=True)
    check_size(patience, "patience", optional=True)
    check_real(lr, "lr", positive=True)
    check_real(grad_clip, "grad_clip", positive=True, optional=True)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, int | float) or not 0 <= weight_decay < math.inf:
        raise ValueError(f"weight_decay must be a non-negative finite number, got {weight_decay!r}")
    if lr_schedule not in (None, "cosine", "plateau") and not callable(lr_schedule):
        raise ValueError(f"lr_schedule must be 'cosine', 'plateau', a callable or None, got {lr_schedule!r}")


def make_adam(params: Iterable[Tensor], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam (AdamW with weight decay) with the fused kernel where the parameters allow it, else the foreach one.

    Examples:
        >>> weight = torch.zeros(3, requires_grad=True)
        >>> type(make_adam([weight], lr=1e-2, weight_decay=1e-4)).__name__
        'AdamW'

    """
    params = list(params)
    kind = torch.optim.AdamW if weight_decay > 0 else torch.optim.Adam
    try:
        return kind(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return kind(params, lr=lr, weight_decay=weight_decay, foreach=True)


#: Relative tolerance of a traced computation against the eager one (float32 sums reordered).
TRACE_RTOL = 1e-4


def tensors_close(eager: Sequence[Tensor | None], traced: Sequence[Tensor | None], rtol: float = TRACE_RTOL) -> bool:
    """Whether each traced tensor equals its eager one within ``rtol`` of the eager tensor's largest entry.

    The check of the traced paths (`fit`'s ELBO, `fit_density`'s log-density): losses and gradients, ``None`` for a
    parameter without one.
    """
    for a, b in zip(eager, traced, strict=True):
        if (a is None) != (b is None):
            return False
        if a is not None and a.numel():
            scale = float(a.abs().max())
            if not (math.isfinite(scale) and float((a - b).abs().max()) <= rtol * max(scale, 1e-12)):
                return False
    return True


def _scheduler(schedule: LRSchedule, optimizer: torch.optim.Optimizer, epochs: int, patience: int | None) -> Any | None:
    if schedule is None:
        return None
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if schedule == "plateau":
        wait = max(1, (patience or 20) // 4)
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=wait)
    return schedule(optimizer)


def _copy_into(targets: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
    with torch.no_grad():
        for target, source in zip(targets, sources, strict=True):
            target.copy_(source)


def _rng_state() -> dict[str, Any]:
    """The random number generators of this process: torch (CPU and initialized CUDA devices), ``random``, NumPy."""
    name, keys, *position = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    state["numpy"] = [name, torch.from_numpy(keys.astype(np.int64)), *position]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *position = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *position))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoint:
    r"""The file a [`train`][pyro_flows.training.train] run saves its state to, and resumes from.

    Saved after every ``every``-th epoch and after the last one: the parameters, the optimizer's and the learning-rate
    schedule's state, the epoch and step counts, the history so far, the best validated parameters and the
    early-stopping counter, the random number generators of every rank (torch, CUDA, ``random``, NumPy; a resume on
    another number of processes gives rank $r$ the state of rank $r \bmod W_{saved}$), and the caller's ``state()``.
    A run given an existing file continues after its last saved epoch (the epoch that was running when it was killed
    is redone from its start), so a killed run restarted with the same arguments ends exactly as the uninterrupted
    run would; on a finished run's file it returns at once. A resumed run keeps the saved optimizer settings (its
    learning rate included), as ``torch.optim.Optimizer.load_state_dict`` does.

    Rank 0 writes the file (to a temporary file beside it, then renamed over it: a run killed while saving leaves the
    previous checkpoint whole) and reads it when resuming, then broadcasts it: only rank 0 needs to see the file. It
    loads with ``torch.load(path, weights_only=True)``.

    Args:
        path: the file (its directory must exist).
        every: save after every ``every``-th epoch (and after the last one).
        state: ``() -> dict`` of the caller's own state to save with the loop's (tensors, numbers, strings, lists,
            dicts), read back from `load`'s ``"extra"`` entry; called on rank 0 only.

    Raises:
        TypeError: ``path`` is not a ``str`` or ``os.PathLike``.
        ValueError: a bad ``every``.

    Examples:
        >>> import tempfile
        >>> weight = torch.zeros(2, requires_grad=True)
        >>> def loss(_):
        ...     return (weight - torch.tensor([1.0, -2.0])).square().sum()
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = f"{folder}/run.pt"
        ...     first = train(loss, [weight], epochs=50, lr=0.05, progress=False, checkpoint=Checkpoint(path))
        ...     # a rerun on the finished run's file returns its result without a step
        ...     again = train(loss, [weight], epochs=50, lr=0.05, progress=False, checkpoint=Checkpoint(path))
        >>> again.steps, again.losses == first.losses
        (50, True)
        >>> Checkpoint(3)
        Traceback (most recent call last):
        ...
        TypeError: checkpoint must be a file path (str or os.PathLike), got int

    """

    def __init__(self, path: str | os.PathLike, every: int = 1, state: Callable[[], dict] | None = None) -> None:
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"checkpoint must be a file path (str or os.PathLike), got {type(path).__name__}")
        self.path = Path(path)
        self.every = check_size(every, "checkpoint_every")
        self.state = state
        self._loaded: tuple[dict[str, Any] | None] | None = None

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        """``(contents or None, error message or None)``, on rank 0."""
        if self.path.is_dir() or not self.path.parent.is_dir():
            return None, f"checkpoint must be a file in an existing directory, got {str(self.path)!r}"
        if not self.path.exists():
            return None, None
        try:
            contents = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # a foreign or truncated file: report it on every rank
            return None, f"checkpoint {str(self.path)!r} cannot be read ({type(error).__name__}: {error})"
        if not isinstance(contents, dict) or contents.get("format") != _FORMAT:
            return None, f"checkpoint {str(self.path)!r} is not a pyro_flows training checkpoint"
        return contents, None

    def load(self, world: World | None = None) -> dict[str, Any] | None:
        """The saved state (``None`` when the file does not exist yet), read once by rank 0 and broadcast.

        Call it on every rank of ``world``; later calls return the same dictionary without a collective.

        Raises:
            ValueError: the path is a directory or in a directory that does not exist, or the file is not a
                training checkpoint (on every rank).

        """
        if self._loaded is None:
            world = world if world is not None else World()
            contents, error = world.broadcast(self._read() if world.main else None)
            if error is not None:
                raise ValueError(error)
            self._loaded = (contents,)
        return self._loaded[0]

    def save(self, world: World, contents: Callable[[], dict[str, Any]]) -> None:
        """Write ``contents()``, every rank's random state and the caller's ``state()`` (call it on every rank)."""
        rng = world.gather(_rng_state())
        if not world.main:
            return
        everything = {
            "format": _FORMAT,
            **contents(),
            "rng": rng,
            "extra": None if self.state is None else self.state(),
        }
        partial = self.path.with_name(self.path.name + ".partial")
        torch.save(everything, partial)
        os.replace(partial, self.path)
        logger.debug("checkpoint saved to %s (epoch %d)", self.path, everything["epoch"])


@dataclass
class _Progress:
    """The loop's state besides parameters and optimizer: what a checkpoint stores to resume."""

    result: TrainResult
    kept_what: str
    epoch: int = 0  # the next epoch to run
    best: float = math.inf
    since_best: int = 0
    running: float | None = None


def _resume(
    saved: dict[str, Any],
    path: Path,
    params: Sequence[Tensor],
    kept: Sequence[Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    world: World,
) -> _Progress:
    """Restore a saved loop state into the parameters, the optimizer, the schedule and the generators."""
    shapes, saved_shapes = [tuple(p.shape) for p in params], [tuple(t.shape) for t in saved["params"]]
    if shapes != saved_shapes:
        raise ValueError(
            f"checkpoint {str(path)!r} holds parameters of shapes {saved_shapes}, this run trains {shapes}; "
            "pass another path, or delete the file to start afresh"
        )
    _copy_into(params, saved["params"])
    _copy_into(kept, saved["kept"])
    optimizer.load_state_dict(saved["optimizer"])
    if saved["scheduler"] is not None and hasattr(scheduler, "load_state_dict"):
        scheduler.load_state_dict(saved["scheduler"])
    states = saved["rng"]
    if len(states) != world.size:
        logger.warning("resuming %d saved random states on %d processes", len(states), world.size)
    _set_rng_state(states[world.rank % len(states)])
    progress = dict(saved["progress"])
    return _Progress(result=TrainResult(**progress.pop("result")), **progress)


def train(
    step: Callable[[Any], Tensor],
    params: Iterable[Tensor],
    *,
    epochs: int,
    batches: Callable[[int], Iterable[Any]] | None = None,
    max_steps: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    grad_clip: float | None = None,
    lr_schedule: LRSchedule = None,
    validate: Callable[[], float] | None = None,
    patience: int | None = None,
    progress: bool = True,
    desc: str = "train",
    world: World | None = None,
    gradients_reduced: bool = False,
    checkpoint: Checkpoint | None = None,
) -> TrainResult:
    r"""Minimize the loss returned by ``step`` over ``params``, epoch by epoch.

    Each optimizer step calls ``step(batch)`` for the next item of ``batches(epoch)`` (one step per epoch with
    ``batch=None`` when ``batches`` is ``None``), back-propagates, checks that the loss and the gradient norm are
    finite, clips the gradient norm to ``grad_clip`` and steps the optimizer. After each epoch ``validate()`` (if
    given) returns the validation loss; the parameters of the best epoch are restored at the end.

    In a ``world`` of $W > 1$ processes (see the module documentation) every rank calls this with the same
    options and the same number of batches per epoch; ``step`` returns the rank's loss $L_r$ such that
    $\frac1W \sum_r L_r$ is the loss of the global batch, and ``validate`` a value equal on every rank.

    Args:
        step: ``batch -> loss``, a scalar tensor to minimize (the loop zeroes the gradients and calls ``backward``).
        params: the tensors to optimize (when ``optimizer`` is given: the ones it updates, used for clipping,
            checks and restores).
        epochs: maximum number of epochs.
        batches: ``epoch -> iterable of batches`` handed to ``step`` in turn.
        max_steps: optional cap on the total number of optimizer steps.
        optimizer: a torch optimizer over ``params`` (default: [`make_adam`][pyro_flows.training.make_adam] with ``lr``
            and ``weight_decay``).
        lr: learning rate of the default optimizer.
        weight_decay: decoupled weight decay of the default optimizer (AdamW); 0 for plain Adam.
        grad_clip: clip the total gradient norm to this value (``None``: no clipping).
        lr_schedule: see `LRSchedule`; ``"plateau"`` watches the validation loss (else the training loss).
        validate: ``() -> float``, the validation loss after each epoch (``None``: no validation).
        patience: with ``validate``, stop after this many epochs without a better validation loss (``None``:
            never stop early).
        progress: show a ``tqdm`` bar over the epochs with the running loss (on rank 0).
        desc: label of the bar and of error messages.
        world: the processes to train across (``None``: this one alone); see
            [`World.current`][pyro_flows.training.World.current].
        gradients_reduced: the backward of ``step`` already averages the gradients over ``world``, as
            ``torch.nn.parallel.DistributedDataParallel`` does; otherwise the loop all-reduces them after each
            backward (one all-reduce with the loss).
        checkpoint: save the loop's state there every few epochs, and resume from it when the file exists (see
            [`Checkpoint`][pyro_flows.training.Checkpoint]).

    Returns:
        The [`TrainResult`][pyro_flows.training.TrainResult] (its ``seconds`` add up over resumed runs).

    Raises:
        ValueError: a bad option (named in the message, see [`check_options`][pyro_flows.training.check_options]),
            before any step; a checkpoint that cannot be read or holds other parameter shapes.
        FloatingPointError: a non-finite loss, gradient or validation loss; the parameters are restored first
            (see the module documentation).

    Examples:
        >>> weight = torch.zeros(2, requires_grad=True)
        >>> target = torch.tensor([1.0, -2.0])
        >>> result = train(lambda _: (weight - target).square().sum(), [weight], epochs=300, lr=0.05, progress=False)
        >>> result.steps, torch.allclose(weight, target, atol=1e-2)
        (300, True)
        >>> train(lambda _: (weight.sum() + 1.0) / 0.0, [weight], epochs=5, progress=False)
        Traceback (most recent call last):
        ...
        FloatingPointError: train: non-finite loss or gradient (loss nan, gradient norm inf) at epoch 0, step 0; ...
        >>> torch.allclose(weight, target, atol=1e-2)  # left at the last finite values
        True

    """
    check_options(
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        patience=patience,
        lr_schedule=lr_schedule,
    )
    world = world if world is not None else World()
    params = [p for p in params if p.requires_grad]
    optimizer = optimizer if optimizer is not None else make_adam(params, lr, weight_decay)
    scheduler = _scheduler(lr_schedule, optimizer, epochs, patience)
    # with validation: the best validated values; without: the values of the last step whose loss was finite
    kept = [p.detach().clone() for p in params]
    state = _Progress(TrainResult(), "the initial values" if validate is not None else "the last finite values")
    saved = checkpoint.load(world) if checkpoint is not None else None
    if saved is not None:
        state = _resume(saved, checkpoint.path, params, kept, optimizer, scheduler, world)
    result = state.result
    earlier_seconds = result.seconds
    start = time.perf_counter()

    def fail(what: str, epoch: int) -> FloatingPointError:
        _copy_into(params, kept)
        return FloatingPointError(
            f"{desc}: {what} at epoch {epoch}, step {result.steps}; the parameters were restored to "
            f"{state.kept_what}. Try a smaller lr, grad_clip, or check the model and data for values that overflow"
        )

    def out_of_steps() -> bool:
        return max_steps is not None and result.steps >= max_steps

    def contents() -> dict[str, Any]:
        result.seconds = earlier_seconds + time.perf_counter() - start
        progress_state = {name: value for name, value in vars(state).items() if name != "result"}
        return {
            "epoch": state.epoch,
            "progress": {**progress_state, "result": dict(vars(result))},
            "params": [p.detach().cpu().clone() for p in params],
            "kept": [k.cpu().clone() for k in kept],
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if hasattr(scheduler, "state_dict") else None,
        }

    remaining = range(0) if result.stopped_early or out_of_steps() else range(state.epoch, epochs)
    bar = tqdm(
        remaining, desc=desc, disable=not (progress and world.main), leave=False, initial=state.epoch, total=epochs
    )
    try:
        for epoch in bar:
            total, count = 0.0, 0
            for batch in batches(epoch) if batches is not None else (None,):
                optimizer.zero_grad(set_to_none=True)
                loss = step(batch)
                loss.backward()
                value = world.average(loss, () if gradients_reduced else params)
                grads = [p.grad for p in params if p.grad is not None]
                if grad_clip is not None:
                    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
                else:
                    norm = torch.nn.utils.get_total_norm(grads) if grads else loss.new_zeros(())
                norm_value = norm.item()
                if not (math.isfinite(value) and math.isfinite(norm_value)):
                    raise fail(f"non-finite loss or gradient (loss {value:.4g}, gradient norm {norm_value:.4g})", epoch)
                if validate is None:
                    _copy_into(kept, params)
                optimizer.step()
                result.steps += 1
                total, count = total + value, count + 1
                state.running = (
                    value if state.running is None else _RUNNING_DECAY * state.running + (1 - _RUNNING_DECAY) * value
                )
                if out_of_steps():
                    break
            result.losses.append(total / count)
            result.lrs.append(optimizer.param_groups[0]["lr"])
            postfix = {"loss": f"{state.running:.4g}"}
            monitored = result.losses[-1]
            if validate is not None:
                monitored = validate()
                if not math.isfinite(monitored):
                    raise fail(f"non-finite validation loss ({monitored})", epoch)
                result.val_losses.append(monitored)
                postfix["val"] = f"{monitored:.4g}"
                if monitored < state.best:
                    state.best, state.since_best, result.best_epoch = monitored, 0, epoch
                    _copy_into(kept, params)
                    state.kept_what = f"the best validated values (epoch {epoch})"
                else:
                    state.since_best += 1
            bar.set_postfix(postfix, refresh=False)
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(monitored)
            elif scheduler is not None:
                scheduler.step()
            state.epoch = epoch + 1
            result.stopped_early = validate is not None and patience is not None and state.since_best >= patience
            finished = result.stopped_early or out_of_steps() or state.epoch == epochs
            if checkpoint is not None and (finished or state.epoch % checkpoint.every == 0):
                checkpoint.save(world, contents)
            if result.stopped_early or out_of_steps():
                break
    finally:
        bar.close()
    if validate is not None:
        _copy_into(params, kept)
    result.seconds = earlier_seconds + time.perf_counter() - start
    if world.main:
        logger.debug("%s: %d epochs, %d steps, %.2f s", desc, len(result.losses), result.steps, result.seconds)
    return result
