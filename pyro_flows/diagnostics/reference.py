r"""Compare an approximate posterior with reference draws (NUTS, posteriordb) parameter by parameter.

For every scalar parameter $\theta_j$ the table reports the standardized mean error
$(\bar\theta_j - \bar\theta_j^{\rm ref}) / {\rm sd}_j^{\rm ref}$ and the sd ratio
${\rm sd}_j / {\rm sd}_j^{\rm ref}$. A good approximation has ``|mean_error| < 0.1`` and
``|sd_ratio - 1| < 0.1`` (the posteriordb convention of comparing constrained-space summaries).
"""

from __future__ import annotations

import io
import json
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

__all__ = ["compare_to_reference", "read_posteriordb_draws"]

_STAN_NAME = re.compile(r"^(?P<name>[^\[\]]+)(?:\[(?P<index>[0-9,\s]+)\])?$")


def read_posteriordb_draws(path: str | PathLike[str]) -> dict[str, np.ndarray]:
    """Read a posteriordb reference-draws file into ``{variable: array (chain, draw, *shape)}``.

    The file (``POSTERIOR.json`` or ``POSTERIOR.json.zip``) holds a JSON list of chains, each a dict of Stan-named
    scalar columns (``"theta[1]"``, ``"beta[2,3]"``, 1-based). Indexed columns are gathered into one array per
    variable with 0-based axes, as ArviZ/Pyro index them.

    Args:
        path: the file.

    Returns:
        One array per variable.

    Raises:
        ValueError: if the file does not hold a list of chains of equal length.

    """
    path = Path(path)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            inner = [n for n in archive.namelist() if n.endswith(".json")]
            if len(inner) != 1:
                raise ValueError(f"{path} should hold exactly one .json file, found {archive.namelist()}")
            chains = json.load(io.TextIOWrapper(archive.open(inner[0]), encoding="utf-8"))
    else:
        with path.open(encoding="utf-8") as handle:
            chains = json.load(handle)
    if not isinstance(chains, list) or not chains or not all(isinstance(c, dict) for c in chains):
        raise ValueError(f"{path} should hold a JSON list of chains (dicts of draws)")
    columns: dict[str, dict[tuple[int, ...], np.ndarray]] = {}
    for key in chains[0]:
        match = _STAN_NAME.match(key)
        if match is None:
            raise ValueError(f"cannot parse the parameter name {key!r} in {path}")
        index = tuple(int(i) - 1 for i in match["index"].split(",")) if match["index"] else ()
        draws = np.stack([np.asarray(chain[key], dtype=np.float64) for chain in chains])
        columns.setdefault(match["name"], {})[index] = draws
    out = {}
    for name, cells in columns.items():
        if list(cells) == [()]:
            out[name] = cells[()]
            continue
        shape = tuple(max(ix[d] for ix in cells) + 1 for d in range(len(next(iter(cells)))))
        array = np.full(next(iter(cells.values())).shape + shape, np.nan)
        for index, draws in cells.items():
            array[(..., *index)] = draws
        out[name] = array
    return out


def _flatten(name: str, draws: np.ndarray, event_ndim: int) -> dict[str, np.ndarray]:
    """``{"name[i,j]": 1-d draws}`` for every scalar of a variable whose last ``event_ndim`` axes are its shape."""
    shape = draws.shape[draws.ndim - event_ndim :] if event_ndim else ()
    flat = draws.reshape(-1, *shape)
    if not shape:
        return {name: flat}
    return {f"{name}[{','.join(map(str, ix))}]": flat[(slice(None), *ix)] for ix in np.ndindex(*shape)}


def _reference_arrays(reference: Any) -> dict[str, np.ndarray]:
    if isinstance(reference, az.InferenceData):
        reference = reference.posterior
    if hasattr(reference, "data_vars"):
        return {str(k): np.asarray(v.values) for k, v in reference.data_vars.items()}
    if isinstance(reference, Mapping):
        return {str(k): np.asarray(v, dtype=np.float64) for k, v in reference.items()}
    raise TypeError(f"reference must be an InferenceData, an xarray Dataset or a dict of draws, got {type(reference)}")


def compare_to_reference(
    idata: az.InferenceData, reference: Any, var_names: Iterable[str] | None = None
) -> pd.DataFrame:
    """Per-parameter comparison of ``idata.posterior`` with a reference posterior.

    Args:
        idata: the approximate posterior (e.g. from
            [`to_inference_data`][pyro_flows.diagnostics.arviz.to_inference_data]).
        reference: reference draws: another InferenceData (e.g. NUTS via ``az.from_pyro``), an xarray Dataset,
            or a dict ``{variable: draws}`` whose arrays end in the variable's shape and start with any number of
            sample axes (``(draws, *shape)`` or ``(chains, draws, *shape)``, e.g. from
            [`read_posteriordb_draws`][pyro_flows.diagnostics.reference.read_posteriordb_draws]).
        var_names: variables to compare (default: every variable present in both).

    Returns:
        One row per scalar parameter (``"theta[0]"``, 0-based like ``az.summary``) with columns ``mean``,
        ``sd``, ``ref_mean``, ``ref_sd``, ``mean_error`` = (mean − ref_mean)/ref_sd and ``sd_ratio`` = sd/ref_sd.

    Raises:
        ValueError: if no variable is shared, or a shared variable has a different shape in the reference.

    Examples:
        >>> import numpy as np, arviz as az
        >>> rng = np.random.default_rng(0)
        >>> idata = az.from_dict(posterior={"mu": rng.normal(size=(1, 4000)), "b": rng.normal(size=(1, 4000, 2))})
        >>> table = compare_to_reference(idata, {"mu": rng.normal(size=4000), "b": rng.normal(size=(4000, 2))})
        >>> list(table.index), bool((table.mean_error.abs() < 0.1).all())
        (['mu', 'b[0]', 'b[1]'], True)

    """
    posterior = idata.posterior
    ref = _reference_arrays(reference)
    names = list(var_names) if var_names is not None else [str(v) for v in posterior.data_vars if str(v) in ref]
    if not names:
        raise ValueError(f"no variable in common: posterior has {list(posterior.data_vars)}, reference has {list(ref)}")
    rows = []
    for name in names:
        if name not in posterior.data_vars or name not in ref:
            raise ValueError(f"variable {name!r} is missing from the posterior or the reference")
        draws = np.asarray(posterior[name].values, dtype=np.float64)
        event_ndim = draws.ndim - 2
        shape = draws.shape[2:]
        ref_draws = ref[name]
        if ref_draws.ndim < event_ndim + 1 or ref_draws.shape[ref_draws.ndim - event_ndim :] != shape:
            raise ValueError(
                f"variable {name!r} has shape {shape} in the posterior but the reference draws have shape "
                f"{ref_draws.shape}"
            )
        ours, theirs = _flatten(name, draws, event_ndim), _flatten(name, ref_draws, event_ndim)
        for key, values in ours.items():
            other = theirs[key]
            mean, sd = float(values.mean()), float(values.std(ddof=1))
            ref_mean, ref_sd = float(other.mean()), float(other.std(ddof=1))
            rows.append(
                {
                    "parameter": key,
                    "mean": mean,
                    "sd": sd,
                    "ref_mean": ref_mean,
                    "ref_sd": ref_sd,
                    "mean_error": (mean - ref_mean) / ref_sd,
                    "sd_ratio": sd / ref_sd,
                }
            )
    return pd.DataFrame(rows).set_index("parameter")
