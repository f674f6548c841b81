"""Maximum-likelihood fitting of a `FlowDensity`: `fit_density`.

The data handling lives here (validation split, standardization statistics, shuffled minibatches); the
optimization is the package's one loop, [`pyro_flows.training.train`][pyro_flows.training.train].
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import partial
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pyro_flows._validation import check_size
from pyro_flows.training import TrainOptions, TrainResult, check_options, train

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from pyro_flows.density.flow_density import ArrayLike, FlowDensity

__all__ = ["FitHistory", "fit_density"]

logger = logging.getLogger(__name__)

#: Rows per batch when a data set is scored without gradients (validation, `FlowDensity.evaluate`).
EVAL_BATCH = 8192


class FitHistory(TrainResult):
    """Per-epoch record of `fit_density`: the training loop's `TrainResult`, read as NLLs (nats per point).

    The NLLs are means over data points, in the units of the data.

    Attributes:
        train_nll: mean training NLL of each epoch (averaged over its minibatches, weights changing): ``losses``.
        val_nll: validation NLL after each epoch (empty when no validation data was used): ``val_losses``.
        lr: learning rate used in each epoch: ``lrs``.
        best_epoch: epoch (0-based) whose weights were restored, ``None`` without validation.
        stopped_early: whether training stopped because ``patience`` epochs passed without improvement.
        steps: number of optimizer steps taken.
        seconds: wall time of the fit.

    Examples:
        >>> history = FitHistory(losses=[2.0, 1.5], val_losses=[2.1, 1.7], best_epoch=1)
        >>> history.epochs, history.best_val_nll, history.train_nll
        (2, 1.7, [2.0, 1.5])

    """

    train_nll = property(attrgetter("losses"), doc="Mean training NLL of each epoch (averaged over its minibatches).")
    val_nll = property(attrgetter("val_losses"), doc="Validation NLL after each epoch (empty without validation).")
    lr = property(attrgetter("lrs"), doc="Learning rate used in each epoch.")

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
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(range(1, self.epochs + 1), self.train_nll, label="train")
        if self.val_nll:
            ax.plot(range(1, len(self.val_nll) + 1), self.val_nll, label="validation")
        if self.best_epoch is not None:
            ax.axvline(self.best_epoch + 1, color="grey", linestyle=":", label="restored")
        ax.set_xlabel("epoch")
        ax.set_ylabel("NLL (nats / point)")
        ax.legend()
        return ax


def fit_density(
    density: FlowDensity,
    x: ArrayLike,
    context: ArrayLike | None = None,
    *,
    batch_size: int = 256,
    validation_fraction: float = 0.1,
    validation_data: ArrayLike | tuple[ArrayLike, ArrayLike] | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    seed: int | None = None,
    **options: Unpack[TrainOptions],
) -> FitHistory:
    """Fit ``density`` by maximum likelihood: minibatch Adam(W), validation NLL each epoch, early stopping.

    The validation set is ``validation_data`` if given, else a random ``validation_fraction`` of ``x`` held out
    (rows drawn with ``seed``). Standardization statistics come from the training rows at the first fit and stay
    fixed afterwards. After training the weights of the epoch with the best validation NLL are restored
    (`FitHistory.best_epoch`). The options are checked before anything is changed. The options of the training
    loop (`epochs`, `max_steps`, `lr`, `weight_decay`, `patience`, `lr_schedule`, `grad_clip`: the keys of
    `pyro_flows.training.TrainOptions`) go to `pyro_flows.training.train`, with the defaults below.

    Args:
        density: the [`FlowDensity`][pyro_flows.density.flow_density.FlowDensity] to train (in place).
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
        The [`FitHistory`][pyro_flows.density.fit.FitHistory].

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
    options = {"epochs": 100, "patience": 20, **options}
    check_options(**options)
    check_size(batch_size, "batch_size")
    fraction = validation_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction < 1:
        raise ValueError(f"validation_fraction must be a number in [0, 1), got {fraction!r}")
    if device is not None:
        density.to(device)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    x_train, c_train = density._prepare(x, context, "x")
    x_val = c_val = None
    if validation_data is not None:
        val = validation_data if isinstance(validation_data, tuple) else (validation_data, None)
        x_val, c_val = density._prepare(*val, "validation_data")
    elif fraction > 0 and len(x_train) >= 2:
        order = torch.randperm(len(x_train), generator=generator).to(x_train.device)
        n_val = min(max(1, round(fraction * len(x_train))), len(x_train) - 1)
        held, kept = order[:n_val], order[n_val:]
        x_val, x_train = x_train[held], x_train[kept]
        c_val, c_train = (None, None) if c_train is None else (c_train[held], c_train[kept])
    if density.standardize and not bool(density.standardized):
        density._set_standardization(x_train, c_train)

    def batches(epoch: int) -> Iterator[Tensor]:
        return iter(torch.randperm(len(x_train), generator=generator).to(x_train.device).split(batch_size))

    def step(index: Tensor) -> Tensor:
        return -density.log_prob(x_train[index], None if c_train is None else c_train[index]).mean()

    validate = None if x_val is None else partial(density._mean_nll, x_val, c_val, EVAL_BATCH)
    density.train()
    try:
        result = train(
            step, density.parameters(), batches=batches, validate=validate, progress=progress, desc="fit", **options
        )
    finally:
        density.eval()
        density.clear_cache()
    history = FitHistory(**vars(result))
    logger.info("fit: %d epochs, best validation NLL %s", history.epochs, history.best_val_nll)
    return history
