"""Fit a guide with SVI while recording the ELBO trace, and plot the trace with one call."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.elbo import ELBO
from pyro.optim import PyroOptim

__all__ = ["ELBOTrace", "fit_svi", "plot_elbo"]


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
        """Plot the trace; see :func:`plot_elbo`."""
        return plot_elbo(self, ax=ax, label=label, window=window)


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
    **kwargs: Any,
) -> ELBOTrace:
    """Run ``num_steps`` of SVI on ``(model, guide)`` and return the ELBO trace.

    Args:
        model: the Pyro model.
        guide: the guide to fit (any Pyro guide).
        *args: model/guide arguments.
        num_steps: number of optimization steps.
        lr: Adam learning rate (ignored when ``optim`` is given).
        optim: a Pyro optimizer (default ``pyro.optim.Adam({"lr": lr})``).
        loss: an ELBO (default ``Trace_ELBO(num_particles, vectorize_particles)``).
        num_particles: particles per step of the default loss.
        vectorize_particles: vectorize the particles of the default loss.
        clear_param_store: clear Pyro's parameter store before fitting.
        **kwargs: model/guide keyword arguments.

    Returns:
        The ELBO trace of the run.

    Raises:
        ValueError: if ``num_steps`` is negative or a step returns a non-finite loss.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model():
        ...     pyro.sample("z", dist.Normal(3.0, 1.0))
        >>> pyro.set_rng_seed(0)
        >>> trace = fit_svi(model, AutoNormal(model), num_steps=20, clear_param_store=True)
        >>> len(trace.elbo)
        20

    """
    if num_steps < 0:
        raise ValueError(f"num_steps must be non-negative, got {num_steps}")
    if clear_param_store:
        pyro.clear_param_store()
    optim = optim or pyro.optim.Adam({"lr": lr})
    loss = loss or Trace_ELBO(num_particles=num_particles, vectorize_particles=vectorize_particles)
    svi = SVI(model, guide, optim, loss)
    trace = ELBOTrace()
    start = time.perf_counter()
    for step in range(num_steps):
        value = svi.step(*args, **kwargs)
        if not math.isfinite(value):
            raise ValueError(f"SVI loss is {value} at step {step}: lower the learning rate or check the model")
        trace.record(value)
    trace.seconds = time.perf_counter() - start
    return trace


def plot_elbo(
    trace: ELBOTrace | Sequence[float],
    ax: Any = None,
    label: str | None = None,
    window: int | None = None,
) -> Any:
    """Plot an ELBO trace (raw estimates faint, running mean solid) on a matplotlib axis.

    Args:
        trace: an :class:`ELBOTrace`, or a sequence of per-step ELBO values.
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
    steps = np.arange(1, len(trace.elbo) + 1)
    (line,) = ax.plot(steps, trace.smoothed(window), label=label)
    ax.plot(steps, trace.elbo, color=line.get_color(), alpha=0.25, linewidth=0.7)
    values = np.asarray(trace.elbo)
    if values.size > 10:
        low, high = np.percentile(values[values.size // 10 :], [1, 100])
        margin = 0.1 * (high - low + 1e-9)
        ax.set_ylim(low - margin, high + margin)
    ax.set_xlabel("SVI step")
    ax.set_ylabel("ELBO (nats)")
    if label is not None:
        ax.legend()
    return ax
