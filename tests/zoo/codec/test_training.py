"""A 20-step training smoke test: a tiny codec on noise + sine waves with `codec_loss`
(quantizer dropout on) and Adam; the held-out reconstruction loss at full bitrate falls."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from streamzoo.zoo.codec import Codec, CodecConfig
from streamzoo.zoo.codec import losses as L

CONFIG = CodecConfig(channels=8, strides=(2, 4), latent_dim=8, dilations=(1,), num_quantizers=3,
                     codebook_size=16, codebook_dim=4, quantizer_dropout=0.5)
LOSS = functools.partial(L.codec_loss, fft_sizes=(64, 32, 16), mel_scales=((64, 16), (32, 8)))


def batch(key, size=4, length=256):
    """Sines of random frequency, amplitude and phase plus a little white noise; ragged."""
    kf, ka, kp, kn, kl = jax.random.split(key, 5)
    t = jnp.arange(length) / CONFIG.sample_rate
    freq = jax.random.uniform(kf, (size, 1), minval=200.0, maxval=2000.0)
    amp = jax.random.uniform(ka, (size, 1), minval=0.2, maxval=0.8)
    phase = jax.random.uniform(kp, (size, 1), maxval=2 * np.pi)
    audio = amp * jnp.sin(2 * np.pi * freq * t + phase)
    audio = audio + 0.05 * jax.random.normal(kn, audio.shape)
    lengths = jax.random.randint(kl, (size,), length // 2, length + 1)
    audio = jnp.where(jnp.arange(length)[None] < lengths[:, None], audio, 0.0)
    return {"audio": audio, "audio_lengths": lengths.astype(jnp.int32)}


def test_reconstruction_loss_falls(key):
    model = Codec(CONFIG, rngs=nnx.Rngs(params=key))
    graphdef, params = nnx.split(model)
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, data, rng):
        def loss_fn(p):
            return LOSS(nnx.merge(graphdef, p), data, rng)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux

    @jax.jit
    def eval_loss(params, data):
        _, aux = LOSS(nnx.merge(graphdef, params), data, None)  # all quantizers
        return aux["loss/mel"] + aux["loss/stft"] + aux["loss/l1"]

    held_out = batch(jax.random.fold_in(key, 10_000))
    before = float(eval_loss(params, held_out))
    losses = []
    for step in range(20):
        data = batch(jax.random.fold_in(key, step))
        params, opt_state, loss, aux = train_step(params, opt_state, data,
                                                  jax.random.fold_in(key, 50_000 + step))
        losses.append(float(loss))
        assert np.isfinite(losses[-1]), (step, aux)
        assert 1.0 <= float(aux["num_quantizers"]) <= 3.0
    after = float(eval_loss(params, held_out))
    assert after < 0.9 * before, (before, after, losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
