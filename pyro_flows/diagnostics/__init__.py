r"""Bayesian-workflow diagnostics for any Pyro guide: ArviZ export, PSIS k̂, importance resampling, reference checks.

* [`to_inference_data`][pyro_flows.diagnostics.arviz.to_inference_data] — a fitted guide as `arviz.InferenceData`
  (posterior, posterior predictive, pointwise log-likelihood, observed data), ready for ``az.summary``, ``az.plot_pair``
  and ``az.loo``;
* [`psis_khat`][pyro_flows.diagnostics.psis.psis_khat] — the Pareto $\hat k$ of Yao et al. (2018), "Yes, but did it
  work?";
* [`importance_resample`][pyro_flows.diagnostics.psis.importance_resample] — the PSIS-corrected posterior as
  InferenceData;
* [`compare_to_reference`][pyro_flows.diagnostics.reference.compare_to_reference] — mean error in reference sds and sd
  ratio per parameter against NUTS or posteriordb draws
  ([`read_posteriordb_draws`][pyro_flows.diagnostics.reference.read_posteriordb_draws]);
* [`iwae_bound`][pyro_flows.diagnostics.iwae.iwae_bound] — importance-weighted log-likelihood bounds for amortized (VAE)
  guides;
* [`fit_svi`][pyro_flows.diagnostics.elbo.fit_svi] / [`ELBOTrace`][pyro_flows.diagnostics.elbo.ELBOTrace] /
  [`plot_elbo`][pyro_flows.diagnostics.elbo.plot_elbo] — SVI with a recorded ELBO trace, plotted in one call;
  [`differentiable_loss`][pyro_flows.diagnostics.elbo.differentiable_loss] — an ELBO's loss for your own torch loop,
  with the gradient of Pyro's `JitTrace_ELBO` corrected.

Importing this package imports ArviZ (and silences ArviZ's import-time ``FutureWarning`` for that import only).
"""

from pyro_flows.diagnostics.arviz import samples_to_inference_data, to_inference_data
from pyro_flows.diagnostics.elbo import ELBOTrace, differentiable_loss, fit_svi, plot_elbo
from pyro_flows.diagnostics.iwae import elbo_estimate, importance_log_weights, iwae_bound
from pyro_flows.diagnostics.psis import importance_resample, psis_khat
from pyro_flows.diagnostics.reference import compare_to_reference, read_posteriordb_draws

__all__ = [
    "ELBOTrace",
    "compare_to_reference",
    "differentiable_loss",
    "elbo_estimate",
    "fit_svi",
    "importance_log_weights",
    "importance_resample",
    "iwae_bound",
    "plot_elbo",
    "psis_khat",
    "read_posteriordb_draws",
    "samples_to_inference_data",
    "to_inference_data",
]
