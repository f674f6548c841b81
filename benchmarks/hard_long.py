"""Neal's funnel (10-d) and centered eight schools at the issue's budget: 5000 float32 SVI steps per guide.

Usage: ``python benchmarks/hard_long.py [--steps 5000] [--slow-steps 1000]``; writes
``results/hard_long-cpu.{json,md}`` with PSIS k̂, the final ELBO and whether every loss and parameter stayed
finite. The sequential/iterative presets (AutoMAF, AutoFFJORD, AutoResidual) get ``--slow-steps``.
"""

from __future__ import annotations

import argparse

import torch
from bench_guides import COLUMNS, hard_rows
from harness import write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--slow-steps", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(write("hard_long", hard_rows(False, args.steps, args.slow_steps), COLUMNS, "cpu"))


if __name__ == "__main__":
    main()
