"""Test-session set-up: CPU by default, 32-bit JAX, and a persistent compilation cache.

The suite is compile-bound on a 2-core CPU, so compiled executables are cached on disk
outside the repository (`~/.cache/streamzoo-jax`, or `$STREAMZOO_JAX_CACHE`) with no minimum
compile time or entry size: jax's default (1 s) caches nothing for small test programs.
The cache is keyed by jax version, flags and CPU, so it is never committed.

Every compiled CPU executable holds a few memory mappings until it is freed; the whole suite
compiles thousands of programs, and without freeing them one process passes Linux's default
`vm.max_map_count` (65530) and XLA segfaults inside a compile (seen in CI at ~85% of the run:
51,000 mappings after three quarters of it). So the in-memory caches are cleared after every
test module.
"""

from __future__ import annotations

import gc
import os
import zlib

# Before jax reads its configuration. An explicit JAX_PLATFORMS (e.g. "cuda") wins.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is compile-bound: XLA's backend optimisation level 0 cuts its CPU time by ~40%
# (measured: 195 -> 119 CPU-s on tests/layers/test_recurrent.py + tests/zoo/codec/test_encoder.py)
# and changes no result beyond float rounding, which every comparison tolerates. Benchmarks do
# not import this file. An explicit level in XLA_FLAGS wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

CACHE_DIR = os.path.expanduser(os.environ.get("STREAMZOO_JAX_CACHE", "~/.cache/streamzoo-jax"))

jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
jax.config.update("jax_enable_x64", False)
if os.environ.get("STREAMZOO_JAX_CACHE") != "off":  # "off": no persistent cache (CI)
    jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# 8 simulated CPU devices, so the sharding tests (DP, FSDP, TP, ring attention, sequence
# parallel) run in this process; other tests use device 0 as before.
if os.environ["JAX_PLATFORMS"] == "cpu":
    jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture
def key(request) -> jax.Array:
    """A PRNG key that differs per test (derived from the test id) and is stable across runs."""
    return jax.random.key(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop the module's compiled executables (and their memory mappings) when it finishes."""
    yield
    jax.clear_caches()
    gc.collect()
