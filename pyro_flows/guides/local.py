r"""``AutoLocalFlow``: flow-guided SVI for models with global latents and local latents in a subsampled plate.

A hierarchical model over $N$ data points (groups, users, documents) has global latents $\theta$ and one local latent
vector $z_i$ per data point $x_i$, inside a data plate that SVI subsamples:

$$
p(\theta) \prod_{i=1}^N p(z_i \mid \theta)\, p(x_i \mid z_i, \theta).
$$

[`AutoLocalFlow`][pyro_flows.guides.local.AutoLocalFlow] is the guide

$$
q(\theta) \prod_{i=1}^N q(z_i \mid x_i, \theta),
$$

where $q(\theta)$ is an [`AutoFlow`][pyro_flows.guides.autoflow.AutoFlow] over the packed unconstrained globals
(built on the model with its local sites hidden) and $q(z_i \mid x_i, \theta)$ an amortized conditional flow,
[`AmortizedFlowGuide`][pyro_flows.guides.amortized.AmortizedFlowGuide], over the packed unconstrained locals of one
data point: $z_i = f_{h_i}(\varepsilon_i)$ with $\varepsilon_i \sim \mathcal{N}(m(h_i), \mathrm{diag}\,s(h_i)^2)$ and
the flows conditioned on the encoder state

$$
h_i = e_\phi\big(x_i,\; g_i,\; u\big), \qquad
g_i = \nabla_{z_i} \log p(x_i, z_i \mid \hat\theta)\big|_{z_i = \bar z_i(\hat\theta)}, \qquad
u = (\theta - \mu) / \sigma,
$$

which reads the point's data $x_i$, the *score* $g_i$ (the gradient of the point's log-density at the prior mean
$\bar z_i$ of its locals, given the globals' location $\hat\theta = \mu$: where the point's likelihood pulls its
locals, computed by one pass of the model) and the globals' standardized coordinates $u$ (so the locals follow the
globals draw by draw: the funnel of a hierarchical scale is one conditional shape, not a compromise). On a
mini-batch $I$ of $B$ of the $N$ points, the ELBO estimate is

$$
\mathbb{E}_{q}\Big[\log p(\theta) - \log q(\theta) + \frac{N}{B} \sum_{i \in I} \big(\log p(z_i \mid \theta)
+ \log p(x_i \mid z_i, \theta) - \log q(z_i \mid x_i, \theta)\big)\Big],
$$

whose cost is that of the mini-batch whatever $N$: the guide's parameters do not grow with the data (AutoNormal keeps
two per local coordinate and moves each one only when its point is drawn, about once an epoch).
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, suppress
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoGuide, init_to_feasible
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn
from torch.distributions import biject_to

from pyro_flows._validation import check_real, check_size, check_widths
from pyro_flows.guides.amortized import AmortizedFlowGuide
from pyro_flows.guides.autoflow import AutoFlow, CheckedSettings, FlowSpec, _plain
from pyro_flows.nn.mlp import MLP
from pyro_flows.transforms.stack import PermutationRule

__all__ = ["AutoLocalFlow", "EncoderInput"]

#: What feeds the encoder: an observed site's name, several names, or ``f(indices, *args, **kwargs) -> Tensor``.
EncoderInput = str | Sequence[str] | Callable[..., Tensor]


class _ProbeDoneError(Exception):
    """Raised inside the model once the probe has what it needs (the rest of the model is not run)."""


class _Probe(Messenger):
    """Record the data plate's subsample indices and some observed values; optionally score the local sites.

    Without local sites to score, the model is stopped as soon as the indices and the values are known. With them,
    the global sites take the values of ``reference``, each local site its prior mean (moved to unconstrained space,
    a leaf tensor with gradients, in ``leaves``), and the log-density of every sample site inside the plate is summed
    per data point into ``log_density``.
    """

    def __init__(
        self, plate: str, sites: Sequence[str], reference: Mapping[str, Tensor], local_sites: Sequence[str]
    ) -> None:
        super().__init__()
        self.plate, self.sites, self.reference = plate, frozenset(sites), reference
        self.local_sites = frozenset(local_sites)
        self.indices: Tensor | None = None
        self.values: dict[str, Tensor] = {}
        self.leaves: dict[str, Tensor] = {}
        self.log_density: Tensor | float = 0.0
        self.drawn = False  # whether the plate drew its indices at random (no ``subsample=`` given)

    def _pyro_sample(self, msg: Message) -> None:
        name = msg["name"]
        if site_is_subsample(msg):
            if name == self.plate:
                self.drawn = msg["value"] is None
        elif name in self.reference:
            msg["value"] = self.reference[name]
        elif name in self.local_sites:
            transform = biject_to(msg["fn"].support)
            try:
                start = transform.inv(msg["fn"].mean.detach())
            except NotImplementedError:  # no closed-form mean: the feasible point of init_to_feasible
                start = torch.zeros_like(transform.inv(msg["fn"].sample().detach()))
            start = torch.where(torch.isfinite(start), start, torch.zeros_like(start)).requires_grad_(True)
            self.leaves[name] = start
            msg["value"] = transform(start)

    def _pyro_post_sample(self, msg: Message) -> None:
        if site_is_subsample(msg):
            if msg["name"] == self.plate:
                self.indices = msg["value"]
            return
        if msg["name"] in self.sites:
            self.values[msg["name"]] = msg["value"]
        if self.local_sites:
            frame = next((f for f in msg["cond_indep_stack"] if f.name == self.plate), None)
            log_prob = msg["fn"].log_prob(msg["value"]) if frame is not None else None
            if log_prob is not None and log_prob.dim() + frame.dim >= 0:
                per_point = log_prob.movedim(log_prob.dim() + frame.dim, 0)
                self.log_density = self.log_density + per_point.reshape(per_point.shape[0], -1).sum(-1)
        elif self.indices is not None and len(self.values) == len(self.sites):
            raise _ProbeDoneError


class _HideLocals:
    """The model with its local latent sites hidden: what the global ``AutoFlow`` sees (picklable)."""

    def __init__(self, model: Callable[..., Any], sites: Sequence[str]) -> None:
        self.model, self.sites = model, list(sites)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with poutine.block(hide=self.sites):
            return self.model(*args, **kwargs)


class AutoLocalFlow(CheckedSettings, AutoGuide):
    r"""Guide $q(\theta)\prod_i q(z_i \mid x_i, \theta)$: a joint flow over the globals, amortized flows for the locals.

    For models with local latent variables inside a subsampled plate (``pyro.plate(name, N, subsample_size=B)`` or
    ``subsample=indices``), which [`AutoFlow`][pyro_flows.guides.autoflow.AutoFlow] refuses. Everything is read from
    the model's trace at the first call (as in every Pyro autoguide, the model's structure needs its arguments, so the
    checks that need the model run then):

    * the **data plate** is the plate that subsamples (or ``plate``); the **local sites** are the latent sites inside
      it, the **global sites** all the others;
    * the globals get an [`AutoFlow`][pyro_flows.guides.autoflow.AutoFlow] (attribute ``global_guide``) on the model
      with the local sites hidden (``poutine.block``), with ``flow``, ``num_flows``, ``flow_kwargs``, ``init_loc_fn``
      and ``init_scale`` (and a cold start: a Laplace start would fit the globals with the locals at their prior);
    * the locals of one data point are packed into one unconstrained vector (the data-plate axis of each site is the
      batch axis; the rest of the site, nested plates and event dimensions, is the vector), modelled by an
      [`AmortizedFlowGuide`][pyro_flows.guides.amortized.AmortizedFlowGuide] (attribute ``local_guide``) with the
      flows ``local_flow`` × ``local_num_flows`` conditioned on the encoder state;
    * the **encoder** is an MLP with ``hidden_dims`` (ELU activations; its last width is the flows' context size).
      It reads the values of ``encoder_input``: by default every observed site inside the data plate (the
      data-plate axis is the point, the rest of the value is flattened), or the named observed site(s), or a function
      ``f(indices, *args, **kwargs) -> Tensor`` of shape ``(len(indices), ...)`` called with the subsample indices and
      the model's arguments (for inputs that are no sample site of the model, such as regression covariates); with
      ``score_input``, the score $g_i$ (module docs); with ``condition_on_globals``, the globals $u$. The data and
      the scores are standardized with the mean and standard deviation of the first batch (buffers of the module).

    At step 0 the local heads give the unconstrained value 0 with scale ``init_scale`` to every data point, and the
    globals start at ``init_loc_fn`` with scale ``init_scale``: AutoNormal's initial distribution.

    **Subsampling.** At each call the guide runs the model (under ``poutine.block``; without ``score_input`` without
    gradients, and only up to the data plate's indices and the encoder's sites) and opens the data plate with the
    model's indices, which the model then replays as it replays any guide's subsample. The subsample size may change
    from call to call, and the model's own ``subsample=`` indices (a data loader's) are followed. The guide works
    with ``Trace_ELBO`` (also ``num_particles=k, vectorize_particles=True``) and the other ELBOs that replay the
    guide's plates, and with [`flow_optim_args`][pyro_flows.guides.autoflow.flow_optim_args] (both flows'
    parameters are named ``...flows...``).

    **Predictive and ArviZ.** `pyro.infer.Predictive` runs the guide and the model separately, so each would draw its
    own random subsample (the guide warns when it sees this): call it, like
    [`to_inference_data`][pyro_flows.diagnostics.arviz.to_inference_data] (which refuses a subsampled plate), on the
    full data (the plate without ``subsample_size``: the guide then covers every data point) or with explicit
    ``subsample=`` indices, which the guide follows.

    **Checkpoints.** ``state_dict`` holds the construction settings besides the parameters and the standardization
    buffers; load it into a guide built with the same settings and called once on the model (a checkpoint with
    other settings raises a ``ValueError`` naming them). ``torch.save(guide)``, ``pickle`` and ``copy.deepcopy``
    work before and after training and keep the model, which the guide runs at every call (so the model and a
    function ``encoder_input`` must be picklable: module-level functions, not lambdas).

    The guide is the whole guide: it cannot be a part of an ``AutoGuideList`` (whose plates draw their own subsample).
    Discrete local sites are not supported (enumerate them in the model and hide them from the guide).

    Args:
        model: a Pyro model with local latent sites inside one subsampled plate.
        encoder_input: what the encoder reads per data point: ``None`` (every observed site inside the data plate),
            an observed site's name or a sequence of names, or ``f(indices, *args, **kwargs) -> Tensor``.
        plate: name of the data plate (default: the plate of the model that subsamples).
        flow: the globals' flow (see [`AutoFlow`][pyro_flows.guides.autoflow.AutoFlow]; default ``AutoFlow``'s).
        num_flows: number of blocks of ``flow`` (default ``AutoFlow``'s).
        local_flow: the locals' conditional flow: a registry name or a block of names, or ``None`` for a
            conditional diagonal Gaussian.
        local_num_flows: number of blocks of ``local_flow``.
        hidden_dims: widths of the encoder's hidden layers; the last one is the flows' context size.
        condition_on_globals: whether the encoder reads the standardized globals $u$.
        score_input: whether the encoder reads the score $g_i$ (one more pass of the model, with gradients, per
            call; needs a log-density differentiable in the local sites).
        init_loc_fn: per-site initialization of the globals' location (Pyro's ``autoguide.initialization``).
        init_scale: initial scale of every unconstrained coordinate, global and local.
        permutation: the permutation rule between blocks of both flows (``"auto"``, ``"reverse"``, ``"random"``,
            ``None``).
        flow_kwargs: options of the globals' flow families (e.g. ``{"hidden_dims": (32,)}``).
        local_flow_kwargs: options of the locals' flow families (e.g. ``{"context_hidden_dims": (32,)}``).
        name: the prefix of the guide's parameters in Pyro's parameter store (default: the class name).

    Raises:
        TypeError: a bad ``encoder_input``, ``plate``, ``name`` or flow option (named in the message).
        ValueError: a bad size, scale or option value (named in the message). At the first call, a
            ``ValueError`` names the argument that does not fit the model: no local latent site (``plate``), an
            ``encoder_input`` that is no observed site inside the data plate, or a function whose output does not
            have one row per data point, a discrete local site; ``NotImplementedError`` for latents in two
            subsampled plates or in a sequential plate, or a guide inside an ``AutoGuideList``.

    Examples:
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro_flows.guides import AutoLocalFlow, flow_optim_args
        >>> def model(y, subsample_size=None):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        ...     tau = pyro.sample("tau", dist.LogNormal(0.0, 1.0))
        ...     with pyro.plate("groups", len(y), subsample_size=subsample_size) as idx:
        ...         z = pyro.sample("z", dist.Normal(mu, tau))
        ...         with pyro.plate("points", y.shape[1]):
        ...             pyro.sample("y", dist.Normal(z, 1.0), obs=y[idx].T)
        >>> y = torch.randn(500, 4)
        >>> guide = AutoLocalFlow(model, hidden_dims=(16,), local_flow="affine_coupling")
        >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam(flow_optim_args(0.01)), pyro.infer.Trace_ELBO())
        >>> loss = svi.step(y, subsample_size=32)
        >>> guide.local_sites, guide.global_sites
        (['z'], ['mu', 'tau'])
        >>> guide(y, subsample_size=10)["z"].shape
        torch.Size([10])
        >>> AutoLocalFlow(model, encoder_input=3)
        Traceback (most recent call last):
            ...
        TypeError: encoder_input must be None, an observed site's name, a sequence of names or a function ...

    """

    def __init__(
        self,
        model: Callable[..., Any],
        encoder_input: EncoderInput | None = None,
        *,
        plate: str | None = None,
        flow: FlowSpec | None = None,
        num_flows: int | None = None,
        local_flow: FlowSpec | None = "iaf",
        local_num_flows: int = 2,
        hidden_dims: Sequence[int] = (64, 64),
        condition_on_globals: bool = True,
        score_input: bool = True,
        init_loc_fn: Callable[[dict], Tensor] = init_to_feasible,
        init_scale: float = 0.1,
        permutation: PermutationRule = "auto",
        flow_kwargs: Mapping[str, Any] | None = None,
        local_flow_kwargs: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        if isinstance(encoder_input, str) or encoder_input is None or callable(encoder_input):
            names_ok = True
        else:
            names_ok = isinstance(encoder_input, Sequence) and bool(encoder_input)
            names_ok = names_ok and all(isinstance(n, str) for n in encoder_input)
        if not names_ok:
            raise TypeError(
                "encoder_input must be None, an observed site's name, a sequence of names or a function "
                f"f(indices, *args, **kwargs) -> Tensor, got {encoder_input!r}"
            )
        for arg, value in (("plate", plate), ("name", name)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{arg} must be a string or None, got {value!r}")
        if not (local_flow is None or isinstance(local_flow, str)) and not (
            isinstance(local_flow, Sequence) and local_flow and all(isinstance(f, str) for f in local_flow)
        ):
            raise TypeError(f"local_flow must be a registry name, a block of names or None, got {local_flow!r}")
        if reserved := sorted(set(flow_kwargs or {}) & {"flow", "num_flows", "init_loc_fn", "init_scale", "name"}):
            raise TypeError(f"flow_kwargs are the flow families' options: {reserved} are arguments of the guide")
        for arg, flag in (("condition_on_globals", condition_on_globals), ("score_input", score_input)):
            if not isinstance(flag, bool):
                raise TypeError(f"{arg} must be True or False, got {flag!r}")
        widths = check_widths(hidden_dims, "hidden_dims")
        if not widths:
            raise ValueError("hidden_dims must name at least one width (the last one is the flows' context size)")
        init_scale = check_real(init_scale, "init_scale", positive=True)
        local_num_flows = check_size(local_num_flows, "local_num_flows", minimum=0)
        global_options = {
            "flow": flow,
            "num_flows": num_flows,
            "init_loc_fn": init_loc_fn,
            "init_scale": init_scale,
            "permutation": permutation,
            "start": "cold",  # a Laplace start would fit the globals with the locals drawn from their prior
            **dict(flow_kwargs or {}),
        }
        local_options = {
            "flow": local_flow,
            "num_flows": local_num_flows if local_flow not in (None, "none") else None,
            "flow_kwargs": dict(local_flow_kwargs or {}),
            "permutation": permutation if local_flow not in (None, "none") else "auto",
            "init_scale": init_scale,
        }
        # construction checks of both flows, by the classes that build them, on the CPU and leaving the random state
        # alone (the globals' flow on the model itself; the locals' at a throwaway size: 2, or a mask's length)
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            AutoFlow(model, **global_options)
            mask = local_options["flow_kwargs"].get("mask")
            probe = max(2, len(mask) if isinstance(mask, list | tuple) else 0)
            AmortizedFlowGuide(nn.Identity(), widths[-1], probe, **copy.deepcopy(local_options))
        super().__init__(model)
        self._pyro_name = name or type(self).__name__
        self._encoder_input = encoder_input
        self._plate_arg = plate
        self._global_options, self._local_options = global_options, local_options
        self._widths, self._init_loc_fn = widths, init_loc_fn
        self.condition_on_globals, self.score_input = condition_on_globals, score_input
        self._settings = _plain(
            {
                "encoder_input": encoder_input,
                "plate": plate,
                "local_flow": local_flow,
                "local_num_flows": local_num_flows,
                "local_flow_kwargs": local_options["flow_kwargs"],
                "hidden_dims": widths,
                "condition_on_globals": condition_on_globals,
                "score_input": score_input,
                "init_scale": init_scale,
                "permutation": permutation,
            }
        )
        self.global_guide: AutoFlow | None = None
        self.local_guide: AmortizedFlowGuide | None = None
        self.local_sites: list[str] = []
        self.global_sites: list[str] = []

    # ------------------------------------------------------------------------------------------------ construction
    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        """Read the model's trace, split its sites, and build the global and local guides."""
        if self.master is not None:
            raise NotImplementedError(
                f"{type(self).__name__} must be the whole guide, not a part of an AutoGuideList: it opens the data "
                "plate with the model's own subsample"
            )
        model = InitMessenger(self._init_loc_fn)(self.model)
        with torch.no_grad():
            full = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
        latent = [
            name
            for name, site in full.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
        ]
        for name in latent:
            if any(frame.dim is None for frame in full.nodes[name]["cond_indep_stack"]):
                raise NotImplementedError(f"the latent site {name!r} is inside a sequential pyro.plate")
        self._find_plate(full, latent)
        frame = self._frame
        self.local_sites = [n for n in latent if any(f.name == frame.name for f in full.nodes[n]["cond_indep_stack"])]
        self.global_sites = [n for n in latent if n not in self.local_sites]
        for name in latent:
            for other in full.nodes[name]["cond_indep_stack"]:
                if other.name != frame.name and other.full_size not in (None, other.size):
                    raise NotImplementedError(
                        f"the latent site {name!r} is inside the subsampled plate {other.name!r}, and the local sites "
                        f"inside {frame.name!r}: {type(self).__name__} amortizes the locals of one subsampled plate"
                    )
        self.prototype_trace = Trace()
        for name in latent:
            self.prototype_trace.add_node(name, **full.nodes[name])
        self._prototype_frames = {
            f.name: f for name in latent for f in full.nodes[name]["cond_indep_stack"] if f.vectorized
        }
        self._layout_locals(full)
        self._layout_encoder_input(full)
        reference = full.nodes[self.local_sites[0]]["value"]
        if self.global_sites:
            self.global_guide = AutoFlow(_HideLocals(self.model, self.local_sites), **self._global_options)
            self.global_guide._setup_prototype(*args, **kwargs)
            reference = self.global_guide.loc
        dtype, device = reference.dtype, reference.device
        _, features, _ = self._probe(*args, **kwargs)
        self._num_features = features.shape[-1] - self._local_dim * self.score_input
        features = features.to(device=device, dtype=dtype)
        scale = features.std(0, correction=0) if len(features) > 1 else torch.ones_like(features[0])
        self.register_buffer("feature_loc", features.mean(0))
        self.register_buffer("feature_scale", torch.where(scale > 1e-8, scale, torch.ones_like(scale)))
        in_features = features.shape[-1]
        if self.condition_on_globals and self.global_guide is not None:
            in_features += self.global_guide.latent_dim
        encoder = nn.Sequential(MLP(in_features, self._widths[-1], self._widths[:-1], nn.ELU), nn.ELU())
        self.local_guide = AmortizedFlowGuide(
            encoder,
            self._widths[-1],
            self._local_dim,
            site=self._aux_name,
            plate_name=frame.name,
            **self._local_options,
        ).to(device=device, dtype=dtype)

    def _find_plate(self, full: Trace, latent: list[str]) -> None:
        """Set the data plate's frame: the ``plate`` argument's, or the one subsampled plate with latent sites."""
        frames = {f.name: f for site in full.nodes.values() for f in site.get("cond_indep_stack", ())}
        if self._plate_arg is not None:
            if self._plate_arg not in frames:
                raise ValueError(
                    f"plate={self._plate_arg!r} is not a plate of the model (its plates: {sorted(frames)})"
                )
            self._frame = frames[self._plate_arg]
            if not any(f.name == self._plate_arg for n in latent for f in full.nodes[n]["cond_indep_stack"]):
                raise ValueError(
                    f"the model has no local latent site: no latent site is inside plate={self._plate_arg!r}"
                )
            return
        subsampled = sorted(
            {f.name for n in latent for f in full.nodes[n]["cond_indep_stack"] if f.full_size not in (None, f.size)}
        )
        if not subsampled:
            raise ValueError(
                f"the model has no local latent site: no latent site is inside a subsampled plate (plates: "
                f"{sorted(frames)}). Use AutoFlow for a model with global latents only, or name the data plate with "
                "plate= when the model runs on the full data"
            )
        if len(subsampled) > 1:
            raise NotImplementedError(
                f"latent sites are inside several subsampled plates {subsampled}: {type(self).__name__} amortizes "
                "the locals of one plate (name it with plate=)"
            )
        self._frame = frames[subsampled[0]]

    def _layout_locals(self, full: Trace) -> None:
        """Per local site: its unconstrained shape, data-plate axis and size per data point."""
        self._local_layout: dict[str, tuple[torch.Size, int, int]] = {}
        for name in self.local_sites:
            site = full.nodes[name]
            if site["fn"].support.is_discrete:
                raise ValueError(
                    f"the local site {name!r} is discrete: enumerate it in the model (TraceEnum_ELBO) and hide it "
                    "from the guide with poutine.block"
                )
            shape = biject_to(site["fn"].support).inv(site["value"]).shape
            axis = len(site["value"].shape) - site["fn"].event_dim + self._frame.dim
            if axis < 0 or shape[axis] != self._frame.size:
                raise ValueError(f"the local site {name!r} has no value per point of the plate {self._frame.name!r}")
            self._local_layout[name] = (shape, axis, math.prod(shape) // shape[axis])
        self._local_dim = sum(size for _, _, size in self._local_layout.values())
        self._aux_name = f"_{self._pyro_name}_local_latent"

    def _layout_encoder_input(self, full: Trace) -> None:
        """Check ``encoder_input`` against the model and fix the encoder's input size."""
        plate = self._frame.name
        inside = [
            name
            for name, site in full.nodes.items()
            if site["type"] == "sample"
            and site["is_observed"]
            and not site_is_subsample(site)
            and any(f.name == plate for f in site["cond_indep_stack"])
        ]
        spec = self._encoder_input
        if callable(spec):
            self._encoder_sites: list[str] = []
        else:
            names = inside if spec is None else [spec] if isinstance(spec, str) else list(spec)
            if not names:
                raise ValueError(
                    f"no observed site is inside the plate {plate!r} to feed the encoder: give encoder_input= (an "
                    "observed site, or a function f(indices, *args, **kwargs) of the data points)"
                )
            for name in names:
                if name not in inside:
                    kind = "no site of the model" if name not in full.nodes else "no observed site inside the plate"
                    raise ValueError(
                        f"encoder_input names {name!r}, which is {kind} {plate!r}; the observed sites inside it are "
                        f"{inside}"
                    )
            self._encoder_sites = names
        self._event_dims = {name: full.nodes[name]["fn"].event_dim for name in self._encoder_sites}
        self._num_features = 0  # the first probe's width (a function's output is only known once called)

    # ----------------------------------------------------------------------------------------------- each call
    def _features(
        self, indices: Tensor, values: Mapping[str, Tensor], args: tuple, kwargs: Mapping[str, Any]
    ) -> Tensor:
        """The encoder's raw input, ``(len(indices), num_features)``.

        Raises:
            TypeError: a function ``encoder_input`` that does not return a tensor.
            ValueError: a value with no row per data point.

        """
        size = len(indices)
        if callable(self._encoder_input):
            out = self._encoder_input(indices, *args, **kwargs)
            if not isinstance(out, Tensor):
                raise TypeError(f"encoder_input must return a tensor, got {type(out).__name__}")
            if out.dim() < 1 or out.shape[0] != size:
                raise ValueError(
                    f"encoder_input must return one row per data point ({size} indices), got shape {tuple(out.shape)}"
                )
            parts = [out.reshape(size, -1)]
        else:
            parts = []
            for name in self._encoder_sites:
                value = values[name]
                axis = value.dim() - self._event_dims[name] + self._frame.dim
                if axis < 0 or value.shape[axis] != size:
                    raise ValueError(
                        f"the observed site {name!r} (encoder_input) has no value per point of the plate "
                        f"{self._frame.name!r}: shape {tuple(value.shape)}"
                    )
                parts.append(value.movedim(axis, 0).reshape(size, -1))
        features = torch.cat([p.to(torch.get_default_dtype()) if not p.is_floating_point() else p for p in parts], -1)
        if self._num_features and features.shape[-1] != self._num_features:
            raise ValueError(
                f"the encoder expects {self._num_features} features per data point, encoder_input gave "
                f"{features.shape[-1]}"
            )
        return features

    def _probe(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor, bool]:
        """Run the model for the data plate's indices and the encoder's input: ``(indices, features, drawn)``.

        Without ``score_input`` the model runs (without gradients) up to the plate's indices and the encoder's
        sites; with it, the whole model runs once at the globals' location and the locals' prior mean, and the
        features end with the gradient of each point's log-density with respect to its packed unconstrained locals.
        ``drawn`` tells whether the plate drew the indices at random (rather than from the model's ``subsample=``).

        Raises:
            RuntimeError: the model did not open the data plate or sample the encoder's sites.

        """
        reference = self._global_reference() if self.score_input else {}
        scored = self.local_sites if self.score_input else []
        probe = _Probe(self._frame.name, self._encoder_sites, reference, scored)
        with torch.set_grad_enabled(self.score_input), poutine.block(), probe, suppress(_ProbeDoneError):
            self.model(*args, **kwargs)
        if probe.indices is None or len(probe.values) < len(self._encoder_sites):
            missing = sorted(set(self._encoder_sites) - set(probe.values))
            raise RuntimeError(
                f"the model did not open the plate {self._frame.name!r}"
                + (f" or sample the site(s) {missing}" if missing else "")
                + f" at this call: {type(self).__name__} needs a static model structure"
            )
        with torch.no_grad():
            features = self._features(probe.indices, probe.values, args, kwargs)
        if self.score_input:
            features = torch.cat([features, self._scores(probe).to(features)], -1)
        return probe.indices, features, probe.drawn

    def _global_reference(self) -> dict[str, Tensor]:
        """The global sites at the global guide's location, in constrained space (no gradients)."""
        if self.global_guide is None:
            return {}
        guide = self.global_guide
        latent = guide.loc.detach()
        return {site["name"]: biject_to(site["fn"].support)(value) for site, value in guide._unpack_latent(latent)}

    def _scores(self, probe: _Probe) -> Tensor:
        """Per data point, the gradient of its log-density with respect to its packed locals: ``(B, local_dim)``.

        Raises:
            RuntimeError: a model whose log-density is not differentiable in the local sites.

        """
        size = len(probe.indices)
        leaves = [probe.leaves[name] for name in self._local_layout]
        total = probe.log_density
        if not isinstance(total, Tensor) or not total.requires_grad:
            return torch.zeros(size, self._local_dim)
        try:
            with torch.enable_grad():
                grads = torch.autograd.grad(total.sum(), leaves, allow_unused=True)
        except RuntimeError as err:
            raise RuntimeError(
                f"score_input needs the model's log-density to be differentiable in the local sites ({err}); "
                "build the guide with score_input=False"
            ) from err
        parts = []
        for (_, axis, _), leaf, grad in zip(self._local_layout.values(), leaves, grads, strict=True):
            grad = torch.zeros_like(leaf) if grad is None else grad
            parts.append(grad.movedim(axis, 0).reshape(size, -1))
        return torch.nan_to_num(torch.cat(parts, -1), nan=0.0, posinf=0.0, neginf=0.0)

    def _check_prototype(self, part_trace: Trace) -> None:
        """Check that the global guide sees the globals as this guide does (called by its first run)."""
        for name, site in part_trace.iter_stochastic_nodes():
            ours = self.prototype_trace.nodes.get(name)
            if ours is None or ours["value"].shape != site["value"].shape:
                raise ValueError(f"the global site {name!r} changed between the traces of the model")

    def _make_plates(self, indices: Tensor) -> dict[str, pyro.plate]:
        """The plates of the latent sites: the data plate with the model's indices, the others whole."""
        plates = {}
        for name, frame in sorted(self._prototype_frames.items()):
            if name == self._frame.name:
                full_size = frame.full_size or frame.size
                plates[name] = pyro.plate(name, full_size, subsample=indices, dim=frame.dim)
            else:
                plates[name] = pyro.plate(name, frame.full_size or frame.size, dim=frame.dim)
        return plates

    def _context(self, features: Tensor, globals_: Tensor | None) -> Tensor:
        """The encoder's input: standardized features laid out on the data plate's dim, with the globals."""
        x = (features.to(self.feature_loc) - self.feature_loc) / self.feature_scale
        x = x.reshape((len(x),) + (1,) * (-self._frame.dim - 1) + x.shape[-1:])
        if globals_ is None:
            return x
        batch = torch.broadcast_shapes(globals_.shape[:-1], x.shape[:-1])
        return torch.cat([x.expand(batch + x.shape[-1:]), globals_.expand(batch + globals_.shape[-1:])], -1)

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Sample every latent site of the model (the globals, then the locals of the model's subsample).

        Returns:
            a dict mapping each latent site's name to its sampled (constrained) value.

        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        indices, features, drawn = self._probe(*args, **kwargs)
        full_size = self._frame.full_size or self._frame.size
        if drawn and len(indices) < full_size and poutine.get_mask() is False:
            warnings.warn(
                f"{type(self).__name__} follows a random subsample of the plate {self._frame.name!r} with the "
                "log-densities masked, as in pyro.infer.Predictive, which then runs the model on a subsample of its "
                "own: its draws of the local sites would belong to other data points. Run Predictive on the full "
                "data, or with the model's subsample= indices",
                stacklevel=2,
            )
        self.plates = plates = self._make_plates(indices)
        result: dict[str, Tensor] = {}
        globals_ = None
        if self.global_guide is not None:
            if self.global_guide.master is None:  # pickling drops the link (Pyro's AutoGuide.__getstate__)
                self.global_guide._update_master(weakref.ref(self))
            trace = poutine.trace(self.global_guide).get_trace(*args, **kwargs)
            result.update(trace.nodes["_RETURN"]["value"])
            if self.condition_on_globals:
                latent = next(s["value"] for s in trace.nodes.values() if s.get("infer", {}).get("is_auxiliary"))
                globals_ = (latent - self.global_guide.loc) / self.global_guide.scale
        local = self.local_guide  # one lookup: each one registers the module's parameters in Pyro's param store
        loc, scale, h = local.encode(self._context(features, globals_))
        posterior = dist.TransformedDistribution(dist.Normal(loc, scale).to_event(1), local.transforms(h))
        with plates[self._frame.name]:
            packed = pyro.sample(self._aux_name, posterior, infer={"is_auxiliary": True})
        result.update(self._unpack_locals(packed, plates))
        return result

    def _unpack_locals(self, packed: Tensor, plates: Mapping[str, pyro.plate]) -> dict[str, Tensor]:
        """Split the packed locals ``(..., B, 1.., D)`` into the local sites, sampled as ``Delta`` s in their plates."""
        k = -self._frame.dim - 1
        lead = packed.shape[: packed.dim() - k - 2]
        size = packed.shape[packed.dim() - k - 2]
        flat = packed.reshape((*lead, size, self._local_dim))
        parts = flat.split([n for _, _, n in self._local_layout.values()], dim=-1)
        result = {}
        for (name, (shape, axis, _)), part in zip(self._local_layout.items(), parts, strict=True):
            site = self.prototype_trace.nodes[name]
            rest = shape[:axis] + shape[axis + 1 :]
            value = part.reshape((*lead, size, *rest)).movedim(len(lead), len(lead) + axis)
            extra = len(site["value"].shape) - site["fn"].event_dim - (k + 1)  # plate dims left of the data plate's
            value = value.reshape(lead[: len(lead) - extra] + value.shape[len(lead) :]) if extra and lead else value
            transform = biject_to(site["fn"].support)
            constrained = transform(value)
            if poutine.get_mask() is False:
                log_density: Tensor | float = 0.0
            else:
                log_density = -transform.log_abs_det_jacobian(value, constrained)
                log_density = sum_rightmost(log_density, log_density.dim() - constrained.dim() + site["fn"].event_dim)
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    stack.enter_context(plates[frame.name])
                delta = dist.Delta(constrained, log_density=log_density, event_dim=site["fn"].event_dim)
                result[name] = pyro.sample(name, delta)
        return result

    def median(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Not defined for the locals (their median depends on the globals' draw).

        Raises:
            NotImplementedError: pointing to ``global_guide.median()`` and to `pyro.infer.Predictive`.

        """
        raise NotImplementedError(
            f"{type(self).__name__} has no median of the local sites: use guide.global_guide.median(*args) for the "
            "globals, and draws of pyro.infer.Predictive (on the full data or given indices) for the locals"
        )

    # ------------------------------------------------------------------------------------------------ checkpoints
    def __getstate__(self) -> dict[str, Any]:
        """Pickle the model too (Pyro's autoguides drop it): the guide runs it at every call."""
        model = self._model
        state = super().__getstate__()
        self._model = model
        state.pop("plates", None)  # the last call's plates
        return {**state, "_model": model}

    def extra_repr(self) -> str:
        """Show the data plate and the site split once the guide has been built."""
        if self.prototype_trace is None:
            return "not built yet (call the guide once)"
        return f"plate={self._frame.name!r}, globals={self.global_sites}, locals={self.local_sites}"
