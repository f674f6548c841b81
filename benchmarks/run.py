"""Run benchmark suites side by side and write JSON + markdown tables to ``benchmarks/results/``.

Usage::

    python benchmarks/run.py                      # every suite on the CPU
    python benchmarks/run.py --suite transforms   # one suite
    python benchmarks/run.py --device cuda        # on a GPU

A suite is a module ``benchmarks/bench_<name>.py`` with ``COLUMNS`` and ``run(device: str, quick: bool)``
returning a list of row dicts. Timings are never asserted anywhere; they are recorded here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from harness import write  # noqa: E402


def main() -> None:
    suites = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", action="append", choices=suites, help="suite(s) to run (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.suite or suites:
        module = importlib.import_module(f"bench_{name}")
        rows = module.run(args.device, args.quick)
        print(write(name, rows, module.COLUMNS, args.device), end="\n\n")


if __name__ == "__main__":
    main()
