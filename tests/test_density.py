"""Density estimation: FlowDensity fit / early stopping / restore, conditional, save/load, bad input, toys."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_flows.density import (
    CHECKERBOARD_ENTROPY,
    TOY_DATASETS,
    FlowDensity,
    bits_per_dim,
    checkerboard,
    dequantize,
    two_moons,
)
from pyro_flows.density.fit import fit_density
from pyro_flows.transforms import conditional_registry, registry
from pyro_flows.transforms.stack import build_flows

#: A stack that works with the foundation flows alone; the MAF-specific tests below run once ``maf`` is registered.
STACK = ("lu", "leaky_relu")
HAS_MAF = "maf" in registry
needs_maf = pytest.mark.skipif(not HAS_MAF, reason="the 'maf' flow is not registered yet")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, generator=gen(seed)) @ torch.tensor([[1.0, 0.8], [0.0, 0.5]]) + torch.tensor([3.0, -1.0])


# --------------------------------------------------------------------------- toy data and dequantization
@pytest.mark.parametrize("name", sorted(TOY_DATASETS))
def test_toy_generators_are_reproducible_and_finite(name: str) -> None:
    a, b = TOY_DATASETS[name](300, generator=gen(1)), TOY_DATASETS[name](300, generator=gen(1))
    assert a.shape == (300, 2) and torch.isfinite(a).all() and torch.equal(a, b)


def test_checkerboard_is_uniform_on_its_dark_squares() -> None:
    x = checkerboard(40_000, generator=gen(0))
    assert x.abs().max() <= 4.0
    cells = (x.div(2).floor() + 2).long()
    assert ((cells.sum(-1) % 2) == 0).all()
    counts = torch.bincount(cells[:, 0] * 4 + cells[:, 1], minlength=16)
    dark = counts[counts > 0]
    assert len(dark) == 8 and (dark.float() / len(x) - 1 / 8).abs().max() < 0.01
    assert math.isclose(CHECKERBOARD_ENTROPY, 5 * math.log(2))


def test_dequantize_and_bits_per_dim() -> None:
    x = torch.randint(0, 17, (100, 64), generator=gen(0))
    y = dequantize(x, 17, generator=gen(1))
    assert y.dtype == torch.get_default_dtype() and (y >= 0).all() and (y < 1).all()
    assert torch.equal((y * 17).floor().long(), x)
    # a uniform density on [0, 1)^D has log p = 0: the bound is exactly log2(K) bits per dimension
    assert bits_per_dim(0.0, 64, 17) == pytest.approx(math.log2(17))
    assert bits_per_dim(torch.tensor([-math.log(2) * 64]), 64).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"values in \[0, 17\)"):
        dequantize(torch.tensor([17]), 17)
    with pytest.raises(ValueError, match="integer"):
        dequantize(torch.tensor([0.5]), 17)


# --------------------------------------------------------------------------- the model and its log-density
def test_standardization_is_accounted_in_the_log_density() -> None:
    x = torch.randn(500, 3, generator=gen(0)) * torch.tensor([10.0, 0.1, 2.0]) + torch.tensor([5.0, -3.0, 0.0])
    density = FlowDensity(3, flow="elementwise_affine", num_flows=1)
    density._set_standardization(x, None)
    # identity flow + standardization = the diagonal Gaussian with the data's mean and standard deviation
    expected = dist.Normal(x.mean(0), x.std(0, correction=0)).to_event(1).log_prob(x)
    assert torch.allclose(density.log_prob(x), expected, atol=1e-4)


def test_fitted_density_integrates_to_one_in_data_units() -> None:
    x = correlated(600) * 50.0
    density = FlowDensity(2, flow=STACK, num_flows=4)
    density.fit(x, epochs=10, lr=1e-2, progress=False, seed=0)
    lo, hi = x.min(0).values - 250.0, x.max(0).values + 250.0
    n = 200
    g0, g1 = (torch.linspace(lo[i].item(), hi[i].item(), n) for i in range(2))
    grid = torch.stack(torch.meshgrid(g0, g1, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        mass = density.log_prob(grid).exp().sum() * (g0[1] - g0[0]) * (g1[1] - g1[0])
    assert mass.item() == pytest.approx(1.0, abs=0.02)


def test_rescaling_the_data_shifts_the_log_density_by_the_jacobian() -> None:
    x = correlated(300)
    a = FlowDensity(2, flow=STACK, num_flows=2)
    b = copy.deepcopy(a)
    a.fit(x, epochs=3, progress=False, seed=0)
    b.fit(1000.0 * x, epochs=3, progress=False, seed=0)
    with torch.no_grad():
        assert torch.allclose(b.log_prob(1000.0 * x), a.log_prob(x) - 2 * math.log(1000.0), atol=1e-3)


def test_layers_are_oriented_so_that_scoring_uses_the_fast_direction() -> None:
    names = sorted({"lu", "maf", "iaf", "spline_iaf"} & set(registry))
    density = FlowDensity(3, flow=names, num_flows=2, hidden_dims=(8,))
    permutation = registry["permutation"]
    for layer, inverted in zip(density.layers, density._inverted, strict=True):
        assert inverted == (not isinstance(layer, permutation) and layer.fast_direction == "forward")
    # the block is repeated num_flows times, one reversal between the blocks
    assert [type(layer) for layer in density.layers] == [type(layer) for layer in build_flows(names, 3, 2)]
    assert sum(isinstance(layer, permutation) for layer in density.layers) == 1
    x = torch.randn(5, 3)
    assert torch.allclose(density.log_prob(x), density.distribution().log_prob(x), atol=1e-5)


# --------------------------------------------------------------------------- fitting
def test_fit_improves_the_held_out_nll_and_records_history() -> None:
    x = correlated(800)
    density = FlowDensity(2, flow=STACK, num_flows=4)
    test = correlated(400, seed=1)
    before = density.evaluate(test)
    history = density.fit(x, epochs=10, lr=1e-2, batch_size=128, progress=False, seed=0)
    after = density.evaluate(test)
    assert after < before - 1.0
    assert history.epochs == 10 and len(history.val_nll) == 10 and len(history.lr) == 10
    assert history.best_epoch == min(range(10), key=history.val_nll.__getitem__)
    assert history.best_val_nll == pytest.approx(min(history.val_nll))
    assert not density.training


def test_early_stopping_restores_the_best_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    density = FlowDensity(2, flow=STACK, num_flows=2)
    scripted = iter([3.0, 2.0, 1.0, 1.5, 2.5, 3.5, 4.0, 5.0])
    states: list[dict[str, torch.Tensor]] = []

    def fake_validation(x: torch.Tensor, context: torch.Tensor | None, batch_size: int) -> float:
        states.append(copy.deepcopy(density.state_dict()))
        return next(scripted)

    monkeypatch.setattr(density, "_mean_nll", fake_validation)
    history = density.fit(correlated(200), epochs=50, lr=1e-2, patience=3, progress=False, seed=0)
    assert history.stopped_early and history.epochs == 6 and history.best_epoch == 2
    assert history.val_nll == [3.0, 2.0, 1.0, 1.5, 2.5, 3.5]
    final = density.state_dict()
    assert all(torch.equal(final[k], states[2][k]) for k in final)
    assert not all(torch.equal(final[k], states[-1][k]) for k in final)


def test_fit_options_schedules_steps_and_explicit_validation() -> None:
    x, x_val = correlated(256), correlated(64, seed=3)
    density = FlowDensity(2, flow=STACK, num_flows=2)
    history = density.fit(
        x, validation_data=x_val, epochs=4, lr=1e-2, lr_schedule="cosine", weight_decay=1e-4, grad_clip=5.0,
        progress=False, seed=0,
    )  # fmt: skip
    assert history.lr[0] == pytest.approx(1e-2) and history.lr[-1] < history.lr[0]
    assert history.val_nll[history.best_epoch] == pytest.approx(density.evaluate(x_val), abs=1e-5)
    history = density.fit(x, epochs=100, max_steps=3, batch_size=64, lr_schedule="plateau", progress=False)
    assert history.epochs == 1
    history = density.fit(x, epochs=2, validation_fraction=0.0, progress=False)
    assert history.val_nll == [] and history.best_epoch is None


def test_progress_bar_is_switchable(capsys: pytest.CaptureFixture[str]) -> None:
    density = FlowDensity(2, flow=STACK, num_flows=1)
    density.fit(correlated(64), epochs=2, progress=False)
    assert capsys.readouterr().err == ""
    density.fit(correlated(64), epochs=2, progress=True)
    assert "fit" in capsys.readouterr().err


def test_history_plot() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    history = FlowDensity(2, flow=STACK, num_flows=1).fit(correlated(64), epochs=3, progress=False)
    ax = history.plot()
    assert len(ax.get_lines()) == 3
    matplotlib.pyplot.close("all")


def test_divergence_is_a_clear_error() -> None:
    density = FlowDensity(2, flow=STACK, num_flows=1, standardize=False)
    with pytest.raises(FloatingPointError, match="non-finite"):
        density.fit(torch.full((64, 2), 1e30), epochs=1, progress=False)


# --------------------------------------------------------------------------- conditional densities
def test_conditional_density_learns_the_dependence_on_the_context() -> None:
    # x | c ~ N((3c, -c), 0.1² I): true conditional NLL ≈ -1.77 nats, the marginal's is above +1.5
    c = torch.rand(500, 1, generator=gen(0)) * 4 - 2
    x = torch.cat([3.0 * c, -c], dim=-1) + 0.1 * torch.randn(500, 2, generator=gen(1))
    flow = "maf" if "maf" in conditional_registry else "elementwise_affine"
    torch.manual_seed(0)
    density = FlowDensity(2, flow=flow, num_flows=2, hidden_dims=(32,), context_dim=1)
    density.fit(x, c, epochs=10, lr=1e-2, batch_size=50, progress=False, seed=0)
    assert density.evaluate(x, c) < 0.0
    contexts = torch.tensor([[-1.0], [1.5]])
    samples = density.sample(500, contexts)
    assert samples.shape == (500, 2, 2)
    assert torch.allclose(samples.mean(0), torch.tensor([[-3.0, 1.0], [4.5, -1.5]]), atol=0.3)
    d = density.distribution(contexts)
    assert d.batch_shape == (2,) and d.event_shape == (2,)
    assert torch.allclose(d.log_prob(samples), density.log_prob(samples, contexts), atol=1e-5)


# --------------------------------------------------------------------------- Pyro integration
def test_pyro_observation_and_learned_prior() -> None:
    pyro.clear_param_store()
    x = correlated(128)
    density = FlowDensity(2, flow=STACK, num_flows=2)
    density.fit(x, epochs=2, progress=False, seed=0)

    def likelihood_model(data: torch.Tensor) -> None:
        with pyro.plate("data", len(data)):
            pyro.sample("x", density.distribution(), obs=data)

    trace = pyro.poutine.trace(likelihood_model).get_trace(x)
    assert torch.allclose(trace.log_prob_sum(), density.log_prob(x).sum())

    def prior_model(y: torch.Tensor) -> None:
        pyro.module("prior", density)
        z = pyro.sample("z", density.distribution())
        pyro.sample("y", dist.Normal(z, 1.0).to_event(1), obs=y)

    before = copy.deepcopy(density.state_dict())
    svi = SVI(prior_model, AutoNormal(prior_model), pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(3):
        assert math.isfinite(svi.step(torch.tensor([3.0, -1.0])))
    changed = [k for k, v in density.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("layers.") for k in changed)
    pyro.clear_param_store()


def test_rsample_is_differentiable() -> None:
    density = FlowDensity(2, flow=STACK, num_flows=2)
    density.fit(correlated(64), epochs=1, progress=False)
    z = density.distribution().rsample(torch.Size([16]))
    z.square().sum().backward()
    assert all(p.grad is not None for p in density.parameters())


# --------------------------------------------------------------------------- checkpoints
def test_save_and_load_round_trip(tmp_path: pytest.TempPathFactory) -> None:
    density = FlowDensity(2, flow=STACK, num_flows=3, permutation="random")
    density.fit(correlated(128), epochs=2, progress=False, seed=0)
    path = tmp_path / "density.pt"  # type: ignore[operator]
    density.save(path)
    raw = torch.load(path, weights_only=True)
    assert raw["config"]["flow"] == list(STACK) and raw["config"]["num_flows"] == 3
    loaded = FlowDensity.load(path)
    x = correlated(20, seed=5)
    assert torch.equal(loaded.log_prob(x), density.log_prob(x))
    assert bool(loaded.standardized)


def test_save_and_load_conditional_and_custom_base() -> None:
    base = dist.StudentT(5.0, torch.zeros(2), torch.ones(2)).to_event(1)
    density = FlowDensity(2, flow="elementwise_affine", num_flows=2, context_dim=3, base=base)
    buffer = io.BytesIO()
    density.save(buffer)
    buffer.seek(0)
    with pytest.raises(ValueError, match="custom base"):
        FlowDensity.load(buffer)
    buffer.seek(0)
    loaded = FlowDensity.load(buffer, base=base)
    x, c = torch.randn(4, 2), torch.randn(4, 3)
    assert torch.equal(loaded.log_prob(x, c), density.log_prob(x, c))
    with pytest.raises(TypeError, match="weights_only"):
        FlowDensity(2, flow="lu", num_flows=1, generator=torch.Generator()).save(io.BytesIO())


# --------------------------------------------------------------------------- bad input
def test_non_finite_rows_are_named() -> None:
    x = correlated(50)
    x[7, 0] = float("nan")
    x[31, 1] = float("inf")
    density = FlowDensity(2, flow=STACK, num_flows=1)
    with pytest.raises(ValueError, match=r"non-finite .* 2 row\(s\): \[7, 31\]"):
        density.fit(x, progress=False)
    c = torch.zeros(50, 1)
    c[3] = float("nan")
    conditional = FlowDensity(2, flow="elementwise_affine", num_flows=1, context_dim=1)
    with pytest.raises(ValueError, match=r"context of x has non-finite .*\[3\]"):
        conditional.fit(correlated(50), c, progress=False)


def test_wrong_shapes_and_empty_data_are_clear_errors() -> None:
    density = FlowDensity(2, flow=STACK, num_flows=1)
    with pytest.raises(ValueError, match=r"shape \(n, 2\), got shape \(10, 3\)"):
        density.fit(torch.randn(10, 3), progress=False)
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        density.fit(torch.randn(10), progress=False)
    with pytest.raises(ValueError, match="empty"):
        density.fit(torch.empty(0, 2), progress=False)
    with pytest.raises(ValueError, match=r"points of shape \(\.\.\., 2\)"):
        density.log_prob(torch.randn(5, 3))
    with pytest.raises(ValueError, match="unconditional"):
        density.fit(torch.randn(10, 2), torch.randn(10, 1), progress=False)
    conditional = FlowDensity(2, flow="elementwise_affine", num_flows=1, context_dim=1)
    with pytest.raises(ValueError, match="pass a context"):
        conditional.log_prob(torch.randn(5, 2))
    with pytest.raises(ValueError, match="10 rows but its context has 9"):
        conditional.fit(torch.randn(10, 2), torch.randn(9, 1), progress=False)
    with pytest.raises(KeyError, match="registered flows are"):
        FlowDensity(2, flow="no_such_flow")
    with pytest.raises(ValueError, match="dim must be a positive"):
        FlowDensity(0, flow=STACK)


def test_numpy_input_is_accepted() -> None:
    x = correlated(64).numpy()
    history = FlowDensity(2, flow=STACK, num_flows=1).fit(x, epochs=1, progress=False)
    assert math.isfinite(history.train_nll[0])


# --------------------------------------------------------------------------- MAF (the default flow)
@needs_maf
def test_default_flow_is_maf_and_fits_two_moons() -> None:
    torch.manual_seed(0)
    x, test = two_moons(512, generator=gen(0)), two_moons(512, generator=gen(1))
    density = FlowDensity(2, num_flows=3, hidden_dims=(32, 32))
    assert density.config["flow"] == "maf"
    assert not any(density._inverted), "MAF scores data with its one-pass inverse: no layer is inverted"
    assert all(layer.fast_direction == "inverse" for layer in density.layers[::2])
    before = density.evaluate(test)
    density.fit(x, epochs=8, lr=3e-3, batch_size=64, progress=False, seed=0)
    assert density.evaluate(test) < before - 0.5
    buffer = io.BytesIO()
    density.save(buffer)
    buffer.seek(0)
    assert torch.equal(FlowDensity.load(buffer).log_prob(test), density.log_prob(test))
    assert density.sample(10).shape == (10, 2)


# --------------------------------------------------------------------------- every density family, smoke
FAMILIES = ("iaf", "affine_coupling", "spline_iaf", "spline_coupling", "ffjord")


@pytest.mark.parametrize("name", [n for n in FAMILIES if n in registry])
def test_other_families_fit_score_and_sample(name: str) -> None:
    torch.manual_seed(0)
    density = FlowDensity(2, flow=name, num_flows=2, hidden_dims=(8,))
    history = density.fit(two_moons(64, generator=gen(0)), epochs=1, batch_size=32, progress=False, seed=0)
    assert math.isfinite(history.train_nll[0])
    x = two_moons(5, generator=gen(1))
    assert torch.allclose(density.log_prob(x), density.distribution().log_prob(x), atol=1e-4)
    assert density.sample(3).shape == (3, 2)


# --------------------------------------------------------------------------- layers from the one stack builder
def test_layers_are_the_builders_and_flow_kwargs_are_checked() -> None:
    density = FlowDensity(2, flow="maf", num_flows=2)
    # FlowDensity's default hidden_dims=(128, 128) for the families that take it
    assert density.layers[0].made.hidden_dims == (128, 128)
    assert [type(layer).__name__ for layer in FlowDensity(2, flow="planar", num_flows=3).layers] == ["Planar"] * 3
    reversed_planar = FlowDensity(2, flow="planar", num_flows=2, permutation="reverse")
    assert isinstance(reversed_planar.layers[1], registry["permutation"])
    assert not any(isinstance(layer, registry["permutation"]) for layer in FlowDensity(2, permutation=None).layers)
    with pytest.raises(TypeError, match="hidden_dims"):
        FlowDensity(2, flow="planar", hidden_dims=(7,))
    with pytest.raises(TypeError, match="no_such_option"):
        FlowDensity(2, flow=STACK, no_such_option=1)
    with pytest.raises(ValueError, match="permutation"):
        FlowDensity(2, flow=STACK, permutation="shuffle")


def test_fit_is_fit_density() -> None:
    x = correlated(128)
    a = FlowDensity(2, flow=STACK, num_flows=2)
    b = copy.deepcopy(a)
    history_a = a.fit(x, epochs=2, progress=False, seed=0)
    history_b = fit_density(b, x, epochs=2, progress=False, seed=0)
    assert history_a.train_nll == history_b.train_nll and history_a.val_nll == history_b.val_nll
    assert torch.equal(a.log_prob(x), b.log_prob(x))


# --------------------------------------------------------------------------- hardening
def test_save_and_load_keep_the_dtype_and_follow_map_location() -> None:
    density = FlowDensity(2, flow="maf", num_flows=2, hidden_dims=(8,)).double()
    density.fit(correlated(128).double(), epochs=1, progress=False, seed=0)
    buffer = io.BytesIO()
    density.save(buffer)
    x = correlated(16, seed=4).double()
    for where in ("cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda storage, _: storage, None):
        buffer.seek(0)
        loaded = FlowDensity.load(buffer, map_location=where)
        assert all(p.dtype == torch.float64 for p in loaded.parameters()) and loaded.data_shift.dtype == torch.float64
        assert torch.equal(loaded.log_prob(x), density.log_prob(x))
    if torch.cuda.is_available():
        buffer.seek(0)
        loaded = FlowDensity.load(buffer, map_location="cuda")
        assert loaded.data_shift.device.type == "cuda" and loaded.data_shift.dtype == torch.float64
        assert torch.allclose(loaded.log_prob(x.cuda()).cpu(), density.log_prob(x))


def _graph_tensors(module: torch.nn.Module) -> list[str]:
    """Names of tensors with an autograd graph held anywhere in the modules' attributes."""
    found = []
    for name, sub in module.named_modules():
        stack = list(vars(sub).items())
        while stack:
            key, value = stack.pop()
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                found.append(f"{name}.{key}")
            elif isinstance(value, tuple | list):
                stack.extend((key, item) for item in value)
    return found


@pytest.mark.parametrize("flow", ["maf", "iaf", "affine_coupling"])
def test_deepcopy_and_pickle_after_a_grad_enabled_log_prob(flow: str) -> None:
    density = FlowDensity(2, flow=flow, num_flows=2, hidden_dims=(8,))
    x = correlated(32)
    density.log_prob(x).sum().backward()
    density.rsample(4).sum().backward()
    assert _graph_tensors(density) == []
    d = density.distribution()
    d.log_prob(d.rsample(torch.Size([3]))).sum().backward()  # caches on the layers: dropped when copying
    for clone in (copy.deepcopy(density), pickle.loads(pickle.dumps(density))):
        assert _graph_tensors(clone) == []
        assert torch.allclose(clone.log_prob(x), density.log_prob(x))


def test_conditional_density_copies_after_a_grad_enabled_log_prob() -> None:
    density = FlowDensity(2, flow="maf", num_flows=2, hidden_dims=(8,), context_dim=1)
    x, c = correlated(16), torch.randn(16, 1)
    density.log_prob(x, c).sum().backward()
    clone = pickle.loads(pickle.dumps(copy.deepcopy(density)))
    assert torch.allclose(clone.log_prob(x, c), density.log_prob(x, c))


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"grad_clip": 0.0}, "grad_clip"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"grad_clip": math.inf}, "grad_clip"),
        ({"lr": 0.0}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"max_steps": 0}, "max_steps"),
        ({"patience": 0}, "patience"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": 2.5}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 32.0}, "batch_size"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"validation_fraction": -0.1}, "validation_fraction"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
    ],
)
def test_fit_options_are_checked_before_anything_changes(options: dict, name: str) -> None:
    density = FlowDensity(2, flow=STACK, num_flows=1)
    before = copy.deepcopy(density.state_dict())
    with pytest.raises(ValueError, match=name):
        density.fit(correlated(64), progress=False, **options)
    after = density.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in after) and not bool(density.standardized)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
        ),
    ],
)
def test_traced_training_runs_on_the_device(device: str, caplog: pytest.LogCaptureFixture) -> None:
    density = FlowDensity(2, flow="maf", num_flows=2)
    with caplog.at_level("INFO", logger="pyro_flows.density.fit"):
        history = density.fit(correlated(300), epochs=2, batch_size=64, progress=False, seed=0, device=device)
    assert "eager pass runs" not in caplog.text and math.isfinite(history.val_nll[-1])
    assert density.data_shift.device.type == device


@pytest.mark.parametrize(("flow", "context_dim"), [("maf", 0), ("spline_coupling", 0), ("maf", 3), ("residual", 0)])
def test_traced_training_takes_the_eager_steps(flow: str, context_dim: int, caplog: pytest.LogCaptureFixture) -> None:
    """`jit=True` (the default): the traced log-density trains to the eager run's weights; a family that cannot be
    traced (residual) runs eager, and says so in the log."""
    x = correlated(300)
    context = torch.randn(300, context_dim, generator=torch.Generator().manual_seed(1)) if context_dim else None
    fitted = []
    for jit in (True, False):
        torch.manual_seed(0)
        density = FlowDensity(2, flow=flow, num_flows=2, context_dim=context_dim)
        with caplog.at_level("INFO", logger="pyro_flows.density.fit"):
            history = density.fit(x, context, epochs=2, batch_size=64, progress=False, seed=0, jit=jit)
        fitted.append((history.val_nll, density.state_dict()))
    assert fitted[0][0] == pytest.approx(fitted[1][0], rel=1e-5)
    for key, value in fitted[0][1].items():
        assert torch.allclose(value, fitted[1][1][key], rtol=1e-4, atol=1e-6), key
    assert ("cannot be traced" in caplog.text) == (flow == "residual")
    with pytest.raises(TypeError, match="jit must be True or False"):
        FlowDensity(2, flow=flow, num_flows=1).fit(x, progress=False, jit="yes")


@pytest.mark.parametrize("validate_args", [True, False])
@pytest.mark.parametrize("validation_fraction", [0.25, 0.0])
def test_divergence_restores_finite_weights(validate_args: bool, validation_fraction: float) -> None:
    previous = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(validate_args)
    try:
        x = two_moons(256, generator=gen(0))
        # a huge learning rate: the weights blow up after the first steps
        density = FlowDensity(2, flow="maf", num_flows=2, hidden_dims=(16,))
        density.fit(x, epochs=1, progress=False, seed=0)
        with pytest.raises(FloatingPointError, match=r"non-finite .* at epoch \d+, step \d+; .*restored.* Try"):
            density.fit(x, epochs=50, lr=1e30, validation_fraction=validation_fraction, progress=False, seed=0)
        assert all(torch.isfinite(p).all() for p in density.parameters())
        assert math.isfinite(density.evaluate(x))
        # a NaN gradient: nothing is stepped, the weights stay as they were
        before = copy.deepcopy(density.state_dict())
        weight = next(density.parameters())
        hook = weight.register_hook(lambda grad: grad * math.nan)
        with pytest.raises(FloatingPointError, match="gradient norm nan"):
            density.fit(x, epochs=3, validation_fraction=validation_fraction, progress=False, seed=0)
        hook.remove()
        after = density.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in after)
    finally:
        torch.distributions.Distribution.set_default_validate_args(previous)


def test_divergence_with_validation_restores_the_best_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    density = FlowDensity(2, flow=STACK, num_flows=2)
    x = correlated(256)
    density.fit(x, epochs=1, progress=False, seed=0)
    states: list[dict[str, torch.Tensor]] = []
    original = density._mean_nll

    def recording(*args: object) -> float:
        states.append(copy.deepcopy(density.state_dict()))
        if len(states) == 3:  # the third epoch's weights are poisoned: the next steps diverge
            with torch.no_grad():
                next(density.parameters()).fill_(math.inf)
        return original(*args)

    monkeypatch.setattr(density, "_mean_nll", recording)
    with pytest.raises(FloatingPointError, match=r"best validated values \(epoch [01]\)"):
        density.fit(x, epochs=10, lr=1e-3, progress=False, seed=0)
    final = density.state_dict()
    assert any(all(torch.equal(final[k], state[k]) for k in final) for state in states[:2])


def test_load_state_dict_with_assign_follows_the_new_dtype() -> None:
    density = FlowDensity(2, flow="maf", num_flows=2, hidden_dims=(8,))
    donor = FlowDensity(2, flow="maf", num_flows=2, hidden_dims=(8,)).double()
    density.load_state_dict(donor.state_dict(), assign=True)
    x = correlated(8).double()
    assert density.log_prob(x).dtype == torch.float64
    assert torch.equal(density.log_prob(x), donor.log_prob(x))
    history = density.fit(x.repeat(8, 1), epochs=1, progress=False, seed=0)
    assert math.isfinite(history.train_nll[0])


def test_log_prob_timing_matches_the_distribution_path() -> None:
    # log_prob is distribution().log_prob: one code path, identical values
    density = FlowDensity(2, flow="iaf", num_flows=2, hidden_dims=(8,))
    x = correlated(16)
    assert torch.equal(density.log_prob(x), density.distribution().log_prob(x))
