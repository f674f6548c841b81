"""Density estimation: test NLL of FlowDensity on toys and real data, and MAF side by side with zuko's MAF.

* 2-d toys (:mod:`pyro_flows.density.data`): test NLL in nats, ``maf`` on each, ``spline_iaf`` on the
  checkerboard too; for the checkerboard the gap to its true entropy log 32 nats (5 bits = 2.5 bits/dim).
* scikit-learn ``load_digits`` (64-d, 17 levels): uniformly dequantized to ``(x + u) / 17`` (one fixed noise draw per
  split), test NLL in nats of the dequantized data and the bits/dim bound of the discrete data.
* scikit-learn ``load_breast_cancer`` (30-d): features z-scored with the training statistics, test NLL in nats.
* Fixed 60/20/20 train/validation/test splits (seed 0); Adam lr 1e-3, batch 128, at most 300 epochs (FFJORD: 15),
  early stopping (patience 20) on the validation NLL with restore of the best weights; the same protocol for all.
  One row per family at seed 0, each in its default layout (for ``maf``: random orders).
* zuko: ``zuko.flows.MAF`` against our MAF in zuko's layout (5 transforms, hidden (128, 128), alternating
  natural/reversed orders, ReLU), trained by a plain loop with the same protocol (same splits, standardization,
  batches, optimizer settings, validation, patience), alternating with ours in the same process over 3 seeds (means
  reported), so the wall-time ratio is measured side by side (other processes load the machine; compare ratios, not
  absolute times). ``FlowDensity.fit`` uses PyTorch's fused Adam kernel; the zuko loop uses ``torch.optim.Adam``'s
  default.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from pyro_flows.density import CHECKERBOARD_ENTROPY, TOY_DATASETS, FlowDensity, bits_per_dim, dequantize
from pyro_flows.transforms import registry

COLUMNS = [
    "dataset", "model", "dim", "epochs", "fit_s", "s_per_epoch", "test_nll", "bits_per_dim", "gap_to_entropy",
    "time_ratio", "epoch_time_ratio",
]  # fmt: skip

HIDDEN = (128, 128)
NUM_FLOWS = 5
SEEDS = (0, 1, 2)


def _split(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    a, b = int(0.6 * n), int(0.8 * n)
    return order[:a], order[a:b], order[b:]


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dequantized digits in [0, 1), split train/val/test."""
    from sklearn.datasets import load_digits

    x = torch.as_tensor(load_digits().data, dtype=torch.float32)
    train, val, test = (
        dequantize(x[idx], 17, generator=torch.Generator().manual_seed(s), dtype=torch.float32)
        for s, idx in enumerate(_split(len(x)))
    )
    return train, val, test


def _breast_cancer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_breast_cancer

    x = torch.as_tensor(load_breast_cancer().data, dtype=torch.float32)
    train, val, test = (x[idx] for idx in _split(len(x)))
    mean, std = train.mean(0), train.std(0)
    return (train - mean) / std, (val - mean) / std, (test - mean) / std


def _fit_ours(
    name: str, train: torch.Tensor, val: torch.Tensor, epochs: int, patience: int, batch: int, seed: int = 0, **kw: Any
) -> tuple[FlowDensity, float, int]:
    torch.manual_seed(seed)
    density = FlowDensity(train.shape[1], flow=name, **kw)
    start = time.perf_counter()
    history = density.fit(
        train,
        validation_data=val,
        epochs=epochs,
        patience=patience,
        batch_size=batch,
        lr=1e-3,
        progress=False,
        seed=seed,
    )
    return density, time.perf_counter() - start, history.epochs


def _fit_zuko(
    train: torch.Tensor, val: torch.Tensor, epochs: int, patience: int, batch: int, seed: int = 0
) -> tuple[Callable[[torch.Tensor], torch.Tensor], float, int] | None:
    """Train zuko's MAF on standardized data; return its log-density in data units, the wall time, the epochs."""
    try:
        import zuko
    except ImportError:
        return None
    # the same standardization as FlowDensity's, accounted for in the returned log-density
    shift, scale = train.mean(0), train.std(0, correction=0)
    scale = torch.where(scale > 1e-12, scale, torch.ones_like(scale))
    train, val = (train - shift) / scale, (val - shift) / scale
    torch.manual_seed(seed)
    flow = zuko.flows.MAF(train.shape[1], transforms=NUM_FLOWS, hidden_features=HIDDEN)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    best, best_state, since, epoch = math.inf, None, 0, 0
    start = time.perf_counter()
    for epoch in range(epochs):  # noqa: B007 - the last epoch index is reported
        order = torch.randperm(len(train), generator=generator)
        for first in range(0, len(train), batch):
            loss = -flow().log_prob(train[order[first : first + batch]]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            val_nll = -flow().log_prob(val).mean().item()
        if val_nll < best:
            best, best_state, since = val_nll, copy.deepcopy(flow.state_dict()), 0
        else:
            since += 1
            if since >= patience:
                break
    flow.load_state_dict(best_state)
    seconds = time.perf_counter() - start
    return lambda x: flow().log_prob((x - shift) / scale) - scale.log().sum(), seconds, epoch + 1


def _toys(quick: bool) -> list[dict]:
    rows = []
    n, epochs = (2000, 3) if quick else (20_000, 40)
    runs = [(name, "maf") for name in TOY_DATASETS] + [("checkerboard", "spline_iaf")]
    for name, flow in runs:
        sampler = TOY_DATASETS[name]
        sizes = (n, n // 5, n)
        train, val, test = (sampler(m, generator=torch.Generator().manual_seed(s)) for s, m in enumerate(sizes))
        torch.manual_seed(0)
        density = FlowDensity(2, flow=flow, num_flows=NUM_FLOWS, hidden_dims=(64, 64))
        start = time.perf_counter()
        history = density.fit(
            train, validation_data=val, epochs=epochs, patience=10, batch_size=256, lr=2e-3, lr_schedule="cosine",
            progress=False, seed=0,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        row = _row(name, flow, 2, history.epochs, seconds, density.evaluate(test))
        if name == "checkerboard":
            row["gap_to_entropy"] = row["test_nll"] - CHECKERBOARD_ENTROPY
            row["bits_per_dim"] = bits_per_dim(-row["test_nll"], 2)  # the entropy is 2.5 bits per dimension
        rows.append(row)
    return rows


def _row(dataset: str, model: str, dim: int, epochs: int, seconds: float, nll: float) -> dict:
    row = {"dataset": dataset, "model": model, "dim": dim, "epochs": epochs, "fit_s": seconds}
    row.update(s_per_epoch=seconds / epochs, test_nll=nll)
    if dataset == "digits":
        row["bits_per_dim"] = bits_per_dim(-nll, dim, 17)
    return row


def _versus_zuko(
    dataset: str, train: torch.Tensor, val: torch.Tensor, test: torch.Tensor, epochs: int, patience: int, batch: int
) -> list[dict]:
    """MAF (ours) and zuko's MAF, same architecture and protocol, alternating, over SEEDS seeds; rows of means."""
    dim = train.shape[1]
    ours, theirs = [], []
    for seed in SEEDS:
        density, seconds, run_epochs = _fit_ours(
            "maf", train, val, epochs, patience, batch, seed=seed, num_flows=NUM_FLOWS, hidden_dims=HIDDEN,
            order="natural",
        )  # fmt: skip
        ours.append((seconds, run_epochs, density.evaluate(test)))
        fitted = _fit_zuko(train, val, epochs, patience, batch, seed=seed)
        if fitted is None:
            return []
        log_prob, seconds, run_epochs = fitted
        with torch.no_grad():
            theirs.append((seconds, run_epochs, -log_prob(test).mean().item()))
    rows = []
    for model, runs in ((f"maf (ours), mean of {len(SEEDS)} seeds", ours), (f"zuko MAF, mean of {len(SEEDS)}", theirs)):
        seconds, run_epochs, nll = (sum(values) / len(runs) for values in zip(*runs, strict=True))
        rows.append(_row(dataset, model, dim, round(run_epochs), seconds, nll))
    rows.append(
        {
            "dataset": dataset,
            "model": "ours / zuko (NLL: difference)",
            "dim": dim,
            "time_ratio": rows[0]["fit_s"] / rows[1]["fit_s"],
            "epoch_time_ratio": rows[0]["s_per_epoch"] / rows[1]["s_per_epoch"],
            "test_nll": rows[0]["test_nll"] - rows[1]["test_nll"],
        }
    )
    return rows


def run(device: str, quick: bool) -> list[dict]:
    if device != "cpu":
        raise ValueError("bench_density runs on the CPU (the data sets are small)")
    rows = _toys(quick)
    epochs, patience, batch = (3, 2, 128) if quick else (300, 20, 128)
    models = [
        ("maf", {}),
        ("affine_coupling", {}),
        ("spline_iaf", {}),
        ("ffjord", {"num_flows": 1, "hidden_dims": (128, 128)}),
    ]
    for dataset, load in (("digits", _digits), ("breast_cancer", _breast_cancer)):
        train, val, test = load()
        for name, kw in models:
            if name not in registry:
                continue
            kw = {"num_flows": NUM_FLOWS, "hidden_dims": HIDDEN, **kw}
            budget = min(epochs, 15) if name == "ffjord" and not quick else epochs
            density, seconds, run_epochs = _fit_ours(name, train, val, budget, patience, batch, **kw)
            rows.append(_row(dataset, name, train.shape[1], run_epochs, seconds, density.evaluate(test)))
        rows += _versus_zuko(dataset, train, val, test, epochs, patience, batch)
    return rows
