"""linear_scan (diagonal) and linear_attention ((S, z) state): references against float64 loops;
Pallas kernels in interpret mode (GPU schedules) and TPU interpret mode against the references on
fresh random inputs with NaN in every invalid frame, fp32 and bf16; chunked steps == offline with
rows out of step; gradients; lowering for cuda (Mosaic GPU, Triton) and tpu; LinearRecurrence
wiring; bad input."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo.layers.linear_recurrence import LinearRecurrence
from streamzoo.layers.linear_recurrence import linear_scan as layer_linear_scan
from streamzoo.pallas_kernels import linear_scan as ls
from tests.pallas_kernels.common import TOL, call


def assert_close(got, want, dtype, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.max(np.abs(want))) if want.size else 1.0)
    np.testing.assert_allclose(got, want, atol=TOL[dtype] * scale, rtol=0, err_msg=what)


def poison(u, lengths):
    invalid = jnp.arange(u.shape[1])[None, :] >= lengths[:, None]
    invalid = invalid.reshape(invalid.shape + (1,) * (u.ndim - 2))
    return jnp.where(invalid, jnp.nan, u).astype(u.dtype)


# ======================================================================== diagonal
SCAN_CASES = {  # (B, T, N, dtype, lengths, block_t)
    "f32_3blocks": (3, 20, 16, jnp.float32, (20, 13, 0), 8),
    "bf16": (2, 12, 24, jnp.bfloat16, (12, 5), None),
}


@functools.partial(jax.jit, static_argnums=1)
def scan_inputs(key, case):
    batch, length, features, dtype, lengths, _ = case
    k = jax.random.split(key, 3)
    lengths = jnp.array(lengths, jnp.int32)
    a = jax.random.uniform(k[0], (batch, length, features), jnp.float32, 0.5, 1.0).astype(dtype)
    b = jax.random.normal(k[1], (batch, length, features), dtype)
    h0 = jax.random.normal(k[2], (batch, features), jnp.float32)
    return poison(a, lengths), poison(b, lengths), h0, lengths


@pytest.fixture(scope="module")
def scan_cases():
    return {name: scan_inputs(jax.random.key(i + 21), c)
            for i, (name, c) in enumerate(SCAN_CASES.items())}


def test_scan_reference_matches_loop_and_layer(scan_cases):
    a, b, h0, lengths = scan_cases["f32_3blocks"]
    h, h_last = call(ls.linear_scan, a, b, h0, lengths=lengths, impl="xla")
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    for row, n in enumerate(np.asarray(lengths)):
        state = np.asarray(h0[row], np.float64)
        for t in range(n):
            state = a64[row, t] * state + b64[row, t]
            np.testing.assert_allclose(h[row, t], state, atol=1e-5)
        np.testing.assert_allclose(h_last[row], state, atol=1e-5)
        assert not np.asarray(h[row, n:]).any()
    # Full rows: the same as the layer's own scan.
    want, want_last = layer_linear_scan(a[:1], b[:1], h0[:1])
    np.testing.assert_allclose(h[:1], want, atol=1e-6)
    np.testing.assert_allclose(h_last[:1], want_last, atol=1e-6)


@pytest.mark.parametrize("name", list(SCAN_CASES))
def test_scan_interpret_matches_reference(scan_cases, name):
    a, b, h0, lengths = scan_cases[name]
    dtype, block_t = SCAN_CASES[name][3], SCAN_CASES[name][5]
    want = call(ls.linear_scan, a, b, h0, lengths=lengths, impl="xla")
    got = jax.jit(functools.partial(ls.linear_scan, impl="interpret", block_t=block_t))(
        a, b, h0, lengths=lengths)
    for g, w, what in zip(got, want, ("h", "h_last")):
        assert g.shape == w.shape and g.dtype == jnp.float32
        assert bool(jnp.isfinite(g).all()), f"{what}: NaN leaked"
        assert_close(g, w, dtype, what)


def test_scan_tpu_interpret_matches_reference(scan_cases):
    a, b, h0, lengths = scan_cases["f32_3blocks"]
    want = call(ls.linear_scan, a, b, h0, lengths=lengths, impl="xla")
    got = call(ls.linear_scan, a, b, h0, lengths=lengths, impl="tpu_interpret", block_t=8)
    for g, w, what in zip(got, want, ("h", "h_last")):
        assert_close(g, w, jnp.float32, what)


def test_scan_chunked_steps_equal_offline(key):
    batch, features = 3, 16
    counts = np.array([[8, 3, 0], [5, 8, 8], [8, 0, 6]])
    total = counts.sum(0)
    k = jax.random.split(key, 2)
    a_all = jax.random.uniform(k[0], (batch, total.max(), features), jnp.float32, 0.5, 1.0)
    b_all = jax.random.normal(k[1], (batch, total.max(), features))
    step = jax.jit(functools.partial(ls.linear_scan, impl="interpret", block_t=8))
    h = jnp.zeros((batch, features))
    outs, done = [[] for _ in range(batch)], np.zeros(batch, int)
    for c in counts:
        a = np.full((batch, 8, features), np.nan, np.float32)
        b = np.full((batch, 8, features), np.nan, np.float32)
        for row in range(batch):
            a[row, :c[row]] = a_all[row, done[row]:done[row] + c[row]]
            b[row, :c[row]] = b_all[row, done[row]:done[row] + c[row]]
        y, h = step(jnp.asarray(a), jnp.asarray(b), h, lengths=jnp.asarray(c))
        for row in range(batch):
            outs[row].append(np.asarray(y[row, :c[row]]))
        done += c
    offline, final = call(ls.linear_scan, a_all, b_all, lengths=jnp.asarray(done), impl="xla")
    for row in range(batch):
        np.testing.assert_allclose(np.concatenate(outs[row]), offline[row, :done[row]], atol=1e-5)
    np.testing.assert_allclose(h, final, atol=1e-5)


def test_scan_gradients_match_reference(scan_cases):
    a, b, h0, lengths = scan_cases["f32_3blocks"]
    a, b = jnp.nan_to_num(a), jnp.nan_to_num(b)
    w_h = jax.random.normal(jax.random.key(7), a.shape)
    w_last = jax.random.normal(jax.random.key(8), h0.shape)

    def loss(impl, a, b, h0):
        h, last = call(ls.linear_scan, a, b, h0, lengths=lengths, impl=impl, block_t=8)
        return jnp.sum(h * w_h) + jnp.sum(last * w_last)

    got = jax.jit(jax.grad(functools.partial(loss, "interpret"), argnums=(0, 1, 2)))(a, b, h0)
    want = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2))(a, b, h0)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-5)


def _lower(f, args, platform):
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("backend,platform,marker", [("mosaic_gpu", "cuda", "mosaic_gpu"),
                                                     ("tpu", "tpu", "tpu_custom_call")])
def test_scan_lowers(backend, platform, marker):
    batch, length, features = 2, 256, 256
    args = (jax.ShapeDtypeStruct((batch, length, features), jnp.bfloat16),) * 2 + (
        jax.ShapeDtypeStruct((batch, features), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.int32))
    assert marker in _lower(functools.partial(ls.scan_pallas_forward, backend), args, platform)


def test_linear_recurrence_impl_interpret_equals_xla(key):
    k = jax.random.split(key, 2)
    layers = {impl: LinearRecurrence(8, 16, impl=impl, rngs=nnx.Rngs(params=k[0]))
              for impl in ("xla", "interpret")}
    x = sz.Seq.from_lengths(jax.random.normal(k[1], (3, 16, 8)), jnp.array([16, 9, 3]))
    want = layers["xla"](x)
    np.testing.assert_allclose(layers["interpret"](x).values, want.values, atol=1e-5)
    for impl in layers:
        _, streamed = sz.stream(layers[impl], x, [7, 9])
        for got, ref in zip(streamed.rows(), want.rows()):
            np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=impl)
    with pytest.raises(ValueError, match="impl"):
        LinearRecurrence(8, 16, impl="gpu", rngs=nnx.Rngs(0))


def test_scan_bad_input_raises():
    a = jnp.zeros((2, 4, 3))
    with pytest.raises(ValueError, match="a, b"):
        ls.linear_scan(a, a[:, :2])
    with pytest.raises(ValueError, match="h0"):
        ls.linear_scan(a, a, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="lengths"):
        ls.linear_scan(a, a, lengths=jnp.zeros((2,)))
    with pytest.raises(ValueError, match="impl"):
        ls.linear_scan(a, a, impl="triton")  # not one of the scan's implementations


# ================================================================ linear attention
ATT_CASES = {  # (B, T, H, Dk, Dv, dtype, lengths, chunk)
    "f32_3chunks": (3, 20, 2, 8, 4, jnp.float32, (20, 13, 0), 8),
    "bf16": (2, 12, 1, 16, 8, jnp.bfloat16, (12, 5), 16),
}


@functools.partial(jax.jit, static_argnums=(1, 2))
def att_inputs(key, case, decay=True):
    batch, length, heads, dk, dv, dtype, lengths, _ = case
    k = jax.random.split(key, 6)
    lengths = jnp.array(lengths, jnp.int32)
    q = jax.nn.relu(jax.random.normal(k[0], (batch, length, heads, dk))).astype(dtype)
    kk = jax.nn.relu(jax.random.normal(k[1], (batch, length, heads, dk))).astype(dtype)
    v = jax.random.normal(k[2], (batch, length, heads, dv), dtype)
    log_decay = -jax.nn.softplus(jax.random.normal(k[3], (batch, length, heads))) if decay else None
    s0 = jax.random.normal(k[4], (batch, heads, dk, dv))
    z0 = jax.random.uniform(k[5], (batch, heads, dk))
    ld = None if log_decay is None else poison(log_decay, lengths)
    return poison(q, lengths), poison(kk, lengths), poison(v, lengths), ld, (s0, z0), lengths


@pytest.fixture(scope="module")
def att_cases():
    return {name: att_inputs(jax.random.key(i + 31), c)
            for i, (name, c) in enumerate(ATT_CASES.items())}


def naive_attention(q, k, v, log_decay, state, lengths):
    """float64 per-frame recurrence: S_t = g S + k vᵀ, z_t = g z + k; o = q S, n = q·z."""
    q, k, v = (np.asarray(u, np.float64) for u in (q, k, v))
    s_all, z_all = (np.asarray(u, np.float64).copy() for u in state)
    o, nrm = np.zeros(v.shape), np.zeros(q.shape[:3])
    for row, n in enumerate(np.asarray(lengths)):
        s, z = s_all[row], z_all[row]
        for t in range(n):
            g = np.exp(np.asarray(log_decay[row, t], np.float64))[:, None]
            s = g[..., None] * s + k[row, t][:, :, None] * v[row, t][:, None, :]
            z = g * z + k[row, t]
            o[row, t] = np.einsum("hd,hdv->hv", q[row, t], s)
            nrm[row, t] = np.einsum("hd,hd->h", q[row, t], z)
        s_all[row], z_all[row] = s, z
    return o, nrm, (s_all, z_all)


def test_attention_reference_matches_loop(att_cases):
    q, k, v, ld, state, lengths = att_cases["f32_3chunks"]
    got = call(ls.linear_attention, q, k, v, ld, state, lengths=lengths, impl="xla", chunk=8)
    want = naive_attention(q, k, v, ld, state, lengths)
    for g, w, what in zip(jax.tree.leaves(got), jax.tree.leaves(want), ("o", "n", "S", "z")):
        assert bool(jnp.isfinite(g).all()), f"{what}: NaN leaked"
        assert_close(g, w, jnp.float32, what)


@pytest.mark.parametrize("name", list(ATT_CASES))
def test_attention_interpret_matches_reference(att_cases, name):
    """The Triton schedule (one program per row and head, a loop over chunks)."""
    q, k, v, ld, state, lengths = att_cases[name]
    dtype, chunk = ATT_CASES[name][5], ATT_CASES[name][7]
    want = call(ls.linear_attention, q, k, v, ld, state, lengths=lengths, impl="xla", chunk=chunk)
    got = jax.jit(functools.partial(ls.linear_attention, impl="interpret", chunk=chunk))(
        q, k, v, ld, state, lengths=lengths)
    for g, w, what in zip(jax.tree.leaves(got), jax.tree.leaves(want), ("o", "n", "S", "z")):
        assert g.shape == w.shape and g.dtype == jnp.float32, what
        assert bool(jnp.isfinite(g).all()), f"{what}: NaN leaked"
        assert_close(g, w, dtype, what)


def test_attention_tpu_interpret_matches_reference(att_cases):
    q, k, v, ld, state, lengths = att_cases["f32_3chunks"]
    want = call(ls.linear_attention, q, k, v, ld, state, lengths=lengths, impl="xla", chunk=8)
    got = call(ls.linear_attention, q, k, v, ld, state, lengths=lengths, impl="tpu_interpret",
               chunk=8)
    for g, w, what in zip(jax.tree.leaves(got), jax.tree.leaves(want), ("o", "n", "S", "z")):
        assert_close(g, w, jnp.float32, what)


def test_attention_chunked_steps_equal_offline(key):
    """No decay (SANA's cumulative state); steps of 8 frames with per-row counts; the state
    threads through and every row advances by exactly its own count."""
    case = (3, 24, 2, 8, 4, jnp.float32, (24, 24, 24), 8)
    q_all, k_all, v_all, _, _, _ = att_inputs(key, case, decay=False)
    counts = np.array([[8, 3, 0], [5, 8, 8], [8, 0, 6]])
    step = jax.jit(functools.partial(ls.linear_attention, impl="interpret", chunk=8))
    state, done = None, np.zeros(3, int)
    outs = [[] for _ in range(3)]
    for c in counts:
        chunk = [np.full((3, 8) + u.shape[2:], np.nan, np.float32) for u in (q_all, k_all, v_all)]
        for row in range(3):
            for dst, src in zip(chunk, (q_all, k_all, v_all)):
                dst[row, :c[row]] = src[row, done[row]:done[row] + c[row]]
        o, nrm, state = step(*map(jnp.asarray, chunk), None, state, lengths=jnp.asarray(c))
        for row in range(3):
            outs[row].append(np.asarray(o[row, :c[row]]))
        done += c
    want_o, _, want_state = call(ls.linear_attention, q_all, k_all, v_all, lengths=jnp.asarray(done),
                                                impl="xla", chunk=8)
    for row in range(3):
        np.testing.assert_allclose(np.concatenate(outs[row]), want_o[row, :done[row]], atol=1e-4)
    for g, w in zip(state, want_state):
        np.testing.assert_allclose(g, w, atol=1e-4)


def test_attention_gradients_match_reference(att_cases):
    q, k, v, ld, state, lengths = att_cases["f32_3chunks"]
    q, k, v, ld = (jnp.nan_to_num(u) for u in (q, k, v, ld))
    weights = [jax.random.normal(jax.random.key(40 + i), u.shape)
               for i, u in enumerate((v, q[..., 0], state[0], state[1]))]

    def loss(impl, q, k, v, ld, s0, z0):
        out = call(ls.linear_attention, q, k, v, ld, (s0, z0), lengths=lengths, impl=impl, chunk=8)
        return sum(jnp.sum(o * w) for o, w in zip(jax.tree.leaves(out), weights))

    args = (q, k, v, ld, *state)
    got = jax.jit(jax.grad(functools.partial(loss, "interpret"), argnums=range(6)))(*args)
    want = jax.grad(functools.partial(loss, "xla"), argnums=range(6))(*args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("backend,platform,marker", [("triton", "cuda", "triton"),
                                                     ("tpu", "tpu", "tpu_custom_call")])
def test_attention_lowers(backend, platform, marker):
    batch, length, heads, dk, dv = 2, 256, 2, 64, 64
    args = (jax.ShapeDtypeStruct((batch, length, heads, dk), jnp.bfloat16),) * 2 + (
        jax.ShapeDtypeStruct((batch, length, heads, dv), jnp.bfloat16),
        jax.ShapeDtypeStruct((batch, length, heads), jnp.float32),
        (jax.ShapeDtypeStruct((batch, heads, dk, dv), jnp.float32),
         jax.ShapeDtypeStruct((batch, heads, dk), jnp.float32)),
        jax.ShapeDtypeStruct((batch,), jnp.int32))
    f = functools.partial(ls.attention_pallas_forward, backend)
    assert marker in _lower(f, args, platform)


def test_attention_bad_input_raises():
    q = jnp.zeros((2, 4, 3, 8))
    with pytest.raises(ValueError, match="q: expected"):
        ls.linear_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="k: expected"):
        ls.linear_attention(q, q[..., :4], q)
    with pytest.raises(ValueError, match="v: expected"):
        ls.linear_attention(q, q, q[:, :3])
    with pytest.raises(ValueError, match="log_decay"):
        ls.linear_attention(q, q, q, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="state"):
        ls.linear_attention(q, q, q, None, (jnp.zeros((2, 3, 8, 8)), jnp.zeros((2, 3, 4))))
    with pytest.raises(ValueError, match="impl"):
        ls.linear_attention(q, q, q, impl="mosaic_gpu")  # Triton serves linear attention on GPU


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("chunk", [8, 16, 32])
def test_attention_sweep_interpret(key, dtype, chunk):
    case = (2, 40, 2, 16, 8, dtype, (40, 17), chunk)
    q, k, v, ld, state, lengths = att_inputs(key, case)
    want = call(ls.linear_attention, q, k, v, ld, state, lengths=lengths, impl="xla", chunk=chunk)
    got = call(ls.linear_attention, q, k, v, ld, state, lengths=lengths, impl="interpret",
               chunk=chunk)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close(g, w, dtype, "sweep")
