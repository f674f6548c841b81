"""Linear and convolutional flows vs Pyro's built-ins, forward + log-det and inverse, timed side by side.

* ``householder`` (K reflections, O(K·D) vector updates) vs Pyro's ``Householder`` with the same K, at D = 64 and
  D = 784, batch 4096;
* ``conv1x1`` (Glow's LU 1×1 convolution) vs Pyro's ``GeneralizedChannelPermute`` (also LU-parameterized);
* ``emerging_conv`` alone (no Pyro equivalent), to record the cost of its sequential inverse.

Every row times ``y = t(x); t.log_abs_det_jacobian(x, y)`` (direction ``forward``) or
``x = t.inv(y); t.log_abs_det_jacobian(x, y)`` (direction ``inverse``) in float32 without gradients, on a fresh
input tensor every call (so no stale cache hit); the log-det is that of the same pass, as in
``TransformedDistribution`` (ours reuses the value computed with the output; Pyro's are closed-form constants).
Ours and Pyro's run in the same process on the same inputs, one after the other, so the ``speedup`` (Pyro
time / our time) is meaningful even on a loaded machine; absolute times are not.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro.distributions.transforms as T
import torch
from harness import time_call
from torch.distributions import Transform

from pyro_flows.transforms import EmergingConv2d, Householder, InvertibleConv1x1

COLUMNS = ["flow", "shape", "K", "batch", "direction", "ours_ms", "pyro_equivalent", "pyro_ms", "speedup"]


def _forward(t: Transform, x: torch.Tensor) -> torch.Tensor:
    y = t(x)
    return t.log_abs_det_jacobian(x, y)


def _inverse(t: Transform, y: torch.Tensor) -> torch.Tensor:
    x = t.inv(y)
    return t.log_abs_det_jacobian(x, y)


def _perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter off its initialization (timings of identity-like parameters could be special)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


def _compare(
    rows: list[dict],
    row: dict,
    ours: Transform,
    theirs: Transform | None,
    label: str | None,
    x: torch.Tensor,
    device: str,
) -> None:
    directions: dict[str, Callable[[Transform, torch.Tensor], torch.Tensor]] = {
        "forward": _forward,
        "inverse": _inverse,
    }
    for direction, fn in directions.items():
        with torch.no_grad():
            ours_s = time_call(lambda fn=fn: fn(ours, x.clone()), device)
            result = {**row, "direction": direction, "ours_ms": 1e3 * ours_s}
            if theirs is not None:
                pyro_s = time_call(lambda fn=fn: fn(theirs, x.clone()), device)
                result.update(pyro_equivalent=label, pyro_ms=1e3 * pyro_s, speedup=pyro_s / ours_s)
        rows.append(result)


def run(device: str, quick: bool) -> list[dict]:
    rows: list[dict] = []
    batch = 256 if quick else 4096
    for dim in (64, 784):
        for count in (4, 16):
            torch.manual_seed(0)
            ours = _perturbed(Householder(dim, num_reflections=count)).to(device)
            theirs = T.Householder(dim, count_transforms=count).to(device)
            x = torch.randn(batch, dim, device=device)
            row = {"flow": "householder", "shape": f"({dim},)", "K": count, "batch": batch}
            _compare(rows, row, ours, theirs, "Householder", x, device)
    image_batch = 16 if quick else 256
    for shape in ((3, 32, 32), (16, 16, 16), (48, 8, 8)):
        torch.manual_seed(0)
        ours = _perturbed(InvertibleConv1x1(shape)).to(device)
        theirs = T.GeneralizedChannelPermute(channels=shape[0]).to(device)
        x = torch.randn(image_batch, *shape, device=device)
        row = {"flow": "conv1x1", "shape": str(shape), "batch": image_batch}
        _compare(rows, row, ours, theirs, "GeneralizedChannelPermute", x, device)
    shape = (3, 16, 16)
    torch.manual_seed(0)
    emerging = _perturbed(EmergingConv2d(shape)).to(device)
    x = torch.randn(16 if quick else 64, *shape, device=device)
    row = {"flow": "emerging_conv (k=3)", "shape": str(shape), "batch": x.shape[0]}
    _compare(rows, row, emerging, None, None, x, device)
    return rows
