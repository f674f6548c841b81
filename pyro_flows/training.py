"""The package's one training loop: [`train`][pyro_flows.training.train] (used by density fitting and by SVI).

The loop knows nothing about models: it calls a user *step closure* that returns a scalar loss tensor, and does the
rest: Adam(W) with PyTorch's fused (else foreach) kernel, optional gradient-norm clipping, learning-rate schedules,
a ``tqdm`` bar with the running loss, an optional per-epoch validation with early stopping and restore of the
best parameters, and a check of the loss and gradient norm at every step. A non-finite loss or gradient stops the
run with a `FloatingPointError` naming the step; the parameters are restored first, so they are never left
NaN:

* with validation, to the best validated values (the initial ones before the first validation);
* without, to the last values whose loss and gradient were finite (the initial ones if the first step fails).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pyro_flows._validation import check_real, check_size

__all__ = ["LRSchedule", "TrainOptions", "TrainResult", "check_options", "make_adam", "train"]

logger = logging.getLogger(__name__)

#: ``"cosine"`` (cosine decay to 0 over the epochs), ``"plateau"`` (halve the rate when the monitored loss stalls
#: for ``max(1, patience // 4)`` epochs), a function ``optimizer -> scheduler`` stepped once per epoch, or ``None``.
LRSchedule = Literal["cosine", "plateau"] | Callable[[torch.optim.Optimizer], Any] | None

_RUNNING_DECAY = 0.9


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
) -> TrainResult:
    """Minimize the loss returned by ``step`` over ``params``, epoch by epoch.

    Each optimizer step calls ``step(batch)`` for the next item of ``batches(epoch)`` (one step per epoch with
    ``batch=None`` when ``batches`` is ``None``), back-propagates, checks that the loss and the gradient norm are
    finite, clips the gradient norm to ``grad_clip`` and steps the optimizer. After each epoch ``validate()`` (if
    given) returns the validation loss; the parameters of the best epoch are restored at the end.

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
        progress: show a ``tqdm`` bar over the epochs with the running loss.
        desc: label of the bar and of error messages.

    Returns:
        The [`TrainResult`][pyro_flows.training.TrainResult].

    Raises:
        ValueError: a bad option (named in the message, see [`check_options`][pyro_flows.training.check_options]),
            before any step.
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
    params = [p for p in params if p.requires_grad]
    optimizer = optimizer if optimizer is not None else make_adam(params, lr, weight_decay)
    scheduler = _scheduler(lr_schedule, optimizer, epochs, patience)
    # with validation: the best validated values; without: the values of the last step whose loss was finite
    kept = [p.detach().clone() for p in params]
    kept_what = "the initial values" if validate is not None else "the last finite values"
    result = TrainResult()
    best = math.inf
    since_best = 0
    running: float | None = None
    start = time.perf_counter()

    def fail(what: str, epoch: int) -> FloatingPointError:
        _copy_into(params, kept)
        return FloatingPointError(
            f"{desc}: {what} at epoch {epoch}, step {result.steps}; the parameters were restored to {kept_what}. "
            "Try a smaller lr, grad_clip, or check the model and data for values that overflow"
        )

    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    try:
        for epoch in bar:
            total, count = 0.0, 0
            for batch in batches(epoch) if batches is not None else (None,):
                optimizer.zero_grad(set_to_none=True)
                loss = step(batch)
                loss.backward()
                grads = [p.grad for p in params if p.grad is not None]
                if grad_clip is not None:
                    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
                else:
                    norm = torch.nn.utils.get_total_norm(grads) if grads else loss.new_zeros(())
                value, norm_value = loss.item(), norm.item()
                if not (math.isfinite(value) and math.isfinite(norm_value)):
                    raise fail(f"non-finite loss or gradient (loss {value:.4g}, gradient norm {norm_value:.4g})", epoch)
                if validate is None:
                    _copy_into(kept, params)
                optimizer.step()
                result.steps += 1
                total, count = total + value, count + 1
                running = value if running is None else _RUNNING_DECAY * running + (1 - _RUNNING_DECAY) * value
                if max_steps is not None and result.steps >= max_steps:
                    break
            result.losses.append(total / count)
            result.lrs.append(optimizer.param_groups[0]["lr"])
            postfix = {"loss": f"{running:.4g}"}
            monitored = result.losses[-1]
            if validate is not None:
                monitored = validate()
                if not math.isfinite(monitored):
                    raise fail(f"non-finite validation loss ({monitored})", epoch)
                result.val_losses.append(monitored)
                postfix["val"] = f"{monitored:.4g}"
                if monitored < best:
                    best, since_best, result.best_epoch = monitored, 0, epoch
                    _copy_into(kept, params)
                    kept_what = f"the best validated values (epoch {epoch})"
                else:
                    since_best += 1
            bar.set_postfix(postfix, refresh=False)
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(monitored)
            elif scheduler is not None:
                scheduler.step()
            if validate is not None and patience is not None and since_best >= patience:
                result.stopped_early = True
                break
            if max_steps is not None and result.steps >= max_steps:
                break
    finally:
        bar.close()
    if validate is not None:
        _copy_into(params, kept)
    result.seconds = time.perf_counter() - start
    logger.debug("%s: %d epochs, %d steps, %.2f s", desc, len(result.losses), result.steps, result.seconds)
    return result
