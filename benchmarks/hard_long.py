"""Neal's funnel (10-d) and centered eight schools at the issue's budget: 5000 float32 SVI steps per guide.

Usage: ``python benchmarks/hard_long.py [--steps 5000] [--slow-steps 1000] [--guides LABEL ...]``; writes
``results/hard_long-cpu.{json,md}`` (replacing the rows it re-runs) with PSIS k̂, the final ELBO and whether every
loss and parameter stayed finite. The sequential/iterative presets (AutoMAF, AutoFFJORD, AutoResidual) get
``--slow-steps``.
"""

from __future__ import annotations

import argparse

import torch
from bench_guides import COLUMNS, hard_rows
from harness import update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--slow-steps", type=int, default=1000)
    parser.add_argument("--guides", nargs="+", default=None, help="guide labels (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(update("hard_long", hard_rows(False, args.steps, args.slow_steps, args.guides), COLUMNS, "cpu"))


if __name__ == "__main__":
    main()
