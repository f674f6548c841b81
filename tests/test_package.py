"""Package-level behaviour: import side effects, registries, shared helpers."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_flows.nn import MLP
from pyro_flows.transforms import FlowRegistry, registry
from pyro_flows.transforms.base import as_event_shape, broadcast_shape


def test_import_changes_no_global_state() -> None:
    code = """
import torch, pyro
from torch.distributions import Distribution
before = (Distribution._validate_args, torch.get_default_dtype(), torch.is_grad_enabled(),
          pyro.settings.get("validate_poutine") if hasattr(pyro.settings, "get") else None,
          torch.get_num_threads())
import pyro_flows, pyro_flows.transforms
after = (Distribution._validate_args, torch.get_default_dtype(), torch.is_grad_enabled(),
         pyro.settings.get("validate_poutine") if hasattr(pyro.settings, "get") else None,
         torch.get_num_threads())
assert before == after, (before, after)
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_flow_name_lists_the_registered_ones() -> None:
    with pytest.raises(KeyError, match=r"registered flows are: .*elementwise_affine"):
        registry["no_such_flow"]


def test_registering_a_name_twice_is_an_error() -> None:
    reg = FlowRegistry("test")
    reg.register("a")(int)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(float)
    assert list(reg) == ["a"] and len(reg) == 1


@pytest.mark.parametrize("bad", [0, (), (3, 0), -2])
def test_event_shape_must_be_positive(bad: object) -> None:
    with pytest.raises(ValueError, match="positive"):
        as_event_shape(bad)  # type: ignore[arg-type]


def test_broadcast_shape_matches_torch() -> None:
    for a, b in [((), (3, 4)), ((4,), (3, 4)), ((3, 1), (1, 5)), ((2, 1, 4), (3, 1))]:
        assert broadcast_shape(a, b) == torch.broadcast_shapes(a, b)
    with pytest.raises(ValueError, match="broadcast"):
        broadcast_shape((3,), (4,))


def test_mlp_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="positive"):
        MLP(0, 3)


@pytest.mark.parametrize("name", ["elementwise_affine", "leaky_relu", "triangular", "lu", "permutation"])
def test_foundation_flows_start_at_identity_or_permutation(name: str) -> None:
    flow = registry[name](4)
    x = torch.randn(10, 4)
    y = flow(x)
    if name in ("lu", "permutation"):
        assert torch.allclose(y.sort(-1).values, x.sort(-1).values)
    else:
        assert torch.allclose(y, x)
    assert torch.allclose(flow.log_abs_det_jacobian(x, y), torch.zeros(10), atol=1e-5)


def test_non_tensor_and_integer_inputs_are_rejected() -> None:
    flow = registry["elementwise_affine"](2)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        flow([1.0, 2.0])
    with pytest.raises(TypeError, match="floating-point"):
        flow(torch.ones(3, 2, dtype=torch.long))


def test_explicit_permutations_are_validated() -> None:
    with pytest.raises(ValueError, match=r"permutation of range"):
        registry["permutation"](3, permutation=[0, 0, 1])
    with pytest.raises(ValueError, match="'reverse', 'random'"):
        registry["permutation"](3, permutation="sideways")
    flow = registry["permutation"](3, permutation=[2, 0, 1])
    assert flow(torch.tensor([10.0, 20.0, 30.0])).tolist() == [30.0, 10.0, 20.0]


#: A speed claim: a time (``0.13 ms``), a ratio (``1.4×``, ``3.8x``; not sizes such as ``1×1`` or ``32 x 32``), a rate.
SPEED_CLAIM = re.compile(
    r"\d(?:[\d.,]*\d)?\s*(?:ms|µs|us|ns)\b"
    r"|\b\d+(?:\.\d+)?\s*[×x](?![\s\d]*\d)(?!\w)"
    r"|\b(?:x|times)\s+(?:faster|slower)\b"
    r"|\d\s*(?:it|steps|points)/s\b"
)


def _documentation(path: Path) -> list[tuple[str, str]]:
    """(where, text) of every docstring and ``#:`` attribute comment of a source file."""
    source = path.read_text(encoding="utf-8")
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc:
                found.append((f"{path}:{getattr(node, 'name', '<module>')}", doc))
    found += [(f"{path}:{i}", line) for i, line in enumerate(source.splitlines(), 1) if line.strip().startswith("#:")]
    return found


def test_no_benchmark_numbers_in_the_package_docstrings() -> None:
    """Measured speeds live in ``benchmarks/README.md`` (with the command, interleaved runs); docstrings point there."""
    root = Path(__file__).resolve().parents[1] / "pyro_flows"
    claims = [
        f"{where}: {match.group(0)!r} in {text[max(0, match.start() - 40) : match.end() + 40]!r}"
        for path in sorted(root.rglob("*.py"))
        for where, text in _documentation(path)
        for match in SPEED_CLAIM.finditer(text)
    ]
    assert not claims, "benchmark numbers in docstrings (point to benchmarks/README.md instead):\n" + "\n".join(claims)
