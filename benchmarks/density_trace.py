"""`FlowDensity.fit` with its traced log-density (``jit=True``, the default) and eager, each against zuko's MAF.

Usage::

    python benchmarks/density_trace.py                 # digits and breast cancer, both settings, 1 thread
    python benchmarks/density_trace.py --datasets digits

Protocol: `bench_density.py`'s MAF-versus-zuko comparison. The architecture is the same on both sides (5 layers,
hidden (128, 128)), and so are the splits, the standardization, batch 128, Adam lr 1e-3, at most 300 epochs,
patience 20 and the restore of the best weights. Ours and zuko's alternate over 3 seeds in one process, once with
``jit=True`` and once with ``jit=False``. The ratio is our wall time over zuko's in the same run. Results go to
``results/density_trace-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

import bench_density
from harness import write

from pyro_flows.density import FlowDensity

COLUMNS = ["dataset", "jit", "ours_s", "zuko_s", "time_ratio", "epoch_time_ratio", "ours_nll", "zuko_nll"]
LOADERS = {"digits": bench_density._digits, "breast_cancer": bench_density._breast_cancer}


def run(dataset: str, jit: bool) -> dict[str, Any]:
    fit = FlowDensity.fit

    def fit_with(self: FlowDensity, x: Any, context: Any = None, **options: Any) -> Any:
        return fit(self, x, context, jit=jit, **options)

    FlowDensity.fit = fit_with
    try:
        train, val, test = LOADERS[dataset]()
        ours, zuko, ratio = bench_density._versus_zuko(dataset, train, val, test, 300, 20, 128)
    finally:
        FlowDensity.fit = fit
    return {
        "dataset": dataset,
        "jit": jit,
        "ours_s": ours["fit_s"],
        "zuko_s": zuko["fit_s"],
        "time_ratio": ratio["time_ratio"],
        "epoch_time_ratio": ratio["epoch_time_ratio"],
        "ours_nll": ours["test_nll"],
        "zuko_nll": zuko["test_nll"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=list(LOADERS), choices=list(LOADERS))
    options = parser.parse_args()
    torch.set_num_threads(1)
    rows = [run(dataset, jit) for dataset in options.datasets for jit in (True, False)]
    print(write("density_trace", rows, COLUMNS, "cpu"))


if __name__ == "__main__":
    main()
