"""Autoregressive flows side by side with zuko and Pyro (one process, same data, float32).

(a) ``maf_training``: 5 MAF layers (MADE 2×128 hidden, ReLU, affine), 2-d two-moons data, batch 512, 500 Adam steps
    (50 with ``--quick``): summed wall time and test NLL, vs zuko's ``MAF`` and a stack of Pyro's
    ``affine_autoregressive(...).inv`` with the same parameter count. The three train round robin in chunks of 25
    steps, so that load changes on a shared machine hit all alike; timings of (b) and (c) alternate the two sides
    over rounds and keep each side's best round. Each is scored through its library's own
    distribution object (ours and Pyro's: ``TransformedDistribution``; zuko: ``flow().log_prob``).
(b) ``iaf_sample_and_score``: ``rsample`` of 4096 points (D = 64) and ``log_prob`` of those samples, vs Pyro's
    ``AffineAutoregressive`` (same single hidden layer of 3D + 1 units, affine and gated/"stable" updates), with no
    gradient and with a backward pass (ELBO-style). Our default (two hidden layers of 64) is reported as well.
(c) ``external_scoring``: ``log_prob`` of 4096 external points (D = 64): MAF direction (one pass) vs IAF direction
    (D sequential passes), and sampling the other way round.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from harness import time_call
from sklearn.datasets import make_moons

from pyro_flows.transforms import InverseAutoregressive, MaskedAutoregressive

COLUMNS = [
    "benchmark",
    "case",
    "ours_ms",
    "reference",
    "reference_ms",
    "speedup",
    "ours_params",
    "reference_params",
    "ours_test_nll",
    "reference_test_nll",
]


def _count(modules: list[torch.nn.Module] | torch.nn.Module) -> int:
    modules = modules if isinstance(modules, list) else [modules]
    return sum(p.numel() for m in modules for p in m.parameters())


def _moons(n: int, seed: int, device: str) -> torch.Tensor:
    x, _ = make_moons(n, noise=0.05, random_state=seed)
    data = torch.as_tensor(x, dtype=torch.float32)
    return ((data - torch.tensor([0.5, 0.25])) / torch.tensor([0.87, 0.5])).to(device)


def _normal(dim: int, device: str) -> dist.Distribution:
    return dist.Normal(torch.zeros(dim, device=device), torch.ones(dim, device=device)).to_event(1)


class _Trainer:
    """Adam on ``-log_prob`` of random batches of 512; ``run(steps)`` returns the wall time of those steps."""

    def __init__(
        self, log_prob: Callable[[torch.Tensor], torch.Tensor], params: list[torch.Tensor], data: torch.Tensor
    ) -> None:
        self.log_prob, self.data = log_prob, data
        self.optimizer = torch.optim.Adam(params, lr=1e-3)
        self.generator = torch.Generator(device=data.device).manual_seed(0)
        self.seconds = 0.0

    def run(self, steps: int) -> None:
        start = time.perf_counter()
        for _ in range(steps):
            index = torch.randint(len(self.data), (512,), generator=self.generator, device=self.data.device)
            loss = -self.log_prob(self.data[index]).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        if self.data.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start


def _maf_training(device: str, quick: bool) -> list[dict]:
    import zuko

    steps = 50 if quick else 500
    train, test = _moons(20000, 0, device), _moons(5000, 1, device)

    torch.manual_seed(0)
    ours = [MaskedAutoregressive(2, (128, 128), order="natural" if i % 2 == 0 else "reverse") for i in range(5)]
    ours = [m.to(device) for m in ours]
    ours_dist = dist.TransformedDistribution(_normal(2, device), ours)
    torch.manual_seed(0)
    zflow = zuko.flows.MAF(features=2, transforms=5, hidden_features=(128, 128)).to(device)
    torch.manual_seed(0)
    pyro_layers = [T.affine_autoregressive(2, hidden_dims=[128, 128]).to(device) for _ in range(5)]
    pyro_dist = dist.TransformedDistribution(_normal(2, device), [t.inv for t in pyro_layers])

    def zuko_log_prob(x: torch.Tensor) -> torch.Tensor:
        return zflow().log_prob(x)

    models = {
        "ours": (ours_dist.log_prob, [p for m in ours for p in m.parameters()], _count(ours)),
        "zuko": (zuko_log_prob, list(zflow.parameters()), _count(zflow)),
        "pyro": (pyro_dist.log_prob, [p for m in pyro_layers for p in m.parameters()], _count(pyro_layers)),
    }
    trainers = {name: _Trainer(log_prob, params, train) for name, (log_prob, params, _) in models.items()}
    # round robin in chunks of 25 steps, so that load changes on a shared machine hit every library alike
    for _ in range(steps // 25):
        for trainer in trainers.values():
            trainer.run(25)
    with torch.no_grad():
        nll = {name: -models[name][0](test).mean().item() for name in models}
    rows = []
    for ref, label in (("zuko", "zuko.flows.MAF"), ("pyro", "affine_autoregressive(...).inv")):
        rows.append(
            {
                "benchmark": "maf_training",
                "case": f"{steps} Adam steps, batch 512, 5 layers 2x128, two moons",
                "ours_ms": 1e3 * trainers["ours"].seconds,
                "reference": label,
                "reference_ms": 1e3 * trainers[ref].seconds,
                "speedup": trainers[ref].seconds / trainers["ours"].seconds,
                "ours_params": models["ours"][2],
                "reference_params": models[ref][2],
                "ours_test_nll": nll["ours"],
                "reference_test_nll": nll[ref],
            }
        )
    return rows


def _alternate(
    ours: Callable[[], object], theirs: Callable[[], object], device: str, repeat: int = 7, rounds: int = 3
) -> tuple[float, float]:
    """Best-of-rounds median times of two functions timed alternately (robust to load changes)."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        times[0].append(time_call(ours, device, repeat=repeat))
        times[1].append(time_call(theirs, device, repeat=repeat))
    return min(times[0]), min(times[1])


def _sample_and_score(d: dist.Distribution, n: int, backward: bool) -> None:
    z = d.rsample((n,))
    lp = d.log_prob(z)
    if backward:
        (z.sum() - lp.sum()).backward()


def _iaf_sample_and_score(device: str, quick: bool) -> list[dict]:
    dim, n = (16, 512) if quick else (64, 4096)
    hidden = 3 * dim + 1
    base = _normal(dim, device)
    cases = []
    torch.manual_seed(0)
    cases.append(
        (
            f"affine, hidden [{hidden}]",
            InverseAutoregressive(dim, (hidden,), gated=False),
            T.affine_autoregressive(dim, hidden_dims=[hidden]),
            "AffineAutoregressive",
        )
    )
    cases.append(
        (
            f"gated, hidden [{hidden}]",
            InverseAutoregressive(dim, (hidden,)),
            T.affine_autoregressive(dim, hidden_dims=[hidden], stable=True),
            "AffineAutoregressive(stable=True)",
        )
    )
    cases.append(
        (
            "gated, ours default (64, 64) vs Pyro default",
            InverseAutoregressive(dim),
            T.affine_autoregressive(dim, stable=True),
            "AffineAutoregressive(stable=True)",
        )
    )
    rows = []
    for label, ours, theirs, ref in cases:
        ours, theirs = ours.to(device), theirs.to(device)
        d_ours = dist.TransformedDistribution(base, [ours])
        d_theirs = dist.TransformedDistribution(base, [theirs])
        for backward in (False, True):
            context = torch.enable_grad if backward else torch.no_grad
            with context():
                t_ours, t_theirs = _alternate(
                    lambda d=d_ours, b=backward: _sample_and_score(d, n, b),
                    lambda d=d_theirs, b=backward: _sample_and_score(d, n, b),
                    device,
                )
            rows.append(
                {
                    "benchmark": "iaf_sample_and_score",
                    "case": f"D={dim}, n={n}, {label}, {'fwd+bwd' if backward else 'no grad'}",
                    "ours_ms": 1e3 * t_ours,
                    "reference": ref,
                    "reference_ms": 1e3 * t_theirs,
                    "speedup": t_theirs / t_ours,
                    "ours_params": _count(ours),
                    "reference_params": _count(theirs),
                }
            )
    return rows


def _external_scoring(device: str, quick: bool) -> list[dict]:
    dim, n = (16, 512) if quick else (64, 4096)
    torch.manual_seed(0)
    maf = MaskedAutoregressive(dim).to(device)
    iaf = InverseAutoregressive(dim, gated=False).to(device)
    base = _normal(dim, device)
    d_maf, d_iaf = dist.TransformedDistribution(base, [maf]), dist.TransformedDistribution(base, [iaf])
    x = torch.randn(n, dim, device=device)
    rows = []
    with torch.no_grad():
        for what, fn_maf, fn_iaf in (
            ("log_prob of external points", lambda: d_maf.log_prob(x.clone()), lambda: d_iaf.log_prob(x.clone())),
            ("sample", lambda: d_maf.sample((n,)), lambda: d_iaf.sample((n,))),
        ):
            t_maf, t_iaf = _alternate(fn_maf, fn_iaf, device, repeat=3)
            rows.append(
                {
                    "benchmark": "external_scoring",
                    "case": f"D={dim}, n={n}, {what}: MAF direction (ours) vs IAF direction (reference column)",
                    "ours_ms": 1e3 * t_maf,
                    "reference": "InverseAutoregressive (ours)",
                    "reference_ms": 1e3 * t_iaf,
                    "speedup": t_iaf / t_maf,
                    "ours_params": _count(maf),
                    "reference_params": _count(iaf),
                }
            )
    return rows


def run(device: str, quick: bool) -> list[dict]:
    return _maf_training(device, quick) + _iaf_sample_and_score(device, quick) + _external_scoring(device, quick)
