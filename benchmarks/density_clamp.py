"""MAF's log-scale clamp in density estimation: the rational clamp (today's) against the former tanh clamp.

Usage::

    python benchmarks/density_clamp.py                     # digits and breast cancer, 9 seeds, 1 thread
    python benchmarks/density_clamp.py --seeds 0 1 2 --datasets digits
    python benchmarks/density_clamp.py --toys              # adds the four 2-d toys at seed 0 (bench_density's protocol)

MAF's affine map bounds its log-scale softly by $B$. The clamp was $B \\tanh(\\tilde s / B)$ (``soft_clamp``, still
the clamp of IAF and affine coupling) and is now $\\tilde s / (1 + |\\tilde s| / B)$ (``rational_clamp``, both in
``pyro_flows/transforms/_network_flows.py``); the former is patched in for the comparison.

Protocol: `bench_density.py`'s MAF-versus-zuko comparison (5 layers, hidden (128, 128), same splits and
standardization, batch 128, Adam lr 1e-3, at most 300 epochs, patience 20, restore of the best weights), over more
seeds, with our MAF in its default random orders and in zuko's alternating natural/reversed orders. Test NLLs are
means over the test points, so one badly modelled point can move a seed's number by several nats. The rows give the
mean over seeds, the worst seed and the mean over seeds of the per-point median. Results go to
``results/density_clamp-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))
import bench_density
from harness import write

from pyro_flows.density import TOY_DATASETS, FlowDensity
from pyro_flows.transforms._network_flows import NormalizingAffineMap, rational_clamp, soft_clamp

COLUMNS = ["dataset", "model", "seeds", "mean_nll", "worst_seed_nll", "sd_over_seeds", "median_point_nll"]
LOADERS = {"digits": bench_density._digits, "breast_cancer": bench_density._breast_cancer}
CLAMPS = {"rational": rational_clamp, "tanh": soft_clamp}


def _set_clamp(clamp: Callable[[Tensor, float], Tensor]) -> None:
    NormalizingAffineMap.clamp = staticmethod(clamp)


def _summary(dataset: str, model: str, seeds: list[int], point_nlls: list[Tensor]) -> dict[str, Any]:
    means = [nll.mean().item() for nll in point_nlls]
    return {
        "dataset": dataset,
        "model": model,
        "seeds": len(seeds),
        "mean_nll": statistics.fmean(means),
        "worst_seed_nll": max(means),
        "sd_over_seeds": statistics.stdev(means) if len(means) > 1 else 0.0,
        "median_point_nll": statistics.fmean(nll.median().item() for nll in point_nlls),
    }


def run(dataset: str, seeds: list[int]) -> list[dict[str, Any]]:
    """Rows of our MAF (two clamps x two orders) and of zuko's MAF over ``seeds``."""
    train, val, test = LOADERS[dataset]()
    runs: dict[str, list[Tensor]] = {}
    for seed in seeds:  # the variants alternate within each seed
        for clamp_name, clamp in CLAMPS.items():
            for order in ("random", "natural"):
                _set_clamp(clamp)
                try:
                    density, _, _ = bench_density._fit_ours(
                        "maf", train, val, 300, 20, 128, seed=seed, num_flows=5, hidden_dims=(128, 128), order=order
                    )
                    with torch.no_grad():  # scored with the clamp it was trained with
                        nll = -density.log_prob(test)
                finally:
                    _set_clamp(rational_clamp)
                runs.setdefault(f"maf, {clamp_name} clamp, {order} orders", []).append(nll)
        fitted = bench_density._fit_zuko(train, val, 300, 20, 128, seed=seed)
        if fitted is not None:
            with torch.no_grad():
                runs.setdefault("zuko MAF", []).append(-fitted[0](test))
    return [_summary(dataset, model, seeds, nlls) for model, nlls in runs.items()]


def toys() -> list[dict[str, Any]]:
    """bench_density's 2-d toys (MAF, seed 0) with each clamp."""
    rows = []
    for name, sampler in TOY_DATASETS.items():
        sizes = (20_000, 4000, 20_000)
        train, val, test = (sampler(m, generator=torch.Generator().manual_seed(s)) for s, m in enumerate(sizes))
        for clamp_name, clamp in CLAMPS.items():
            _set_clamp(clamp)
            try:
                torch.manual_seed(0)
                density = FlowDensity(2, flow="maf", num_flows=5, hidden_dims=(64, 64))
                density.fit(
                    train, validation_data=val, epochs=40, patience=10, batch_size=256, lr=2e-3,
                    lr_schedule="cosine", progress=False, seed=0,
                )  # fmt: skip
                with torch.no_grad():  # scored with the clamp it was trained with
                    nll = -density.log_prob(test)
            finally:
                _set_clamp(rational_clamp)
            rows.append(_summary(name, f"maf, {clamp_name} clamp, random orders", [0], [nll]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=list(LOADERS), choices=list(LOADERS))
    parser.add_argument("--seeds", nargs="*", type=int, default=list(range(9)))
    parser.add_argument("--toys", action="store_true", help="also the four 2-d toys at seed 0")
    options = parser.parse_args()
    torch.set_num_threads(1)
    rows = [row for dataset in options.datasets for row in run(dataset, options.seeds)]
    if options.toys:
        rows += toys()
    print(write("density_clamp", rows, COLUMNS, "cpu"))


if __name__ == "__main__":
    main()
