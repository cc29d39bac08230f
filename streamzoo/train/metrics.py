"""Training metrics on disk: one JSON object per line (`metrics.jsonl`) and plots of the curves.

Each record is `{"step": int, "split": "train" | "eval" | ..., "time": float, <name>: float}`.
JSON lines survive a crash (every line is complete or absent), append on resume, and
`truncate_after(step)` drops records a killed run wrote after its last checkpoint, so a
resumed run's log reads as if it never stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from typing import Any, Iterable, Mapping

import numpy as np


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Scalars (Python, numpy or jax) as plain floats; anything else is a ValueError."""
    out = {}
    for name, value in metrics.items():
        arr = np.asarray(value)
        if arr.size != 1:
            raise ValueError(f"metrics[{name!r}]: expected a scalar, got shape {arr.shape}")
        out[name] = float(arr.reshape(()))
    return out


class MetricsLogger:
    """Appends metric records to a JSON-lines file (or keeps them in memory when path is None)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None else os.fspath(path)
        self.records: list[dict] = []
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.records = read_metrics(self.path) if os.path.exists(self.path) else []

    def log(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> dict:
        record = {"step": int(step), "split": split, "time": time.time(), **to_floats(metrics)}
        self.records.append(record)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        return record

    def truncate_after(self, step: int) -> int:
        """Drop records with `record.step > step` (a resumed run redoes those steps).

        Returns how many records were dropped.
        """
        kept = [r for r in self.records if r["step"] <= step]
        dropped = len(self.records) - len(kept)
        self.records = kept
        if self.path and dropped:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, self.path)
        return dropped


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics file; a torn last line (a killed writer) is ignored."""
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def curves(records: Iterable[Mapping]) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """`{metric: {split: (steps, values)}}` from metric records."""
    points: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        for name, value in r.items():
            if name in ("step", "split", "time") or not isinstance(value, (int, float)):
                continue
            points[name][r.get("split", "train")].append((r["step"], value))
    return {name: {split: (np.array([s for s, _ in pts]), np.array([v for _, v in pts]))
                   for split, pts in by_split.items()}
            for name, by_split in points.items()}


def plot_metrics(records_or_path, out_path: str | os.PathLike, *, names: Iterable[str] | None = None,
                 log_scale: Iterable[str] = ("loss",), skip: Iterable[str] = ("weight",)) -> str:
    """One panel per metric, a line per split; saved as an image (PNG by extension).

    `names`: the metrics to plot (default: all but those in `skip`). Metrics whose name
    contains an entry of `log_scale` get a log y axis when all positive. Returns the path.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    records = (read_metrics(records_or_path) if isinstance(records_or_path, (str, os.PathLike))
               else list(records_or_path))
    data = curves(records)
    names = [n for n in (names or [m for m in sorted(data) if m not in set(skip)]) if n in data]
    if not names:
        raise ValueError(f"records_or_path: expected at least one metric to plot, got none "
                         f"({len(records)} records)")
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for split, (steps, values) in sorted(data[name].items()):
            style = "-" if split == "train" else "o-"
            ax.plot(steps, values, style, label=split, markersize=3)
            if any(key in name for key in log_scale) and np.all(values > 0):
                ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
