"""Local latents at scale: hierarchical logistic regression, 10 000 groups × 20 points, mini-batches of 256 groups.

Usage: ``python benchmarks/bench_local_latents.py [--quick] [--seconds S]``; writes
``results/local_latents-cpu.{json,md}`` (also runs as a suite of ``benchmarks/run.py``).

Model (generated data, fixed seed): $y_{ij} \\sim \\mathrm{Bernoulli}(\\sigma(x_{ij}^\\top \\beta_i))$ for groups
$i = 1..10\\,000$ and points $j = 1..20$, $x_{ij} = (1, x_{ij1}, x_{ij2})$, random coefficients
$\\beta_i \\sim \\mathcal{N}(\\mu, \\mathrm{diag}\\,\\tau^2)$, $\\mu \\sim \\mathcal{N}(0, 2^2)$,
$\\tau \\sim \\mathrm{HalfNormal}(1)$, in ``pyro.plate("groups", 10_000, subsample_size=256)``. Five more points per
group are held out. Three guides train for the same wall time (one thread, ``Trace_ELBO`` with one particle, Adam at
lr 0.01; the flows' parameters at a tenth of it through ``flow_optim_args``):

* ``AutoNormal`` over all sites (Pyro's local handling: one location and scale per group coefficient, updated when
  the group is drawn);
* the hand-wired Pyro solution: ``AutoGuideList`` of ``AutoNormal`` on ``poutine.block(model, hide=["beta"])`` and a
  local guide that opens the list's ``groups`` plate and samples ``beta`` from an ``AmortizedFlowGuide`` (the same
  encoder and local flow as ``AutoLocalFlow``'s defaults, reading the group's covariates and outcomes);
* ``AutoLocalFlow(model, encoder_input=features)`` with its defaults (the same features, plus its score input and
  the conditioning on the globals).

Measured: the ELBO per training point averaged over each epoch (40 steps of 256 groups ≈ one pass) and the held-out
predictive log-likelihood per point, $\\log \\frac1S \\sum_s p(y^*_{ij} \\mid \\beta_i^{(s)})$ with $S = 100$
posterior draws, at four equal wall times (training time only; evaluation is off the clock).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from harness import result_path, write
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from torch import Tensor, nn

from pyro_flows.guides import AmortizedFlowGuide, AutoLocalFlow, flow_optim_args
from pyro_flows.nn.mlp import MLP

GROUPS, POINTS, HELD_OUT, COVARIATES = 10_000, 20, 5, 3
BATCH, LR, DRAWS = 256, 0.01, 100
MU, TAU = torch.tensor([-0.5, 1.0, -0.8]), torch.tensor([0.8, 0.6, 0.4])  # the true population of coefficients
COLUMNS = ["guide", "seconds", "steps", "epochs", "steps_per_s", "elbo_per_point", "heldout_ll", "heldout_ll_curve"]


@dataclass
class Data:
    x: Tensor  # (G, J, 3) training covariates (first column 1)
    y: Tensor  # (G, J) training outcomes
    x_test: Tensor  # (G, H, 3)
    y_test: Tensor  # (G, H)
    beta: Tensor  # (G, 3) the true coefficients


def make_data(groups: int = GROUPS, seed: int = 0) -> Data:
    """Generated data of the benchmark (fixed seed)."""
    gen = torch.Generator().manual_seed(seed)
    beta = MU + TAU * torch.randn(groups, COVARIATES, generator=gen)
    x = torch.randn(groups, POINTS + HELD_OUT, COVARIATES, generator=gen)
    x[..., 0] = 1.0
    p = torch.sigmoid((x * beta[:, None]).sum(-1))
    y = torch.bernoulli(p, generator=gen)
    return Data(x[:, :POINTS], y[:, :POINTS], x[:, POINTS:], y[:, POINTS:], beta)


def model(x: Tensor, y: Tensor, subsample_size: int | None = None, subsample: Tensor | None = None) -> None:
    """Hierarchical logistic regression with random coefficients per group."""
    mu = pyro.sample("mu", dist.Normal(x.new_zeros(COVARIATES), 2.0).to_event(1))
    tau = pyro.sample("tau", dist.HalfNormal(x.new_ones(COVARIATES)).to_event(1))
    with pyro.plate("groups", len(x), subsample_size=subsample_size, subsample=subsample) as idx:
        beta = pyro.sample("beta", dist.Normal(mu, tau).to_event(1))
        logits = (x[idx] * beta.unsqueeze(-2)).sum(-1)
        pyro.sample("y", dist.Bernoulli(logits=logits).to_event(1), obs=y[idx])


def features(idx: Tensor, x: Tensor, y: Tensor, *args: object, **kwargs: object) -> Tensor:
    """What the amortized guides read per group: its covariates (without the intercept) and outcomes."""
    return torch.cat([x[idx, :, 1:].flatten(1), y[idx]], -1)


# ------------------------------------------------------------------------------------------------------- guides
class Trained:
    """A guide, its SVI and a function drawing ``beta`` for a range of groups: ``(S, len(idx), 3)``."""

    def __init__(self, guide: Callable, draw: Callable[[Tensor, Data], Tensor]) -> None:
        self.guide, self.draw = guide, draw
        self.svi = SVI(model, guide, pyro.optim.Adam(flow_optim_args(LR)), Trace_ELBO())


def autonormal(data: Data) -> Trained:
    guide = AutoNormal(model)

    def draw(idx: Tensor, data: Data) -> Tensor:
        loc, scale = guide.locs.beta[idx], guide.scales.beta[idx]
        return loc + scale * torch.randn((DRAWS, *loc.shape))

    return Trained(guide, draw)


def hand_wired(data: Data) -> Trained:
    width = 64
    encoder = nn.Sequential(MLP(features(torch.arange(1), data.x, data.y).shape[-1], width, (width,), nn.ELU), nn.ELU())
    local = AmortizedFlowGuide(encoder, width, COVARIATES, flow="iaf", num_flows=2, init_scale=0.1)
    guide = AutoGuideList(model)
    guide.append(AutoNormal(poutine.block(model, hide=["beta"])))

    def local_guide(x: Tensor, y: Tensor, subsample_size: int | None = None, subsample: Tensor | None = None) -> dict:
        pyro.module("local", local)
        with guide.plates["groups"] as idx:  # the list's own subsample, which the model replays
            return {"beta": pyro.sample("beta", local.posterior(features(idx, x, y)))}

    guide.append(local_guide)

    def draw(idx: Tensor, data: Data) -> Tensor:
        return local.posterior(features(idx, data.x, data.y)).sample((DRAWS,))

    return Trained(guide, draw)


def auto_local_flow(data: Data) -> Trained:
    guide = AutoLocalFlow(model, encoder_input=features)

    def draw(idx: Tensor, data: Data) -> Tensor:
        predictive = Predictive(model, guide=guide, num_samples=DRAWS, return_sites=["beta"], parallel=True)
        return predictive(data.x, data.y, subsample=idx)["beta"].reshape(DRAWS, len(idx), COVARIATES)

    return Trained(guide, draw)


GUIDES = {
    "AutoNormal (all sites)": autonormal,
    "hand-wired AutoGuideList + AmortizedFlowGuide": hand_wired,
    "AutoLocalFlow": auto_local_flow,
}


# --------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def heldout_ll(trained: Trained, data: Data, chunk: int = 1000) -> float:
    """Mean over held-out points of $\\log \\frac1S \\sum_s p(y^* \\mid \\beta^{(s)})$."""
    total = 0.0
    for start in range(0, len(data.x), chunk):
        idx = torch.arange(start, min(start + chunk, len(data.x)))
        beta = trained.draw(idx, data)  # (S, n, 3)
        logits = (data.x_test[idx] * beta.unsqueeze(-2)).sum(-1)  # (S, n, H)
        log_p = dist.Bernoulli(logits=logits).log_prob(data.y_test[idx])
        total += float((torch.logsumexp(log_p, 0) - math.log(DRAWS)).sum())
    return total / data.y_test.numel()


def oracle_ll(data: Data) -> float:
    """The held-out log-likelihood per point at the true coefficients (a reference, not a bound)."""
    logits = (data.x_test * data.beta.unsqueeze(-2)).sum(-1)
    return float(dist.Bernoulli(logits=logits).log_prob(data.y_test).mean())


@torch.no_grad()
def bayes_ll(data: Data, draws: int, chunk: int = 500) -> float:
    """The held-out log-likelihood per point of the exact posterior predictive at the true mu and tau.

    Self-normalized importance sampling of each group's coefficients from the true population distribution.
    """
    gen = torch.Generator().manual_seed(1)
    total = 0.0
    for start in range(0, len(data.x), chunk):
        idx = torch.arange(start, min(start + chunk, len(data.x)))
        beta = MU + TAU * torch.randn(draws, len(idx), COVARIATES, generator=gen)
        log_w = dist.Bernoulli(logits=(data.x[idx] * beta.unsqueeze(-2)).sum(-1)).log_prob(data.y[idx]).sum(-1)
        log_p = dist.Bernoulli(logits=(data.x_test[idx] * beta.unsqueeze(-2)).sum(-1)).log_prob(data.y_test[idx])
        log_w = (log_w - torch.logsumexp(log_w, 0)).unsqueeze(-1)
        total += float(torch.logsumexp(log_w + log_p, 0).sum())
    return total / data.y_test.numel()


class Run:
    """One guide's training state: its steps, training time, ELBO per epoch and held-out checkpoints."""

    def __init__(self, label: str, data: Data, marks: list[float]) -> None:
        pyro.set_rng_seed(0)
        self.label, self.trained, self.marks = label, GUIDES[label](data), list(marks)
        self.seconds, self.steps, self.losses = 0.0, 0, []
        self.elbo_curve: list[dict] = []
        self.ll_curve: list[dict] = []

    def train_for(self, seconds: float, data: Data) -> None:
        """Train for about ``seconds`` of training time (less if a checkpoint comes first), then evaluate there."""
        steps_per_epoch = math.ceil(len(data.x) / BATCH)
        until = min(self.seconds + seconds, self.marks[0])
        while self.seconds < until:
            start = time.perf_counter()
            self.losses.append(self.trained.svi.step(data.x, data.y, subsample_size=BATCH))
            self.seconds += time.perf_counter() - start
            self.steps += 1
            if self.steps % steps_per_epoch == 0:
                elbo = -sum(self.losses) / len(self.losses) / data.y.numel()
                self.elbo_curve.append({"epoch": len(self.elbo_curve) + 1, "seconds": self.seconds, "elbo": elbo})
                self.losses = []
        if self.seconds >= self.marks[0]:
            self.ll_curve.append(
                {"seconds": self.seconds, "steps": self.steps, "heldout_ll": heldout_ll(self.trained, data)}
            )
            self.marks.pop(0)

    def row(self, data: Data) -> dict:
        steps_per_epoch = math.ceil(len(data.x) / BATCH)
        return {
            "guide": self.label,
            "seconds": self.seconds,
            "steps": self.steps,
            "epochs": self.steps / steps_per_epoch,
            "steps_per_s": self.steps / self.seconds,
            "elbo_per_point": self.elbo_curve[-1]["elbo"] if self.elbo_curve else None,
            "heldout_ll": self.ll_curve[-1]["heldout_ll"],
            "heldout_ll_curve": " / ".join(f"{p['heldout_ll']:.4f}" for p in self.ll_curve),
            "elbo_curve": self.elbo_curve,
            "ll_curve": self.ll_curve,
        }


def train_all(data: Data, seconds: float, checkpoints: int = 4, slice_seconds: float = 1.0) -> list[dict]:
    """Train every guide for ``seconds`` of training time, in turns of ``slice_seconds`` (a shared machine's load
    then falls on every guide alike), with held-out checkpoints at equal training times."""
    marks = [seconds * (k + 1) / checkpoints for k in range(checkpoints)]
    pyro.clear_param_store()
    runs = [Run(label, data, marks) for label in GUIDES]
    while any(run.marks for run in runs):
        for run in runs:
            if run.marks:
                run.train_for(slice_seconds, data)
    return [run.row(data) for run in runs]


def run(device: str = "cpu", quick: bool = False, seconds: float | None = None) -> list[dict]:
    """Train every guide for the same wall time; the rows of the results table (with two reference rows)."""
    if device != "cpu":
        raise ValueError("this benchmark runs on the CPU")
    seconds = seconds if seconds is not None else 15.0 if quick else 90.0
    data = make_data()
    rows = train_all(data, seconds)
    rows.append(
        {
            "guide": "exact posterior predictive at the true mu, tau (reference)",
            "heldout_ll": bayes_ll(data, 1000 if quick else 4000),
        }
    )
    rows.append({"guide": "the true coefficients (reference)", "heldout_ll": oracle_ll(data)})
    return rows


NOTES = """
Command: `python benchmarks/bench_local_latents.py` ({budget:g} s of training per guide; `--quick`: 15 s). Hierarchical
logistic regression, 10 000 groups × 20 points (3 random coefficients per group), mini-batches of 256 groups,
`Trace_ELBO` with one particle, Adam lr 0.01 (flows at 0.001 through `flow_optim_args`), 1 torch thread. The machine
has 2 cores shared with 3 other agents: the guides train in interleaved turns of 1 s, so that the load falls on
each alike, and `steps_per_s` varies from run to run. `heldout_ll`: mean over the 50 000 held-out points (5 per group)
of the log posterior predictive density (100 draws), at the end; `heldout_ll_curve`: the same at 1/4, 2/4, 3/4 and 4/4
of the budget (training time only). `elbo_per_point`: the ELBO estimates of the last epoch (40 steps) over the
200 000 training points. The exact posterior predictive at the true population parameters (importance sampling, 4000
draws per group) is what a perfect posterior would reach (up to the uncertainty in mu, tau); the true coefficients
are a reference, not a bound.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="15 s per guide instead of 90 s")
    parser.add_argument("--seconds", type=float, default=None, help="training wall time per guide")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = run("cpu", args.quick, args.seconds)
    budget = args.seconds if args.seconds is not None else 15.0 if args.quick else 90.0
    print(write("local_latents", rows, COLUMNS, "cpu"))
    path = result_path("local_latents", "cpu", ".md")
    path.write_text(path.read_text() + NOTES.format(budget=budget))


if __name__ == "__main__":
    main()
