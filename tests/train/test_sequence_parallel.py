"""The sequence-parallel linear recurrence on 8 simulated CPU devices equals the
single-device scan (`streamzoo.layers.linear_recurrence.linear_scan`): with an initial state,
masked frames, the batch also sharded, in gradients, and on a `LinearRecurrence` layer's own
coefficients (its streamed carry)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo.layers.linear_recurrence import LinearRecurrence, linear_scan
from streamzoo.train.sequence_parallel import sequence_parallel_scan
from streamzoo.train.sharding import make_mesh
from tests.train._multidevice import (cpu_devices, needs_devices, run_module_in_child,
                                      unsharded_on_cpu)  # noqa: F401 (autouse fixture)

B, T, D = 2, 32, 3


def test_this_module_on_8_cpu_devices_in_a_child():
    run_module_in_child(__file__)


@functools.partial(jax.jit, static_argnames=("batch", "shape"))
def make_inputs(key, batch=B, shape=(D,)):
    ka, kb, kh, km = jax.random.split(key, 4)
    a = jax.random.uniform(ka, (batch, T, *shape), minval=0.6, maxval=1.0)
    b = jax.random.normal(kb, (batch, T, *shape))
    h0 = jax.random.normal(kh, (batch, *shape))
    mask = jax.random.bernoulli(km, 0.8, (batch, T))
    return a, b, h0, mask


@jax.jit
def reference(a, b, h0, mask):
    keep = mask.reshape(mask.shape + (1,) * (a.ndim - 2))
    return linear_scan(jnp.where(keep, a, 1.0), jnp.where(keep, b, 0.0), h0)


@functools.partial(jax.jit, static_argnames=("mesh", "batch_axis"))
def parallel(a, b, h0, mask, *, mesh, batch_axis=None):
    return sequence_parallel_scan(a, b, h0, mesh=mesh, mask=mask, batch_axis=batch_axis)


@needs_devices
def test_equals_single_device_scan(key):
    mesh = make_mesh({"seq": 8}, devices=cpu_devices())
    a, b, h0, mask = make_inputs(key, shape=(D, 2))
    h, h_last = parallel(a, b, h0, mask, mesh=mesh)
    want_h, want_last = reference(a, b, h0, mask)
    np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h_last, want_last, rtol=1e-5, atol=1e-5)
    assert h.sharding.spec[1] == "seq"


@needs_devices
def test_batch_and_sequence_sharded(key):
    mesh = make_mesh({"data": 2, "seq": 4}, devices=cpu_devices())
    a, b, h0, mask = make_inputs(key, batch=4)
    h, h_last = parallel(a, b, h0, mask, mesh=mesh, batch_axis="data")
    want_h, want_last = reference(a, b, h0, mask)
    np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h_last, want_last, rtol=1e-5, atol=1e-5)
    assert tuple(h.sharding.spec[:2]) == ("data", "seq")


@needs_devices
def test_gradients_equal_single_device(key):
    mesh = make_mesh({"seq": 8}, devices=cpu_devices())
    a, b, h0, _ = make_inputs(key)
    target = jax.random.normal(jax.random.fold_in(key, 1), b.shape)

    def loss(scan, a, b, h0):
        h, last = scan(a, b, h0)
        return jnp.sum((h - target) ** 2) + jnp.sum(last ** 2)

    sp = functools.partial(sequence_parallel_scan, mesh=mesh)
    got = jax.jit(jax.grad(functools.partial(loss, sp), argnums=(0, 1, 2)))(a, b, h0)
    want = jax.jit(jax.grad(functools.partial(loss, linear_scan), argnums=(0, 1, 2)))(a, b, h0)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@jax.jit
def layer_inputs(key):
    kx, kh = jax.random.split(key)
    x = sz.Seq.from_lengths(jax.random.normal(kx, (B, T, 4)), jnp.array([T, 19]))
    return x, jax.random.normal(kh, (B, 6))


@needs_devices
def test_layer_coefficients_give_the_streamed_carry(key):
    """A `LinearRecurrence` layer's (a, b), scanned sequence-parallel from its carry, end in
    the state its own `step` carries."""
    layer = jax.jit(lambda: LinearRecurrence(4, 6, rngs=nnx.Rngs(0)))()
    x, h0 = layer_inputs(key)
    carry = layer.init_carry(B).replace(h=h0)
    a, b = jax.jit(lambda layer, x: layer.coefficients(x))(layer, x)
    mesh = make_mesh({"seq": 8}, devices=cpu_devices())
    _, h_last = parallel(a, b, carry.h, x.mask, mesh=mesh)
    want, _ = jax.jit(lambda layer, c, x: layer.step(c, x))(layer, carry, x)
    np.testing.assert_allclose(h_last, want.h, rtol=1e-5, atol=1e-5)


@needs_devices
def test_bad_input_names_the_argument(key):
    mesh = make_mesh({"seq": 8}, devices=cpu_devices())
    a, b, h0, mask = make_inputs(key)
    with pytest.raises(ValueError, match="multiple"):
        sequence_parallel_scan(a[:, :30], b[:, :30], h0, mesh=mesh)
    with pytest.raises(ValueError, match="h0"):
        sequence_parallel_scan(a, b, h0[:, :2], mesh=mesh)
    with pytest.raises(ValueError, match="mask"):
        sequence_parallel_scan(a, b, h0, mesh=mesh, mask=mask.astype(jnp.int32))
    with pytest.raises(ValueError, match="axis"):
        sequence_parallel_scan(a, b, h0, mesh=mesh, axis="data")
