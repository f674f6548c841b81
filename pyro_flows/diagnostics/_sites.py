"""Site bookkeeping shared by the diagnostics: which sites of a model are latent, observed or deterministic.

One trace of the guide, replayed through the model, tells the kind, shape and plates of every site. The
diagnostics assume a static model structure (the same sites with the same shapes on every run), as
`pyro.infer.Predictive` and `pyro.infer.importance.psis_diagnostic` do.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import InitMessenger, init_to_feasible
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor


@dataclass
class SiteInfo:
    """Shape and plate information of one model site.

    Attributes:
        name: site name.
        kind: ``"latent"``, ``"observed"`` or ``"deterministic"``.
        shape: shape of one value of the site (batch + event).
        event_dim: number of event dimensions of the site's distribution.
        dims: one name per axis of ``shape``: the plate name for plate axes, ``"<name>_dim_<i>"`` otherwise.
        value: the value of the site in the reference trace (observed data for observed sites).

    """

    name: str
    kind: str
    shape: torch.Size
    event_dim: int
    dims: list[str]
    value: Tensor


@dataclass
class ModelSites:
    """Every sample/deterministic site of a model, in trace order, and the model's plate nesting.

    Attributes:
        sites: the sites by name.
        max_plate_nesting: the number of plate dimensions of the model.
        subsampled: ``{plate name: (subsample size, full size)}`` of the plates that subsample.
        scaled: ``{observed site: scale}`` of the observed sites whose log-density is scaled up (``poutine.scale``
            with a factor above 1, outside the plates' own subsampling factor).
        enumerated: the sample sites of the model or the guide marked ``infer={"enumerate": ...}``.

    """

    sites: dict[str, SiteInfo] = field(default_factory=dict)
    max_plate_nesting: int = 0
    subsampled: dict[str, tuple[int, int]] = field(default_factory=dict)
    scaled: dict[str, float] = field(default_factory=dict)
    enumerated: list[str] = field(default_factory=list)

    def names(self, kind: str) -> list[str]:
        """Names of the sites of one kind, in trace order."""
        return [name for name, site in self.sites.items() if site.kind == kind]

    def require_full_data(self, what: str) -> None:
        """Refuse a model whose plates subsample: ``what`` would see the subsample as the data.

        A model whose observed sites are scaled up by hand (``poutine.scale``, the other way to train on
        mini-batches) gets a warning: a mini-batch scaled to the data set's size is indistinguishable from weighted
        observations.

        Raises:
            ValueError: naming the first subsampling plate.

        """
        if self.subsampled:
            plate, (size, full_size) = next(iter(self.subsampled.items()))
            raise ValueError(
                f"{what} needs the full data, but the plate {plate!r} subsamples {size} of {full_size} points: the "
                "subsample would be exported as the observed data. Pass the full data to a model whose plate does "
                "not subsample (no subsample_size or subsample, e.g. model(..., subsample_size=None)); a guide that "
                "follows the model's plate, such as AutoLocalFlow, then covers every data point"
            )
        if self.scaled:
            warnings.warn(
                f"{what}: the observed site(s) {sorted(self.scaled)} are scaled by {sorted(set(self.scaled.values()))} "
                "(poutine.scale). If that is a mini-batch scaled to the size of the data set, the export takes the "
                "mini-batch for the data: pass the full data without the scale",
                stacklevel=3,
            )

    def refuse_enumeration(self, what: str) -> None:
        """Refuse enumerated discrete sites: importance weights need every latent site drawn by the guide.

        Raises:
            ValueError: naming the enumerated sites.

        """
        if self.enumerated:
            raise ValueError(
                f"{what} cannot weigh a model with enumerated discrete sites {self.enumerated} "
                "(infer={'enumerate': ...}): its importance weights need every latent site drawn by the guide. Draw "
                "them in the guide, or sum them out in the model by hand"
            )


def _axis_names(name: str, shape: torch.Size, event_dim: int, frames: list[Any]) -> list[str]:
    dims = [f"{name}_dim_{i}" for i in range(len(shape))]
    batch_ndim = len(shape) - event_dim
    for frame in frames:
        if not frame.vectorized or frame.dim is None:
            continue
        axis = batch_ndim + frame.dim
        if 0 <= axis < batch_ndim and shape[axis] == frame.size:
            dims[axis] = frame.name
    return dims


def inspect_model(
    model: Callable[..., Any],
    guide: Callable[..., Any] | None,
    args: tuple,
    kwargs: Mapping[str, Any],
    init_loc_fn: Callable[[dict], Any] = init_to_feasible,
) -> ModelSites:
    """Trace ``guide`` once, replay ``model`` on it and classify the model's sites.

    Args:
        model: a Pyro model.
        guide: a guide for ``model`` (``None`` runs the model at the points of ``init_loc_fn``).
        args: positional arguments of model and guide.
        kwargs: keyword arguments of model and guide.
        init_loc_fn: where the latent sites are when ``guide`` is ``None``.

    Returns:
        The sites of ``model`` with their kind, shape and plate axes.

    Raises:
        ValueError: if the model has no latent site.

    """
    with poutine.block(), torch.no_grad():
        if guide is None:
            guide_trace = None
            model_trace = poutine.trace(InitMessenger(init_loc_fn)(model)).get_trace(*args, **kwargs)
        else:
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    model_trace = prune_subsample_sites(model_trace)
    info = ModelSites()
    for trace in (model_trace, guide_trace) if guide_trace is not None else (model_trace,):
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and site["infer"].get("enumerate") and name not in info.enumerated:
                info.enumerated.append(name)
    for name, site in model_trace.nodes.items():
        plate_factor = 1.0
        for frame in site.get("cond_indep_stack", ()):
            if frame.full_size not in (None, frame.size):
                info.subsampled[frame.name] = (frame.size, frame.full_size)
                plate_factor *= frame.full_size / frame.size
        if site["type"] == "sample" and site["is_observed"] and not site["infer"].get("_deterministic"):
            scale = float(torch.as_tensor(site["scale"]).max()) / plate_factor
            if scale > 1.0 + 1e-6:
                info.scaled[name] = scale
    nesting = 0
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["infer"].get("_do_not_trace"):
            continue
        frames = list(site["cond_indep_stack"])
        nesting = max([nesting] + [-f.dim for f in frames if f.vectorized and f.dim is not None])
        if site["infer"].get("_deterministic"):
            kind = "deterministic"
        elif site["is_observed"]:
            kind = "observed"
        else:
            kind = "latent"
        value = site["value"]
        event_dim = int(getattr(site["fn"], "event_dim", 0))
        # pyro.deterministic declares every axis an event axis; its plate axes are still the rightmost ones
        dims = _axis_names(name, value.shape, 0 if kind == "deterministic" else event_dim, frames)
        info.sites[name] = SiteInfo(name, kind, value.shape, event_dim, dims, value.detach())
    info.max_plate_nesting = nesting
    if not info.names("latent"):
        raise ValueError("the model has no latent sample site: there is no posterior to diagnose")
    return info
