"""Flow autoguides vs Pyro's guides: SVI speed and ELBO, exact KL on 2-d energies, PSIS k̂ on hard posteriors.

Sections (one table, column ``problem``):

* ``logreg``: 50-d Bayesian logistic regression (500 points), 300 Adam steps at lr 0.01, ELBO from 2000 vectorized
  particles; every preset beside AutoNormal, Pyro's ``AutoIAFNormal`` (default and at our IAF's hidden sizes),
  ``AutoNormalizingFlow(planar × 8)`` and ``AutoNormalizingFlow(sylvester × 4)``. ``speedup`` = our steps/s over
  the Pyro counterpart's, measured in the same process one after the other.
* ``U1``–``U4`` (32 particles, Adam lr 0.005): Rezende & Mohamed (2015) energies as ``pyro.factor`` models
  (U2–U4 with the envelope ``0.5 (z₁/2.5)²``); ``kl`` = log Z − ELBO with log Z from a dense grid.
* ``funnel`` (Neal, 10-d) and ``eight_schools`` (centered): float32 runs; ``finite`` says whether every loss and
  parameter stayed finite; ``khat`` is Pyro's PSIS diagnostic (< 0.7 usable, < 0.5 good).

Our guides' flows learn at a fraction of the base's learning rate (``flow_optim_args``): 0.1, 0.01 for
AutoSplineCoupling and 1 for ``AutoIAF(affine × 4)`` (:data:`FLOW_LR_SCALE`), the settings of the recorded numbers.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoNormal, AutoNormalizingFlow, init_to_value
from pyro.infer.importance import psis_diagnostic
from pyro.optim import Adam

from pyro_flows.guides import PRESETS, AutoIAF, AutoSylvester, flow_optim_args
from pyro_flows.transforms import registry

COLUMNS = ["problem", "guide", "steps", "steps_per_s", "elbo", "kl", "khat", "finite", "speedup_vs", "speedup"]

PRESET_FAMILIES = {
    "AutoIAF": "iaf",
    "AutoMAF": "maf",
    "AutoPlanar": "planar",
    "AutoRadial": "radial",
    "AutoSylvester": "sylvester_householder",
    "AutoHouseholder": "householder",
    "AutoConvexTriangular": "convex_triangular",
    "AutoSplineCoupling": "spline_coupling",
    "AutoResidual": "residual",
    "AutoFFJORD": "ffjord",
}


#: Learning-rate factor of the flows per guide label (:func:`~pyro_flows.guides.flow_optim_args`; default 0.1;
#: Pyro's guides and AutoNormal have no parameters named ``.flows.``, so it does not apply to them).
FLOW_LR_SCALE = {"AutoSplineCoupling": 0.01, "AutoIAF(affine × 4)": 1.0}


def available_presets() -> list[str]:
    return [name for name in PRESETS if PRESET_FAMILIES[name] in registry]


def fit(
    model: Callable, guide: Callable, steps: int, lr: float, *args, label: str = "", num_particles: int = 1
) -> tuple[float, bool]:
    """Train with Adam (flows at ``FLOW_LR_SCALE[label]`` times ``lr``); return (steps/s, all losses finite).

    One untimed warm-up step.
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1)
    svi = SVI(model, guide, Adam(flow_optim_args(lr, FLOW_LR_SCALE.get(label, 0.1))), elbo)
    finite = math.isfinite(svi.step(*args))
    start = time.perf_counter()
    for _ in range(steps):
        finite &= math.isfinite(svi.step(*args))
    rate = steps / (time.perf_counter() - start)
    finite &= all(torch.isfinite(p).all().item() for p in pyro.get_param_store().values())
    return rate, finite


@torch.no_grad()
def evaluate_elbo(model: Callable, guide: Callable, *args, particles: int = 2000) -> float:
    return -Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1).loss(model, guide, *args)


# ----------------------------------------------------------------------------------------- logistic regression
def logistic_data(n: int = 500, d: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=generator)
    w = 0.5 * torch.randn(d, generator=generator)
    y = torch.bernoulli(torch.sigmoid(x @ w), generator=generator)
    return x, y


def logistic_model(x: torch.Tensor, y: torch.Tensor) -> None:
    w = pyro.sample("w", dist.Normal(x.new_zeros(x.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=(w * x).sum(-1)), obs=y)


def logreg_rows(quick: bool) -> list[dict]:
    x, y = logistic_data()
    steps = 60 if quick else 300
    particles = 200 if quick else 2000
    guides: dict[str, Callable[[], Callable]] = {"AutoNormal": lambda: AutoNormal(logistic_model)}
    for name in available_presets():
        guides[name] = functools.partial(PRESETS[name], logistic_model)
    if "sylvester_householder" in registry:
        for kind in ("orthogonal", "triangular"):
            guides[f"AutoSylvester(kind={kind!r})"] = functools.partial(AutoSylvester, logistic_model, kind=kind)
    guides["pyro AutoIAFNormal (default)"] = lambda: AutoIAFNormal(logistic_model)
    guides["pyro AutoIAFNormal (hidden 64,64 ×2)"] = lambda: AutoIAFNormal(
        logistic_model, hidden_dim=[64, 64], num_transforms=2
    )
    guides["pyro AutoNormalizingFlow(planar × 8)"] = lambda: AutoNormalizingFlow(
        logistic_model, functools.partial(T.iterated, 8, T.planar)
    )
    guides["pyro AutoNormalizingFlow(sylvester × 4)"] = lambda: AutoNormalizingFlow(
        logistic_model, functools.partial(T.iterated, 4, T.sylvester)
    )
    rows = []
    for label, make in guides.items():
        guide = make()
        rate, finite = fit(logistic_model, guide, steps, 0.01, x, y, label=label)
        rows.append(
            {
                "problem": "logreg",
                "guide": label,
                "steps": steps,
                "steps_per_s": rate,
                "elbo": evaluate_elbo(logistic_model, guide, x, y, particles=particles),
                "finite": finite,
            }
        )
    by_label = {r["guide"]: r for r in rows}
    pairs = [
        ("AutoIAF", "pyro AutoIAFNormal (hidden 64,64 ×2)"),
        ("AutoSylvester", "pyro AutoNormalizingFlow(sylvester × 4)"),
        ("AutoPlanar", "pyro AutoNormalizingFlow(planar × 8)"),
    ]
    for ours, theirs in pairs:
        if ours in by_label:
            by_label[ours]["speedup_vs"] = theirs
            by_label[ours]["speedup"] = by_label[ours]["steps_per_s"] / by_label[theirs]["steps_per_s"]
    return rows


# ------------------------------------------------------------------------------------- Rezende & Mohamed energies
def _w1(z1: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * math.pi * z1 / 4)


def energy(name: str, z: torch.Tensor) -> torch.Tensor:
    """U(z) of Rezende & Mohamed (2015), Table 1; U2–U4 plus the envelope 0.5 (z₁/2.5)²."""
    z1, z2 = z[..., 0], z[..., 1]
    if name == "U1":
        ring = 0.5 * ((z.norm(dim=-1) - 2) / 0.4) ** 2
        modes = torch.logaddexp(-0.5 * ((z1 - 2) / 0.6) ** 2, -0.5 * ((z1 + 2) / 0.6) ** 2)
        return ring - modes
    envelope = 0.5 * (z1 / 2.5) ** 2
    w1 = _w1(z1)
    if name == "U2":
        return 0.5 * ((z2 - w1) / 0.4) ** 2 + envelope
    if name == "U3":
        w2 = 3 * torch.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
        return -torch.logaddexp(-0.5 * ((z2 - w1) / 0.35) ** 2, -0.5 * ((z2 - w1 + w2) / 0.35) ** 2) + envelope
    w3 = 3 * torch.sigmoid((z1 - 1) / 0.3)
    return -torch.logaddexp(-0.5 * ((z2 - w1) / 0.4) ** 2, -0.5 * ((z2 - w1 + w3) / 0.35) ** 2) + envelope


def log_normalizer(name: str, n: int = 1200) -> float:
    """log ∫ exp(−U) by the midpoint rule on [−15, 15] × [−8, 8] (float64)."""
    z1 = torch.linspace(-15, 15, 2 * n + 1, dtype=torch.float64)
    z2 = torch.linspace(-8, 8, n + 1, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(z1, z2, indexing="ij"), -1)
    cell = (z1[1] - z1[0]) * (z2[1] - z2[0])
    return (torch.logsumexp(-energy(name, grid).flatten(), 0) + cell.log()).item()


def energy_model(name: str) -> Callable[[], None]:
    def model() -> None:
        z = pyro.sample("z", dist.ImproperUniform(constraints.real, (), (2,)))
        pyro.factor("U", -energy(name, z))

    return model


def energy_rows(quick: bool) -> list[dict]:
    steps = 100 if quick else 300
    rows = []
    for name in ("U1", "U2", "U3", "U4"):
        log_z = log_normalizer(name)
        model = energy_model(name)
        init = init_to_value(values={"z": torch.zeros(2)})
        guides: dict[str, Callable[[], Callable]] = {
            "AutoNormal": lambda m=model, i=init: AutoNormal(m, init_loc_fn=i, init_scale=1.0)
        }
        for preset in available_presets():
            guides[preset] = functools.partial(PRESETS[preset], model, init_loc_fn=init, init_scale=1.0)
        for label, make in guides.items():
            guide = make()
            rate, finite = fit(model, guide, steps, 0.005, label=label, num_particles=32)
            elbo = evaluate_elbo(model, guide, particles=20000)
            rows.append(
                {
                    "problem": name,
                    "guide": label,
                    "steps": steps,
                    "steps_per_s": rate,
                    "elbo": elbo,
                    "kl": log_z - elbo,
                    "finite": finite,
                }
            )
    return rows


# --------------------------------------------------------------------------------- funnel and eight schools
def funnel() -> None:
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    pyro.sample("x", dist.Normal(torch.zeros(9), (v / 2).exp().unsqueeze(-1)).to_event(1))


SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools() -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", 8):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, SCHOOLS_SIGMA), obs=SCHOOLS_Y)


def eight_schools_noncentered() -> None:
    """Non-centered eight schools (D = 10): ``theta = mu + tau * theta_trans``, ``theta_trans ~ N(0, 1)``."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", 8):
        theta_trans = pyro.sample("theta_trans", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * theta_trans, SCHOOLS_SIGMA), obs=SCHOOLS_Y)


def hard_rows(
    quick: bool, steps: int | None = None, slow_steps: int | None = None, only: Sequence[str] | None = None
) -> list[dict]:
    """Funnel and centered eight schools; ``slow_steps`` (default ``steps``) for the slow MAF/FFJORD/residual.

    Every preset at its defaults, plus ``AutoIAF(affine × 4)`` (the affine update recommended for scales that vary
    with other latents); ``only`` restricts the run to these guide labels.
    """
    steps = steps or (100 if quick else 300)
    slow_steps = slow_steps or steps
    rows = []
    for problem, model in (("funnel", funnel), ("eight_schools", eight_schools)):
        guides: dict[str, Callable[[], Callable]] = {"AutoNormal": lambda m=model: AutoNormal(m)}
        for preset in available_presets():
            guides[preset] = functools.partial(PRESETS[preset], model)
        if "iaf" in registry:
            guides["AutoIAF(affine × 4)"] = functools.partial(AutoIAF, model, num_flows=4, gated=False)
        for label, make in guides.items():
            if only is not None and label not in only:
                continue
            guide = make()
            n = slow_steps if label in ("AutoMAF", "AutoFFJORD", "AutoResidual") else steps
            rate, finite = fit(model, guide, n, 0.005, label=label)
            with torch.no_grad():
                khat = psis_diagnostic(model, guide, num_particles=1000, max_simultaneous_particles=1000)
            rows.append(
                {
                    "problem": problem,
                    "guide": label,
                    "steps": n,
                    "steps_per_s": rate,
                    "elbo": evaluate_elbo(model, guide, particles=1000),
                    "khat": float(khat),
                    "finite": finite,
                }
            )
    return rows


def run(device: str, quick: bool) -> list[dict]:
    if device != "cpu":
        torch.set_default_device(device)
    return logreg_rows(quick) + energy_rows(quick) + hard_rows(quick)


if __name__ == "__main__":
    from harness import markdown_table

    print(markdown_table(run("cpu", quick=True), COLUMNS))
