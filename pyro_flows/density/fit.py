r"""Maximum-likelihood fitting of a `FlowDensity`: `fit_density`, in one process or data-parallel under ``torchrun``.

The data handling lives here (validation split, standardization statistics, shuffled minibatches, data streamed from
a ``DataLoader``, the shares of the ranks); the optimization is the package's one loop,
[`pyro_flows.training.train`][pyro_flows.training.train].

Data parallelism. Under ``torchrun --nproc_per_node=W`` every process runs the same script; `fit_density` joins the
process group (initializing it with the machine's backend if the script did not, see
[`World.current`][pyro_flows.training.World.current]), wraps the density in ``DistributedDataParallel`` and trains
the same model on every rank. The minimized loss is the NLL of the global batch $B$ (the union of the ranks' shares
$B_r$),

$$
\mathcal L = -\frac{1}{|B|} \sum_{i \in B} \log p(x_i) = \frac1W \sum_r L_r, \qquad
L_r = -\frac{W}{|B|} \sum_{i \in B_r} \log p(x_i),
$$

so the gradient ``DistributedDataParallel`` averages over the ranks is the global batch's, whatever the sizes of the
shares, and every rank takes the same step: the parameters stay identical, and a run on $W$ processes computes what
one process does on the same global batches (up to the order of floating-point sums).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from pyro_flows._validation import check_size
from pyro_flows.training import Checkpoint, TrainOptions, TrainResult, World, check_options, tensors_close, train

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


def _is_stream(data: Any) -> bool:
    """Whether ``data`` is a source of batches (a ``DataLoader`` or another iterable) rather than an array."""
    arrays = (Tensor, Sequence, Mapping, str, bytes)
    return isinstance(data, Iterable) and not isinstance(data, arrays) and not hasattr(data, "__array__")


def _check_stream(data: Any, name: str) -> None:
    if iter(data) is data:
        raise TypeError(
            f"{name} is a one-pass iterator ({type(data).__name__}); fitting needs a new pass every epoch: pass a "
            "DataLoader, or an iterable whose __iter__ starts a new pass"
        )


def _pieces(data: Iterable[Any], density: FlowDensity, name: str) -> Iterator[tuple[Tensor, Tensor | None]]:
    """The checked ``(x, context)`` tensors of the batches of ``data``: tensors, ``(x,)`` or ``(x, context)``."""
    for batch in data:
        if isinstance(batch, list | tuple):
            if len(batch) not in (1, 2):
                raise TypeError(f"each batch of {name} must be x, (x,) or (x, context), got {len(batch)} entries")
            batch = (batch[0], batch[1] if len(batch) == 2 else None)
        else:
            batch = (batch, None)
        yield density._prepare(*batch, f"a batch of {name}")


def _set_epoch(data: Any, epoch: int) -> None:
    """Call ``set_epoch`` on a DataLoader's sampler that has one (``DistributedSampler``: a new order per epoch)."""
    for holder in (data, getattr(data, "batch_sampler", None)):
        set_epoch = getattr(getattr(holder, "sampler", None), "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
            return


def _moments(pieces: Iterable[tuple[Tensor, Tensor | None]], width: int, world: World) -> tuple[Tensor, Tensor]:
    r"""Mean and standard deviation (divisor $n$) of every rank's rows, in float64, exact up to rounding.

    Each rank merges its batches' counts, means and sums of squared deviations $M_2$ with the pairwise rule of Chan,
    Golub and LeVeque (1979), $M_2 = M_{2,a} + M_{2,b} + \delta^2 n_a n_b / n$ with $\delta$ the difference of the
    means; across the ranks the global mean comes from one all-reduce of $(n_r, n_r \bar x_r)$ and
    $M_2 = \sum_r M_{2,r} + n_r (\bar x_r - \bar x)^2$ from a second.
    """
    count, mean, m2 = 0, torch.zeros(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64)
    for x, context in pieces:
        rows = (x if context is None else torch.cat([x, context], dim=1)).to(torch.float64).cpu()
        size, batch_mean = len(rows), rows.mean(0)
        delta, total = batch_mean - mean, count + size
        m2 = m2 + (rows - batch_mean).square().sum(0) + delta.square() * (count * size / total)
        mean, count = mean + delta * (size / total), total
    sums = world.sum(torch.cat([torch.tensor([count], dtype=torch.float64), count * mean]))
    rows = sums[0].item()
    if rows == 0:
        raise ValueError("the data has no rows (every batch of x was empty)")
    global_mean = sums[1:] / rows
    m2 = world.sum(m2 + count * (mean - global_mean).square())
    return global_mean, (m2 / rows).sqrt()


def _fingerprint(x: Tensor, context: Tensor | None) -> Tensor:
    """``[rows, sum, sum of squares]`` of the data in float64, by chunks: equal data give equal fingerprints."""
    total = torch.zeros(3, dtype=torch.float64)
    for values in (x, context) if context is not None else (x,):
        for chunk in values.split(EVAL_BATCH):
            chunk = chunk.to(torch.float64)
            total += torch.stack([chunk.new_tensor(0.0), chunk.sum(), chunk.square().sum()]).cpu()
    total[0] = len(x)
    return total


def _global_mean_nll(density: FlowDensity, pieces: Iterable[tuple[Tensor, Tensor | None]], world: World) -> float:
    """Mean NLL over every rank's pieces: per-rank sums and counts, all-reduced."""
    total = count = 0.0
    for x, context in pieces:
        if len(x):
            total, count = total + density._mean_nll(x, context, EVAL_BATCH) * len(x), count + len(x)
    total, count = world.sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
    if count == 0:
        raise ValueError("validation_data has no rows")
    return total / count


def _run_seed(seed: int | None, saved: dict[str, Any] | None, world: World, needed: bool) -> int | None:
    """The seed of the split and of the batch order: ``seed``, the checkpoint's, or one drawn on rank 0 if ``needed``.

    ``needed``: several ranks must draw the same order, or a checkpoint must be able to redraw it.
    """
    if saved is not None:
        if seed is not None and seed != saved["seed"]:
            raise ValueError(f"seed={seed} differs from the seed {saved['seed']} of the run that wrote the checkpoint")
        return saved["seed"]
    if seed is None and needed:
        return world.broadcast(int(torch.randint(2**62, ()).item()))
    return seed


class _TracedLogDensity:
    """``density(x, context)`` through `torch.jit.trace_module`, where the trace is exact; else the eager call.

    One trace per input shape (the last batch of an epoch is usually shorter), made at the first batch of that
    shape and checked there against the eager call: the log-densities and the gradients of their sum with respect to
    every parameter (`tensors_close`). A failed trace (a family that is not traceable raises) or a failed check
    leaves that shape to the eager call. The traces run without TorchScript's optimization passes, whose cost grows
    faster than the graph.
    """

    def __init__(self, density: FlowDensity) -> None:
        self.density = density
        self.traces: dict[tuple, Any] = {}

    def __call__(self, x: Tensor, context: Tensor | None) -> Tensor:
        inputs = (x,) if context is None else (x, context)
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        if key not in self.traces:
            self.traces[key] = self._trace(inputs)
        traced = self.traces[key]
        if traced is None:
            return self.density(x, context)
        with torch.jit.optimized_execution(False):
            return traced(*inputs)

    def _trace(self, inputs: tuple[Tensor, ...]) -> Any:
        params = [p for p in self.density.parameters() if p.requires_grad]
        try:
            with torch.jit.optimized_execution(False), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace_module(self.density, {"forward": inputs}, check_trace=False)
                checked = []
                for call in (self.density, traced):
                    log_p = call(*inputs)
                    checked.append([log_p.detach(), *torch.autograd.grad(log_p.sum(), params, allow_unused=True)])
        except Exception as err:  # any failure of tracing means: the eager call
            logger.info("fit: the log-density cannot be traced (%s: %s): the eager pass runs", type(err).__name__, err)
            return None
        if not tensors_close(*checked):
            logger.info("fit: the traced log-density differs from the eager one: the eager pass runs")
            return None
        return traced.forward


def fit_density(
    density: FlowDensity,
    x: ArrayLike | Iterable[Any],
    context: ArrayLike | None = None,
    *,
    batch_size: int = 256,
    validation_fraction: float | None = None,
    validation_data: ArrayLike | tuple[ArrayLike, ArrayLike] | Iterable[Any] | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    seed: int | None = None,
    distributed: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    jit: bool = True,
    **options: Unpack[TrainOptions],
) -> FitHistory:
    r"""Fit ``density`` by maximum likelihood: minibatch Adam(W), validation NLL each epoch, early stopping.

    The validation set is ``validation_data`` if given, else a random ``validation_fraction`` of ``x`` held out
    (rows drawn with ``seed``). Standardization statistics come from the training rows at the first fit and stay
    fixed afterwards. After training the weights of the epoch with the best validation NLL are restored
    (`FitHistory.best_epoch`). The options are checked before anything is changed. The options of the training
    loop (`epochs`, `max_steps`, `lr`, `weight_decay`, `patience`, `lr_schedule`, `grad_clip`: the keys of
    `pyro_flows.training.TrainOptions`) go to `pyro_flows.training.train`, with the defaults below.

    **Data that do not fit in memory.** ``x`` may be a ``torch.utils.data.DataLoader`` (or any iterable that starts
    a new pass at each ``iter``) whose batches are tensors ``x``, ``(x,)`` or ``(x, context)`` (a ``TensorDataset``'s
    batches). One pass over it is one epoch and each batch one optimizer step, in the loader's order (shuffle with its
    sampler or generator); ``batch_size``, ``validation_fraction`` and ``seed`` do not apply. When the density is not
    standardized yet, one extra pass before the first epoch computes the statistics (exact, streamed in float64).
    Validation then needs ``validation_data`` (in memory, or a DataLoader too).

    **Data-parallel training under** ``torchrun`` (see the module documentation for the loss). With
    ``distributed=None`` (default) a fit in a process group of $W > 1$ processes, or in the environment of
    ``torchrun --nproc_per_node=W``, trains on all of them: ``DistributedDataParallel`` (gloo on CPU, NCCL on CUDA,
    ``device="cuda"`` meaning each rank's ``cuda:LOCAL_RANK``); the parameters end identical on every rank.

    * In-memory ``x``: every rank passes the same data (checked: a ``ValueError`` on every rank otherwise);
      ``batch_size`` is the *global* batch, each split into $W$ contiguous shares, so the validation split, the
      statistics and the batches are those of a one-process fit with the same seed (drawn on rank 0 and
      broadcast when ``seed`` is ``None``), and its result up to rounding. The validation rows are split across
      the ranks and their NLL all-reduced.
    * A DataLoader ``x``: each rank's loader yields that rank's own shard (e.g. with a
      ``torch.utils.data.DistributedSampler``, whose ``set_epoch`` is called every epoch); a global batch is the
      union of the ranks' $k$-th batches (a rank whose loader ran out contributes nothing until all have), the
      statistics are those of the union of the shards, and a DataLoader ``validation_data`` is the rank's shard of
      the validation set.

    The validation NLL, and with it the best epoch and early stopping, is the same on every rank; only rank 0 shows
    the progress bar, logs and writes the checkpoint.

    **Checkpoints.** With ``checkpoint=path`` the fit saves its state to ``path`` every ``checkpoint_every``
    epochs, and a fit started on an existing file resumes from it: the module's weights and buffers (standardization
    included), the optimizer and schedule, the epoch, the batch order's generator and every rank's random state, the
    best weights and the early-stopping counter (see [`Checkpoint`][pyro_flows.training.Checkpoint]). A killed
    fit restarted with the same arguments thus ends as the uninterrupted fit, and rerunning a finished fit returns its
    history at once. The seed and the in-memory data must be those of the run that wrote the file (a ``ValueError``
    otherwise).

    Args:
        density: the [`FlowDensity`][pyro_flows.density.flow_density.FlowDensity] to train (in place).
        x: ``(n, dim)`` data (tensor or array), or a DataLoader of batches (see above).
        context: ``(n, context_dim)`` contexts of a conditional density (``None`` with a DataLoader: its batches
            carry the contexts).
        epochs: maximum number of passes over the training rows.
        max_steps: optional cap on the total number of optimizer steps (≥ 1).
        batch_size: minibatch size (the global one across the ranks); not used with a DataLoader.
        lr: Adam learning rate.
        weight_decay: decoupled weight decay (AdamW); 0 for plain Adam.
        validation_fraction: fraction of ``x`` held out when ``validation_data`` is ``None`` (0: no validation,
            no early stopping, the last weights are kept); default 0.1 for in-memory ``x``, 0 for a DataLoader (the
            only value it takes).
        validation_data: ``x_val``, ``(x_val, context_val)``, or a DataLoader of validation batches.
        patience: stop after this many epochs without a better validation NLL (``None``: never stop early).
        lr_schedule: ``"cosine"`` (cosine decay to 0 over ``epochs``), ``"plateau"`` (halve the rate when the
            validation NLL stalls for ``max(1, patience // 4)`` epochs), a function ``optimizer -> scheduler``
            stepped once per epoch, or ``None``.
        grad_clip: clip the gradient norm to this value (``None``: no clipping).
        progress: show a ``tqdm`` progress bar over epochs (on rank 0).
        device: move the module (and the data) there before training.
        seed: seed of the validation split and of the minibatch order (``None``: torch's global generator).
        distributed: ``None``: data-parallel when run in a process group of several processes (see above);
            ``True``: the same, an error outside one; ``False``: this process alone, whatever the environment.
        checkpoint: a file to save the fit's state to and resume from (``None``: no checkpoint).
        checkpoint_every: save the checkpoint every this many epochs (and after the last one).
        jit: compute the training batches' log-density through `torch.jit.trace` where the trace is exact
            (one trace per batch shape, checked against the eager pass at its first batch: values and gradients;
            the eager pass otherwise, and always under data parallelism). The run takes the eager run's steps,
            faster (`benchmarks/README.md`).

    Returns:
        The [`FitHistory`][pyro_flows.density.fit.FitHistory] (identical on every rank).

    Raises:
        ValueError: a bad option (named in the message), non-finite values (the message names the rows), wrong
            width, empty data, mismatched context rows, in-memory data that differ across the ranks, or a checkpoint
            that is not one or was written for other data, seed or parameter shapes.
        TypeError: a bad ``checkpoint`` or ``distributed``, a one-pass iterator for ``x``, or malformed batches.
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

        From a DataLoader, one pass per epoch:

        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> loader = DataLoader(TensorDataset(x), batch_size=64, shuffle=True)
        >>> history = fit_density(FlowDensity(2, flow="maf", num_flows=2), loader, epochs=2, progress=False)
        >>> history.steps
        8

    """
    options = {"epochs": 100, "patience": 20, **options}
    check_options(**options)
    if not isinstance(jit, bool):
        raise TypeError(f"jit must be True or False, got {jit!r}")
    check_size(batch_size, "batch_size")
    check_size(checkpoint_every, "checkpoint_every")
    for name, data in (("x", x), ("validation_data", validation_data)):
        if isinstance(data, Dataset) and not _is_stream(data):
            raise TypeError(f"{name} is a map-style Dataset; pass DataLoader({name}, batch_size=...) instead")
    streamed = _is_stream(x)
    fraction = validation_fraction if validation_fraction is not None else 0.0 if streamed else 0.1
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction < 1:
        raise ValueError(f"validation_fraction must be a number in [0, 1), got {fraction!r}")
    if streamed:
        _check_stream(x, "x")
        if context is not None:
            raise ValueError("context must be None when x is a DataLoader: its batches carry the contexts")
        if fraction > 0:
            raise ValueError("validation_fraction needs in-memory x; with a DataLoader pass validation_data")
    val_streamed = validation_data is not None and _is_stream(validation_data)
    if val_streamed:
        _check_stream(validation_data, "validation_data")
    store = None if checkpoint is None else Checkpoint(checkpoint, checkpoint_every)
    world = World.current(distributed)
    saved = store.load(world) if store is not None else None
    extra = None if saved is None else saved["extra"]
    device = world.device(device)
    if device is not None:
        density.to(device)
    seed = _run_seed(seed, extra, world, needed=store is not None or world.size > 1)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    fingerprint = x_train = c_train = x_val = c_val = None
    if not streamed:
        x_train, c_train = density._prepare(x, context, "x")
        if world.size > 1 or store is not None:  # to compare the ranks' data, or a resumed run's with the saved
            fingerprint = _fingerprint(x_train, c_train)
            world.check_same(fingerprint, "x (with its context)")
        if extra is not None and (extra["data"] is None or not torch.equal(fingerprint, extra["data"])):
            raise ValueError(f"x differs from the data of the run that wrote the checkpoint {str(checkpoint)!r}")
    if validation_data is not None and not val_streamed:
        val = validation_data if isinstance(validation_data, tuple) else (validation_data, None)
        x_val, c_val = density._prepare(*val, "validation_data")
        if world.size > 1:
            world.check_same(_fingerprint(x_val, c_val), "validation_data")
    elif not streamed and fraction > 0 and len(x_train) >= 2:
        order = torch.randperm(len(x_train), generator=generator).to(x_train.device)
        n_val = min(max(1, round(fraction * len(x_train))), len(x_train) - 1)
        held, kept = order[:n_val], order[n_val:]
        x_val, x_train = x_train[held], x_train[kept]
        c_val, c_train = (None, None) if c_train is None else (c_train[held], c_train[kept])
    if extra is not None:
        try:
            density.load_state_dict(extra["module"])
        except RuntimeError as error:
            raise ValueError(f"checkpoint {str(checkpoint)!r} holds the state of another density: {error}") from None
        if generator is not None:
            generator.set_state(extra["generator"])

    def extra_state() -> dict[str, Any]:
        order = None if generator is None else generator.get_state()
        return {"module": density.state_dict(), "generator": order, "seed": seed, "data": fingerprint}

    if store is not None:
        store.state = extra_state

    if density.standardize and not bool(density.standardized):
        if streamed:
            width = density.dim + density.context_dim
            mean, sd = _moments(_pieces(x, density, "x"), width, world)
            context_moments = (mean[density.dim :], sd[density.dim :]) if density.context_dim else None
            density._use_moments((mean[: density.dim], sd[: density.dim]), context_moments)
        else:
            density._set_standardization(x_train, c_train)

    dummy = (density.data_shift.new_zeros(1, density.dim), None)  # a rank without rows this step still runs DDP
    if density.context_dim:
        dummy = (dummy[0], density.data_shift.new_zeros(1, density.context_dim))

    def shares(epoch: int) -> Iterator[tuple[Tensor, Tensor | None, float | None]]:
        """In-memory data: a global batch per step, this rank's share of it and the share's loss scale."""
        for index in torch.randperm(len(x_train), generator=generator).to(x_train.device).split(batch_size):
            if world.size > 1:
                scale = world.size / len(index)
                index = index.tensor_split(world.size)[world.rank]
                if not len(index):
                    index, scale = index.new_zeros(1), 0.0
            else:
                scale = None
            yield x_train[index], None if c_train is None else c_train[index], scale

    def streamed_batches(epoch: int) -> Iterator[tuple[Tensor, Tensor | None, float | None]]:
        """A DataLoader: this rank's next batch per step, scaled by the global number of rows of the step."""
        _set_epoch(x, epoch)
        pieces = _pieces(x, density, "x")
        if world.size == 1:
            yield from ((points, contexts, None) for points, contexts in pieces)
            return
        while True:
            piece = next(pieces, None)
            rows = world.sum(torch.tensor([0.0 if piece is None else len(piece[0])])).item()
            if rows == 0:
                return
            yield (*dummy, 0.0) if piece is None else (*piece, world.size / rows)

    model = density
    if world.size > 1:
        place = density.data_shift.device
        model = DistributedDataParallel(density, device_ids=[place.index] if place.type == "cuda" else None)
        # the buffers (standardization, permutations, masks) are fixed while training: synced once, at construction
        model.broadcast_buffers = False

    forward = _TracedLogDensity(density) if jit and world.size == 1 else model

    def step(batch: tuple[Tensor, Tensor | None, float | None]) -> Tensor:
        points, contexts, scale = batch
        log_p = forward(points, contexts)
        return -log_p.mean() if scale is None else -log_p.sum() * scale

    def validate() -> float:
        if val_streamed:
            return _global_mean_nll(density, _pieces(validation_data, density, "validation_data"), world)
        if world.size == 1:
            return density._mean_nll(x_val, c_val, EVAL_BATCH)
        share = (
            x_val.tensor_split(world.size)[world.rank],
            None if c_val is None else c_val.tensor_split(world.size)[world.rank],
        )
        return _global_mean_nll(density, [share], world)

    density.train()
    try:
        result = train(
            step,
            density.parameters(),
            batches=streamed_batches if streamed else shares,
            validate=validate if val_streamed or x_val is not None else None,
            progress=progress,
            desc="fit",
            world=world,
            gradients_reduced=True,
            checkpoint=store,
            **options,
        )
    finally:
        density.eval()
        density.clear_cache()
    history = FitHistory(**vars(result))
    if world.main:
        logger.info("fit: %d epochs, best validation NLL %s", history.epochs, history.best_val_nll)
    return history
