"""Residual flows (exact log-det vs Russian-roulette estimator) and FFJORD (exact trace vs Hutchinson).

For each flow, mode and dim in (2, 16, 64), at batch 256 (quick: 64), float32, one layer with default widths:

* ``fwd_ms``: ``y = t(x)`` + log-det without gradients;
* ``train_ms``: forward + log-det + backward of ``(y² + log-det).sum()`` (gradients for every parameter);
* ``saved_MB``: bytes of the tensors autograd keeps for the backward of that training step (measured with
  ``saved_tensors_hooks``, so it is the same on CPU and GPU); on CUDA ``peak_MB`` is the peak allocated memory too;
* ``nfe``: ODE function evaluations of the forward solve (FFJORD, default RK4 with 10 steps and the adjoint).

The exact modes are forced at dim 64 and the estimators at dim 2 so every cell of the comparison exists.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from harness import synchronize, time_call

from pyro_flows.transforms.continuous import FFJORD
from pyro_flows.transforms.residual import Residual

COLUMNS = ["flow", "mode", "dim", "batch", "fwd_ms", "train_ms", "saved_MB", "peak_MB", "nfe"]

FACTORIES: dict[tuple[str, str], Callable[[int], torch.nn.Module]] = {
    ("residual", "exact"): lambda d: Residual(d, log_det="exact"),
    ("residual", "estimator"): lambda d: Residual(d, log_det="estimator"),
    ("ffjord", "exact"): lambda d: FFJORD(d, trace="exact"),
    ("ffjord", "hutchinson"): lambda d: FFJORD(d, trace="hutchinson"),
}


def _perturb(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p) / (p.shape[-1] ** 0.5 if p.dim() > 1 else 1.0))


def _forward(flow: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = flow(x)
    return flow.log_abs_det_jacobian(x, y)


def _train_step(flow: torch.nn.Module, x: torch.Tensor) -> None:
    y = flow(x)
    loss = (y**2).sum() + flow.log_abs_det_jacobian(x, y).sum()
    loss.backward()
    flow.zero_grad(set_to_none=True)


def _saved_bytes(flow: torch.nn.Module, x: torch.Tensor) -> int:
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = flow(x)
        loss = (y**2).sum() + flow.log_abs_det_jacobian(x, y).sum()
    loss.backward()
    flow.zero_grad(set_to_none=True)
    return sum(seen.values())


def run(device: str, quick: bool) -> list[dict]:
    batch = 64 if quick else 256
    rows = []
    for (name, mode), make in FACTORIES.items():
        for dim in (2, 16, 64):
            torch.manual_seed(0)
            flow = make(dim).to(device)
            _perturb(flow)
            x = torch.randn(batch, dim, device=device)
            with torch.no_grad():
                fwd = time_call(lambda f=flow, x=x: _forward(f, x.clone()), device, repeat=5)
            train = time_call(lambda f=flow, x=x: _train_step(f, x.clone()), device, repeat=5)
            row = {"flow": name, "mode": mode, "dim": dim, "batch": batch, "fwd_ms": 1e3 * fwd, "train_ms": 1e3 * train}
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                _train_step(flow, x.clone())
                synchronize(device)
                row["peak_MB"] = torch.cuda.max_memory_allocated() / 2**20
            row["saved_MB"] = _saved_bytes(flow, x.clone()) / 2**20
            if name == "ffjord":
                flow(x.clone())
                row["nfe"] = flow.last_nfe
            rows.append(row)
    return rows
