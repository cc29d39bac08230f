"""ConformerEncoder from raw audio (log-mel + conv subsampling + chunked Conformer): the
streaming contract at several (chunk, left, look-ahead) settings of one set of weights,
dynamic-chunk training's `forward_dynamic`, lengths, config round-trip, feature statistics,
bad input. Tiny sizes: 1600 Hz audio (40-sample windows, 16-sample hop), 8 mels, D=8."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo.layers.logmel import estimate_log_mel_stats
from streamzoo.testing import assert_stream_contract
from streamzoo.zoo.asr import (ConformerConfig, ConformerEncoder, ConvSubsampling, Latency,
                               count_params)

SETTINGS = ((2, 3, 1), (3, 0, 4), (1, 2, 0))  # (chunk, left, look-ahead) in 40 ms frames
TINY = ConformerConfig(sample_rate=1600, n_mels=8, d_model=8, num_layers=2, num_heads=2,
                       conv_kernel=3, latencies=SETTINGS)
SAMPLES = 640  # 10 encoder frames of 64 samples
LENGTHS = (SAMPLES, 437, 100)  # partial frames and a partial chunk at the end
# Default run: ragged partitions, batch invariance / NaN isolation, exec-mask invariance,
# reset_rows, carry shapes and the receptive field for one setting; exec-mask invariance
# (random ragged partitions with inserted invalid frames, vs offline) and the receptive field
# for a second one. The semantics of every setting are checked against a reference in
# test_conformer.py. `-m slow` runs the whole harness for every setting (compiles dominate
# on the 2-core CI: each check compiles the whole encoder's step for new shapes).
PRIMARY_CHECKS = ("partitions", "flush", "batch", "exec_mask", "reset_rows", "carry",
                  "receptive_field")
SECONDARY_CHECKS = ("exec_mask", "receptive_field")
_offline, _step, _flush = sz.jitted_apply, sz.jitted_step, sz.jitted_flush


@pytest.fixture(scope="module")
def encoder() -> ConformerEncoder:
    enc = ConformerEncoder(TINY, rngs=nnx.Rngs(params=jax.random.key(3)))
    enc.set_feature_stats(np.linspace(-3, 0, 8), np.linspace(1, 2, 8))
    return enc


def audio(key, lengths=LENGTHS, length=SAMPLES) -> sz.Seq:
    return sz.Seq.from_lengths(jax.random.normal(key, (len(lengths), length, 1)) * 0.1,
                               jnp.array(lengths))


@pytest.mark.parametrize("setting", SETTINGS[:2], ids=lambda s: "c{}_l{}_r{}".format(*s))
def test_stream_contract(encoder, setting, key):
    checks = PRIMARY_CHECKS if setting == SETTINGS[0] else SECONDARY_CHECKS
    assert_stream_contract(encoder.with_latency(setting), audio(key), checks=checks)


@pytest.mark.slow
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "c{}_l{}_r{}".format(*s))
def test_stream_contract_all_checks(encoder, setting, key):
    assert_stream_contract(encoder.with_latency(setting), audio(key))


def test_encoder_is_its_parts(encoder, key):
    """Encoder == stack(subsampling(log-mel)); its own latency is the first setting."""
    x = audio(key)
    assert encoder.latency == Latency(*SETTINGS[0])
    parts = jax.jit(lambda m, x: m.stack.forward_at(m.subsampling(m.frontend(x)), m.latency))
    want = parts(encoder, x)
    got = _offline(encoder, x)
    np.testing.assert_allclose(got.values, want.values, atol=1e-6)
    assert np.array_equal(got.mask, want.mask)
    # Lengths: (n // hop) // 4 frames, the final partial chunk included.
    assert list(np.asarray(got.lengths())) == [encoder.num_frames(n) for n in LENGTHS]
    assert encoder.samples_per_frame == 64 and encoder.frame_ms == 40.0


def test_forward_dynamic_selects_setting(encoder, key):
    """Dynamic-chunk training: one compiled program, the setting chosen by a traced index,
    equals the offline forward of that setting (which equals streaming it, per the contract
    tests above)."""
    x = audio(key)
    dyn = jax.jit(lambda m, x, i: m.forward_dynamic(x, i))
    for i, setting in enumerate(SETTINGS):
        got = dyn(encoder, x, jnp.int32(i))
        want = _offline(encoder.with_latency(setting), x)
        np.testing.assert_allclose(got.values, want.values, atol=1e-5)
        assert np.array_equal(got.mask, want.mask)
    assert dyn._cache_size() == 1
    idx = jax.jit(jax.vmap(lambda k: encoder.sample_latency(k, probs=[0.5, 0.5, 0.0])))(
        jax.random.split(key, 64))
    assert set(np.asarray(idx).tolist()) == {0, 1}


@pytest.mark.slow
def test_forward_dynamic_gradients(encoder, key):
    """Gradients through the switch reach the shared weights, for every setting, in one
    compiled training program."""
    x = audio(key)

    @jax.jit
    def grads(model, index):
        return jax.grad(lambda m: jnp.sum(m.forward_dynamic(x, index).values ** 2))(model)

    for i in range(len(SETTINGS)):
        leaves = jax.tree_util.tree_leaves(nnx.state(grads(encoder, jnp.int32(i)), nnx.Param))
        assert leaves and all(np.isfinite(np.asarray(a)).all() for a in leaves)
        assert any(float(jnp.abs(a).max()) > 0 for a in leaves)
    assert grads._cache_size() == 1


def test_features_then_encode(encoder, key):
    """`features` + `encode_features` (the hook for SpecAugment) equals the encoder."""
    x = audio(key)
    got = jax.jit(lambda m, x: m.encode_features(m.features(x), SETTINGS[2]))(encoder, x)
    want = _offline(encoder.with_latency(SETTINGS[2]), x)
    np.testing.assert_allclose(got.values, want.values, atol=1e-5)


def test_config_round_trip_and_size():
    d = json.loads(TINY.to_json())
    assert d["latencies"] == [list(s) for s in SETTINGS]
    assert ConformerConfig.from_dict(d) == TINY
    default = nnx.eval_shape(lambda: ConformerEncoder(ConformerConfig(), rngs=nnx.Rngs(0)))
    assert 1_500_000 < count_params(default) < 2_500_000  # ~8 MB of float32


def test_feature_stats(encoder, key):
    x = audio(key)
    mean, std = estimate_log_mel_stats(encoder.raw_frontend(), x)
    enc = ConformerEncoder(TINY, rngs=nnx.Rngs(0))
    enc.set_feature_stats(mean, std)
    frames = np.concatenate(jax.jit(lambda m, x: m.features(x))(enc, x).rows())
    np.testing.assert_allclose(frames.mean(0), 0, atol=1e-4)


def test_bad_input(encoder, key):
    with pytest.raises(ValueError, match="config"):
        ConformerEncoder({"d_model": 8}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="latencies"):
        ConformerConfig(latencies=())
    with pytest.raises(ValueError, match="config"):
        ConformerConfig.from_dict({"d_model": 8, "depth": 3})
    with pytest.raises(ValueError, match="factor"):
        ConvSubsampling(8, 8, factor=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mean, std"):
        encoder.set_feature_stats(np.zeros(7), np.ones(7))
    with pytest.raises(ValueError, match="block_size=64"):
        encoder.step(encoder.init_carry(3), audio(key, length=96))
    with pytest.raises(ValueError, match="feature shape"):
        encoder(sz.Seq.full(jax.random.normal(key, (3, SAMPLES, 2))))
    with pytest.raises(ValueError, match="probs"):
        encoder.sample_latency(key, probs=[1.0])
    a, b = encoder.with_latency(SETTINGS[0]), encoder.with_latency(SETTINGS[1])
    with pytest.raises(ValueError, match="carry"):
        a.step(b.init_carry(3), audio(key))
