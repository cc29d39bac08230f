"""Smoke test of `benchmarks/codec_vad.py`: a `--quick` run of the codec cases in both threading
configurations (default threading, pinned to one core) writes its JSON with every case timed (so the script cannot rot: a refactor of
its helpers once broke it unnoticed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "codec_vad.py")


@pytest.mark.slow  # ~2 min: the codec's step compiled in two processes
def test_quick_run_writes_every_codec_case(tmp_path):
    out = tmp_path / "codec_vad.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # not the tests' opt level
    subprocess.run([sys.executable, SCRIPT, "--quick", "--no-vad", "--out", str(out)],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    res = json.loads(out.read_text())
    assert res["command"].startswith("python benchmarks/codec_vad.py")
    for key in ("codec", "codec_one_core"):
        results = res[key]["results"]
        assert "codec sz.jit_step(codec), packed carry, 20 ms frame" in results and len(results) == 12
        for name, r in results.items():
            assert r["ms_per_call"] > 0 and r["real_time_factor"] > 0, name
    assert len(res["codec_one_core"]["cpu_affinity"]) == 1
    assert res["machine"]["nproc"] >= 1
