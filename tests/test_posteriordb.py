"""The recommended flow guide against posteriordb reference posteriors (Stan NUTS draws).

Needs the posteriordb files beside the repository (``<repo>/../shared/data/posteriordb``, present in CI); skipped
when they are absent. Each case fits the Laplace-started flow guide of ``examples/posteriordb_models.py`` on a
small budget and checks, for every parameter, |mean − reference mean| < 0.1 reference sd and sd within 10 % of the
reference sd. At this budget the check is made on the guide's PSIS-resampled draws (``importance_resample``), with
k̂ < 0.7 required so that the correction is trustworthy; the raw guide's numbers are printed beside them and must be
within 0.5 sd and 25 %. The full table (raw flow guide, flow + PSIS, AutoNormal, AutoMultivariateNormal at 3,000
steps) is ``docs/posteriordb.md``, written by ``examples/posteriordb_table.py``.

Fast checks of every model in ``POSTERIORS`` (seconds in all): its sites have the shapes (and float64 dtype) of
the reference draws and an autoguide traces with vectorized particles; its log joint is finite at the reference
draws, spreads like a ``d``-dimensional near-Gaussian posterior's there (sd ≈ sqrt(d / 2)) and drops when the draws
are moved by a posterior sd. The benchmark of guides on these and other reference posteriors is
``benchmarks/posterior_suite.py`` (``docs/posterior-suite.md``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch.distributions import biject_to

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO.parent / "shared" / "data" / "posteriordb"

pytestmark = pytest.mark.skipif(not (ROOT / "reference_draws").is_dir(), reason=f"posteriordb data not found at {ROOT}")

sys.path.insert(0, str(REPO / "examples"))
from posteriordb_models import POSTERIORS, PositiveOrderedNormal, fit_and_compare, load_posterior  # noqa: E402

CASES = [
    pytest.param("arK-arK", 300, 2000, id="arK"),
    pytest.param("kidiq-kidscore_momiq", 300, 2000, id="kidiq"),
    pytest.param("earnings-logearn_interaction", 300, 2000, id="earnings"),
    # the hierarchical scale (tau) needs a longer run: at 3000 steps k-hat was 0.35-0.64 over seeds 0-2
    pytest.param("eight_schools-eight_schools_noncentered", 3000, 4000, id="eight_schools", marks=pytest.mark.slow),
]


def describe(table) -> str:
    ratio = f"{table.sd_ratio.min():.3f}–{table.sd_ratio.max():.3f}"
    return f"max |mean error| {table.mean_error.abs().max():.3f}, sd ratio {ratio}"


@pytest.mark.parametrize(("name", "steps", "draws"), CASES)
def test_flow_guide_matches_reference(name, steps, draws):
    torch.set_num_threads(1)
    result = fit_and_compare(name, ROOT, "flow", num_steps=steps, num_draws=draws)
    raw, corrected = result["table"], result["psis_table"]
    print(f"{name}: k-hat {result['khat']:.2f}; guide: {describe(raw)}; guide + PSIS: {describe(corrected)}")
    assert result["khat"] < 0.7
    assert (corrected.mean_error.abs() < 0.1).all(), corrected
    assert ((corrected.sd_ratio - 1.0).abs() < 0.1).all(), corrected
    # the raw guide is already close: no parameter off by more than half a reference sd or 25 % in sd
    assert (raw.mean_error.abs() < 0.5).all(), raw
    assert ((raw.sd_ratio - 1.0).abs() < 0.25).all(), raw


# ------------------------------------------------------------------ fast checks of every model against its draws
def _reference(name):
    from pyro_flows.diagnostics import read_posteriordb_draws

    draws = read_posteriordb_draws(ROOT / "reference_draws" / f"{name}.json.zip")
    return {k: v.reshape(-1, *v.shape[2:]) for k, v in draws.items()}


def _latents(model, args):
    trace = pyro.poutine.trace(model).get_trace(*args)
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and type(site["fn"]).__name__ != "_Subsample"
    }


def _log_joint(model, args, values):
    """log p(theta, y) at each of a batch of draws ``{site: (S, *shape)}`` (a plate of draws at dim -2)."""
    num = next(iter(values.values())).shape[0]
    sites = _latents(model, args)
    data = {k: v if sites[k]["cond_indep_stack"] else v.unsqueeze(1) for k, v in values.items()}
    with pyro.plate("draws", num, dim=-2):
        trace = pyro.poutine.trace(pyro.poutine.condition(model, data=data)).get_trace(*args)
    total = torch.zeros(num, dtype=torch.float64)
    for site in trace.nodes.values():
        if site["type"] == "sample" and type(site["fn"]).__name__ != "_Subsample":
            total = total + site["fn"].log_prob(site["value"]).reshape(num, -1).sum(-1)
    return total


@pytest.mark.parametrize("name", list(POSTERIORS))
def test_model_sites_match_reference_draws(name):
    model, args = load_posterior(name, ROOT)
    reference = _reference(name)
    sites = _latents(model, args)
    trace = pyro.poutine.trace(model).get_trace(*args)
    for key, draws in reference.items():
        assert key in trace.nodes, f"{name}: no site {key!r}"
        assert tuple(trace.nodes[key]["value"].shape) == draws.shape[1:], key
        assert trace.nodes[key]["value"].dtype == torch.float64
    # a guide traces, and the ELBO is finite with vectorized particles
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(model)
    loss = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1).loss(model, guide, *args)
    assert np.isfinite(loss)
    guide_sites = pyro.poutine.trace(guide).get_trace(*args).nodes
    for key, site in sites.items():
        assert tuple(guide_sites[key]["value"].shape) == tuple(site["value"].shape)


@pytest.mark.parametrize("name", [n for n in POSTERIORS if "eight_schools" not in n])
def test_log_joint_peaks_at_reference_draws(name):
    """At the reference draws log p(theta, y) is finite and its sd near sqrt(d / 2) (a near-Gaussian posterior of d
    dimensions); draws moved by one (unconstrained) posterior sd per coordinate have a lower log joint."""
    model, args = load_posterior(name, ROOT)
    sites = _latents(model, args)
    rng = np.random.default_rng(0)
    reference = _reference(name)
    index = rng.choice(next(iter(reference.values())).shape[0], 400, replace=False)
    values = {k: torch.as_tensor(v[index]) for k, v in reference.items() if k in sites}
    assert set(values) == set(sites)
    log_joint = _log_joint(model, args, values)
    assert torch.isfinite(log_joint).all()
    dim = sum(int(np.prod(site["fn"].event_shape)) for site in sites.values())
    dim -= sum(1 for site in sites.values() if site["fn"].support is torch.distributions.constraints.simplex)
    assert 0.5 < log_joint.std().item() / (dim / 2) ** 0.5 < 2.0
    torch.manual_seed(0)
    moved = {}
    for key, value in values.items():
        transform = biject_to(sites[key]["fn"].support)
        free = transform.inv(value)
        moved[key] = transform(free + free.std(0) * torch.randn_like(free))
    assert (_log_joint(model, args, moved).mean() < log_joint.mean() - 1.0).item()


def test_positive_ordered_normal():
    d = PositiveOrderedNormal(torch.tensor([3.0, 10.0]), torch.ones(2))
    torch.manual_seed(0)
    x = d.sample((2000,))
    assert ((x[:, 0] > 0) & (x[:, 1] > x[:, 0])).all()
    assert torch.allclose(x.mean(0), torch.tensor([3.0, 10.0]), atol=0.1)
    assert d.log_prob(torch.tensor([2.0, 1.0])).item() == float("-inf")
    assert d.expand((3,)).batch_shape == (3,)
