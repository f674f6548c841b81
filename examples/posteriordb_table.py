"""Compare the flow guide, AutoNormal and AutoMultivariateNormal with posteriordb reference posteriors.

Writes ``docs/posteriordb.md``. Usage::

    python examples/posteriordb_table.py --root ../shared/data/posteriordb --steps 1500
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from posteriordb_models import GUIDES, POSTERIORS, fit_and_compare

HEADER = """# Reference posteriors (posteriordb)

Each guide is fitted to four posteriordb posteriors written in Pyro (`examples/posteriordb_models.py`) and compared
with posteriordb's reference draws (Stan NUTS, 10 × 1000 draws) in constrained space: **max |mean error|** is the
largest |mean − reference mean| / reference sd over all parameters (goal < 0.1), **sd ratio** the range of
sd / reference sd (goal within 0.9–1.1), **k̂** the PSIS diagnostic of the guide (Yao et al. 2018; < 0.5 good,
> 0.7 unreliable). **PSIS** rows are the flow guide's draws importance-resampled by their Pareto-smoothed weights
(`pyro_flows.diagnostics.importance_resample`).

Protocol: Laplace approximation (MAP by L-BFGS, inverse Hessian); every guide starts at the MAP; the flow guide
(`laplace_flow_guide`: `AutoFlow.from_guide` of the Laplace fit, two affine IAF layers (`gated=False`, hidden
32, 32) and a triangular layer holding the Laplace correlations, i.e. exactly the Laplace Gaussian at step 0) and
AutoNormal / AutoMultivariateNormal (init at the MAP, init scale 0.1) each run {steps} Adam steps (lr 0.01 decayed
to 0.001, 8 vectorized particles), then 4000 draws. Time = Laplace + SVI on one shared CPU core (other jobs were
running: compare times within a row only). Command: `python examples/posteriordb_table.py --steps {steps}`.

Notes. Stan's flat priors (kidiq `beta`, earnings `beta` and `sigma`) are written as N(0, 1000²) / HalfNormal(1000)
(Pyro's `Predictive` and autoguide initializations sample every prior once; `ImproperUniform` cannot be sampled);
the effect on the posterior is far below 10⁻³ sd. Eight schools (non-centered) is the hard case: the hierarchical
scale tau has a long right tail that every guide shortens. With the affine IAF layers at 3000 steps, seeds 0–2 gave
k̂ 0.35–0.64, raw max |mean error| 0.05–0.16 (tau's sd 0.82–0.97 of the reference) and a PSIS-corrected pass on all
three seeds; the gated IAF update (the `"iaf"` default) gave k̂ 0.57–0.78 and raw errors up to 0.21 (tau's sd 0.83).
The price on the regressions: with gated layers at 1500 steps the raw guide's worst mean error was 0.10 (arK) and
0.05 (earnings) sd, with the affine layers at 3000 steps 0.22 and 0.15 (k̂ 0.27 and 0.42; PSIS corrects both).
AutoMultivariateNormal starts at the MAP with scale 0.1 (not at the Laplace covariance) and has not converged in
{steps} steps on the ill-conditioned regressions (sd ratios ≪ 1).

| posterior | guide | ELBO | k̂ | max \\|mean error\\| | sd ratio | pass | time (s) |
|---|---|---|---|---|---|---|---|
"""


def markdown(table) -> str:
    head = "| parameter | " + " | ".join(table.columns) + " |\n|---" + "|---" * len(table.columns) + "|\n"
    body = "".join(f"| {ix} | " + " | ".join(f"{v:.3f}" for v in values) + " |\n" for ix, values in table.iterrows())
    return head + body


def passes(table) -> bool:
    return bool((table.mean_error.abs() < 0.1).all() and ((table.sd_ratio - 1).abs() < 0.1).all())


def row(name: str, guide: str, result: dict, table) -> str:
    return (
        f"| {name} | {guide} | {result['elbo']:.2f} | {result['khat']:.2f} | {table.mean_error.abs().max():.3f} | "
        f"{table.sd_ratio.min():.3f}–{table.sd_ratio.max():.3f} | {'yes' if passes(table) else 'no'} | "
        f"{result['seconds']:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[2] / "shared/data/posteriordb"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs/posteriordb.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [HEADER.format(steps=args.steps)]
    details = []
    for name in POSTERIORS:
        for guide in GUIDES:
            result = fit_and_compare(name, args.root, guide, num_steps=args.steps)
            lines.append(row(name, guide, result, result["table"]) + "\n")
            if guide == "flow":
                lines.append(row(name, "flow + PSIS", result, result["psis_table"]) + "\n")
                details.append(f"\n### {name}: flow guide\n\n{markdown(result['table'])}\n")
                details.append(f"\n### {name}: flow guide + PSIS\n\n{markdown(result['psis_table'])}\n")
            print(lines[-1], end="", flush=True)
    lines.append("\n## Per-parameter tables\n")
    lines.extend(details)
    Path(args.out).write_text("".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
