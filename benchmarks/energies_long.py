"""Rezende & Mohamed's energies U1–U4 at the full 2500-step budget: exact KL(q‖p) = log Z − ELBO per guide.

Usage: ``python benchmarks/energies_long.py [--steps 2500] [--energies U1,U2,U3,U4]``; writes
``results/energies_long-cpu.{json,md}``. Same models and evaluation as ``bench_guides.energy_rows`` (which runs a
300-step version in the main suite); here 32 particles, ClippedAdam lr 0.01 decayed to ×0.05, ``flow_lr_scale=1``
(the base starts at N(0, I), so the flows may learn at full speed), ELBO from 20 000 particles, log Z by quadrature.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import pyro
import torch
from bench_guides import energy_model, evaluate_elbo, log_normalizer
from harness import write
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_value
from pyro.optim import ClippedAdam

from pyro_flows.guides import AutoFlow, AutoIAF, AutoPlanar, AutoSplineCoupling

COLUMNS = ["problem", "guide", "steps", "seconds", "kl"]

GUIDES: dict[str, Callable[..., Callable]] = {
    "AutoNormal": lambda m, i: AutoNormal(m, init_loc_fn=i, init_scale=1.0),
    "AutoSplineCoupling(4)": lambda m, i: AutoSplineCoupling(
        m, num_flows=4, init_loc_fn=i, init_scale=1.0, flow_lr_scale=1.0
    ),
    "AutoIAF(4)": lambda m, i: AutoIAF(m, num_flows=4, init_loc_fn=i, init_scale=1.0, flow_lr_scale=1.0),
    "AutoFlow(spline_autoregressive, 4)": lambda m, i: AutoFlow(
        m, flow="spline_autoregressive", num_flows=4, init_loc_fn=i, init_scale=1.0, flow_lr_scale=1.0
    ),
    "AutoPlanar(16)": lambda m, i: AutoPlanar(m, num_flows=16, init_loc_fn=i, init_scale=1.0, flow_lr_scale=1.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--energies", default="U1,U2,U3,U4")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.energies.split(","):
        log_z = log_normalizer(name)
        model = energy_model(name)
        for label, make in GUIDES.items():
            pyro.clear_param_store()
            torch.manual_seed(0)
            guide = make(model, init_to_value(values={"z": torch.zeros(2)}))
            optim = ClippedAdam({"lr": 0.01, "lrd": 0.05 ** (1 / args.steps)})
            svi = SVI(model, guide, optim, Trace_ELBO(num_particles=32, vectorize_particles=True))
            start = time.perf_counter()
            for _ in range(args.steps):
                svi.step()
            seconds = time.perf_counter() - start
            kl = log_z - evaluate_elbo(model, guide, particles=20000)
            rows.append({"problem": name, "guide": label, "steps": args.steps, "seconds": seconds, "kl": kl})
    print(write("energies_long", rows, COLUMNS, "cpu"))


if __name__ == "__main__":
    main()
