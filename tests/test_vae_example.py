"""The VAE example: IDX loading (raw, .gz, .zip), splits, and one tiny end-to-end run of the CLI."""

from __future__ import annotations

import gzip
import json
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import vae  # noqa: E402
import vae_data  # noqa: E402


def idx_bytes(images: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, images.ndim]) + struct.pack(f">{images.ndim}i", *images.shape) + images.tobytes()


@pytest.mark.parametrize("kind", ["raw", "gz", "zip"])
def test_idx_files_raw_gz_zip(tmp_path: Path, kind: str) -> None:
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    raw = idx_bytes(images)
    name = "t10k-images-idx3-ubyte"
    if kind == "raw":
        (tmp_path / name).write_bytes(raw)
    elif kind == "gz":
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress(raw))
    else:
        with zipfile.ZipFile(tmp_path / f"{name}.zip", "w") as z:
            z.writestr(name, raw)
    x = vae_data.load_mnist(tmp_path)
    assert x.shape == (3, 784) and x.dtype == torch.float32
    assert torch.allclose(x * 255, torch.from_numpy(images.reshape(3, -1).astype(np.float32)))


def test_bad_idx_and_missing_files_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an IDX"):
        vae_data.parse_idx(b"\x01\x02\x08\x01")
    with pytest.raises(ValueError, match="payload"):
        vae_data.parse_idx(bytes([0, 0, 0x08, 1]) + struct.pack(">i", 5) + b"abc")
    with pytest.raises(FileNotFoundError, match="no MNIST image file"):
        vae_data.find_mnist_images(tmp_path)


def test_split_is_fixed_and_disjoint() -> None:
    data = torch.arange(100.0)[:, None]
    a, b = vae_data.split(data), vae_data.split(data)
    assert [len(p) for p in a] == [70, 10, 20]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert torch.equal(torch.cat(a).sort(0).values, data)


def test_cli_compare_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.json"
    argv = ["--compare", "--flows", "none", "householder", "--epochs", "2", "--hidden", "16", "--latent-dim", "2"]
    argv += ["--iw-samples", "20", "--elbo-samples", "4", "--batch-size", "500", "--quiet", "--json", str(out)]
    results = vae.main(argv)
    assert [r["flow"] for r in results] == ["none", "householder"]
    saved = json.loads(out.read_text())
    for r in saved:
        assert {"neg_elbo", "nll", "flow", "epochs", "seconds"} <= set(r)
        assert np.isfinite(r["neg_elbo"]) and np.isfinite(r["nll"])
    assert "| householder × 4 |" in capsys.readouterr().out


def test_cli_flow_kwargs_reach_the_flow_constructor() -> None:
    common = ["--flow", "iaf", "--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--iw-samples", "10"]
    common += ["--elbo-samples", "2", "--batch-size", "500", "--quiet"]
    (result,) = vae.main([*common, "--flow-kwargs", '{"gated": false}'])
    assert result["flow_kwargs"] == {"gated": False}
    assert np.isfinite(result["nll"])
    with pytest.raises(TypeError, match="bogus"):
        vae.main([*common, "--flow-kwargs", '{"bogus": 1}'])
