r"""Fit a guide with SVI while recording the ELBO trace (in one process or data-parallel), and plot the trace.

Data-parallel SVI. Under ``torchrun --nproc_per_node=W`` each rank runs the same script on its own shard of the data,
with the model written as for one process: its data plate covers the rank's shard $S_r$ (its ``size`` is the shard's,
with or without ``subsample_size``). [`fit_svi`][pyro_flows.diagnostics.elbo.fit_svi] with
``shard_plate="that plate's name"`` multiplies the log-densities of the sites inside that plate (model and guide) by
$W$, so that rank $r$ minimizes

$$
L_r = \mathbb E_q\left[\log q(z) - \log p(z)\right] - W \sum_{i \in S_r} \mathbb E_q \log p(x_i \mid z)
$$

(the shard's sum being estimated from the subsample as usual), and averages the gradients over the ranks after each
step: $\frac1W \sum_r L_r$ is (an unbiased estimate of) the full data's negative ELBO, each rank contributing its
shard's likelihood once and the global terms once in all, whatever the sizes of the shards. Every rank thus takes the
same step and the parameters stay identical (they start from rank 0's values: a guide whose set-up looks at the data,
such as `AutoFlow`'s Laplace start, starts from rank 0's shard). With the same random seed on every rank and a guide
whose set-up does not depend on the data (e.g. ``AutoFlow(..., start="cold")``), the draws of the global latents
coincide: without subsampling, the run is then the one-process run on all the data (up to rounding). With different
draws per rank (another seed per rank, e.g. ``seed + rank``, or a data-dependent set-up) each step also averages $W$
independent draws.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import JitTrace_ELBO, Trace_ELBO
from pyro.infer.elbo import ELBO
from pyro.optim import PyroOptim
from pyro.optim.lr_scheduler import PyroLRScheduler
from pyro.poutine.messenger import Messenger
from torch import Tensor

from pyro_flows._validation import check_size
from pyro_flows.training import Checkpoint, World, check_options, make_adam, tensors_close, train

__all__ = ["ELBOTrace", "differentiable_loss", "fit_svi", "plot_elbo", "svi_parameters", "traced_if_exact"]

logger = logging.getLogger(__name__)


@dataclass
class ELBOTrace:
    """The per-step ELBO estimates of an SVI run (``elbo[t] = -loss[t]``), in nats.

    Attributes:
        elbo: one ELBO estimate per step.
        seconds: wall-clock time of the run.

    """

    elbo: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def record(self, loss: float) -> None:
        """Append the ELBO of one step from its SVI loss (the negative ELBO)."""
        self.elbo.append(-float(loss))

    def smoothed(self, window: int | None = None) -> np.ndarray:
        """Running mean of the trace over ``window`` steps (default: 2 % of the run, at least 1)."""
        values = np.asarray(self.elbo, dtype=np.float64)
        if values.size == 0:
            return values
        window = window or max(1, values.size // 50)
        kernel = np.ones(window) / window
        padded = np.concatenate([np.full(window - 1, values[0]), values])
        return np.convolve(padded, kernel, mode="valid")

    def final(self, last: int = 100) -> float:
        """Mean ELBO over the last ``last`` steps (a less noisy summary than the last step)."""
        if not self.elbo:
            return math.nan
        return float(np.mean(self.elbo[-last:]))

    def plot(self, ax: Any = None, label: str | None = None, window: int | None = None) -> Any:
        """Plot the trace; see [`plot_elbo`][pyro_flows.diagnostics.elbo.plot_elbo]."""
        return plot_elbo(self, ax=ax, label=label, window=window)


def _torch_optimizer(optim: PyroOptim, params: list[Tensor]) -> torch.optim.Optimizer:
    """The torch optimizer that ``optim`` builds, over all of ``params`` (one group each for per-parameter args).

    Raises:
        TypeError: a Pyro learning-rate scheduler, or an optimizer with Pyro's per-parameter ``clip_args``.

    """
    if isinstance(optim, PyroLRScheduler) or optim.pt_clip_args:
        raise TypeError(
            "fit_svi takes a plain Pyro optimizer (e.g. pyro.optim.Adam or ClippedAdam): for clipping use "
            "grad_clip=, for a learning-rate schedule a scheduler-free optimizer with a decay (ClippedAdam's lrd)"
        )
    if callable(optim.pt_optim_args):
        groups = [{"params": [param], **optim._get_optim_args(param)} for param in params]
        return optim.pt_optim_constructor(groups)
    return optim.pt_optim_constructor(params, **optim.pt_optim_args)


class _ScalePlate(Messenger):
    """Multiply the log-densities of the sample sites in the plate ``name`` by ``factor``; record the plates seen."""

    def __init__(self, name: str, factor: float) -> None:
        super().__init__()
        self.name, self.factor = name, factor
        self.plates: set[str] = set()

    def _process_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] != "sample":
            return
        names = {frame.name for frame in msg["cond_indep_stack"]}
        self.plates |= names
        if self.name in names:
            msg["scale"] = self.factor * msg["scale"]


def differentiable_loss(
    elbo: ELBO, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any
) -> Tensor:
    r"""The negative ELBO estimate of ``elbo`` whose gradient is the ELBO's gradient estimate, traced ELBOs included.

    ``elbo.differentiable_loss(model, guide, *args, **kwargs)``, except for Pyro's ``JitTrace_ELBO``: its
    ``differentiable_loss`` returns $\ell + (s - \operatorname{stop}(s))$ with a loss $\ell$ that is not detached
    (the eager ``Trace_ELBO`` detaches it), so its gradient is $\nabla \ell + \nabla s$, twice the ELBO's for
    reparameterized sites. Here the traced loss is detached: $\operatorname{stop}(\ell) + (s -
    \operatorname{stop}(s))$ (Pyro's own ``loss_and_grads``, which ``SVI.step`` calls, differentiates $s$ alone).

    Args:
        elbo: a Pyro ELBO with ``differentiable_loss``.
        model: the model.
        guide: the guide.
        *args: the model's and guide's positional arguments.
        **kwargs: their keyword arguments.

    Returns:
        The scalar loss; its value is the negative ELBO estimate.

    """
    if isinstance(elbo, JitTrace_ELBO):
        loss, surrogate = elbo.loss_and_surrogate_loss(model, guide, *args, **kwargs)
        return loss.detach() + (surrogate - surrogate.detach())
    return elbo.differentiable_loss(model, guide, *args, **kwargs)


def traced_if_exact(
    elbo: Trace_ELBO,
    model: Callable[..., Any],
    guide: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    params: Sequence[Tensor],
) -> Callable[[Any], Tensor] | None:
    r"""A traced loss closure (Pyro's `JitTrace_ELBO`) that equals ``elbo``'s, or ``None`` where it does not.

    The closure ``step(_)`` returns [`differentiable_loss`][pyro_flows.diagnostics.elbo.differentiable_loss] of a
    `JitTrace_ELBO` with ``elbo``'s particles and plate nesting, run without TorchScript's optimization passes.
    Those passes cost more than linearly in the graph's size (a model that loops over its time points can spend
    minutes in them at the second call); without them the trace still runs an SVI step faster than the eager ELBO
    (`benchmarks/README.md`, "`pyro_flows.fit`'s SVI step").

    Exact means that at two fixed random states the traced loss and its gradients with respect to ``params`` equal
    the eager ones (`pyro_flows.training.tensors_close`: to $10^{-4}$ of each tensor's largest entry). A model whose
    control flow depends on sampled values is caught only when the checked draws take another branch than the
    traced one. The check runs inside `torch.random.fork_rng`, so it leaves the caller's random stream as it was.
    ``None`` (logged at INFO) means the trace differs, or tracing failed, for example on a guide whose flows are not
    traceable.

    Args:
        elbo: the eager `Trace_ELBO`, already evaluated once (its plate nesting known).
        model: the model.
        guide: the guide.
        args: the model's and guide's positional arguments.
        kwargs: their keyword arguments.
        params: the tensors trained (`svi_parameters`).

    Returns:
        The traced closure, or ``None``.

    """
    traced = JitTrace_ELBO(
        num_particles=elbo.num_particles,
        vectorize_particles=elbo.vectorize_particles,
        max_plate_nesting=elbo.max_plate_nesting,
        ignore_jit_warnings=True,
    )

    def traced_step(_: Any) -> Tensor:
        with torch.jit.optimized_execution(False):
            return differentiable_loss(traced, model, guide, *args, **kwargs)

    try:
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced_step(None)  # compiles
            for seed in (0, 1):
                checked = []
                for step in (
                    lambda: elbo.differentiable_loss(model, guide, *args, **kwargs),
                    lambda: traced_step(None),
                ):
                    torch.manual_seed(seed)
                    loss = step()
                    checked.append([loss.detach(), *torch.autograd.grad(loss, params, allow_unused=True)])
                if not tensors_close(*checked):
                    logger.info("the traced ELBO differs from the eager one: the eager ELBO runs")
                    return None
    except Exception as err:  # any failure of tracing means: run the eager ELBO
        logger.info("the ELBO cannot be traced (%s: %s): the eager ELBO runs", type(err).__name__, err)
        return None
    return traced_step


def svi_parameters(step: Callable[[Any], Tensor]) -> list[Tensor]:
    """The unconstrained tensors of every parameter an SVI ``step`` closure touches (model's and guide's).

    One evaluation of ``step(None)`` without gradients registers them in Pyro's parameter store (a guide creates its
    parameters at its first call) and records them.
    """
    with poutine.trace(param_only=True) as capture, torch.no_grad():
        step(None)
    return [site["value"].unconstrained() for site in capture.trace.nodes.values()]


def fit_svi(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    num_steps: int = 1000,
    lr: float = 0.01,
    optim: PyroOptim | None = None,
    loss: ELBO | None = None,
    num_particles: int = 1,
    vectorize_particles: bool = False,
    clear_param_store: bool = False,
    grad_clip: float | None = None,
    progress: bool = True,
    distributed: bool | None = None,
    shard_plate: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    jit: bool = False,
    **kwargs: Any,
) -> ELBOTrace:
    """Run ``num_steps`` of SVI on ``(model, guide)`` and return the ELBO trace.

    The steps run in the package's one training loop ([`pyro_flows.training.train`][pyro_flows.training.train]): each
    minimizes ``loss.differentiable_loss(model, guide, *args, **kwargs)`` over the parameters that the first evaluation
    of the loss registers in Pyro's parameter store. A non-finite loss or gradient stops the run with a
    ``FloatingPointError`` naming the step; the parameters are left at their last finite values (those of the last step
    whose loss and gradient were finite).

    Under ``torchrun`` (a process group of several processes, see ``distributed``) the fit is data-parallel: each
    rank passes its own shard of the data in ``args``/``kwargs`` and names the plate over it in ``shard_plate`` (see
    the module documentation for the loss); the parameters start from rank 0's values, each step's gradients are
    averaged over the ranks (one all-reduce, together with the loss), and the recorded ELBO is the full data's. Only
    rank 0 shows the progress bar and writes the checkpoint.

    Args:
        model: the Pyro model.
        guide: the guide to fit (any Pyro guide).
        *args: model/guide arguments.
        num_steps: number of optimization steps.
        lr: Adam learning rate (ignored when ``optim`` is given).
        optim: a Pyro optimizer such as ``pyro.optim.ClippedAdam({...})`` (default: Adam with ``lr``, fused
            kernel where available); per-parameter arguments (a callable) are supported, Pyro's ``clip_args``
            and learning-rate schedulers are not (use ``grad_clip``, or ClippedAdam's ``lrd``).
        loss: an ELBO with a ``differentiable_loss`` method (default ``Trace_ELBO(num_particles,
            vectorize_particles)``).
        num_particles: particles per step of the default loss.
        vectorize_particles: vectorize the particles of the default loss.
        clear_param_store: clear Pyro's parameter store before fitting.
        grad_clip: clip the total gradient norm to this value (``None``: no clipping).
        progress: show a ``tqdm`` bar over the steps with the running loss (on rank 0).
        distributed: ``None``: data-parallel when run in a process group of several processes (an initialized one,
            or the environment of ``torchrun --nproc_per_node=W`` with ``W > 1``, then initialized with gloo on CPU
            and NCCL on CUDA); ``True``: the same, an error outside one; ``False``: this process alone.
        shard_plate: data-parallel only, and then required: the name of the plate whose data are split across the
            ranks (the log-densities of its sites are multiplied by the number of ranks).
        checkpoint: a file to save the run's state to every ``checkpoint_every`` steps and to resume from (the
            parameter values, the optimizer state, the step, the trace and every rank's random state; see
            [`Checkpoint`][pyro_flows.training.Checkpoint]): a killed run restarted with the same arguments ends as
            the uninterrupted one.
        checkpoint_every: steps between checkpoints.
        jit: trace the loss, a `Trace_ELBO` (the default or ``loss``), with Pyro's `JitTrace_ELBO` where the trace
            is exact ([`traced_if_exact`][pyro_flows.diagnostics.elbo.traced_if_exact]: checked at the start, the
            eager loss otherwise); the run takes the eager run's steps, faster (`benchmarks/README.md`).
        **kwargs: model/guide keyword arguments.

    Returns:
        The ELBO trace of the run (identical on every rank).

    Raises:
        ValueError: ``num_steps`` is negative, a bad ``lr`` / ``grad_clip`` / ``checkpoint_every`` (named in the
            message), a data-parallel run without a ``shard_plate`` or with one that is not a plate of the model,
            or an unreadable checkpoint.
        TypeError: a loss without ``differentiable_loss``, an unsupported Pyro optimizer, or a bad ``checkpoint``,
            ``distributed`` or ``shard_plate``.
        FloatingPointError: a step's loss or gradient is non-finite (the message names the step).

    Examples:
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model():
        ...     pyro.sample("z", dist.Normal(3.0, 1.0))
        >>> pyro.set_rng_seed(0)
        >>> trace = fit_svi(model, AutoNormal(model), num_steps=20, clear_param_store=True, progress=False)
        >>> len(trace.elbo)
        20

    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative integer, got {num_steps!r}")
    check_options(epochs=max(num_steps, 1), lr=lr, grad_clip=grad_clip)
    elbo = (
        loss if loss is not None else Trace_ELBO(num_particles=num_particles, vectorize_particles=vectorize_particles)
    )
    if not callable(getattr(elbo, "differentiable_loss", None)):
        raise TypeError(f"fit_svi needs a loss with a differentiable_loss method, got {type(elbo).__name__}")
    if not isinstance(jit, bool) or (jit and type(elbo) is not Trace_ELBO):
        raise TypeError(f"jit=True traces a Trace_ELBO loss; got jit={jit!r} with a {type(elbo).__name__}")
    check_size(checkpoint_every, "checkpoint_every")
    if shard_plate is not None and not isinstance(shard_plate, str):
        raise TypeError(f"shard_plate must be a plate name (str) or None, got {type(shard_plate).__name__}")
    store = None if checkpoint is None else Checkpoint(checkpoint, checkpoint_every)
    world = World.current(distributed)
    if world.size > 1 and shard_plate is None:
        raise ValueError(
            f"fit_svi runs data-parallel on {world.size} processes: pass shard_plate=, the name of the plate over "
            "each rank's shard of the data (or distributed=False for independent fits)"
        )
    if clear_param_store:
        pyro.clear_param_store()
    trace = ELBOTrace()
    if num_steps == 0:
        return trace
    scaling = _ScalePlate(shard_plate, float(world.size)) if world.size > 1 else None
    model_, guide_ = (model, guide) if scaling is None else (scaling(model), scaling(guide))

    def step(_: Any) -> Tensor:
        return differentiable_loss(elbo, model_, guide_, *args, **kwargs)

    params = svi_parameters(step)
    if scaling is not None and shard_plate not in scaling.plates:
        raise ValueError(
            f"shard_plate={shard_plate!r} is not a plate of the model or guide (plates: {sorted(scaling.plates)})"
        )
    world.broadcast_(params)
    traced = traced_if_exact(elbo, model_, guide_, args, kwargs, params) if jit else None
    optimizer = make_adam(params, lr) if optim is None else _torch_optimizer(optim, params)
    result = train(
        step if traced is None else traced,
        params,
        epochs=num_steps,
        optimizer=optimizer,
        grad_clip=grad_clip,
        progress=progress,
        desc="svi",
        world=world,
        checkpoint=store,
    )
    for value in result.losses:
        trace.record(value)
    trace.seconds = result.seconds
    return trace


def plot_elbo(
    trace: ELBOTrace | Sequence[float],
    ax: Any = None,
    label: str | None = None,
    window: int | None = None,
) -> Any:
    """Plot an ELBO trace (raw estimates faint, running mean solid) on a matplotlib axis.

    Args:
        trace: an [`ELBOTrace`][pyro_flows.diagnostics.elbo.ELBOTrace], or a sequence of per-step ELBO values.
        ax: the axis to draw on (default: a new figure).
        label: legend label of the running mean.
        window: running-mean window (default: 2 % of the run).

    Returns:
        The matplotlib axis.

    """
    import matplotlib.pyplot as plt

    trace = trace if isinstance(trace, ELBOTrace) else ELBOTrace(elbo=[float(v) for v in trace])
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    earlier = ax.get_ylim() if ax.lines else None  # traces already on the axis stay in view
    steps = np.arange(1, len(trace.elbo) + 1)
    (line,) = ax.plot(steps, trace.smoothed(window), label=label)
    ax.plot(steps, trace.elbo, color=line.get_color(), alpha=0.25, linewidth=0.7)
    values = np.asarray(trace.elbo)
    if values.size > 10:
        low, high = np.percentile(values[values.size // 10 :], [1, 100])
        margin = 0.1 * (high - low + 1e-9)
        low, high = low - margin, high + margin
        if earlier is not None:
            low, high = min(low, earlier[0]), max(high, earlier[1])
        ax.set_ylim(low, high)
    ax.set_xlabel("SVI step")
    ax.set_ylabel("ELBO (nats)")
    if label is not None:
        ax.legend()
    return ax
