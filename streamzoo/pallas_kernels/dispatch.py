"""Choosing a kernel implementation: `impl="auto" | "xla" | "mosaic_gpu" | "triton" | "tpu" | "interpret"`.

Every kernel in this package has a jnp reference ("xla", also the CPU path) and Pallas
versions. `resolve_impl` turns the user's choice into one a kernel can run on the current
backend, so layers call kernels with `impl="auto"` and models use them with no code change.
`"interpret"` runs the Pallas kernel body in Pallas' interpreter (any backend; how CI checks
kernels on the CPU); `"tpu_interpret"` runs the TPU kernel in the TPU-semantics simulator.

The default for `"auto"` can be changed for a whole program with `default_impl(...)` (a
context manager) or the `STREAMZOO_KERNEL_IMPL` environment variable, e.g. to benchmark the
XLA path on a GPU. The override is read while a function is traced and is not part of
`jax.jit`'s cache key: a function already compiled keeps the implementation it was traced
with, so switch the default before the first call, or jit a fresh function per setting.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import jax

IMPLS = ("auto", "xla", "mosaic_gpu", "triton", "tpu", "interpret", "tpu_interpret")
_override: list[str] = []


@contextlib.contextmanager
def default_impl(impl: str) -> Iterator[None]:
    """Within the block, `impl="auto"` means `impl` (checked against IMPLS)."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    _override.append(impl)
    try:
        yield
    finally:
        _override.pop()


def backend_platform() -> str:
    """'cpu', 'gpu' or 'tpu': the platform of jax's default backend."""
    platform = jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def resolve_impl(impl: str, kernel: str, supported: tuple[str, ...]) -> str:
    """The implementation `kernel` runs: `impl` itself, or what "auto" picks on this backend.

    supported: the non-"xla" implementations `kernel` has (e.g. ("mosaic_gpu", "tpu",
    "interpret")). "auto" picks the backend's native Pallas version when there is one, else
    "xla". An explicit choice the kernel lacks, or a native version requested on another
    backend, is an error naming the kernel, rather than a silent fallback.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = _override[-1] if _override else os.environ.get("STREAMZOO_KERNEL_IMPL", "auto")
        if impl not in IMPLS:
            raise ValueError(f"STREAMZOO_KERNEL_IMPL: expected one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        platform = backend_platform()
        native = {"gpu": ("mosaic_gpu", "triton"), "tpu": ("tpu",)}.get(platform, ())
        return next((n for n in native if n in supported), "xla")
    if impl == "tpu_interpret" and "tpu" in supported:
        return impl
    if impl != "xla" and impl not in supported:
        raise ValueError(f"impl: kernel {kernel!r} has implementations "
                         f"{('auto', 'xla') + tuple(supported)}, got {impl!r}")
    needs = {"mosaic_gpu": "gpu", "triton": "gpu", "tpu": "tpu"}.get(impl)
    if needs is not None and backend_platform() != needs:
        raise ValueError(f"impl: {impl!r} for kernel {kernel!r} needs a {needs.upper()} backend; "
                         f"this one is {backend_platform()!r} (use 'interpret' to run the kernel "
                         f"body on the CPU)")
    return impl
