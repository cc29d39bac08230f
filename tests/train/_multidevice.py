"""Run a test module on 8 simulated CPU devices, in this process or in a child.

jax fixes the CPU device count when its backend starts, once per process. When the suite's
process already has 8 CPU devices (`jax.config.update("jax_num_cpu_devices", 8)` in
tests/conftest.py, before any backend use) the module's tests run here. Otherwise they are
skipped here and one test re-runs the module in a child pytest with
`--xla_force_host_platform_device_count=8`, and fails with the child's report if it fails.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest

DEVICES = 8
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CHILD_FLAG = "STREAMZOO_MULTIDEVICE_CHILD"


def cpu_device_count() -> int:
    try:
        return len(jax.devices("cpu"))
    except RuntimeError:  # no CPU backend in this process (e.g. JAX_PLATFORMS=cuda)
        return 0


HAVE_DEVICES = cpu_device_count() >= DEVICES

# Mark for the module's tests: they need the devices in this process.
needs_devices = pytest.mark.skipif(
    not HAVE_DEVICES, reason=f"runs in a child process with {DEVICES} CPU devices")


def cpu_devices():
    return jax.devices("cpu")[:DEVICES]


@pytest.fixture(autouse=True)
def unsharded_on_cpu():
    """Unsharded references run on CPU device 0 too (not on a GPU with TF32 matmuls), so
    sharded and unsharded results differ only by reduction order. Import it into a module."""
    if not HAVE_DEVICES:
        yield
        return
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def run_module_in_child(module_file: str, timeout_s: int = 600) -> None:
    """Re-run `module_file` under pytest in a child process with 8 CPU devices."""
    if HAVE_DEVICES:
        pytest.skip(f"this process has {DEVICES} CPU devices: the tests ran here")
    if os.environ.get(_CHILD_FLAG):
        pytest.fail(f"the child process did not get {DEVICES} CPU devices")
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env.update({
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={DEVICES}".strip(),
        "JAX_PLATFORMS": "cpu",
        _CHILD_FLAG: "1",
        "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", ""),
    })
    cache = jax.config.jax_compilation_cache_dir
    if cache:  # share the suite's persistent compilation cache
        env.update({"JAX_COMPILATION_CACHE_DIR": cache,
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
    done = subprocess.run(
        [sys.executable, "-m", "pytest", module_file, "-q", "-p", "no:cacheprovider",
         "-o", "addopts=", "-m", "not slow"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    report = done.stdout[-6000:] + done.stderr[-3000:]
    assert done.returncode == 0, f"child pytest on {DEVICES} CPU devices failed:\n{report}"
    assert " passed" in done.stdout, report
