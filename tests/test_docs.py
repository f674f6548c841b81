"""The documentation site builds warning-free (``mkdocs build --strict``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_docs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_choosing_a_flow_covers_every_registered_family() -> None:
    from pyro_flows.transforms import conditional_registry, image_registry, registry

    page = (ROOT / "docs" / "choosing-a-flow.md").read_text()
    for name in {*registry, *conditional_registry, *image_registry}:
        assert f"`{name}`" in page, f"docs/choosing-a-flow.md does not cover the registered flow {name!r}"
