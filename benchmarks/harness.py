"""Timing helpers and result writers shared by the benchmark suites (JSON + markdown tables)."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(
    fn: Callable[[], Any], device: str = "cpu", repeat: int = 7, warmup: int = 2, min_time: float = 0.05
) -> float:
    """Median wall time of ``fn()`` in seconds (each sample loops until ``min_time`` has passed)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeat):
        n = 0
        start = time.perf_counter()
        while True:
            fn()
            n += 1
            synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        samples.append(elapsed / n)
    return statistics.median(samples)


def machine() -> dict[str, Any]:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def result_path(suite: str, device: str, suffix: str) -> Path:
    """``results/<suite>-<device type><suffix>``, e.g. ``results/guides-cuda.json``."""
    return RESULTS / f"{suite}-{device.split(':')[0]}{suffix}"


def write(suite: str, rows: Sequence[dict[str, Any]], columns: Sequence[str], device: str) -> str:
    """Write ``results/<suite>-<device>.json`` and ``.md``; return the markdown table."""
    RESULTS.mkdir(exist_ok=True)
    payload = {"suite": suite, "device": device, "machine": machine(), "rows": list(rows)}
    result_path(suite, device, ".json").write_text(json.dumps(payload, indent=2))
    table = markdown_table(rows, columns)
    header = f"### {suite} ({device}; torch {torch.__version__}, {torch.get_num_threads()} threads)\n\n"
    result_path(suite, device, ".md").write_text(header + table + "\n")
    return header + table


def update(
    suite: str,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    device: str,
    key: Sequence[str] = ("problem", "guide"),
) -> str:
    """Like :func:`write`, but keep the rows of an earlier ``results/<suite>-<device>.json`` that ``rows`` do not
    replace (same values in the ``key`` columns); new rows take the place of the ones they replace."""
    path = result_path(suite, device, ".json")
    previous = json.loads(path.read_text())["rows"] if path.exists() else []
    merged = {tuple(row.get(k) for k in key): row for row in previous}
    merged.update((tuple(row[k] for k in key), row) for row in rows)
    return write(suite, list(merged.values()), columns, device)
