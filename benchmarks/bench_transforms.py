"""Forward + log-det throughput of every registered flow vs Pyro's built-in equivalent (one process, same data).

Each row times ``y = t(x); t.log_abs_det_jacobian(x, y)`` at dim 64, batch 4096, float32, no gradient, with
fresh inputs: the cost of sampling and scoring a sample, which is what a flow guide pays per step. Our flows
compute the log-det in the same pass as ``y``; Pyro's transforms are timed the same way, with their own caching.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro.distributions.transforms as T
import torch
from harness import time_call

from pyro_flows.transforms import registry

COLUMNS = ["flow", "ours_ms", "pyro_equivalent", "pyro_ms", "speedup"]

#: Pyro's closest built-in for a registry name (same dim; matching hyper-parameters where they exist).
PYRO_EQUIVALENTS: dict[str, tuple[str, Callable[[int], torch.distributions.Transform]]] = {
    "elementwise_affine": ("AffineTransform", lambda d: T.AffineTransform(torch.zeros(d), torch.ones(d), event_dim=1)),
    "leaky_relu": ("LeakyReLUTransform (fixed slope)", lambda d: T.LeakyReLUTransform()),
    "permutation": ("Permute", lambda d: T.Permute(torch.randperm(d))),
    "triangular": ("LowerCholeskyAffine", lambda d: T.LowerCholeskyAffine(torch.zeros(d), torch.eye(d))),
    "householder": ("Householder (K=2, as ours)", lambda d: T.Householder(d, count_transforms=2)),
    "planar": ("Planar", lambda d: T.Planar(d)),
    "radial": ("Radial", lambda d: T.Radial(d)),
    "sylvester_householder": ("Sylvester", lambda d: T.Sylvester(d, count_transforms=d // 2 + 1)),
    "iaf": ("affine_autoregressive", lambda d: T.affine_autoregressive(d)),
    "affine_coupling": ("affine_coupling", lambda d: T.affine_coupling(d)),
    "spline_coupling": ("spline_coupling", lambda d: T.spline_coupling(d)),
    "spline_iaf": ("spline_iaf", lambda d: T.spline_iaf(d)),
}


def _forward_and_log_det(t: torch.distributions.Transform, x: torch.Tensor) -> torch.Tensor:
    y = t(x)
    return t.log_abs_det_jacobian(x, y)


def run(device: str, quick: bool) -> list[dict]:
    dim, batch = (16, 256) if quick else (64, 4096)
    rows = []
    for name in sorted(registry):
        torch.manual_seed(0)
        ours = registry[name](dim).to(device)
        x = torch.randn(batch, dim, device=device)
        with torch.no_grad():
            ours_s = time_call(lambda t=ours, x=x: _forward_and_log_det(t, x.clone()), device)
        row = {"flow": name, "ours_ms": 1e3 * ours_s}
        if name in PYRO_EQUIVALENTS:
            label, make = PYRO_EQUIVALENTS[name]
            theirs = make(dim)
            theirs = theirs.to(device) if isinstance(theirs, torch.nn.Module) else _to_device(theirs, device)
            with torch.no_grad():
                pyro_s = time_call(lambda t=theirs, x=x: _forward_and_log_det(t, x.clone()), device)
            row.update(pyro_equivalent=label, pyro_ms=1e3 * pyro_s, speedup=pyro_s / ours_s)
        rows.append(row)
    return rows


def _to_device(t: torch.distributions.Transform, device: str) -> torch.distributions.Transform:
    if isinstance(t, T.AffineTransform):
        return T.AffineTransform(t.loc.to(device), t.scale.to(device), event_dim=1)
    if isinstance(t, T.LowerCholeskyAffine):
        return T.LowerCholeskyAffine(t.loc.to(device), t.scale_tril.to(device))
    if isinstance(t, T.Permute):
        return T.Permute(t.permutation.to(device))
    return t
