"""Rezende & Mohamed's energies U1–U4 at full budgets: exact KL(q‖p) = log Z − ELBO per guide.

Usage: ``python benchmarks/energies_long.py [--energies U1,U2,U3,U4] [--guides LABEL ...]``; writes
``results/energies_long-cpu.{json,md}``, replacing the rows it re-runs and keeping the others. Same models and
evaluation as ``bench_guides.energy_rows`` (which runs a 300-step version in the main suite): ClippedAdam lr 0.01
(0.005 for the deep spline stack) decayed to ×0.05 (×0.02) over the run for the base and the flows alike (the base
starts at N(0, I), so the flows may learn at full speed), ELBO from 20 000 particles, log Z by quadrature. The first
five guides run 2500 steps with 32 particles; the deep spline stack (8 coupling layers, 16 bins, bound 4) 8000 steps
with 128 particles.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from bench_guides import PRESETS, available_presets, energy_model, evaluate_elbo, log_normalizer
from harness import update
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_value
from pyro.optim import ClippedAdam

from pyro_flows.guides import AutoFlow, AutoIAF, AutoPlanar, AutoSplineCoupling

COLUMNS = ["problem", "guide", "steps", "particles", "seconds", "kl"]


@dataclass(frozen=True)
class Setting:
    make: Callable[..., Callable]
    steps: int = 2500
    particles: int = 32
    lr: float = 0.01
    final_lr_factor: float = 0.05


GUIDES: dict[str, Setting] = {
    "AutoNormal": Setting(lambda m, i: AutoNormal(m, init_loc_fn=i, init_scale=1.0)),
    "AutoSplineCoupling(4)": Setting(lambda m, i: AutoSplineCoupling(m, num_flows=4, init_loc_fn=i, init_scale=1.0)),
    "AutoIAF(4)": Setting(lambda m, i: AutoIAF(m, num_flows=4, init_loc_fn=i, init_scale=1.0)),
    "AutoFlow(spline_iaf, 4)": Setting(
        lambda m, i: AutoFlow(m, flow="spline_iaf", num_flows=4, init_loc_fn=i, init_scale=1.0)
    ),
    "AutoPlanar(16)": Setting(lambda m, i: AutoPlanar(m, num_flows=16, init_loc_fn=i, init_scale=1.0)),
    "AutoSplineCoupling(8, 16 bins, bound 4)": Setting(
        lambda m, i: AutoSplineCoupling(m, num_flows=8, init_loc_fn=i, init_scale=1.0, num_bins=16, bound=4.0),
        steps=8000,
        particles=128,
        lr=0.005,
        final_lr_factor=0.02,
    ),
}


def preset_settings() -> dict[str, Setting]:
    """Issue #16's protocol: every available preset at its defaults (start included), 2500 steps, 32 particles,
    ClippedAdam at lr 5e-3 throughout."""
    return {
        f"{name}() at defaults": Setting(lambda m, i, cls=PRESETS[name]: cls(m), lr=0.005, final_lr_factor=1.0)
        for name in available_presets()
    }


def run(name: str, label: str, setting: Setting) -> dict:
    log_z = log_normalizer(name)
    model = energy_model(name)
    pyro.clear_param_store()
    torch.manual_seed(0)
    guide = setting.make(model, init_to_value(values={"z": torch.zeros(2)}))
    optim = ClippedAdam({"lr": setting.lr, "lrd": setting.final_lr_factor ** (1 / setting.steps)})
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=setting.particles, vectorize_particles=True))
    start = time.perf_counter()
    for _ in range(setting.steps):
        svi.step()
    seconds = time.perf_counter() - start
    kl = log_z - evaluate_elbo(model, guide, particles=20000)
    return {
        "problem": name,
        "guide": label,
        "steps": setting.steps,
        "particles": setting.particles,
        "seconds": seconds,
        "kl": kl,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--energies", default="U1,U2,U3,U4")
    parser.add_argument("--guides", nargs="+", choices=list(GUIDES), default=list(GUIDES), help="default: all")
    parser.add_argument(
        "--presets", action="store_true", help="instead: every preset at its defaults (issue #16's protocol)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = preset_settings() if args.presets else {label: GUIDES[label] for label in args.guides}
    rows = [run(name, label, setting) for name in args.energies.split(",") for label, setting in settings.items()]
    print(update("energies_long", rows, COLUMNS, "cpu"))


if __name__ == "__main__":
    main()
