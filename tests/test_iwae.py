"""iwae_bound / elbo_estimate: exact on a linear-Gaussian VAE, ≥ ELBO, increasing in K, memory-bounded chunks."""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_flows.diagnostics.iwae import elbo_estimate, importance_log_weights, iwae_bound
from pyro_flows.guides.amortized import AmortizedFlowGuide

D_X, D_Z, SIGMA = 4, 2, 0.7


def linear_gaussian() -> tuple[torch.Tensor, torch.Tensor]:
    """W with orthogonal columns (so the exact posterior covariance is diagonal) and an offset b."""
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(D_X, D_Z, generator=gen, dtype=torch.float64))
    w = q * torch.tensor([1.5, 0.6], dtype=torch.float64)
    b = torch.randn(D_X, generator=gen, dtype=torch.float64)
    return w, b


def make_model(w: torch.Tensor, b: torch.Tensor) -> Callable[..., None]:
    def model(x: torch.Tensor, full_size: int | None = None) -> None:
        batch = x.shape[0]
        with pyro.plate("data", full_size or batch, subsample=torch.arange(batch)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(D_Z), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T + b, SIGMA).to_event(1), obs=x)

    return model


def log_marginal(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cov = w @ w.T + SIGMA**2 * torch.eye(D_X, dtype=x.dtype)
    return dist.MultivariateNormal(b, covariance_matrix=cov).log_prob(x)


def exact_guide(w: torch.Tensor, b: torch.Tensor, flow: str | None = None) -> AmortizedFlowGuide:
    """The exact posterior N(S Wᵀ(x − b)/σ², S), S = (I + WᵀW/σ²)⁻¹ (diagonal here), written as the guide."""
    guide = AmortizedFlowGuide(nn.Identity(), D_X, D_Z, flow=flow, num_flows=2).double()
    s = 1.0 / (1.0 + (w * w).sum(0) / SIGMA**2)
    gain = s[:, None] * w.T / SIGMA**2
    with torch.no_grad():
        guide.loc_head.weight.copy_(gain)
        guide.loc_head.bias.copy_(-gain @ b)
        guide.scale_head.weight.zero_()
        guide.scale_head.bias.copy_(torch.log(torch.expm1(s.sqrt() - guide.min_scale)))
    return guide


def data(n: int = 6) -> torch.Tensor:
    return torch.randn(n, D_X, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.5


@pytest.fixture(autouse=True)
def _fresh() -> None:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)


@pytest.mark.parametrize("flow", [None, "elementwise_affine"])
def test_exact_on_linear_gaussian_vae_with_the_exact_posterior(flow: str | None) -> None:
    w, b = linear_gaussian()
    model, guide, x = make_model(w, b), exact_guide(w, b, flow), data()
    truth = log_marginal(x, w, b)
    # chunked over data (3 + 3) and samples (2 + 2 + 1): every importance weight equals p(x)
    bound = iwae_bound(model, guide, x, num_samples=5, batch_size=3, particle_batch_size=2)
    assert torch.allclose(bound, truth, atol=1e-8)
    assert torch.allclose(elbo_estimate(model, guide, x, num_samples=3, batch_size=4), truth, atol=1e-8)
    # a minibatch scale (full_size) does not enter the per-datapoint estimates
    assert torch.allclose(iwae_bound(model, guide, x, num_samples=2, full_size=1000), truth, atol=1e-8)


def detuned_guide(w: torch.Tensor, b: torch.Tensor) -> AmortizedFlowGuide:
    guide = exact_guide(w, b)
    with torch.no_grad():
        guide.loc_head.bias.add_(0.3)
        guide.scale_head.bias.add_(0.5)
    return guide


def test_converges_to_log_marginal_with_a_wrong_guide_and_chunks_correctly() -> None:
    w, b = linear_gaussian()
    model, guide, x = make_model(w, b), detuned_guide(w, b), data(8)
    truth = log_marginal(x, w, b)
    # 80 chunks of 50 samples; one chunk alone (L_50) is off by 0.2 to 0.4 nats on some points: the chunks must
    # be combined into L_4000, not averaged
    bound = iwae_bound(model, guide, x, num_samples=4000, batch_size=3, particle_batch_size=50)
    assert (bound - truth).abs().max() < 0.05


def test_bound_dominates_elbo_and_increases_with_k() -> None:
    w, b = linear_gaussian()
    model, guide, x = make_model(w, b), detuned_guide(w, b), data(60)
    truth = log_marginal(x, w, b)
    log_w = importance_log_weights(model, guide, x, num_samples=50)
    # same samples: log-mean-exp ≥ mean (Jensen), for every data point
    assert (torch.logsumexp(log_w, 0) - math.log(50) >= log_w.mean(0) - 1e-12).all()
    elbo = elbo_estimate(model, guide, x, num_samples=200).mean()
    l3, l1000 = (iwae_bound(model, guide, x, num_samples=k).mean() for k in (3, 1000))
    assert elbo < l3 < l1000 <= truth.mean() + 0.01


def test_sites_outside_the_data_plate_are_rejected() -> None:
    def model(x: torch.Tensor) -> None:
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x: torch.Tensor) -> None:
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="outside the data plate"):
        iwae_bound(model, guide, torch.zeros(3), num_samples=2)
    with pytest.raises(ValueError, match="positive"):
        iwae_bound(model, guide, torch.zeros(3), num_samples=0)


def test_nested_plates_are_summed_per_datapoint() -> None:
    def model(x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with pyro.plate("pixels", x.shape[1], dim=-2):
                pyro.sample("x", dist.Normal(z, 1.0), obs=x.T)

    def guide(x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            n = x.shape[1]
            pyro.sample("z", dist.Normal(x.sum(1) / (n + 1), (1.0 / (n + 1)) ** 0.5))

    x = torch.randn(5, 3, dtype=torch.float64)
    truth = dist.MultivariateNormal(
        torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64) + 1.0
    ).log_prob(x)
    bound = iwae_bound(model, guide, x, num_samples=3, max_plate_nesting=2)
    assert torch.allclose(bound, truth, atol=1e-6)
