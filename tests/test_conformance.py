"""The conformance suite: every registered flow, checked for the same properties.

A flow joins by being registered in ``registry`` (vector events), ``conditional_registry`` or ``image_registry``
(``(C, H, W)`` events); nothing needs to be added here. Checks are made in float64 at *random* parameters
(every parameter perturbed away from its initialization, see :func:`build`) and several random points:

1. inverse round trip (closed form: atol 1e-6; numerical inverses: the flow's stated ``inverse_atol`` ≤ 1e-4) and
   log-det == slogdet of the autograd Jacobian (atol 1e-5), along both the forward and the inverse path;
2. batch shapes (), (7,), (3, 4): output shape and log-det shape == batch shape;
3. gradients reach every parameter through ``TransformedDistribution.rsample`` + ``log_prob``;
4. conditional flows: the context changes the output, a batch of contexts equals per-context conditioning;
5. ``state_dict`` round trip and ``torch.save``/``torch.load(weights_only=True)``;
6. wrong event shape / dtype / device raise ``ValueError``/``TypeError``;
7. scoring own samples (cached path) equals scoring them after clearing the caches;
plus a float32 smoke pass.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro.distributions as dist
import pytest
import torch
from torch.autograd.functional import jacobian

from pyro_flows.nn.packed import named_tensors
from pyro_flows.transforms import ConditionalFlow, ParametricFlow, conditional_registry, image_registry, registry

VECTOR_DIM = 5
IMAGE_SHAPE = (2, 4, 4)
CONTEXT_DIM = 3
NUM_POINTS = 6
PERTURBATION = 0.5


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], torch.nn.Module]
    event_shape: tuple[int, ...]
    conditional: bool

    def __repr__(self) -> str:
        return self.name


def _cases() -> list[Case]:
    cases = [Case(n, lambda n=n: registry[n](VECTOR_DIM), (VECTOR_DIM,), False) for n in sorted(registry)]
    cases += [
        Case(
            f"conditional_{n}",
            lambda n=n: conditional_registry[n](VECTOR_DIM, CONTEXT_DIM),
            (VECTOR_DIM,),
            True,
        )
        for n in sorted(conditional_registry)
    ]
    cases += [
        Case(f"image_{n}", lambda n=n: image_registry[n](IMAGE_SHAPE), IMAGE_SHAPE, False) for n in image_registry
    ]
    return cases


CASES = _cases()
parametrize_cases = pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])


def build(case: Case, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    """Instantiate the flow and move its parameters to random values away from the initialization.

    Vectors get N(0, 0.5²) added; weight matrices/kernels N(0, 0.5² / fan_in), so that a network's outputs move
    by O(0.5) whatever its width (the scale a trained network has).
    """
    torch.manual_seed(seed)
    module = case.make().to(dtype)
    with torch.no_grad():
        for _, p in named_tensors(module):
            fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else 1
            p.add_(PERTURBATION / math.sqrt(fan_in) * torch.randn_like(p))
    return module


def contexts(*batch: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*batch, CONTEXT_DIM, dtype=dtype)


def transforms_of(case: Case, module: torch.nn.Module, batch: tuple[int, ...] = ()) -> torch.distributions.Transform:
    """The transform to test: the module itself, or the module conditioned on a random context of ``batch``."""
    if case.conditional:
        return module.condition(contexts(*batch, dtype=next(module.parameters()).dtype))
    return module


def points(case: Case, *batch: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*batch, *case.event_shape, dtype=dtype)


def flat_jacobian_log_det(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    n = x.numel()
    jac = jacobian(fn, x).reshape(n, n)
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign != 0, "the Jacobian is singular"
    return logabsdet


def clear(transform: torch.distributions.Transform) -> None:
    transform.clear_cache()


@parametrize_cases
def test_inverse_and_log_det_at_random_parameters(case: Case) -> None:
    module = build(case)
    for i in range(NUM_POINTS):
        torch.manual_seed(100 + i)
        t = transforms_of(case, module)
        atol = t.inverse_atol
        assert atol <= 1e-4, "numerical inverses must be accurate to 1e-4 or better"
        x = points(case)
        y = t(x)
        ld_forward = t.log_abs_det_jacobian(x, y)
        clear(t)
        x_rec = t.inv(y.clone())
        ld_inverse = t.log_abs_det_jacobian(x_rec, y)
        assert torch.allclose(x_rec, x, atol=atol, rtol=0), f"round trip error {(x_rec - x).abs().max():.3g}"
        clear(t)
        ld_uncached = t.log_abs_det_jacobian(x.clone(), y.clone())
        clear(t)
        expected = flat_jacobian_log_det(lambda v, t=t: t(v), x)
        for got in (ld_forward, ld_inverse, ld_uncached):
            assert got.shape == ()
            assert torch.allclose(got, expected, atol=max(1e-5, 10 * atol), rtol=0), (
                got.item(),
                expected.item(),
            )


@parametrize_cases
@pytest.mark.parametrize("batch", [(), (7,), (3, 4)], ids=str)
def test_batch_shapes(case: Case, batch: tuple[int, ...]) -> None:
    module = build(case)
    context_batches = [batch, ()] if case.conditional else [()]
    for context_batch in context_batches:
        t = transforms_of(case, module, context_batch)
        x = points(case, *batch)
        y = t(x)
        assert y.shape == t.forward_shape(x.shape)
        assert t.inverse_shape(y.shape) == x.shape
        assert t.log_abs_det_jacobian(x, y).shape == batch
        clear(t)
        x_rec = t.inv(y.clone())
        assert x_rec.shape == x.shape
        assert t.log_abs_det_jacobian(x_rec, y).shape == batch


@parametrize_cases
def test_gradients_reach_every_parameter(case: Case) -> None:
    module = build(case)
    if not any(True for _ in module.parameters()):
        pytest.skip("the flow has no parameters")
    t = transforms_of(case, module, (4,))
    base = dist.Normal(torch.zeros(case.event_shape, dtype=torch.float64), 1.0).to_event(len(case.event_shape))
    d = dist.TransformedDistribution(base.expand([4]), [t])
    z = d.rsample((2,))
    external = points(case, 2, 4)
    loss = z.pow(2).sum() - d.log_prob(z).sum() - d.log_prob(external).sum()
    loss.backward()
    for name, p in module.named_parameters():
        assert p.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {name}"
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"


@pytest.mark.parametrize("case", [c for c in CASES if c.conditional], ids=lambda c: c.name)
def test_context_changes_output_and_batches_consistently(case: Case) -> None:
    module = build(case)
    x = points(case, 4)
    c = contexts(4)
    conditioned = module.condition(c)
    y_batched = conditioned(x)
    y_single = torch.stack([module.condition(c[i])(x[i]) for i in range(4)])
    # exact flows agree to round-off; adaptive ODE solves share step sizes within a batch, so they agree to the
    # accuracy the flow states (its inverse_atol)
    atol = 1e-10 if conditioned.inverse_atol <= 1e-6 else conditioned.inverse_atol
    assert torch.allclose(y_batched, y_single, atol=atol)
    y_other = module.condition(contexts(4))(x)
    assert not torch.allclose(y_batched, y_other)
    with pytest.raises(ValueError, match="shape"):
        module.condition(torch.randn(4, CONTEXT_DIM + 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        module.condition(torch.randn(4, CONTEXT_DIM, dtype=torch.float32))


@parametrize_cases
def test_state_dict_round_trip(case: Case) -> None:
    module = build(case)
    clone = build(case, seed=1)
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    x = points(case, 3)
    if case.conditional:
        c = contexts(3)
        assert torch.equal(module.condition(c)(x), clone.condition(c)(x))
    else:
        assert torch.equal(module(x), clone(x))


@parametrize_cases
def test_parametric_flows_load_the_per_parameter_checkpoint_format(case: Case) -> None:
    """A checkpoint with one entry per raw parameter (the format before packing) loads into ``raw``."""
    module = build(case)
    flow = module.flow if isinstance(module, ConditionalFlow) else module
    if not isinstance(flow, ParametricFlow):
        pytest.skip("not a ParametricFlow")
    prefix = "flow." if flow is not module else ""
    legacy = {key: value for key, value in module.state_dict().items() if key != prefix + "raw"}
    legacy.update({prefix + name: value.detach().clone() for name, value in flow.raw_params().items()})
    clone = build(case, seed=1)
    clone.load_state_dict(legacy)
    assert torch.equal(clone.state_dict()[prefix + "raw"], module.state_dict()[prefix + "raw"])
    name = next(iter(flow.param_shapes))
    legacy[prefix + name] = torch.zeros(flow.param_shapes[name].numel() + 1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="raw"):  # a wrong shape is not packed: strict loading names what is missing
        build(case, seed=1).load_state_dict(legacy)


@parametrize_cases
def test_bad_input_raises_clear_errors(case: Case) -> None:
    module = build(case)
    t = transforms_of(case, module)
    wrong_shape = list(case.event_shape)
    wrong_shape[-1] += 1
    with pytest.raises(ValueError, match="shape"):
        t(torch.randn(2, *wrong_shape, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        t.inv(torch.randn(2, *wrong_shape, dtype=torch.float64))
    state = [*module.parameters(), *module.buffers()]
    if any(s.is_floating_point() for s in state):
        with pytest.raises(TypeError, match="dtype"):
            t(points(case, 2, dtype=torch.float32))
    if state:
        with pytest.raises(ValueError, match="device"):
            t(torch.empty(2, *case.event_shape, dtype=torch.float64, device="meta"))


@parametrize_cases
def test_scoring_own_samples_matches_uncached_scoring(case: Case) -> None:
    module = build(case)
    t = transforms_of(case, module)
    base = dist.Normal(torch.zeros(case.event_shape, dtype=torch.float64), 1.0).to_event(len(case.event_shape))
    d = dist.TransformedDistribution(base, [t])
    z = d.sample((5,))
    cached = d.log_prob(z)
    clear(t)
    uncached = d.log_prob(z.clone())
    atol = max(1e-6, 10 * t.inverse_atol)
    assert torch.allclose(cached, uncached, atol=atol, rtol=0)


@parametrize_cases
def test_float32_smoke(case: Case) -> None:
    module = build(case, dtype=torch.float32)
    t = transforms_of(case, module, (8,)) if case.conditional else module
    x = points(case, 8, dtype=torch.float32)
    y = t(x)
    ld = t.log_abs_det_jacobian(x, y)
    assert y.dtype == ld.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(ld).all()
    clear(t)
    x_rec = t.inv(y.clone())
    assert torch.allclose(x_rec, x, atol=max(1e-3, 100 * t.inverse_atol), rtol=1e-3)


def test_registries_have_the_foundation_families() -> None:
    assert {"elementwise_affine", "leaky_relu", "permutation", "triangular", "lu"} <= set(registry)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@parametrize_cases
def test_cuda_forward_inverse_and_gradients(case: Case) -> None:
    module = build(case).cuda()
    t = module.condition(contexts(4).cuda()) if case.conditional else module
    x = points(case, 4).cuda()
    y = t(x)
    ld = t.log_abs_det_jacobian(x, y)
    assert y.device.type == ld.device.type == "cuda"
    clear(t)
    assert torch.allclose(t.inv(y.clone()), x, atol=max(1e-6, t.inverse_atol), rtol=0)
    params = list(module.parameters())
    if params:
        (y.pow(2).sum() - ld.sum()).backward()
        assert all(p.grad is not None and p.grad.device.type == "cuda" for p in params)
