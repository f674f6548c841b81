"""`pyro_flows.fit`'s SVI step: the traced ELBO against the eager one, interleaved (the `FitOptions.jit` choice).

Usage::

    python benchmarks/fit_trace.py            # 9 rounds of 50 steps per arm, 1 thread
    python benchmarks/fit_trace.py --quick    # 2 rounds of 10 steps (smoke run)

For each problem, the fit's own guide is set up (`_start`: MAP, Laplace, start choice) and its two loss closures are
built as `fit` builds them (`_loss` with ``jit`` off and on; the traced one passed `fit`'s exactness check, or the
row says it fell back). Both arms then train the same guide with `ClippedAdam` at lr 1e-3 (8 vectorized particles,
`fit`'s default), alternating rounds so that both see the same machine load. Columns: milliseconds per step (median
over rounds), the eager time over the traced one (median [range] over rounds), and the seconds that the check costs
at the start (tracing, two checked draws). Problems: Neal's funnel (10-d), non-centered eight schools, a generated
1000-point, 30-feature logistic regression (the top of `fit`'s stated budget) and, where `../shared/data/posteriordb`
exists, three posteriordb posteriors (the ARMA and HMM models loop over time in Python: long traces). Results go to
``results/fit_trace-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.optim.clipped_adam import ClippedAdam

sys.path.insert(0, str(Path(__file__).parent))

from bench_guides import eight_schools_noncentered
from harness import write
from posterior_suite import DATA, funnel10, load_posterior

from pyro_flows.inference import FitOptions, _loss, _start

COLUMNS = ["problem", "dim", "traced", "eager_ms", "traced_ms", "speedup", "speedup_min", "speedup_max", "check_s"]
POSTERIORDB = ("arma-arma11", "hmm_example-hmm_example", "gp_pois_regr-gp_regr")


def logistic_regression(x: torch.Tensor, y: torch.Tensor) -> None:
    """Bayesian logistic regression, ``w ~ N(0, 1)``, 1000 rows, 30 features."""
    w = pyro.sample("w", dist.Normal(x.new_zeros(x.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=(x * w).sum(-1)), obs=y)


def problems() -> dict[str, tuple[Callable[..., None], tuple]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 30, generator=generator)
    y = torch.bernoulli(torch.sigmoid(x @ (0.5 * torch.randn(30, generator=generator))), generator=generator)
    chosen: dict[str, tuple[Callable[..., None], tuple]] = {
        "funnel10": (funnel10, ()),
        "eight schools (non-centered)": (eight_schools_noncentered, ()),
        "logistic regression 1000 x 30": (logistic_regression, (x, y)),
    }
    if (DATA / "reference_draws").is_dir():
        for name in POSTERIORDB:
            chosen[name] = load_posterior(name, DATA)
    return chosen


def run(name: str, model: Callable[..., None], args: tuple, rounds: int, steps: int) -> dict[str, Any]:
    options = FitOptions(progress=False)
    pyro.set_rng_seed(0)
    with pyro.get_param_store().scope():
        guide = _start(model, args, {}, options)
        eager, params, _ = _loss(model, guide, args, {}, FitOptions(progress=False, jit=False))
        begin = time.perf_counter()
        traced, _, is_traced = _loss(model, guide, args, {}, options)
        check = time.perf_counter() - begin
        optimizer = ClippedAdam(params, lr=1e-3)
        times: dict[str, list[float]] = {"eager": [], "traced": []}
        for index in range(rounds + 1):  # round 0 warms both arms up
            for arm, step in sorted({"eager": eager, "traced": traced}.items(), reverse=index % 2 == 1):
                start = time.perf_counter()
                for _ in range(steps):
                    optimizer.zero_grad()
                    step(None).backward()
                    optimizer.step()
                if index:
                    times[arm].append((time.perf_counter() - start) / steps * 1e3)
    ratios = [e / t for e, t in zip(times["eager"], times["traced"], strict=True)]
    return {
        "problem": name,
        "dim": guide.latent_dim,
        "traced": is_traced,
        "eager_ms": round(statistics.median(times["eager"]), 2),
        "traced_ms": round(statistics.median(times["traced"]), 2),
        "speedup": round(statistics.median(ratios), 2),
        "speedup_min": round(min(ratios), 2),
        "speedup_max": round(max(ratios), 2),
        "check_s": round(check, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 10 steps")
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    warnings.filterwarnings("ignore")
    rounds, steps = (2, 10) if options.quick else (9, 50)
    rows = []
    for name, (model, args) in problems().items():
        rows.append(run(name, model, args, rounds, steps))
        print(rows[-1], flush=True)
    print(write("fit_trace-quick" if options.quick else "fit_trace", rows, COLUMNS, "cpu"))


if __name__ == "__main__":
    main()
