"""The worked example of ``docs/adding-a-flow.md`` is a complete family: it passes the conformance checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import test_conformance as suite
import torch

import pyro_flows.transforms
from pyro_flows.transforms import ConditionalFlow
from pyro_flows.transforms.registry import FlowRegistry

PAGE = Path(__file__).resolve().parent.parent / "docs" / "adding-a-flow.md"


@pytest.fixture(scope="module")
def family() -> type:
    code = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)[0]
    assert len(code.strip().splitlines()) < 60, "the example must stay under 60 lines"
    with pytest.MonkeyPatch.context() as patch:
        scratch = FlowRegistry("vector", conditional=FlowRegistry("conditional"))
        patch.setattr(pyro_flows.transforms, "registry", scratch)
        namespace: dict = {}
        exec(compile(code, str(PAGE), "exec"), namespace)
    assert "sinh_arcsinh" in scratch and "sinh_arcsinh" in scratch.conditional
    return namespace["SinhArcsinh"]


CHECKS = [
    suite.test_inverse_and_log_det_at_random_parameters,
    suite.test_gradients_reach_every_parameter,
    suite.test_state_dict_round_trip,
    suite.test_bad_input_raises_clear_errors,
    suite.test_scoring_own_samples_matches_uncached_scoring,
    suite.test_float32_smoke,
]


@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "conditional"])
@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__)
def test_the_documented_family_passes_the_conformance_checks(family: type, check, conditional: bool) -> None:
    if conditional:
        make = lambda: ConditionalFlow(family(suite.VECTOR_DIM, context_dim=suite.CONTEXT_DIM))  # noqa: E731
    else:
        make = lambda: family(suite.VECTOR_DIM)  # noqa: E731
    check(suite.Case("sinh_arcsinh", make, (suite.VECTOR_DIM,), conditional))


def test_the_documented_family_starts_at_the_identity(family: type) -> None:
    x = torch.randn(8, 3)
    assert torch.allclose(family(3)(x), x, atol=1e-5)
