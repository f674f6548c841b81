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


def write(suite: str, rows: Sequence[dict[str, Any]], columns: Sequence[str], device: str) -> str:
    """Write ``results/<suite>-<device>.json`` and ``.md``; return the markdown table."""
    RESULTS.mkdir(exist_ok=True)
    tag = f"{suite}-{device.split(':')[0]}"
    payload = {"suite": suite, "device": device, "machine": machine(), "rows": list(rows)}
    (RESULTS / f"{tag}.json").write_text(json.dumps(payload, indent=2))
    table = markdown_table(rows, columns)
    header = f"### {suite} ({device}; torch {torch.__version__}, {torch.get_num_threads()} threads)\n\n"
    (RESULTS / f"{tag}.md").write_text(header + table + "\n")
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
    path = RESULTS / f"{suite}-{device.split(':')[0]}.json"
    merged = json.loads(path.read_text())["rows"] if path.exists() else []
    for row in rows:
        ident = tuple(row[k] for k in key)
        positions = [i for i, old in enumerate(merged) if tuple(old.get(k) for k in key) == ident]
        if positions:
            merged[positions[0]] = row
        else:
            merged.append(row)
    return write(suite, merged, columns, device)
