"""Smoke test of `benchmarks/kernels_gpu.py`: `--smoke` runs every item at tiny shapes on the CPU
with our kernels in interpret mode (cuDNN peers are skipped with a reason), writes its JSON and
markdown, and each of our kernels agrees with its XLA peer, so the script cannot rot before the
GPU run."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "kernels_gpu.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("kernels_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# One attention item (masks, cuDNN skips, the bar), the conv (bandwidth, streaming step) and
# linear attention (FLOP rate) by default; every item in the slow test.
DEFAULT_ITEMS = ("window_sinks", "causal_conv", "linear_attention")


def run_smoke(bench, tmp_path, items):
    out = tmp_path / "kernels.json"
    result = bench.main(["--smoke", "--only", ",".join(items), "--out", str(out)])
    saved = json.loads(out.read_text())
    table = (tmp_path / "kernels.md").read_text()
    assert saved["command"].startswith("python benchmarks/kernels_gpu.py --smoke")
    assert saved["smoke"] and saved["impl"] == "interpret"
    assert list(saved["items"]) == list(items)
    assert saved["ceilings"]["hbm_read_write_tbps"] > 0 and saved["ceilings"]["matmul_tflops"] > 0
    for name, item in result["items"].items():
        if name == "model_step":
            lm = item["lm"]
            assert "per_chunk_s" in lm["auto"] and "per_chunk_s" in lm["xla"], lm
            assert lm["auto"]["kernels"] and not lm["xla"]["kernels"]  # kernels only in "auto"
            continue
        ours = item["cases"]["ours"]
        assert "median_s" in ours, (name, ours)
        check = next(v for k, v in ours.items() if k.startswith("check_vs_"))
        assert check["finite"] and check["rel_err"] < 2e-2, (name, check)  # bf16 inputs
        skipped = [c for c in item["cases"].values() if "skipped" in c]
        assert all("cuDNN" in c["skipped"] for c in skipped)
        assert f"| {name} | ours |" in table
    if "causal_conv" in items:
        assert "step" in result["items"]["causal_conv"]


def test_smoke_default_items(bench, tmp_path):
    run_smoke(bench, tmp_path, DEFAULT_ITEMS)


@pytest.mark.slow
def test_smoke_every_item(bench, tmp_path):
    run_smoke(bench, tmp_path, bench.ITEMS)


def test_bad_arguments_raise(bench):
    with pytest.raises(ValueError, match="--only"):
        bench.parse_args(["--only", "prefill_causal,warp_drive"])
    with pytest.raises(ValueError, match="--rounds"):
        bench.parse_args(["--rounds", "0"])
    args = bench.parse_args(["--impl", "mosaic_gpu"])
    assert args.la_impl == "auto"  # linear attention has no Mosaic GPU kernel
