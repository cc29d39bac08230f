"""Ring attention on 8 simulated CPU devices equals single-device attention
(`streamzoo.layers.attention.attention_reference`): causal, windowed (fewer ring steps than
devices), bidirectional, look-ahead with padded keys, GQA, with the batch also sharded, and
in gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from streamzoo.layers.attention import attention_reference
from streamzoo.train.ring_attention import _ring_steps, ring_attention
from streamzoo.train.sharding import make_mesh
from tests.train._multidevice import (cpu_devices, needs_devices, run_module_in_child,
                                      unsharded_on_cpu)  # noqa: F401 (autouse fixture)

B, T, H, HKV, DH = 2, 32, 4, 2, 8  # 8 blocks of 4 frames


def test_this_module_on_8_cpu_devices_in_a_child():
    run_module_in_child(__file__)


@functools.partial(jax.jit, static_argnames=("batch",))
def make_qkv(key, batch=B):
    kq, kk, kv, kl = jax.random.split(key, 4)
    q = jax.random.normal(kq, (batch, T, H, DH))
    k = jax.random.normal(kk, (batch, T, HKV, DH))
    v = jax.random.normal(kv, (batch, T, HKV, DH))
    lengths = jax.random.randint(kl, (batch,), T // 2, T + 1).at[0].set(T)
    valid = jnp.arange(T)[None, :] < lengths[:, None]
    return q, k, v, valid


@functools.partial(jax.jit, static_argnames=("max_past", "max_future"))
def reference(q, k, v, valid, max_past, max_future):
    pos = jnp.broadcast_to(jnp.arange(T), (q.shape[0], T))
    future = T if max_future is None else max_future
    return attention_reference(q, k, v, pos, pos, valid, max_past, future, 0)


@functools.partial(jax.jit, static_argnames=("mesh", "max_past", "max_future", "batch_axis"))
def ring(q, k, v, valid, *, mesh, max_past, max_future, batch_axis=None):
    return ring_attention(q, k, v, mesh=mesh, axis="seq", max_past=max_past,
                          max_future=max_future, k_valid=valid, batch_axis=batch_axis)


@needs_devices
@pytest.mark.parametrize("max_past, max_future", [
    (None, 0),     # full causal: every block
    (5, 0),        # window inside 2 blocks: 3 ring steps instead of 8
    (13, 0),       # window across 4 blocks
    (None, None),  # bidirectional
    (6, 3),        # window with look-ahead
])
def test_ring_attention_equals_single_device(max_past, max_future, key):
    mesh = make_mesh({"seq": 8}, devices=cpu_devices())
    q, k, v, valid = make_qkv(key)
    got = ring(q, k, v, valid, mesh=mesh, max_past=max_past, max_future=max_future)
    want = reference(q, k, v, valid, max_past, max_future)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert got.sharding.spec[1] == "seq"


@needs_devices
def test_ring_attention_with_batch_and_sequence_sharded(key):
    mesh = make_mesh({"data": 2, "seq": 4}, devices=cpu_devices())
    q, k, v, valid = make_qkv(key, batch=4)
    got = ring(q, k, v, valid, mesh=mesh, max_past=9, max_future=0, batch_axis="data")
    np.testing.assert_allclose(got, reference(q, k, v, valid, 9, 0), rtol=1e-5, atol=1e-5)
    assert tuple(got.sharding.spec[:2]) == ("data", "seq")


@needs_devices
def test_ring_attention_gradients_equal_single_device(key):
    mesh = make_mesh({"seq": 8}, devices=cpu_devices())
    q, k, v, valid = make_qkv(key)
    target = jax.random.normal(jax.random.fold_in(key, 1), q.shape)

    def loss(attend, q, k, v):
        return jnp.sum((attend(q, k, v) - target) ** 2)

    grads = jax.jit(jax.grad(functools.partial(
        loss, lambda q, k, v: ring_attention(q, k, v, mesh=mesh, max_past=6, k_valid=valid)),
        argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(functools.partial(
        loss, lambda q, k, v: reference(q, k, v, valid, 6, 0)), argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(grads, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_ring_steps_cover_the_window():
    assert _ring_steps(8, 4, None, 0) == 8
    assert _ring_steps(8, 4, 5, 0) == 3      # blocks i, i-1, i-2 hold keys >= p - 5
    assert _ring_steps(8, 4, 4, 0) == 2
    assert _ring_steps(8, 4, 100, 0) == 8
    assert _ring_steps(8, 4, 5, 1) == 8      # look-ahead: keys come from both sides


@needs_devices
def test_bad_input_names_the_argument(key):
    mesh = make_mesh({"seq": 8}, devices=cpu_devices())
    q, k, v, valid = make_qkv(key)
    with pytest.raises(ValueError, match="multiple"):
        ring_attention(q[:, :30], k[:, :30], v[:, :30], mesh=mesh)
    with pytest.raises(ValueError, match="axis"):
        ring_attention(q, k, v, mesh=mesh, axis="time")
    with pytest.raises(ValueError, match="k:"):
        ring_attention(q, k[..., :4], v[..., :4], mesh=mesh)
    with pytest.raises(ValueError, match="k_valid"):
        ring_attention(q, k, v, mesh=mesh, k_valid=valid.astype(jnp.int32))
