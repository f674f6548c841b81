"""Raw throughput on the chosen device: IAF sampling, MADE forward vs the device's matmul rate, MAF training.

* ``iaf_sample``: samples/s of ``TransformedDistribution(N(0, I), [IAF × 2]).rsample`` plus ``log_prob`` of those
  samples (what a flow guide does per particle), dims 64 and 784, batch 4096 and 65536 (``--quick``: 1024), no grad;
* ``made_forward``: the MADE forward (hidden 1024, 1024; D = 784; batch 4096) in GFLOP/s and as a fraction of the
  same device's measured float32 GEMM rate (a square matmul of size 4096 on GPU, 1024 on CPU) — the physical limit
  of a network made of dense masked layers;
* ``maf_fit``: training samples/s of a 5-layer MAF (hidden 128, 128; batch 512; forward, backward and Adam step)
  on 2-d and 64-d data.
"""

from __future__ import annotations

import itertools

import pyro.distributions as dist
import torch
from harness import time_call

from pyro_flows.nn import MADE
from pyro_flows.transforms import InverseAutoregressive, MaskedAutoregressive, Permutation

COLUMNS = ["benchmark", "dim", "batch", "ms", "per_s", "gflops", "fraction_of_gemm"]


def _gemm_gflops(device: str, n: int) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    seconds = time_call(lambda: a @ b, device, repeat=5)
    return 2 * n**3 / seconds / 1e9


def _iaf_rows(device: str, quick: bool) -> list[dict]:
    rows = []
    for dim in (64, 784):
        layers = [InverseAutoregressive(dim), Permutation(dim), InverseAutoregressive(dim)]
        layers = [layer.to(device) for layer in layers]
        base = dist.Normal(torch.zeros(dim, device=device), 1.0).to_event(1)
        q = dist.TransformedDistribution(base, layers)
        for batch in (1024,) if quick else (4096, 65536):

            def step(q: dist.TransformedDistribution = q, batch: int = batch) -> torch.Tensor:
                z = q.rsample((batch,))
                return q.log_prob(z)

            with torch.no_grad():
                seconds = time_call(step, device, repeat=3)
            rows.append(
                {"benchmark": "iaf_sample", "dim": dim, "batch": batch, "ms": 1e3 * seconds, "per_s": batch / seconds}
            )
    return rows


def _made_rows(device: str, quick: bool) -> list[dict]:
    dim, hidden, batch = (784, (256, 256), 1024) if quick else (784, (1024, 1024), 4096)
    made = MADE(dim, num_params=2, hidden_dims=hidden).to(device)
    x = torch.randn(batch, dim, device=device)
    sizes = [dim, *hidden, 2 * dim]
    flops = 2 * batch * sum(a * b for a, b in itertools.pairwise(sizes))
    with torch.no_grad():
        seconds = time_call(lambda: made(x), device, repeat=5)
    achieved = flops / seconds / 1e9
    peak = _gemm_gflops(device, 1024 if quick or device == "cpu" else 4096)
    return [
        {
            "benchmark": f"made_forward (hidden {hidden})",
            "dim": dim,
            "batch": batch,
            "ms": 1e3 * seconds,
            "per_s": batch / seconds,
            "gflops": achieved,
            "fraction_of_gemm": achieved / peak,
        },
        {"benchmark": "gemm (float32, square)", "gflops": peak, "fraction_of_gemm": 1.0},
    ]


def _maf_rows(device: str, quick: bool) -> list[dict]:
    rows = []
    for dim in (2, 64):
        layers = []
        for i in range(5):
            layers.append(MaskedAutoregressive(dim, hidden_dims=(128, 128)))
            if i < 4:
                layers.append(Permutation(dim))
        modules = torch.nn.ModuleList(layers).to(device)
        base = dist.Normal(torch.zeros(dim, device=device), 1.0).to_event(1)
        optimizer = torch.optim.Adam(modules.parameters(), lr=1e-3)
        data = torch.randn(512, dim, device=device)

        def step(
            modules: torch.nn.ModuleList = modules,
            base: dist.Distribution = base,
            data: torch.Tensor = data,
            optimizer: torch.optim.Optimizer = optimizer,
        ) -> None:
            q = dist.TransformedDistribution(base, list(modules))
            loss = -q.log_prob(data.clone()).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        seconds = time_call(step, device, repeat=3 if quick else 5)
        rows.append(
            {
                "benchmark": "maf_fit (5 layers, 128x2)",
                "dim": dim,
                "batch": 512,
                "ms": 1e3 * seconds,
                "per_s": 512 / seconds,
            }
        )
    return rows


def run(device: str, quick: bool) -> list[dict]:
    return _iaf_rows(device, quick) + _made_rows(device, quick) + _maf_rows(device, quick)
