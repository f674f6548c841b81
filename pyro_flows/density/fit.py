"""Maximum-likelihood fitting of a :class:`~pyro_flows.density.FlowDensity`: :func:`fit_density`.

The data handling lives here (validation split, standardization statistics, shuffled minibatches); the
optimization is the package's one loop, :func:`pyro_flows.training.train`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pyro_flows.training import LRSchedule, check_options, train

if TYPE_CHECKING:
    from pyro_flows.density.flow_density import ArrayLike, FlowDensity

__all__ = ["FitHistory", "fit_density"]

logger = logging.getLogger(__name__)

#: Rows per batch when a data set is scored without gradients (validation, :meth:`FlowDensity.evaluate`).
EVAL_BATCH = 8192


@dataclass
class FitHistory:
    """Per-epoch record of :func:`fit_density` (NLLs are mean nats per data point, data units).

    Attributes:
        train_nll: mean training NLL of each epoch (averaged over its minibatches, weights changing).
        val_nll: validation NLL after each epoch (empty when no validation data was used).
        lr: learning rate used in each epoch.
        best_epoch: epoch (0-based) whose weights were restored, ``None`` without validation.
        stopped_early: whether training stopped because ``patience`` epochs passed without improvement.
        seconds: wall time of the fit.

    Examples:
        >>> history = FitHistory(train_nll=[2.0, 1.5], val_nll=[2.1, 1.7], best_epoch=1)
        >>> history.epochs, history.best_val_nll
        (2, 1.7)

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


def _check_fit_options(batch_size: Any, validation_fraction: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(validation_fraction, bool) or not isinstance(validation_fraction, int | float):
        raise ValueError(f"validation_fraction must be a number in [0, 1), got {validation_fraction!r}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")


def fit_density(
    density: FlowDensity,
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
    """Fit ``density`` by maximum likelihood: minibatch Adam(W), validation NLL each epoch, early stopping.

    The validation set is ``validation_data`` if given, else a random ``validation_fraction`` of ``x`` held out
    (rows drawn with ``seed``). Standardization statistics come from the training rows at the first fit and stay
    fixed afterwards. After training the weights of the epoch with the best validation NLL are restored
    (:attr:`FitHistory.best_epoch`). The options are checked before anything is changed.

    Args:
        density: the :class:`~pyro_flows.density.FlowDensity` to train (in place).
        x: ``(n, dim)`` data (tensor or array).
        context: ``(n, context_dim)`` contexts of a conditional density.
        epochs: maximum number of passes over the training rows.
        max_steps: optional cap on the total number of optimizer steps (≥ 1).
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
        ValueError: a bad option (named in the message), non-finite values (the message names the rows), wrong
            width, empty data or mismatched context rows.
        FloatingPointError: the training loss or its gradient became non-finite; the best weights so far (the
            initial ones before the first validation, the last finite ones without validation) are restored.

    Examples:
        >>> from pyro_flows.density import FlowDensity, two_moons
        >>> density = FlowDensity(2, flow="maf", num_flows=2, hidden_dims=(16,))
        >>> x = two_moons(256, generator=torch.Generator().manual_seed(0))
        >>> history = fit_density(density, x, epochs=2, progress=False, seed=0)
        >>> history.epochs, len(history.val_nll)
        (2, 2)
        >>> fit_density(density, x, epochs=2, patience=0)
        Traceback (most recent call last):
        ...
        ValueError: patience must be a positive integer or None, got 0

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
    _check_fit_options(batch_size, validation_fraction)
    if device is not None:
        density.to(device)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    x_train, c_train = density._prepare(x, context, "x")
    x_val: Tensor | None = None
    c_val: Tensor | None = None
    if validation_data is not None:
        val_x, val_c = validation_data if isinstance(validation_data, tuple) else (validation_data, None)
        x_val, c_val = density._prepare(val_x, val_c, "validation_data")
    elif validation_fraction > 0 and len(x_train) >= 2:
        order = torch.randperm(len(x_train), generator=generator).to(x_train.device)
        n_val = min(max(1, round(validation_fraction * len(x_train))), len(x_train) - 1)
        held, kept = order[:n_val], order[n_val:]
        x_val, x_train = x_train[held], x_train[kept]
        if c_train is not None:
            c_val, c_train = c_train[held], c_train[kept]
    if density.standardize and not bool(density.standardized):
        density._set_standardization(x_train, c_train)

    def batches(epoch: int) -> Iterator[Tensor]:
        order = torch.randperm(len(x_train), generator=generator).to(x_train.device)
        return iter(order.split(batch_size))

    def step(index: Tensor) -> Tensor:
        return -density.log_prob(x_train[index], None if c_train is None else c_train[index]).mean()

    def validate() -> float:
        return density._mean_nll(x_val, c_val, EVAL_BATCH)

    density.train()
    try:
        result = train(
            step,
            density.parameters(),
            epochs=epochs,
            batches=batches,
            max_steps=max_steps,
            lr=lr,
            weight_decay=weight_decay,
            grad_clip=grad_clip,
            lr_schedule=lr_schedule,
            validate=validate if x_val is not None else None,
            patience=patience,
            progress=progress,
            desc="fit",
        )
    finally:
        density.eval()
        density.clear_cache()
    history = FitHistory(
        train_nll=result.losses,
        val_nll=result.val_losses,
        lr=result.lrs,
        best_epoch=result.best_epoch,
        stopped_early=result.stopped_early,
        seconds=result.seconds,
    )
    logger.info(
        "fit: %d epochs (%s), best validation NLL %s at epoch %s, %.1f s",
        history.epochs,
        "stopped early" if history.stopped_early else "all epochs",
        f"{history.best_val_nll:.4f}" if history.best_val_nll is not None else "n/a",
        history.best_epoch,
        history.seconds,
    )
    return history
