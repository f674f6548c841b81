"""Guide speed ratios vs Pyro measured interleaved (A B A B …), the source of every quoted guide ratio.

Usage::

    python benchmarks/interleaved.py            # 15 rounds of 40 steps per guide, 1 thread
    python benchmarks/interleaved.py --quick    # 3 rounds of 10 steps (smoke run)

Model: the 50-d Bayesian logistic regression of ``bench_guides.py`` (500 rows; the small-model row: non-centered
eight schools, D = 10), ``Trace_ELBO`` with one particle,
Adam lr 0.01, one torch thread. Each pair is built once, warmed up, then timed in alternating rounds so that both
guides see the same machine load; the ratio is Pyro's time per step over ours per round, reported as the median and
the range over rounds. Architectures are matched where the row says so (same hidden sizes, same number of
reflections). Results go to ``results/interleaved-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import pyro.distributions.transforms as T
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoNormalizingFlow
from pyro.optim import Adam

sys.path.insert(0, str(Path(__file__).parent))

from bench_guides import eight_schools_noncentered, logistic_data, logistic_model
from harness import write

from pyro_flows.guides import AutoIAF, AutoPlanar, AutoSylvester

COLUMNS = [
    "comparison",
    "ours",
    "pyro",
    "ours_ms_per_step",
    "pyro_ms_per_step",
    "ratio_median",
    "ratio_min",
    "ratio_max",
]

D = 50
PYRO_SYLVESTER_REFLECTIONS = D // 2 + 1  # Pyro's default count_transforms

#: comparison -> (our label, our guide, Pyro's label, Pyro's guide); on the logistic regression unless in SMALL
PAIRS: dict[str, tuple[str, Callable, str, Callable]] = {
    "AutoIAF vs AutoIAFNormal, defaults vs defaults": (
        "AutoIAF()",
        lambda m: AutoIAF(m),
        "AutoIAFNormal()",
        lambda m: AutoIAFNormal(m),
    ),
    "AutoIAF vs AutoIAFNormal, equal architecture (2 layers, 64x64)": (
        "AutoIAF(num_flows=2, hidden_dims=(64, 64))",
        lambda m: AutoIAF(m, num_flows=2, hidden_dims=(64, 64)),
        "AutoIAFNormal(hidden_dim=[64, 64], num_transforms=2)",
        lambda m: AutoIAFNormal(m, hidden_dim=[64, 64], num_transforms=2),
    ),
    "AutoSylvester vs sylvester x 4, matched reflections": (
        f"AutoSylvester(num_reflections={PYRO_SYLVESTER_REFLECTIONS})",
        lambda m: AutoSylvester(m, num_reflections=PYRO_SYLVESTER_REFLECTIONS),
        "AutoNormalizingFlow(sylvester x 4)",
        lambda m: AutoNormalizingFlow(m, functools.partial(T.iterated, 4, T.sylvester)),
    ),
    "AutoPlanar vs planar x 8": (
        "AutoPlanar()",
        lambda m: AutoPlanar(m),
        "AutoNormalizingFlow(planar x 8)",
        lambda m: AutoNormalizingFlow(m, functools.partial(T.iterated, 8, T.planar)),
    ),
    "small model (non-centered eight schools, D=10): AutoIAF vs AutoIAFNormal, defaults vs defaults": (
        "AutoIAF()",
        lambda m: AutoIAF(m),
        "AutoIAFNormal()",
        lambda m: AutoIAFNormal(m),
    ),
    "small model (non-centered eight schools, D=10): AutoIAF vs AutoIAFNormal, equal architecture (Pyro's default)": (
        "AutoIAF(num_flows=1, hidden_dims=(31,))",
        lambda m: AutoIAF(m, num_flows=1, hidden_dims=(31,)),
        "AutoIAFNormal() (1 layer, hidden 3D + 1 = 31)",
        lambda m: AutoIAFNormal(m),
    ),
}
#: the pairs timed on the small model (no data arguments)
SMALL = {name for name in PAIRS if name.startswith("small model")}


def _stepper(make: Callable, model: Callable, *args: torch.Tensor) -> Callable[[int], float]:
    """An SVI closure timing ``steps`` steps (the paired guides are of different classes: no shared parameters)."""
    guide = make(model)
    svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            svi.step(*args)
        return (time.perf_counter() - start) / steps

    return run


def measure(rounds: int, steps: int) -> list[dict]:
    data = logistic_data(d=D)
    rows = []
    for comparison, (ours_label, ours, pyro_label, theirs) in PAIRS.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model, args = (eight_schools_noncentered, ()) if comparison in SMALL else (logistic_model, data)
        a = _stepper(ours, model, *args)
        b = _stepper(theirs, model, *args)
        a(5)
        b(5)
        ours_times, pyro_times = [], []
        for _ in range(rounds):
            ours_times.append(a(steps))
            pyro_times.append(b(steps))
        ratios = [p / o for o, p in zip(ours_times, pyro_times, strict=True)]
        rows.append(
            {
                "comparison": comparison,
                "ours": ours_label,
                "pyro": pyro_label,
                "ours_ms_per_step": 1e3 * statistics.median(ours_times),
                "pyro_ms_per_step": 1e3 * statistics.median(pyro_times),
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = measure(3, 10) if args.quick else measure(15, 40)
    print(write("interleaved", rows, COLUMNS, "cpu"))


if __name__ == "__main__":
    main()
