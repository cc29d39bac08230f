"""pallas_kernels.dispatch: what `impl=` resolves to on this (CPU) backend, the errors for
implementations a kernel lacks or a backend cannot run, the `default_impl` context and the
STREAMZOO_KERNEL_IMPL variable, and that the kernels honour them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from streamzoo.pallas_kernels import causal_depthwise_conv as dw
from streamzoo.pallas_kernels import linear_scan as ls
from streamzoo.pallas_kernels.dispatch import IMPLS, backend_platform, default_impl, resolve_impl

GPU_TPU = ("mosaic_gpu", "tpu", "interpret")


def test_cpu_backend_auto_is_xla():
    assert backend_platform() == "cpu"
    assert resolve_impl("auto", "k", GPU_TPU) == "xla"
    assert resolve_impl("auto", "k", ()) == "xla"


def test_explicit_choices():
    assert resolve_impl("xla", "k", GPU_TPU) == "xla"
    assert resolve_impl("interpret", "k", GPU_TPU) == "interpret"
    assert resolve_impl("tpu_interpret", "k", GPU_TPU) == "tpu_interpret"  # "tpu" is supported


@pytest.mark.parametrize("impl,supported,match", [
    ("triton", GPU_TPU, r"kernel 'k' has implementations"),          # the kernel lacks it
    ("tpu_interpret", ("mosaic_gpu", "interpret"), "has implementations"),  # no TPU kernel
    ("mosaic_gpu", GPU_TPU, r"needs a GPU backend; this one is 'cpu'"),
    ("tpu", GPU_TPU, r"needs a TPU backend"),
    ("cuda", GPU_TPU, r"impl: expected one of"),
])
def test_errors_name_the_kernel_and_choice(impl, supported, match):
    with pytest.raises(ValueError, match=match):
        resolve_impl(impl, "k", supported)


def test_default_impl_context_nests_and_restores():
    with default_impl("interpret"):
        assert resolve_impl("auto", "k", GPU_TPU) == "interpret"
        assert resolve_impl("xla", "k", GPU_TPU) == "xla"  # explicit choices win
        with default_impl("xla"):
            assert resolve_impl("auto", "k", GPU_TPU) == "xla"
        assert resolve_impl("auto", "k", GPU_TPU) == "interpret"
    assert resolve_impl("auto", "k", GPU_TPU) == "xla"
    with pytest.raises(ValueError, match="impl"):
        with default_impl("gpu"):
            pass


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("STREAMZOO_KERNEL_IMPL", "interpret")
    assert resolve_impl("auto", "k", GPU_TPU) == "interpret"
    with default_impl("xla"):  # the context wins over the variable
        assert resolve_impl("auto", "k", GPU_TPU) == "xla"
    monkeypatch.setenv("STREAMZOO_KERNEL_IMPL", "bogus")
    with pytest.raises(ValueError, match="STREAMZOO_KERNEL_IMPL"):
        resolve_impl("auto", "k", GPU_TPU)


def _primitives(jaxpr) -> set[str]:
    """Names of the primitives in `jaxpr` and in every jaxpr nested in its equations."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    names |= _primitives(sub)
    return names


def _has_pallas_call(fn, *args) -> bool:
    return "pallas_call" in _primitives(jax.make_jaxpr(fn)(*args))


def test_kernels_follow_the_dispatcher():
    """impl="auto" runs the reference on CPU and the Pallas kernel under default_impl.

    The choice is made at trace time: jax's trace caches do not see `default_impl`, so a
    function traced before entering the context keeps its implementation (fresh lambdas here).
    """
    x = jax.random.normal(jax.random.key(0), (2, 8, 4))
    w = jax.random.normal(jax.random.key(1), (3, 4))
    q = x.reshape(2, 8, 2, 2)
    calls = (
        (lambda: (lambda x: dw.causal_depthwise_conv(x, None, w)), x),
        (lambda: (lambda x: ls.linear_scan(jnp.abs(x) / 4, x)), x),
        (lambda: (lambda q: ls.linear_attention(q, q, q)), q),
    )
    for make, arg in calls:
        assert not _has_pallas_call(make(), arg)
        with default_impl("interpret"):
            assert _has_pallas_call(make(), arg)


def test_kernel_implementation_lists():
    assert set(dw.SUPPORTED) <= set(IMPLS) and set(ls.SCAN_SUPPORTED) <= set(IMPLS)
    assert set(ls.ATTENTION_SUPPORTED) <= set(IMPLS)
    # Mosaic GPU serves the conv and the diagonal scan; linear attention falls back to Triton.
    assert "mosaic_gpu" in dw.SUPPORTED and "mosaic_gpu" in ls.SCAN_SUPPORTED
    assert "triton" in ls.ATTENTION_SUPPORTED and "mosaic_gpu" not in ls.ATTENTION_SUPPORTED
