"""Planar / radial / Sylvester flows vs Pyro's ``Planar`` and ``Sylvester``, inverse costs and a U1 density fit.

Rows (all float32, one process, side by side; timings are medians of ``harness.time_call``):

* ``forward+logdet``: ``y = t(x); t.log_abs_det_jacobian(x, y)`` without gradient (one pass for both, as when
  sampling and scoring); Sylvester at D = 50, M = D against Pyro's Householder ``Sylvester`` with its usual
  D/2 + 1 reflections; planar against Pyro's ``Planar``. Parameters are moved off their initialization (Björck then
  needs a few iterations, as in training).
* ``train step``: the same plus ``backward()`` of ``y.sum() + logdet.sum()`` (what a VI step costs).
* ``inverse``: our numerical/closed-form inverses (Pyro has none): time per point and iterations (planar: Newton
  iterations of the batch; Sylvester: Newton iterations summed over the M back-substitution coordinates).
* ``U1 fit``: reverse-KL fit of 16 planar layers to Rezende & Mohamed's energy U1; the KL (nats, with the exact
  log-normalizer from a grid) is reported before and after.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from harness import time_call

from pyro_flows.transforms import Planar, Radial, SylvesterHouseholder, SylvesterOrthogonal, SylvesterTriangular

COLUMNS = ["benchmark", "flow", "dim", "batch", "ours_ms", "pyro_ms", "speedup", "us_per_point", "iterations", "note"]


def _perturb(module: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else 1
            p.add_(scale / math.sqrt(fan_in) * torch.randn_like(p))
    return module


def _forward_log_det(t: torch.distributions.Transform, x: torch.Tensor) -> torch.Tensor:
    y = t(x)
    return t.log_abs_det_jacobian(x, y)


def _train_step(t: torch.nn.Module, x: torch.Tensor) -> None:
    y = t(x)
    (y.sum() + t.log_abs_det_jacobian(x, y).sum()).backward()
    t.zero_grad(set_to_none=True)


def _compare(
    benchmark: str, name: str, ours: torch.nn.Module, theirs: torch.nn.Module, dim: int, batch: int, device: str
) -> list[dict]:
    rows = []
    x = torch.randn(batch, dim, device=device)
    with torch.no_grad():
        ours_s = time_call(lambda: _forward_log_det(ours, x.clone()), device)
        pyro_s = time_call(lambda: _forward_log_det(theirs, x.clone()), device)
    note = f"Björck iterations {ours.last_bjorck_iterations}" if hasattr(ours, "last_bjorck_iterations") else ""
    rows.append(
        {
            "benchmark": "forward+logdet",
            "flow": name,
            "dim": dim,
            "batch": batch,
            "ours_ms": 1e3 * ours_s,
            "pyro_ms": 1e3 * pyro_s,
            "speedup": pyro_s / ours_s,
            "note": f"vs Pyro {benchmark}; {note}".rstrip("; "),
        }
    )
    ours_s = time_call(lambda: _train_step(ours, x.clone()), device)
    pyro_s = time_call(lambda: _train_step(theirs, x.clone()), device)
    rows.append(
        {
            "benchmark": "train step",
            "flow": name,
            "dim": dim,
            "batch": batch,
            "ours_ms": 1e3 * ours_s,
            "pyro_ms": 1e3 * pyro_s,
            "speedup": pyro_s / ours_s,
            "note": f"vs Pyro {benchmark}",
        }
    )
    return rows


def _inverse_row(name: str, flow: torch.nn.Module, dim: int, batch: int, device: str) -> dict:
    x = torch.randn(batch, dim, device=device)
    with torch.no_grad():
        y = flow(x)
        seconds = time_call(lambda: flow.inv(y.clone()), device, repeat=3)
        x_rec = flow.inv(y.clone())
    iterations = getattr(flow, "last_inverse_iterations", None)
    return {
        "benchmark": "inverse",
        "flow": name,
        "dim": dim,
        "batch": batch,
        "ours_ms": 1e3 * seconds,
        "us_per_point": 1e6 * seconds / batch,
        "iterations": iterations,
        "note": f"float32 round-trip max error {(x_rec - x).abs().max().item():.1e}",
    }


def energy_u1(z: torch.Tensor) -> torch.Tensor:
    """Rezende & Mohamed (2015), Table 1, U1."""
    ring = 0.5 * ((z.norm(dim=-1) - 2.0) / 0.4) ** 2
    modes = torch.stack([-0.5 * ((z[..., 0] - 2.0) / 0.6) ** 2, -0.5 * ((z[..., 0] + 2.0) / 0.6) ** 2])
    return ring - torch.logsumexp(modes, dim=0)


def _u1_fit(device: str, seconds: float) -> dict:
    grid = torch.linspace(-5, 5, 801, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), dim=-1)
    log_z = (torch.logsumexp(-energy_u1(z).flatten(), 0) + ((grid[1] - grid[0]) ** 2).log()).item()
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(Planar(2) for _ in range(16)).to(device)
    base = dist.Normal(torch.zeros(2, device=device), torch.ones(2, device=device)).to_event(1)
    flow = dist.TransformedDistribution(base, list(layers))

    def kl(n: int) -> torch.Tensor:
        sample = flow.rsample((n,))
        return (flow.log_prob(sample) + energy_u1(sample)).mean() + log_z

    with torch.no_grad():
        start = kl(8192).item()
    optimizer = torch.optim.Adam(layers.parameters(), lr=2e-2)
    begin, steps = time.perf_counter(), 0
    while steps < 2000 and time.perf_counter() - begin < seconds:
        optimizer.zero_grad()
        kl(256).backward()
        optimizer.step()
        steps += 1
    elapsed = time.perf_counter() - begin
    with torch.no_grad():
        end = kl(8192).item()
    return {
        "benchmark": "U1 fit",
        "flow": "planar x16",
        "dim": 2,
        "batch": 256,
        "iterations": steps,
        "note": f"reverse KL {start:.3f} -> {end:.3f} nats in {steps} Adam steps ({elapsed:.1f} s)",
    }


def run(device: str, quick: bool) -> list[dict]:
    dim = 50
    batches = (1, 64) if quick else (1, 64, 1024)
    variants: list[tuple[str, Callable[[], torch.nn.Module]]] = [
        ("sylvester_householder H=26", lambda: SylvesterHouseholder(dim, num_reflections=dim // 2 + 1)),
        ("sylvester_householder H=8", lambda: SylvesterHouseholder(dim)),
        ("sylvester_orthogonal", lambda: SylvesterOrthogonal(dim)),
        ("sylvester_triangular", lambda: SylvesterTriangular(dim)),
    ]
    rows: list[dict] = []
    for batch in batches:
        for name, make in variants:
            torch.manual_seed(0)
            ours = _perturb(make()).to(device)
            theirs = T.Sylvester(dim, count_transforms=dim // 2 + 1).to(device)
            rows += _compare("Sylvester(D/2+1 reflections)", name, ours, theirs, dim, batch, device)
    for planar_dim in (2, dim):
        for batch in batches:
            torch.manual_seed(0)
            ours = _perturb(Planar(planar_dim)).to(device)
            rows += _compare("Planar", "planar", ours, T.Planar(planar_dim).to(device), planar_dim, batch, device)
    inverse_batch = 256 if quick else 1024
    for name, make in [
        ("planar", lambda: Planar(dim)),
        ("radial", lambda: Radial(dim)),
        *variants[1:],
    ]:
        torch.manual_seed(0)
        rows.append(_inverse_row(name, _perturb(make(), 1.0).to(device), dim, inverse_batch, device))
    rows.append(_u1_fit(device, 3.0 if quick else 15.0))
    return rows
