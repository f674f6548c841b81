r"""Pure-torch floor of the flow guides' SVI step, timed interleaved with the library's step (issue 17).

Usage::

    python benchmarks/bench_floor.py                    # headline (D=50), D-scaling and particles tables
    python benchmarks/bench_floor.py --quick            # smoke run (few rounds, few steps)
    python benchmarks/bench_floor.py --tables headline --guides iaf planar
    python benchmarks/bench_floor.py --tables scaling --guides iaf --dims 5 50 1000
    python benchmarks/bench_floor.py --ab HEAD --flow planar --num-flows 8   # one change: before vs working tree
    python benchmarks/bench_floor.py --compile --guides iaf planar          # flow stacks eager vs torch.compile

Model: Bayesian logistic regression, $w \sim \mathcal{N}(0, I_D)$, 1000 generated rows (fixed seed, the data of
``bench_guides.py``), ``Trace_ELBO``, Adam lr 0.01 for every parameter, one torch thread.

Arms, built once per configuration and timed in alternating rounds (the order rotates from round to round, so that
every arm sees the same machine load):

* ``floor``: the guide's math written directly in torch: the same masks, orders and permutations, the parameter
  values copied from the guide after its first call, no Pyro anywhere in the step (noise, flows, affine base, the
  model's log-joint, the ELBO), ``torch.optim.Adam(fused=True)`` over the copied tensors;
* ``library``: ``SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO()).step`` (what a user writes);
* ``library_fused``: the same guide through ``Trace_ELBO().differentiable_loss`` and one fused torch Adam over all its
  parameters (the optimizer path ``pyro_flows.fit`` can take);
* ``pyro``: Pyro's matching guide through ``svi.step``, for context: ``AutoIAFNormal`` with the guide's number of
  IAF layers, its update (``stable=True`` for the gated one) and hidden widths $\max(h, D)$ (Pyro's smallest allowed
  width is D); ``AutoNormalizingFlow`` of as many ``sylvester(count_transforms=8)`` or ``planar`` layers as the guide
  has (Pyro's Sylvester has no triangular kind: Householder for both rows); left out where one of its steps takes
  more than a second.

Before timing, the floor is checked against the guide: both draw the same base noise (same seed, the same
``randn`` call), and the floor's $-\mathrm{ELBO}$ and every parameter's gradient must equal the library's
``Trace_ELBO`` loss and gradients to a relative 1e-5 in float32 (``LOSS_RTOL``; the differences are summation order
and the library's extra safeguards, e.g. planar's second projection). The ratio ``floor_over_library`` is the floor's
time per step over the library's, per round: median and range over rounds. The results go to
``results/floor-cpu.{json,md}``.

``--ab BEFORE`` measures one change to the flows instead: the same ``AutoFlow`` guide (working tree) with its layers
built by ``pyro_flows.transforms`` as of ``BEFORE`` (a git revision, or a directory holding a copy of the
``pyro_flows`` package) and by the working tree's, ``svi.step`` of both interleaved; it prints the speed-up
(before / after, median and interquartile range over rounds), the parameter tensors of each guide and their losses
at the same parameters and noise (the working tree loading the other's ``state_dict``).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import io
import math
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import pyro
import pyro.distributions.transforms as T
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoNormalizingFlow
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))

from bench_guides import logistic_data, logistic_model
from harness import update

from pyro_flows.guides import AutoFlow, AutoIAF, AutoPlanar, AutoSylvester
from pyro_flows.nn.packed import named_tensors
from pyro_flows.transforms import InverseAutoregressive, Permutation, Planar
from pyro_flows.transforms._network_flows import AffineMap, GatedMap
from pyro_flows.transforms.sylvester import IMPLICIT_Q_SIZE, SylvesterHouseholder, SylvesterTriangular

COLUMNS = [
    "table",
    "guide",
    "layers",
    "dim",
    "particles",
    "floor_ms",
    "library_ms",
    "library_fused_ms",
    "pyro_ms",
    "floor_over_library",
    "floor_over_library_min",
    "floor_over_library_max",
    "library_over_fused",
    "pyro_over_library",
    "loss_rel_diff",
    "grad_rel_diff",
    "rounds",
    "clock",
]

#: Relative tolerance of the floor's loss and gradients against the library's (float32).
LOSS_RTOL = 1e-5
LR = 0.01
ROWS = 1000
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)

GUIDES: dict[str, Callable[..., AutoFlow]] = {
    "iaf": AutoIAF,
    "sylvester": AutoSylvester,
    "sylvester_triangular": functools.partial(AutoSylvester, kind="triangular"),
    "planar": AutoPlanar,
}


def _pyro_iaf(model: Callable, guide: AutoFlow) -> Callable:
    """``AutoIAFNormal`` with the guide's depth and update (gated: ``stable=True``), hidden widths ``max(h, D)``."""
    layers = [flow for flow in guide.flows if isinstance(flow, InverseAutoregressive)]
    made = layers[0].made
    hidden = [max(width, made.dim) for width in made.hidden_dims]
    stable = isinstance(layers[0].elementwise, GatedMap)
    return AutoIAFNormal(model, hidden_dim=hidden, num_transforms=len(layers), stable=stable)


def _num_layers(guide: AutoFlow) -> int:
    return sum(not isinstance(flow, Permutation) for flow in guide.flows)


#: Pyro's guide for each row, ``(model, our guide) -> guide``, at matched architecture where Pyro allows it (its IAF
#: needs hidden widths of at least D; its Sylvester layers are Householder ones, 8 reflections as ours).
PYRO_GUIDES: dict[str, Callable[[Callable, AutoFlow], Callable]] = {
    "iaf": _pyro_iaf,
    **{
        name: lambda m, g: AutoNormalizingFlow(
            m, functools.partial(T.iterated, _num_layers(g), functools.partial(T.sylvester, count_transforms=8))
        )
        for name in ("sylvester", "sylvester_triangular")
    },
    "planar": lambda m, g: AutoNormalizingFlow(m, functools.partial(T.iterated, _num_layers(g), T.planar)),
}


# ----------------------------------------------------------------------------------------------------- the floor


class Floor:
    r"""The guide's SVI step in plain torch: $\varepsilon \to u$ (flows) $\to z = \mu + \sigma \odot U u \to$ loss.

    $U$ is the guide's unit lower-triangular factor where it has one (``unit_tril``), else the identity.

    Args:
        guide: a flow guide that has been called once (its parameters exist); its IAF, planar, Sylvester
            (Householder, triangular) and permutation layers are translated, anything else raises.
        lr: Adam's learning rate.

    Raises:
        NotImplementedError: a layer the floor does not translate.

    """

    def __init__(self, guide: AutoFlow, lr: float) -> None:
        self.params = {name: p.detach().clone().requires_grad_() for name, p in named_tensors(guide)}
        # μ = c + s ⊙ δ: the learned shift δ in units s from the starting point c (buffers)
        self.loc_shift, self.raw_scale = self.params["loc_shift"], self.params["scale_unconstrained"]
        self.loc_origin, self.loc_unit = guide.loc_origin.clone(), guide.loc_unit.clone()
        self.unit_tril = self.params.get("unit_tril")  # a dense base z = μ + diag(σ) U u (small D)
        self.dim = self.loc_shift.shape[-1]
        if self.unit_tril is not None:
            self.eye = torch.eye(self.dim)
        self.layers: list[Callable[[Tensor], tuple[Tensor, Tensor | None]]] = []
        for i, flow in enumerate(guide.flows):
            mine = {name.split(".", 2)[2]: p for name, p in self.params.items() if name.startswith(f"flows.{i}.")}
            self.layers.append(self._translate(flow, mine))
        self.optimizer = torch.optim.Adam(self.params.values(), lr=lr, fused=True)

    def _translate(self, flow: torch.nn.Module, p: dict[str, Tensor]) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        if isinstance(flow, Permutation):
            perm = flow.permutation.clone()
            if torch.equal(perm, torch.arange(self.dim - 1, -1, -1)):
                return lambda u: (u.flip(-1), None)
            return lambda u: (u[..., perm], None)
        if isinstance(flow, InverseAutoregressive):
            made = flow.made
            assert not made.residual and not made.context_dim
            masks = [mask.clone() for mask in made.masks()]
            names = [f"made.layers.{k}" for k in range(len(made.hidden_dims))] + ["made.output"]
            weights = [(p[f"{n}.weight"], p[f"{n}.bias"]) for n in names]
            if isinstance(flow.elementwise, GatedMap):
                update = functools.partial(_gated, gate_bias=flow.elementwise.gate_bias)
            else:
                assert type(flow.elementwise) is AffineMap
                update = functools.partial(_affine, bound=flow.elementwise.bound)
            return functools.partial(_iaf, weights=weights, masks=masks, update=update)
        if isinstance(flow, Planar):
            return functools.partial(_planar, u_raw=p["u"], w=p["w"], b=p["bias"])
        if isinstance(flow, SylvesterHouseholder | SylvesterTriangular):
            m = flow.num_hidden
            index = flow._triangle_index.clone()
            if isinstance(flow, SylvesterTriangular):
                assert not flow.reverse
                reflections = None
            else:
                reflections = p["reflections"]
            return functools.partial(
                _sylvester, upper=p["upper"], diag=p["diag"], bias=p["bias"], reflections=reflections, m=m, index=index
            )
        raise NotImplementedError(f"no floor for {type(flow).__name__}")

    def neg_elbo(self, eps: Tensor, x: Tensor, y: Tensor) -> Tensor:
        r"""$-\mathrm{ELBO}$ averaged over the particles of ``eps`` (``(D,)`` or ``(P, D)``)."""
        u, log_det = eps, eps.new_zeros(())
        for layer in self.layers:
            u, ld = layer(u)
            if ld is not None:
                log_det = log_det + ld
        scale = F.softplus(self.raw_scale)
        loc = torch.addcmul(self.loc_origin, self.loc_unit, self.loc_shift)
        if self.unit_tril is None:
            z = torch.addcmul(loc, scale, u)
        else:
            z = loc + u @ (scale.unsqueeze(-1) * (self.unit_tril.tril(-1) + self.eye)).T
        d = self.dim
        log_q = -0.5 * (eps * eps).sum(-1) - d * LOG_SQRT_2PI - log_det - scale.log().sum()
        log_prior = -0.5 * (z * z).sum(-1) - d * LOG_SQRT_2PI
        logits = z @ x.T
        nll = F.binary_cross_entropy_with_logits(logits, y.expand_as(logits), reduction="sum")
        particles = eps.numel() // d
        return ((log_q - log_prior).sum() + nll) / particles

    def step(self, x: Tensor, y: Tensor, particles: int) -> Tensor:
        """One Adam step on a fresh base draw; returns the loss."""
        eps = torch.randn(self.dim) if particles == 1 else torch.randn(particles, self.dim)
        loss = self.neg_elbo(eps, x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss


def _iaf(
    u: Tensor,
    weights: Sequence[tuple[Tensor, Tensor]],
    masks: Sequence[Tensor],
    update: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor]:
    h = u
    for (w, b), m in zip(weights[:-1], masks[:-1], strict=True):
        h = torch.relu(F.linear(h, w * m, b))
    (w, b), m = weights[-1], masks[-1]
    return update(u, *F.linear(h, w * m, b).chunk(2, dim=-1))


def _gated(u: Tensor, mean: Tensor, gate: Tensor, gate_bias: float) -> tuple[Tensor, Tensor]:
    logit = gate + gate_bias
    return mean + torch.sigmoid(logit) * (u - mean), F.logsigmoid(logit).sum(-1)


def _affine(u: Tensor, shift: Tensor, raw_log_scale: Tensor, bound: float) -> tuple[Tensor, Tensor]:
    log_scale = bound * torch.tanh(raw_log_scale / bound)
    return u * log_scale.exp() + shift, log_scale.sum(-1)


def _planar(z: Tensor, u_raw: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    wu = w @ u_raw
    s = F.softplus(wu) - 1.0 + 1e-3  # w·û, the paper's reparameterization (with the library's 1e-3 margin)
    u_hat = u_raw + ((s - wu) / (w @ w)) * w
    a = torch.tanh(z @ w + b)
    return z + a.unsqueeze(-1) * u_hat, torch.log1p((1 - a * a) * s)


def _sylvester(
    z: Tensor,
    upper: Tensor,
    diag: Tensor,
    bias: Tensor,
    reflections: Tensor | None,
    m: int,
    index: Tensor,
) -> tuple[Tensor, Tensor]:
    if z.dim() == 1:  # one particle: a batch of one (the triangular solves need matrices)
        out, log_det = _sylvester(z.unsqueeze(0), upper, diag, bias, reflections, m, index)
        return out[0], log_det[0]
    d = torch.tanh(diag) * torch.tensor([[1.0], [1.0 - 1e-3]])
    entries = F.pad(torch.cat([d, upper], dim=-1), (1, 0))
    r, rt = entries.index_select(-1, index).view(2, m, m).unbind(0)
    if reflections is None:  # triangular: Q = I
        act = torch.tanh(z @ rt.T + bias)
        out = z + act @ r.T
    else:  # Householder, compact WY form: Q = I[:, :M] - V^T T^{-1} V[:, :M]
        v = reflections
        t = torch.triu(v @ v.T)
        t = t - 0.5 * torch.diag_embed(t.diagonal()) + torch.finfo(t.dtype).tiny * torch.eye(t.shape[0])
        if v.shape[1] * m > IMPLICIT_Q_SIZE:  # large D (the library's rule): apply Q through V and T, never form it
            coef = torch.linalg.solve_triangular(t, z @ v.T, upper=True, left=False)
            act = torch.tanh((z[..., :m] - coef @ v[:, :m]) @ rt.T + bias)
            lifted = act @ r.T
            coef = torch.linalg.solve_triangular(t.T, lifted @ v[:, :m].T, upper=False, left=False)
            out = z + F.pad(lifted, (0, v.shape[1] - m)) - coef @ v
        else:
            q = torch.eye(v.shape[1], m) - v.T @ torch.linalg.solve_triangular(t, v[:, :m], upper=True)
            act = torch.tanh((z @ q) @ rt.T + bias)
            out = z + (act @ r.T) @ q.T
    return out, torch.log1p((1 - act * act) * (d[0] * d[1])).sum(-1)


# --------------------------------------------------------------------------------------------------------- arms
def _elbo(particles: int) -> Trace_ELBO:
    return Trace_ELBO(num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=1)


def _library_arm(guide: Callable, x: Tensor, y: Tensor, particles: int) -> Callable[[], object]:
    svi = SVI(logistic_model, guide, pyro.optim.Adam({"lr": LR}), _elbo(particles))
    return lambda: svi.step(x, y)


def _fused_arm(guide: AutoFlow, x: Tensor, y: Tensor, particles: int) -> Callable[[], object]:
    loss_fn = _elbo(particles).differentiable_loss
    optimizer = torch.optim.Adam(guide.parameters(), lr=LR, fused=True)

    def step() -> Tensor:
        loss = loss_fn(logistic_model, guide, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


def describe(guide: AutoFlow) -> str:
    """The guide's layers in short, e.g. ``4 InverseAutoregressive (affine, 32x32)``; permutations left out."""
    layers = [flow for flow in guide.flows if not isinstance(flow, Permutation)]
    first = layers[0]
    if isinstance(first, InverseAutoregressive):
        update = "gated" if isinstance(first.elementwise, GatedMap) else "affine"
        detail = f" ({update}, {'x'.join(map(str, first.made.hidden_dims))})"
    elif isinstance(first, SylvesterHouseholder):
        detail = f" (M={first.num_hidden}, {first.reflections.shape[0]} reflections)"
    else:
        detail = ""
    return f"{len(layers)} {type(first).__name__}{detail}"


def check_floor(guide: AutoFlow, floor: Floor, x: Tensor, y: Tensor, particles: int) -> tuple[float, float]:
    """Loss and gradients of the floor vs the guide's ``Trace_ELBO`` at the same base noise (relative differences).

    Raises:
        AssertionError: a difference above `LOSS_RTOL`.

    """
    torch.manual_seed(123)
    for p in guide.parameters():
        p.grad = None
    loss = _elbo(particles).differentiable_loss(logistic_model, guide, x, y)
    loss.backward()
    torch.manual_seed(123)
    eps = torch.randn(floor.dim) if particles == 1 else torch.randn(particles, floor.dim)
    ours = floor.neg_elbo(eps, x, y)
    ours.backward()
    loss_diff = abs(ours.item() - loss.item()) / abs(loss.item())
    # max |Δg| over every parameter entry (the floor's tensors in the order of the guide's), relative to the largest
    # gradient entry (a parameter whose gradient is zero at the start, e.g. a planar bias while û = 0, has only
    # round-off to compare)
    g = torch.cat([p.grad.reshape(-1) for p in guide.parameters()])
    h = torch.cat([p.grad.reshape(-1) for p in floor.params.values()])
    grad_diff = ((g - h).abs().max() / g.abs().max()).item()
    for p in [*guide.parameters(), *floor.params.values()]:
        p.grad = None
    assert loss_diff <= LOSS_RTOL and grad_diff <= LOSS_RTOL, (loss_diff, grad_diff)
    return loss_diff, grad_diff


#: The clock of every timing: ``"cpu"`` (this process's CPU time, the default: the benchmark is single-threaded and
#: the machine is shared, so the time other processes hold the cores is left out) or ``"wall"``.
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def _timer(step: Callable[[], object], clock: Callable[[], float]) -> Callable[[int], float]:
    def run(steps: int) -> float:
        start = clock()
        for _ in range(steps):
            step()
        return (clock() - start) / steps

    return run


def measure(
    table: str,
    name: str,
    dim: int,
    particles: int,
    rounds: int,
    budget: float,
    pyro_limit: float = 1.0,
    clock: str = "cpu",
) -> dict[str, object]:
    """One row: the four arms interleaved for ``rounds`` rounds of about ``budget`` seconds per arm.

    Pyro's arm is left out where one of its steps takes more than ``pyro_limit`` seconds.
    """
    x, y = logistic_data(n=ROWS, d=dim)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = GUIDES[name](logistic_model, name="library")
    guide(x, y)
    floor = Floor(guide, LR)
    loss_diff, grad_diff = check_floor(guide, floor, x, y, particles)
    fused_guide = GUIDES[name](logistic_model, name="fused")
    fused_guide(x, y)
    fused_guide.load_state_dict(guide.state_dict())
    tick = CLOCKS[clock]
    arms = {
        "floor": _timer(functools.partial(floor.step, x, y, particles), tick),
        "library": _timer(_library_arm(guide, x, y, particles), tick),
        "library_fused": _timer(_fused_arm(fused_guide, x, y, particles), tick),
        "pyro": _timer(_library_arm(PYRO_GUIDES[name](logistic_model, guide), x, y, particles), tick),
    }
    steps = {}
    for arm, run in list(arms.items()):
        run(1)
        once = run(2)
        if arm == "pyro" and once > pyro_limit:
            del arms[arm]
            continue
        steps[arm] = max(2, round(budget / once))
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    order = list(arms)
    for r in range(rounds):
        for arm in order[r % len(order) :] + order[: r % len(order)]:
            times[arm].append(arms[arm](steps[arm]))
    ratios = [f / lib for f, lib in zip(times["floor"], times["library"], strict=True)]
    med = {arm: statistics.median(ts) for arm, ts in times.items()}
    per_round = {
        other: statistics.median(t / lib for t, lib in zip(times[other], times["library"], strict=True))
        for other in ("library_fused", "pyro")
        if other in times
    }
    return {
        "table": table,
        "guide": type(guide).__name__ + ("(kind='triangular')" if name == "sylvester_triangular" else "()"),
        "layers": describe(guide),
        "dim": dim,
        "particles": particles,
        "floor_ms": 1e3 * med["floor"],
        "library_ms": 1e3 * med["library"],
        "library_fused_ms": 1e3 * med["library_fused"],
        "pyro_ms": 1e3 * med["pyro"] if "pyro" in med else None,
        "floor_over_library": statistics.median(ratios),
        "floor_over_library_min": min(ratios),
        "floor_over_library_max": max(ratios),
        "library_over_fused": 1 / per_round["library_fused"],
        "pyro_over_library": per_round.get("pyro"),
        "loss_rel_diff": loss_diff,
        "grad_rel_diff": grad_diff,
        "rounds": rounds,
        "clock": clock,
    }


TABLES = ("headline", "scaling", "particles")


def run(
    device: str,
    quick: bool,
    guides: Sequence[str] = ("iaf", "sylvester", "planar"),
    dims: Sequence[int] = (5, 10, 50, 200, 1000),
    particles: Sequence[int] = (1, 16),
    tables: Sequence[str] = TABLES,
    clock: str = "cpu",
) -> list[dict]:
    """The rows of the requested tables (CPU only: the floor measures the per-step overhead of eager dispatch).

    ``headline``: D=50, one particle, 15 rounds; ``scaling``: one particle at each D of ``dims``; ``particles``: D=50
    at each count of ``particles`` (vectorized); 9 rounds each. Every arm runs about 0.2 s per round.

    Raises:
        ValueError: a device other than the CPU.

    """
    if device != "cpu":
        raise ValueError("bench_floor measures the CPU step (use benchmarks/gpu.sh on a GPU)")
    rounds, budget = (3, 0.05) if quick else (15, 0.2)
    configs = {
        "headline": [(50, 1)],
        "scaling": [(d, 1) for d in dims],
        "particles": [(50, p) for p in particles],
    }
    rows = []
    for table in tables:
        for name in guides:
            for dim, p in configs[table]:
                n = rounds if table == "headline" else max(3, rounds * 3 // 5)
                row = measure(table, name, dim, p, n, budget, clock=clock)
                print({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()}, flush=True)
                rows.append(row)
    return rows


COMPILE_COLUMNS = [
    "guide",
    "layers",
    "dim",
    "graphs",
    "graph_breaks",
    "compile_s",
    "eager_us",
    "compiled_us",
    "speedup",
]


def compile_row(name: str, dim: int = 50, rounds: int = 15, steps: int = 50) -> dict[str, object]:
    """The guide's flow stack (forward, log-det, backward at one point) eager vs ``torch.compile``d, interleaved.

    ``compile_s`` is the CPU time of the first two compiled calls (tracing and code generation included);
    ``speedup`` the median over rounds of eager time over compiled time.
    """
    x, y = logistic_data(n=ROWS, d=dim)
    guide = GUIDES[name](logistic_model, name="compile")
    guide(x, y)
    flows = list(guide.flows)

    def stack(eps: Tensor) -> tuple[Tensor, Tensor]:
        u, log_det = eps, eps.new_zeros(())
        for flow in flows:
            v = flow(u)
            log_det = log_det + flow.log_abs_det_jacobian(u, v)
            u = v
        return u, log_det

    def step(fn: Callable[[Tensor], tuple[Tensor, Tensor]]) -> Callable[[], None]:
        def once() -> None:
            u, log_det = fn(torch.randn(dim))
            (u.sum() + log_det).backward()

        return once

    explained = torch._dynamo.explain(stack)(torch.randn(dim))
    torch._dynamo.reset()
    compiled = torch.compile(stack)
    start = time.process_time()
    for _ in range(2):
        step(compiled)()
    compile_s = time.process_time() - start
    eager, fast = _timer(step(stack), time.process_time), _timer(step(compiled), time.process_time)
    eager(5)
    fast(5)
    times: list[list[float]] = [[], []]
    for _ in range(rounds):
        times[0].append(eager(steps))
        times[1].append(fast(steps))
    return {
        "guide": type(guide).__name__ + ("(kind='triangular')" if name == "sylvester_triangular" else "()"),
        "layers": describe(guide),
        "dim": dim,
        "graphs": explained.graph_count,
        "graph_breaks": explained.graph_break_count,
        "compile_s": compile_s,
        "eager_us": 1e6 * statistics.median(times[0]),
        "compiled_us": 1e6 * statistics.median(times[1]),
        "speedup": statistics.median(e / c for e, c in zip(*times, strict=True)),
    }


def transforms_before(before: str) -> ModuleType:
    """``pyro_flows.transforms`` of a git revision or of a directory with a ``pyro_flows`` copy, as a separate package.

    The package is copied to a temporary directory under the name ``pyro_flows_before`` (its imports rewritten), so
    that both versions live in one process.
    """
    root = Path(tempfile.mkdtemp(prefix="bench_floor_"))
    source = Path(before)
    if source.is_dir():
        shutil.copytree(source / "pyro_flows", root / "pyro_flows")
    else:
        repo = Path(__file__).resolve().parents[1]
        archive = subprocess.run(["git", "archive", before, "pyro_flows"], cwd=repo, capture_output=True, check=True)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(root, filter="data")
    package = root / "pyro_flows_before"
    (root / "pyro_flows").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(path.read_text().replace("pyro_flows", "pyro_flows_before"))
    sys.path.insert(0, str(root))
    return importlib.import_module("pyro_flows_before.transforms")


def ab(
    before: str, flow: str, num_flows: int, dim: int = 50, particles: int = 1, rounds: int = 30, steps: int = 10
) -> str:
    """One line: ``svi.step`` with the layers of `transforms_before` vs the working tree's (CPU time, interleaved)."""
    from pyro_flows import transforms as after

    x, y = logistic_data(n=ROWS, d=dim)
    runs, guides = [], []
    for name, module in (("before", transforms_before(before)), ("after", after)):
        torch.manual_seed(0)
        layers = functools.partial(module.build_flows, flow, num_flows=num_flows)
        guide = AutoFlow(logistic_model, flow=layers, name=name)
        guide(x, y)
        guides.append(guide)
        runs.append(_timer(_library_arm(guide, x, y, particles), time.process_time))
    guides[1].load_state_dict(guides[0].state_dict())
    losses = []
    for guide in guides:
        torch.manual_seed(5)
        losses.append(_elbo(particles).differentiable_loss(logistic_model, guide, x, y).item())
    for run_ in runs:
        run_(5)
    times: list[list[float]] = [[], []]
    for r in range(rounds):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            times[i].append(runs[i](steps))
    ratios = sorted(b / a for b, a in zip(*times, strict=True))
    tensors = [sum(1 for _ in guide.parameters()) for guide in guides]
    return (
        f"{flow} x{num_flows}, D={dim}, {particles} particle(s): before {1e3 * statistics.median(times[0]):.2f} ms, "
        f"after {1e3 * statistics.median(times[1]):.2f} ms, speed-up {statistics.median(ratios):.3f} "
        f"(IQR {ratios[len(ratios) // 4]:.3f}-{ratios[3 * len(ratios) // 4]:.3f}, {rounds} rounds); parameter "
        f"tensors {tensors[0]} -> {tensors[1]}; loss {losses[0]:.7g} vs {losses[1]:.7g}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds of about 50 ms per arm (smoke run)")
    parser.add_argument("--guides", nargs="+", choices=list(GUIDES), default=["iaf", "sylvester", "planar"])
    parser.add_argument("--dims", nargs="+", type=int, default=[5, 10, 50, 200, 1000], help="D of the scaling table")
    parser.add_argument("--particles", nargs="+", type=int, default=[1, 16], help="particles of the particles table")
    parser.add_argument("--tables", nargs="+", choices=TABLES, default=list(TABLES))
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu", help="process CPU time (default) or wall time")
    parser.add_argument("--no-write", action="store_true", help="print only (leave results/floor-cpu.* alone)")
    parser.add_argument("--compile", action="store_true", help="the --guides' flow stacks eager vs torch.compile")
    parser.add_argument(
        "--ab", metavar="BEFORE", help="A/B of one change: a git revision or a pyro_flows copy's parent"
    )
    parser.add_argument("--flow", default="planar", help="--ab: the registry family (default planar)")
    parser.add_argument("--num-flows", type=int, default=8, help="--ab: number of layers (default 8)")
    parser.add_argument("--dim", type=int, default=50, help="--ab: D (default 50)")
    parser.add_argument("--ab-particles", type=int, default=1, help="--ab: particles (default 1)")
    parser.add_argument("--rounds", type=int, default=30, help="--ab: rounds of 10 steps each (default 30)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.ab:
        print(ab(args.ab, args.flow, args.num_flows, args.dim, args.ab_particles, args.rounds))
        return
    if args.compile:
        from harness import markdown_table

        print(markdown_table([compile_row(name) for name in args.guides], COMPILE_COLUMNS))
        return
    rows = run("cpu", args.quick, args.guides, args.dims, args.particles, args.tables, args.clock)
    if args.no_write:
        from harness import markdown_table

        print(markdown_table(rows, COLUMNS))
    else:  # rows of other guides, tables and sizes already in the results are kept
        print(update("floor", rows, COLUMNS, "cpu", key=("table", "guide", "dim", "particles")))


if __name__ == "__main__":
    main()
