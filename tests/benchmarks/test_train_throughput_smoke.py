"""Smoke test of `benchmarks/train_throughput.py`: its `main` runs end to end at the smallest
sizes, writes its JSON, and its analytic FLOP count agrees with XLA's (so the script cannot rot)."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "train_throughput.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--features", "16", "--layers", "1", "--heads", "2", "--ffn-hidden", "32",
        "--max-past", "8", "--length", "16", "--batch", "2", "--steps", "2", "--warmup", "1",
        "--peak-size", "64", "--peak-rounds", "2"]


def test_main_runs_and_writes_json(bench, tmp_path):
    out = tmp_path / "result.json"
    result = bench.main(TINY + ["--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["command"].startswith("python benchmarks/train_throughput.py")
    for r in (result, saved):
        assert r["model"]["layers"] == 1 and r["batch"] == 2 and r["length"] == 16
        assert r["timed_steps"] == 2 and len(r["step_s"]["all"]) == 2
        assert r["examples_per_s"] > 0 and r["frames_per_s"] == pytest.approx(16 * r["examples_per_s"])
        assert 0 < r["mfu"] < 5  # tiny shapes: only a sanity range
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"])
        assert r["flops"]["train_per_step"] == 3 * r["flops"]["forward_per_step"]
        # XLA counts elementwise work too, a large share at these sizes; never fewer FLOPs.
        assert 1.0 <= r["flops_check"]["ratio"] < 1.6


def test_analytic_flops_by_hand(bench):
    args = bench.parse_args(["--features", "8", "--layers", "3", "--heads", "2", "--length", "5",
                             "--batch", "2", "--ffn-hidden", "12", "--kv-heads", "1"])
    d, dh, t = 8, 4, 5
    per_frame = (2 * d * (2 + 2 * 1) * dh + 2 * 2 * dh * d   # qkv (GQA: 1 kv head), out
                 + 2 * 2 * t * 2 * dh                        # scores and values, 2 heads
                 + 2 * d * 24 + 2 * 12 * d)                  # gated up (2x12), down
    flops = bench.model_flops(args)
    assert flops["forward_per_step"] == 3 * 2 * t * per_frame
    assert flops["train_per_step"] == 3 * flops["forward_per_step"]


def test_bad_sizes_raise(bench):
    with pytest.raises(ValueError, match="--heads"):
        bench.parse_args(["--features", "10", "--heads", "4"])
    with pytest.raises(ValueError, match="--batch"):
        bench.parse_args(["--batch", "0"])
