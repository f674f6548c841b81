"""One-particle SVI stability of `AutoFlow(model)` at one learning rate for every parameter.

Usage: ``python benchmarks/stability.py [--seeds 5] [--steps 1000]``. For non-centered eight schools (posteriordb,
``../shared/data``) and a 100-d Gaussian with condition number 1e4, each seed trains the default guide with
``Trace_ELBO()`` (one particle) and ``pyro.optim.Adam({"lr": 0.01})`` for the base and the flows alike, and counts the
runs whose loss turned non-finite (the guide then raises ``FloatingPointError`` at the next step). Prints one line per
problem: runs diverged and the final losses.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

from posteriordb_models import load_posterior  # noqa: E402

from pyro_flows.guides import AutoFlow  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "posteriordb"


def ill_conditioned_gaussian(dim: int = 100, condition: float = 1e4) -> dist.MultivariateNormal:
    """A Gaussian with a random rotation and variances from 1 down to ``1 / condition``."""
    generator = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
    covariance = rotation @ torch.diag(torch.logspace(0, -math.log10(condition), dim)) @ rotation.T
    return dist.MultivariateNormal(torch.zeros(dim), covariance_matrix=covariance)


GAUSSIAN = ill_conditioned_gaussian()


def gaussian_model() -> None:
    pyro.sample("x", GAUSSIAN)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1000)
    options = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    problems = [("gaussian100", gaussian_model, ())]
    if DATA.exists():
        problems.insert(
            0, ("eight_schools_noncentered", *load_posterior("eight_schools-eight_schools_noncentered", DATA))
        )
    for name, model, args in problems:
        diverged, finals = 0, []
        for seed in range(options.seeds):
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            svi = SVI(model, AutoFlow(model), pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
            try:
                for _ in range(options.steps):
                    loss = svi.step(*args)
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"loss {loss}")
                finals.append(f"{loss:.1f}")
            except FloatingPointError as error:
                diverged += 1
                finals.append(str(error).splitlines()[0][:40])
        print(f"{name}: diverged {diverged} of {options.seeds}; final losses {finals}", flush=True)


if __name__ == "__main__":
    main()
