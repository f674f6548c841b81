r"""MAP and Laplace approximation on a model's packed unconstrained latents: the warm start of the flow guides.

[`AutoFlow`][pyro_flows.guides.autoflow.AutoFlow] (``start="laplace"``, its default) and
[`pyro_flows.fit`][pyro_flows.inference.fit] start at

$$
q_0 = \mathcal{N}(\hat z, \Sigma), \qquad
\hat z = \arg\max_z \log p(x, \theta(z)) + \log|\det \partial\theta/\partial z|, \qquad \Sigma = H^{-1},
$$

with $H$ the Hessian of the negative log joint at the MAP $\hat z$, on the latent vector $z$ packed exactly as
Pyro's ``AutoContinuous`` guides pack it (``biject_to`` of each site's support).

* **MAP**: L-BFGS (strong-Wolfe line search, at most 500 iterations) from the guide's ``init_loc_fn`` values;
  Adam (3000 steps, cosine schedule, through [`train`][pyro_flows.training.train]) when L-BFGS fails or ends on a
  non-finite value.
* **Curvature**: the exact Hessian ($D$ Hessian-vector products) for $D \le$ ``dense_max_dim``; above, only its
  diagonal, $\Sigma = \mathrm{diag}(1/H_{ii})$ (again $D$ products, no $D \times D$ matrix kept).

Every model evaluation runs under ``poutine.block``, so the approximation can be computed inside a guide's first
call (within an ELBO's traces and particle plates) without leaking sites to them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pyro import poutine
from pyro.infer.autoguide import AutoContinuous
from torch import Tensor
from torch.distributions import biject_to

from pyro_flows.training import train

__all__ = ["find_map", "laplace_factors", "log_joint_fn"]

logger = logging.getLogger(__name__)


def log_joint_fn(
    model: Callable[..., Any], guide: AutoContinuous, args: tuple, kwargs: Mapping[str, Any]
) -> Callable[[Tensor], Tensor]:
    r"""$z \mapsto \log p(x, \theta(z)) + \log|\det \partial\theta / \partial z|$ on ``guide``'s packed latents.

    Args:
        model: the Pyro model.
        guide: an ``AutoContinuous`` guide whose prototype trace exists (it defines the packing).
        args: the model's positional arguments.
        kwargs: the model's keyword arguments.

    """

    def log_joint(latent: Tensor) -> Tensor:
        values, log_det = {}, latent.new_zeros(())
        for site, unconstrained in guide._unpack_latent(latent):
            transform = biject_to(site["fn"].support)
            value = transform(unconstrained)
            values[site["name"]] = value
            log_det = log_det + transform.log_abs_det_jacobian(unconstrained, value).sum()
        conditioned = poutine.condition(model, data=values)
        trace = poutine.block(poutine.trace(conditioned).get_trace)(*args, **kwargs)
        return trace.log_prob_sum() + log_det

    return log_joint


def find_map(log_joint: Callable[[Tensor], Tensor], init: Tensor) -> Tensor | None:
    """The mode of ``log_joint`` by L-BFGS, else by Adam, from ``init``; ``None`` if both end on non-finite values."""
    with torch.enable_grad():
        latent = init.detach().clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS(
            [latent], max_iter=500, line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12
        )

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = -log_joint(latent)
            loss.backward()
            return loss

        try:
            optimizer.step(closure)
            with torch.no_grad():
                value = log_joint(latent)
            if bool(torch.isfinite(latent).all()) and math.isfinite(float(value)):
                return latent.detach()
            logger.info("L-BFGS ended on a non-finite value; finding the MAP with Adam")
        except (RuntimeError, ValueError) as err:  # a failed line search or an out-of-support step
            logger.info("L-BFGS failed (%s: %s); finding the MAP with Adam", type(err).__name__, err)
        latent = init.detach().clone().requires_grad_(True)
        try:
            train(lambda _: -log_joint(latent), [latent], epochs=3000, lr=0.05, lr_schedule="cosine", progress=False)
        except FloatingPointError as err:
            logger.info("Adam stopped early: %s", err)
        with torch.no_grad():
            finite = math.isfinite(float(log_joint(latent)))
    return latent.detach() if finite else None


def laplace_factors(
    log_joint: Callable[[Tensor], Tensor], mode: Tensor, dense_max_dim: int
) -> tuple[Tensor, Tensor | None] | None:
    r"""Conditional sds $d$ and unit lower-triangular $U$ with $\Sigma = \mathrm{diag}(d)\, U U^\top \mathrm{diag}(d)$.

    The factors of the Laplace Gaussian at ``mode``. For $D \le$ ``dense_max_dim``: $\Sigma = H^{-1}$ with the
    exact Hessian $H$ of $-\log p$ (eigenvalues clipped at $10^{-8} \max|\lambda|$ when $H$ is not positive
    definite), factored through the correlation matrix $C = \mathrm{diag}(\sigma)^{-1} \Sigma\,
    \mathrm{diag}(\sigma)^{-1}$ (better conditioned than $\Sigma$ when scales differ by orders of magnitude):
    $C = L L^\top$, $d = \sigma \odot \mathrm{diag}(L)$, $U = L\, \mathrm{diag}(L)^{-1}$. No diagonal then has to
    represent a near-singular correlation (a regression on an uncentred predictor). Above ``dense_max_dim``: the
    diagonal $d_i = H_{ii}^{-1/2}$ and ``U = None``.

    Returns:
        ``(d, U)``, or ``None`` when the curvature is not finite and positive.

    """
    dim = mode.numel()
    with torch.enable_grad():
        point = mode.detach().clone().requires_grad_(True)
        grad = torch.autograd.grad(-log_joint(point), point, create_graph=True)[0]
        if dim > dense_max_dim:
            diag = torch.stack([torch.autograd.grad(grad[i], point, retain_graph=True)[0][i] for i in range(dim)])
            diag = diag.detach()
            return (diag.rsqrt(), None) if bool((torch.isfinite(diag) & (diag > 0)).all()) else None
        rows = [torch.autograd.grad(grad[i], point, retain_graph=True)[0] for i in range(dim)]
    hessian = torch.stack(rows).detach()
    hessian = (hessian + hessian.T) / 2
    if not bool(torch.isfinite(hessian).all()):
        return None
    precision_tril, info = torch.linalg.cholesky_ex(hessian)
    if int(info) != 0:
        eigenvalues, eigenvectors = torch.linalg.eigh(hessian)
        floor = 1e-8 * float(eigenvalues.abs().max())
        if not floor > 0:
            return None
        logger.info("the Hessian at the MAP is not positive definite: its eigenvalues are clipped at %.3g", floor)
        covariance = (eigenvectors / eigenvalues.clamp_min(floor)) @ eigenvectors.T
    else:
        covariance = torch.cholesky_inverse(precision_tril)
    scale = torch.diagonal(covariance).sqrt()
    corr = covariance / scale / scale.unsqueeze(-1)
    corr_tril, info = torch.linalg.cholesky_ex((corr + corr.T) / 2)
    if int(info) != 0:
        return None
    diag = torch.diagonal(corr_tril)
    return scale * diag, corr_tril / diag.unsqueeze(-1)
