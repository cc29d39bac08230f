"""Quantizers: RVQ nearest neighbours against brute force, straight-through gradients and
losses, quantizer dropout, FSQ levels and exact round trips, the frame-wise streaming
contract, bad input."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo.layers.quantizers import (FSQ, ResidualVQ, codebook_perplexity,
                                         sample_active_quantizers)
from streamzoo.testing import assert_stream_contract

B, T, D = 3, 10, 8


def rvq(key, **kw) -> ResidualVQ:
    args = dict(num_quantizers=3, codebook_size=16)
    args.update(kw)
    return ResidualVQ(D, **args, rngs=nnx.Rngs(params=key))


def latents(key, scale=1.0):
    return jax.random.normal(key, (B, T, D)) * scale


@pytest.mark.parametrize("kw", [dict(), dict(codebook_dim=4, normalize=True),
                                dict(codebook_dim=4)], ids=["plain", "factorised_cosine",
                                                            "factorised"])
def test_rvq_codes_are_nearest_neighbours(kw, key):
    """Every stage's code is (within float32 rounding) the nearest code to that stage's
    residual, recomputed in float64 from the layer's own earlier codes."""
    q = rvq(key, **kw)
    v = latents(jax.random.fold_in(key, 1))
    codes = np.asarray(q.encode(v)).reshape(-1, 3)
    residual = np.asarray(v, np.float64).reshape(-1, D)
    cbs = np.asarray(q.codebooks[...], np.float64)
    for i in range(3):
        if q.projected:
            z = residual @ np.asarray(q.in_proj[...][i], np.float64) + np.asarray(q.in_bias[...][i])
        else:
            z = residual
        cb = cbs[i]
        if q.normalize:
            z = z / np.linalg.norm(z, axis=-1, keepdims=True)
            cb_l = cb / np.linalg.norm(cb, axis=-1, keepdims=True)
        else:
            cb_l = cb
        dist = ((z[:, None, :] - cb_l[None]) ** 2).sum(-1)  # brute force, all codes
        chosen = dist[np.arange(len(z)), codes[:, i]]
        np.testing.assert_array_less(chosen - dist.min(-1), 1e-4)  # a nearest code
        clear = np.sort(dist, -1)[:, 1] - dist.min(-1) > 1e-3
        np.testing.assert_array_equal(codes[clear, i], dist.argmin(-1)[clear])
        e = cb[codes[:, i]]
        if q.projected:
            e = e @ np.asarray(q.out_proj[...][i], np.float64) + np.asarray(q.out_bias[...][i])
        residual = residual - e
    # decode(encode(v)) is the sum of the chosen vectors, equal to quantize's forward value.
    out = q.quantize(v)
    np.testing.assert_array_equal(np.asarray(out.codes).reshape(-1, 3), codes)
    np.testing.assert_allclose(np.asarray(q.decode(q.encode(v))), np.asarray(out.quantized),
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.quantized).reshape(-1, D),
                               np.asarray(v, np.float64).reshape(-1, D) - residual, atol=1e-4)


def test_rvq_fewer_quantizers_are_a_prefix(key):
    q = rvq(key, codebook_dim=4, normalize=True)
    v = latents(jax.random.fold_in(key, 1))
    full = np.asarray(q.encode(v))
    for n in (1, 2):
        np.testing.assert_array_equal(np.asarray(q.encode(v, num_quantizers=n)), full[..., :n])
    # Plain (Euclidean, unprojected) RVQ reconstructs better with more stages, even untrained.
    q = rvq(key)
    full = q.encode(v)
    errors = [float(jnp.mean((q.decode(full[..., :n]) - v) ** 2)) for n in (1, 3)]
    assert errors[1] < errors[0] < float(jnp.mean(v ** 2)), errors


def test_rvq_straight_through_and_losses(key):
    q = rvq(key, codebook_dim=4, normalize=True)
    v = latents(jax.random.fold_in(key, 1))
    mask = jnp.arange(T)[None, :] < jnp.array([T, 6, 3])[:, None]

    def loss(v, params):
        out = nnx.merge(graphdef, params).quantize(v, mask=mask)
        return jnp.sum(out.quantized * w) + out.commitment_loss + out.codebook_loss

    graphdef, params = nnx.split(q)
    w = jax.random.normal(jax.random.fold_in(key, 2), v.shape)
    gv, gp = jax.grad(loss, argnums=(0, 1))(v, params)
    assert np.all(np.isfinite(np.asarray(gv))) and float(jnp.abs(gv).max()) > 0
    for leaf in jax.tree_util.tree_leaves(gp):
        assert np.all(np.isfinite(np.asarray(leaf)))
    assert float(jnp.abs(gp["codebooks"][...]).max()) > 0  # codebook loss trains the codes
    out = q.quantize(v, mask=mask)
    assert float(out.commitment_loss) > 0 and np.isclose(out.commitment_loss, out.codebook_loss)
    # Masked frames do not count: garbage there changes neither loss.
    poisoned = jnp.where(mask[..., None], v, 1e3)
    again = q.quantize(poisoned, mask=mask)
    np.testing.assert_allclose(again.commitment_loss, out.commitment_loss, rtol=1e-5)


def test_quantizer_dropout(key):
    q = rvq(key)
    v = latents(jax.random.fold_in(key, 1))
    out = q.quantize(v, num_active=jnp.array([1, 2, 3]))
    codes = np.asarray(out.codes)
    assert (codes[0, :, 1:] == -1).all() and (codes[1, :, 2] == -1).all() and (codes[2] >= 0).all()
    np.testing.assert_allclose(np.asarray(out.quantized[0]),
                               np.asarray(q.decode(q.encode(v, num_quantizers=1))[0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(q.decode(out.codes)), np.asarray(out.quantized), atol=1e-6)
    counts = np.stack([np.asarray(sample_active_quantizers(jax.random.fold_in(key, i), 4, 8))
                       for i in range(200)])
    assert counts.min() >= 1 and counts.max() == 8
    assert (counts == counts[:, :1]).all()  # one count per batch by default
    per_row = np.asarray(sample_active_quantizers(key, 64, 8, dropout_rate=1.0, per_row=True))
    assert len(set(per_row.tolist())) > 3
    never = np.asarray(sample_active_quantizers(key, 4, 8, dropout_rate=0.0))
    assert (never == 8).all()
    assert np.all(np.asarray(codebook_perplexity(out.codes, 16)) >= 1.0)


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (3, 4), (2,)])
def test_fsq_levels_and_round_trip(levels, key):
    d = len(levels)
    f = FSQ(d, levels, rngs=nnx.Rngs(params=key))
    assert f.codebook_size == math.prod(levels)
    v = jax.random.normal(jax.random.fold_in(key, 1), (4096, d)) * 3
    out = f.quantize(v)
    codes = f.encode(v)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(out.codes))
    # decode(encode(v)) is bitwise the straight-through forward value.
    np.testing.assert_array_equal(np.asarray(f.decode(codes)), np.asarray(out.quantized))
    digits = np.asarray(f.digits(codes))
    for i, l in enumerate(levels):
        assert set(np.unique(digits[:, i]).tolist()) == set(range(l))  # exactly L levels, all used
    grid = (digits - np.array(levels) // 2) / (np.array(levels) // 2)
    np.testing.assert_array_equal(np.asarray(out.quantized), grid.astype(np.float32))
    # Every code decodes and re-encodes to itself.
    all_codes = jnp.arange(f.codebook_size, dtype=jnp.int32)[:, None]
    np.testing.assert_array_equal(np.asarray(f.encode(jnp.arctanh(jnp.clip(
        (f.decode(all_codes) * (np.array(levels) // 2) + f._constants()[1]) / f._constants()[0],
        -0.999999, 0.999999)) - f._constants()[2])), np.asarray(all_codes))
    g = jax.grad(lambda v: jnp.sum(f.quantize(v).quantized * v))(v[:8])
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).max()) > 0


def test_fsq_with_projection(key):
    f = FSQ(D, (5, 5, 5), rngs=nnx.Rngs(params=key))
    v = latents(jax.random.fold_in(key, 1))
    out = f.quantize(v)
    assert out.quantized.shape == v.shape and out.codes.shape == (B, T, 1)
    np.testing.assert_array_equal(np.asarray(f.decode(f.encode(v))), np.asarray(out.quantized))


@pytest.mark.parametrize("which", ["rvq", "fsq"])
def test_stream_contract(which, key):
    layer = (rvq(key, codebook_dim=4, normalize=True, active_quantizers=2) if which == "rvq"
             else FSQ(D, (4, 3, 3), rngs=nnx.Rngs(params=key)))
    x = sz.Seq.from_lengths(latents(jax.random.fold_in(key, 1)), jnp.array([T, 7, 3]))
    assert_stream_contract(layer, x, num_partitions=1,
                           checks=("partitions", "batch", "exec_mask", "gradients"))


def test_bad_input(key):
    r = nnx.Rngs(0)
    with pytest.raises(ValueError, match="codebook_size"):
        ResidualVQ(D, num_quantizers=2, codebook_size=0, rngs=r)
    with pytest.raises(ValueError, match="num_quantizers"):
        ResidualVQ(D, num_quantizers=2, codebook_size=8, active_quantizers=3, rngs=r)
    with pytest.raises(ValueError, match="levels"):
        FSQ(D, (8, 1), rngs=r)
    with pytest.raises(ValueError, match="levels"):
        FSQ(D, (), rngs=r)
    q = rvq(key)
    v = latents(key)
    with pytest.raises(ValueError, match="v: expected shape"):
        q.encode(v[..., :4])
    with pytest.raises(ValueError, match="num_quantizers"):
        q.encode(v, num_quantizers=4)
    with pytest.raises(ValueError, match="codes: expected integer"):
        q.decode(v[..., :2])
    with pytest.raises(ValueError, match="codes: expected shape"):
        q.decode(jnp.zeros((B, T, 4), jnp.int32))
    with pytest.raises(ValueError, match="num_active"):
        q.quantize(v, num_active=jnp.array([1, 2]))
    with pytest.raises(ValueError, match="mask"):
        q.quantize(v, mask=jnp.ones((B, T + 1), bool))
    with pytest.raises(ValueError, match="dropout_rate"):
        sample_active_quantizers(key, 2, 4, dropout_rate=1.5)
