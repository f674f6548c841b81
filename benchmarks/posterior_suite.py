"""Development suite of reference posteriors: how close each guide gets out of the box.

Problems (``--problems`` filters them):

* the eleven posteriordb posteriors of ``examples/posteriordb_models.py`` (reference: posteriordb's Stan NUTS
  draws, 10 × 1000, from ``<repo>/../shared/data/posteriordb``; skipped with a note when the folder is absent);
* ``eight_schools_centered``: the centered parameterization of eight schools; reference: the non-centered NUTS
  draws, whose ``theta`` is the transformed parameter ``mu + tau * theta_trans`` (the same posterior of
  ``mu, tau, theta``);
* ``funnel10``: Neal's funnel, ``v ~ N(0, 3)``, ``x[1..9] ~ N(0, exp(v / 2))``; reference: 100,000 exact draws;
* ``U1``–``U4``: the 2-d energies of Rezende & Mohamed (2015) as ``pyro.factor`` models (``bench_guides.energy``);
  reference: 100,000 exact draws from the density on a fine grid (cell drawn by its mass, uniform within the cell),
  i.e. grid-exact moments up to Monte Carlo error (~0.003 sd).

Guides (``--guides`` filters them): Pyro's ``AutoNormal``, ``AutoMultivariateNormal`` and ``AutoIAFNormal``, and
pyro_flows' ``AutoFlow``, each at its defaults (default initialization, init scale, flow), trained by one protocol:
ClippedAdam, lr 1e-2 decayed geometrically to 1e-3 over the run (every parameter at the same rate), 8 vectorized
particles, ``--steps`` steps (3000); then ``pyro_flows.fit(model, *args)`` at its defaults (its own budget and
stopping rule; ``--steps`` does not apply; its draws are PSIS-resampled when k̂ < 0.7, as a user gets them), or
"n/a" when ``pyro_flows.fit`` cannot be imported.

Per problem × guide: ``mean_err`` = the largest |mean − reference mean| / reference sd over all scalar
parameters, ``sd_ratio`` = the sd / reference sd farthest from 1 (in log scale), ``khat`` = PSIS k̂
(``pyro_flows.diagnostics.psis_khat``, 4000 draws; < 0.5 good, > 0.7 unreliable), ``seconds`` = wall time of the
fit (SVI; for ``fit`` its whole run), from 4000 guide draws in constrained space
(``to_inference_data`` + ``compare_to_reference``). A fit whose loss turns non-finite is reported as ``failed``.

Output: printed rows, ``benchmarks/results/posterior_suite-cpu.{json,md}`` (merged with earlier rows by
``(problem, guide)``, so runs over subsets add up) and the table of ``docs/posterior-suite.md`` (between its
``<!-- suite-table -->`` markers).

Examples:
    Smoke run (100 steps, 500 draws, a few problems)::

        python benchmarks/posterior_suite.py --quick

    The recorded tables::

        python benchmarks/posterior_suite.py --steps 3000
        python benchmarks/posterior_suite.py --problems arK-arK funnel10 --guides AutoNormal AutoFlow
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_guides import energy  # noqa: E402
from harness import markdown_table, result_path, update  # noqa: E402
from posteriordb_models import POSTERIORS, VAGUE, eight_schools_centered, load_posterior  # noqa: E402

from pyro_flows.diagnostics import (  # noqa: E402
    compare_to_reference,
    fit_svi,
    psis_khat,
    read_posteriordb_draws,
    to_inference_data,
)
from pyro_flows.guides import AutoFlow  # noqa: E402

DTYPE = torch.float64
DATA = REPO.parent / "shared" / "data" / "posteriordb"
DOC = REPO / "docs" / "posterior-suite.md"
SUITE = "posterior_suite"
COLUMNS = ["problem", "guide", "dim", "steps", "mean_err", "sd_ratio", "khat", "seconds", "note"]
GUIDES = ("AutoNormal", "AutoMultivariateNormal", "AutoIAFNormal", "AutoFlow", "fit")
#: AutoFlow settings compared when its defaults were chosen (docs/posterior-suite.md, "AutoFlow's defaults"): the
#: Laplace start with the flows of the defaults before (two gated IAF layers 64 x 64) and with four affine IAF layers
#: 32 x 32 (the defaults since, which are also pyro_flows.fit's guide).
AUTOFLOW_VARIANTS: dict[str, dict[str, Any]] = {
    "AutoFlow[laplace,gated]": {"start": "laplace", "num_flows": 2, "hidden_dims": (64, 64), "gated": True},
    "AutoFlow[laplace,affine]": {"start": "laplace", "num_flows": 4, "hidden_dims": (32, 32), "gated": False},
}
#: The rows of the defaults before 2026-12-02 (cold start: `init_to_feasible` at scale 0.1, diagonal base, two
#: gated IAF layers 64 x 64), run as `--guides AutoFlow` at commit 1473824; kept in the results file, not runnable.
BEFORE = "AutoFlow (before 2026-12-02)"
DEFAULTS_COLUMNS = (BEFORE, *AUTOFLOW_VARIANTS)
ALL_PROBLEMS = (*POSTERIORS, "eight_schools_centered", "funnel10", "U1", "U2", "U3", "U4")
QUICK_PROBLEMS = ("arK-arK", "hmm_example-hmm_example", "eight_schools_centered", "funnel10", "U2")
TABLE_START, TABLE_END = "<!-- suite-table:start -->", "<!-- suite-table:end -->"
DEFAULTS_START, DEFAULTS_END = "<!-- defaults-table:start -->", "<!-- defaults-table:end -->"


@dataclass
class Problem:
    """A model, its arguments and reference draws ``{site: array (draws, *shape)}`` in constrained space."""

    name: str
    model: Callable[..., None]
    args: tuple[Any, ...]
    reference: dict[str, np.ndarray]


# ------------------------------------------------------------------------------------------------- problems
def funnel10() -> None:
    """Neal's funnel in 10 dimensions: ``v ~ N(0, 3)``, ``x ~ N(0, exp(v / 2))`` (9 coordinates)."""
    v = pyro.sample("v", dist.Normal(torch.zeros((), dtype=DTYPE), 3.0))
    scale = (v / 2).exp().unsqueeze(-1)
    pyro.sample("x", dist.Normal(torch.zeros(9, dtype=DTYPE), scale).to_event(1))


def funnel_reference(num: int = 100_000, seed: int = 0) -> dict[str, np.ndarray]:
    """Exact draws of :func:`funnel10`."""
    gen = torch.Generator().manual_seed(seed)
    v = 3.0 * torch.randn(num, generator=gen, dtype=DTYPE)
    x = torch.randn(num, 9, generator=gen, dtype=DTYPE) * (v / 2).exp().unsqueeze(-1)
    return {"v": v.numpy(), "x": x.numpy()}


def energy_model(name: str) -> Callable[[], None]:
    """``z ~ exp(-U(z))`` on R² as a (vague) site plus ``pyro.factor`` (float64)."""

    def model() -> None:
        # Stan-style flat prior as the suite's vague proper one (guides' initializations sample every prior once):
        # log N(z | 0, 1000²) varies by < 2e-4 nats over the grid
        z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=DTYPE), VAGUE).to_event(1))
        pyro.factor("U", -energy(name, z.to(DTYPE)))

    return model


def energy_reference(name: str, num: int = 100_000, n: int = 1200, seed: int = 0) -> dict[str, np.ndarray]:
    """Draws from ``exp(-U)`` on the grid [−15, 15] × [−8, 8] (cells by mass, uniform inside a cell)."""
    width = (30.0 / (2 * n), 16.0 / n)
    z1 = torch.linspace(-15 + width[0] / 2, 15 - width[0] / 2, 2 * n, dtype=DTYPE)
    z2 = torch.linspace(-8 + width[1] / 2, 8 - width[1] / 2, n, dtype=DTYPE)
    grid = torch.stack(torch.meshgrid(z1, z2, indexing="ij"), -1).reshape(-1, 2)
    log_mass = -energy(name, grid)
    gen = torch.Generator().manual_seed(seed)
    cells = torch.multinomial((log_mass - log_mass.max()).exp(), num, replacement=True, generator=gen)
    jitter = (torch.rand(num, 2, generator=gen, dtype=DTYPE) - 0.5) * torch.tensor(width, dtype=DTYPE)
    return {"z": (grid[cells] + jitter).numpy()}


def _flat(reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """posteriordb ``(chain, draw, *shape)`` arrays as ``(chain * draw, *shape)``."""
    return {k: v.reshape(-1, *v.shape[2:]) for k, v in reference.items()}


def load_problems(names: Sequence[str] | None) -> tuple[list[Problem], list[str]]:
    """The problems named (all by default) and notes on those that cannot be loaded."""
    wanted = list(names) if names else list(ALL_PROBLEMS)
    problems, notes = [], []
    for name in wanted:
        if name in POSTERIORS or name == "eight_schools_centered":
            if not (DATA / "reference_draws").is_dir():
                notes.append(f"{name}: skipped, no posteriordb data at {DATA}")
                continue
            source = "eight_schools-eight_schools_noncentered" if name == "eight_schools_centered" else name
            model, args = load_posterior(source, DATA)
            if name == "eight_schools_centered":
                model = eight_schools_centered
            reference = _flat(read_posteriordb_draws(DATA / "reference_draws" / f"{source}.json.zip"))
            problems.append(Problem(name, model, args, reference))
        elif name == "funnel10":
            problems.append(Problem(name, funnel10, (), funnel_reference()))
        elif re.fullmatch(r"U[1-4]", name):
            problems.append(Problem(name, energy_model(name), (), energy_reference(name)))
        else:
            notes.append(f"{name}: unknown problem")
    return problems, notes


# --------------------------------------------------------------------------------------------------- guides
def make_guide(name: str, model: Callable[..., None]) -> Any:
    """One of the four autoguides at its defaults."""
    if name == "AutoNormal":
        return AutoNormal(model)
    if name == "AutoMultivariateNormal":
        return AutoMultivariateNormal(model)
    if name == "AutoIAFNormal":
        return AutoIAFNormal(model)
    if name == "AutoFlow":
        return AutoFlow(model)
    if name in AUTOFLOW_VARIANTS:
        return AutoFlow(model, flow="iaf", **AUTOFLOW_VARIANTS[name])
    raise ValueError(f"unknown guide {name!r}")


def fit_function() -> Callable[..., Any] | None:
    """``pyro_flows.fit`` if it can be imported, else ``None``."""
    try:
        import pyro_flows

        return pyro_flows.fit
    except Exception:  # the module may be missing or mid-edit: the suite reports "n/a"
        return None


def _worst(table: Any) -> tuple[float, float]:
    mean_err = float(table.mean_error.abs().max())
    ratios = table.sd_ratio.to_numpy()
    return mean_err, float(ratios[np.argmax(np.abs(np.log(ratios)))])


def run_one(
    problem: Problem,
    guide_name: str,
    steps: int,
    num_draws: int,
    seed: int = 0,
    fit_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit one guide to one problem and compare it with the reference (``fit_options``: extra options of ``fit``)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    dim = sum(int(np.prod(v.shape[1:])) for v in problem.reference.values())
    # variants get rows of their own in the results file (the docs' tables show the defaults at seed 0)
    label = f"fit {json.dumps(fit_options, sort_keys=True)}" if guide_name == "fit" and fit_options else guide_name
    label += f" (seed {seed})" if seed else ""
    row: dict[str, Any] = {"problem": problem.name, "guide": label, "dim": dim, "steps": steps}
    args = problem.args
    start = time.perf_counter()
    try:
        if guide_name == "fit":
            fit = fit_function()
            if fit is None:
                return {**row, "steps": None, "note": "n/a"}
            result = fit(problem.model, *args, fit_options={"progress": False, "seed": seed, **(fit_options or {})})
            guide = result.guide
            row["steps"] = len(result.elbo_trace.elbo) if hasattr(result.elbo_trace, "elbo") else None
            row["seconds"] = time.perf_counter() - start
            idata = result.to_inference_data(num_draws, posterior_predictive=False, log_likelihood=False)
            row["note"] = f"{result.start}, {'PSIS' if result.resampled else 'raw'}"
        else:
            guide = make_guide(guide_name, problem.model)
            optim = pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.1 ** (1.0 / max(steps, 1))})
            fit_svi(
                problem.model,
                guide,
                *args,
                num_steps=steps,
                optim=optim,
                num_particles=8,
                vectorize_particles=True,
                progress=False,
            )
            row["seconds"] = time.perf_counter() - start
            idata = to_inference_data(problem.model, guide, *args, num_samples=num_draws, posterior_predictive=False)
        names = [n for n in problem.reference if n in idata.posterior.data_vars]
        table = compare_to_reference(idata, problem.reference, var_names=names)
        row["mean_err"], row["sd_ratio"] = _worst(table)
        row["khat"] = psis_khat(problem.model, guide, *args, num_samples=num_draws)
    except (FloatingPointError, ValueError, RuntimeError, NotImplementedError) as error:
        row["seconds"] = time.perf_counter() - start
        row["note"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
        traceback.print_exc(limit=2)
    return row


# --------------------------------------------------------------------------------------------------- output
def doc_table(rows: Sequence[dict[str, Any]], guides: Sequence[str] = GUIDES) -> str:
    """One line per problem, one column group per guide: ``mean err / sd ratio / k̂ / s``."""
    guides = [g for g in guides if any(r["guide"] == g for r in rows)]
    problems = list(dict.fromkeys(r["problem"] for r in rows))
    by_key = {(r["problem"], r["guide"]): r for r in rows}

    def cell(row: dict[str, Any] | None) -> str:
        if row is None:
            return "–"
        if row.get("mean_err") is None:
            return str(row.get("note") or "failed").split(":")[0]
        khat = row.get("khat")
        khat_text = "inf" if khat is None or not math.isfinite(khat) else f"{khat:.2f}"
        return f"{row['mean_err']:.2f} / {row['sd_ratio']:.2f} / {khat_text} / {row['seconds']:.0f}"

    def within(guide: str) -> int:
        return sum(
            1
            for r in rows
            if r["guide"] == guide
            and r.get("mean_err") is not None
            and r["mean_err"] < 0.1
            and 0.9 <= r["sd_ratio"] <= 1.1
        )

    lines = ["| problem | dim | " + " | ".join(guides) + " |", "|---|---|" + "---|" * len(guides)]
    for problem in problems:
        dim = next(r["dim"] for r in rows if r["problem"] == problem)
        lines.append(f"| {problem} | {dim} | " + " | ".join(cell(by_key.get((problem, g))) for g in guides) + " |")
    lines.append("| within both goals | | " + " | ".join(f"{within(g)} of {len(problems)}" for g in guides) + " |")
    return "\n".join(lines)


def write_doc(rows: Sequence[dict[str, Any]], command: str) -> None:
    """Replace the two tables between the markers of ``docs/posterior-suite.md``."""
    if not DOC.exists():
        return
    text = DOC.read_text()
    for start, end, guides in ((TABLE_START, TABLE_END, GUIDES), (DEFAULTS_START, DEFAULTS_END, DEFAULTS_COLUMNS)):
        if start not in text or end not in text:
            continue
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        table = doc_table(rows, guides)
        text = head + f"{start}\nCommand: `{command}` (torch {torch.__version__}, CPU).\n\n{table}\n{end}" + tail
    DOC.write_text(text)


def render_doc(suite: str, steps: int) -> None:
    """Write the docs tables from every row of ``results/<suite>-cpu.json`` (problems in suite order)."""
    rows = json.loads(result_path(suite, "cpu", ".json").read_text())["rows"]
    order = {name: i for i, name in enumerate(ALL_PROBLEMS)}
    names = [*GUIDES, *DEFAULTS_COLUMNS]
    rank = {name: i for i, name in enumerate(names)}  # variant rows ("fit (seed 1)", ...) sort last, unshown
    rows.sort(key=lambda r: (order.get(r["problem"], len(order)), r["problem"], rank.get(r["guide"], len(rank))))
    write_doc(rows, f"python benchmarks/posterior_suite.py --steps {steps}")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the suite (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="SVI steps of the four autoguides")
    parser.add_argument("--draws", type=int, default=4000, help="guide draws compared with the reference")
    parser.add_argument("--problems", nargs="*", help="problems to run (default: all)")
    parser.add_argument(
        "--guides", nargs="*", choices=[*GUIDES, *AUTOFLOW_VARIANTS], help="guides to run (default: the five of GUIDES)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 100 steps, 500 draws, a few problems")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/posterior-suite.md")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fit-options",
        type=json.loads,
        help='JSON dict of extra FitOptions for the fit guide, e.g. \'{"num_particles": 32}\' (rows "fit {...}")',
    )
    parser.add_argument(
        "--render-only", action="store_true", help="only rewrite the docs table from the results JSON (no fits)"
    )
    options = parser.parse_args(argv)
    if options.render_only:
        render_doc(SUITE, options.steps)
        return
    torch.set_num_threads(options.threads)
    # float64 throughout: the models' data are float64, and so become the networks of AutoIAFNormal and AutoFlow
    torch.set_default_dtype(DTYPE)
    warnings.filterwarnings("ignore")
    steps, draws = (100, 500) if options.quick else (options.steps, options.draws)
    problems, notes = load_problems(options.problems or (QUICK_PROBLEMS if options.quick else None))
    for note in notes:
        print(note, flush=True)
    suite = f"{SUITE}-quick" if options.quick else SUITE
    rows = []
    for problem in problems:
        for guide_name in options.guides or GUIDES:
            row = run_one(problem, guide_name, steps, draws, options.seed, options.fit_options)
            rows.append(row)
            print(markdown_table([row], COLUMNS).splitlines()[-1], flush=True)
            # after every row: partial runs keep their results, and runs over subsets (in parallel) add up
            update(suite, [row], COLUMNS, "cpu")
    if not options.quick and not options.no_doc:
        render_doc(suite, steps)
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
