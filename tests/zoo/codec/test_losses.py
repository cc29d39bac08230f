"""STFT / mel helpers against NumPy, reconstruction losses (finite, differentiable, masked),
the multi-scale discriminator and its losses, and the EnCodec loss balancer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo.layers import stft as S
from streamzoo.zoo.codec import losses as L

SR = 16_000


def signal(key, batch=2, length=400):
    return jax.random.normal(key, (batch, length))


@pytest.mark.parametrize("center", [False, True])
def test_stft_matches_numpy(center, key):
    x = signal(key)
    n_fft, hop, win = 64, 16, 48
    got = np.asarray(S.stft(x, n_fft, hop, win_length=win, center=center))
    xn = np.asarray(x, np.float64)
    if center:
        xn = np.pad(xn, ((0, 0), (win // 2, win // 2)))
    w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    frames = (xn.shape[1] - win) // hop + 1
    assert got.shape == (2, frames, n_fft // 2 + 1)
    assert frames == S.frame_count(400, win, hop, center)
    for j in (0, 3, frames - 1):
        want = np.fft.rfft(xn[:, j * hop:j * hop + win] * w, n=n_fft)
        np.testing.assert_allclose(got[:, j], want, atol=1e-3, rtol=1e-4)


def test_mel_filterbank():
    assert np.isclose(S.hz_to_mel(1000.0), 15.0) and np.isclose(S.hz_to_mel(1000.0, htk=True), 1000.0, atol=0.1)
    for htk in (False, True):
        hz = np.array([0.0, 440.0, 1000.0, 3000.0, 8000.0])
        np.testing.assert_allclose(S.mel_to_hz(S.hz_to_mel(hz, htk), htk), hz, atol=1e-6)
    fb = S.mel_filterbank(SR, 2048, 40)
    assert fb.shape == (1025, 40) and (fb >= 0).all()
    peaks = fb.argmax(axis=0)
    assert (np.diff(peaks) > 0).all()  # centres rise with the band index
    area = fb.sum(axis=0) * (SR / 2048)  # Slaney norm: unit area per Hz
    np.testing.assert_allclose(area[5:], 1.0, rtol=0.05)
    with pytest.raises(ValueError, match="fmin, fmax"):
        S.mel_filterbank(SR, 512, 10, fmax=9000.0)
    mel = S.mel_spectrogram(signal(jax.random.key(0)), SR, 256, 64, 20)
    assert mel.shape == (2, 3, 20) and np.isfinite(np.asarray(mel)).all()


def audio_pair(key, lengths=(400, 250)):
    t = jax.random.normal(key, (2, 400, 1))
    p = t + 0.3 * jax.random.normal(jax.random.fold_in(key, 1), t.shape)
    n = jnp.asarray(lengths)
    return sz.Seq.from_lengths(p, n), sz.Seq.from_lengths(t, n)


LOSSES = {
    "l1": L.l1_loss,
    "stft": lambda p, t: L.multi_scale_stft_loss(p, t, fft_sizes=(128, 64, 32)),
    "mel": lambda p, t: L.multi_scale_mel_loss(p, t, sample_rate=SR, scales=((128, 16), (64, 8)),
                                               l2_weight=1.0),
}


@pytest.mark.parametrize("name", LOSSES)
def test_reconstruction_losses(name, key):
    fn = LOSSES[name]
    pred, target = audio_pair(key)
    value = float(fn(pred, target))
    assert np.isfinite(value) and value > 0
    assert float(fn(target, target)) < 1e-3 * value
    # Samples past a row's end do not count, even NaN.
    garbage = pred.replace(values=jnp.where(pred.expanded_mask(), pred.values, jnp.nan))
    np.testing.assert_allclose(float(fn(garbage, target)), value, rtol=1e-5)
    g = jax.grad(lambda v: fn(pred.replace(values=v), target))(pred.values)
    g = np.asarray(g)
    assert np.isfinite(g).all() and np.abs(g).max() > 0
    assert np.abs(g[1, 250:]).max() == 0  # no gradient into padding
    # Rows shorter than the largest window still count (frames start inside the row).
    short_p, short_t = audio_pair(key, lengths=(20, 20))
    assert float(fn(short_p, short_t)) > 0


def test_si_sdr_loss_matches_the_metric_per_row(key):
    from streamzoo.zoo.codec.quality import si_sdr

    pred, target = audio_pair(key)
    p, t = pred.rows(), target.rows()
    want = -np.mean([si_sdr(t[b][:, 0], p[b][:, 0]) for b in range(2)])
    value = float(L.si_sdr_loss(pred, target))
    np.testing.assert_allclose(value, want, rtol=1e-4)
    assert 5 < -value < 20  # noise at 0.3 of the signal: about 10 dB
    # Scale-invariant in the prediction; samples past a row's end do not count, even NaN.
    louder = pred.replace(values=pred.values * 3.7)
    np.testing.assert_allclose(float(L.si_sdr_loss(louder, target)), value, rtol=1e-4)
    garbage = pred.replace(values=jnp.where(pred.expanded_mask(), pred.values, jnp.nan))
    np.testing.assert_allclose(float(L.si_sdr_loss(garbage, target)), value, rtol=1e-5)
    g = np.asarray(jax.grad(lambda v: L.si_sdr_loss(pred.replace(values=v), target))(pred.values))
    assert np.isfinite(g).all() and np.abs(g).max() > 0 and np.abs(g[1, 250:]).max() == 0


def test_discriminator_losses(key):
    disc = L.MultiScaleDiscriminator(num_scales=2, channels=4, depth=2, kernel_size=5,
                                     stride_kernel=9, rngs=nnx.Rngs(params=key))
    pred, target = audio_pair(key)
    real, fake = disc(target), disc(pred)
    assert len(real) == 2 and real[0][1].shape == (2, 400 // 16, 1)
    assert real[1][1].shape == (2, 200 // 16 + 1, 1)
    d_loss = L.discriminator_loss(real, disc(jax.lax.stop_gradient(pred.values)))
    g_loss = L.generator_adversarial_loss(fake)
    fm = L.feature_matching_loss(real, fake)
    for v in (d_loss, g_loss, fm):
        assert np.isfinite(float(v))
    assert float(L.feature_matching_loss(real, real)) == 0.0
    graphdef, params = nnx.split(disc)

    def gen_loss(v):
        d = nnx.merge(graphdef, params)
        f = d(v)
        return L.generator_adversarial_loss(f) + L.feature_matching_loss(d(target), f)

    g = np.asarray(jax.grad(gen_loss)(pred.values))
    assert np.isfinite(g).all() and np.abs(g).max() > 0
    gd = jax.grad(lambda p: L.discriminator_loss(nnx.merge(graphdef, p)(target),
                                                 nnx.merge(graphdef, p)(pred)))(params)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(gd))


def test_balancer_shares_follow_weights(key):
    balancer = L.LossBalancer({"a": 3.0, "b": 1.0}, total_norm=2.0, ema_decay=0.9)
    state = balancer.init()
    ga = jax.random.normal(key, (4, 32))
    gb = 1000.0 * jax.random.normal(jax.random.fold_in(key, 1), (4, 32))
    g, state, metrics = balancer.combine(state, {"a": ga, "b": gb})
    # First step: each part has (per item, on average) norm total_norm * w / sum(w).
    part_a = balancer.combine(balancer.init(), {"a": ga, "b": 0 * gb})[0]
    per_item = lambda v: float(jnp.mean(jnp.linalg.norm(v, axis=1)))
    np.testing.assert_allclose(per_item(part_a), 2.0 * 0.75, rtol=1e-5)
    np.testing.assert_allclose(per_item(g - part_a), 2.0 * 0.25, rtol=1e-5)
    # Scaling a loss does not change its share.
    g2, _, _ = balancer.combine(balancer.init(), {"a": 50.0 * ga, "b": gb})
    np.testing.assert_allclose(np.asarray(g2), np.asarray(g), rtol=1e-4, atol=1e-6)
    assert float(metrics["grad_norm/b"]) > 100
    with pytest.raises(ValueError, match="grads"):
        balancer.combine(state, {"a": ga})
    with pytest.raises(ValueError, match="weights"):
        L.LossBalancer({})
    with pytest.raises(ValueError, match="ema_decay"):
        L.LossBalancer({"a": 1.0}, ema_decay=1.0)


def test_balanced_grads(key):
    """Parameter gradients = vjp of the balanced output gradient + the unbalanced loss's."""
    w = jax.random.normal(key, (8, 8))
    x = jax.random.normal(jax.random.fold_in(key, 1), (3, 8))
    target = jax.random.normal(jax.random.fold_in(key, 2), (3, 8))

    def forward(p):
        y = x @ p
        return y, 0.1 * jnp.sum(p ** 2)

    losses = {"mse": lambda y: jnp.mean((y - target) ** 2),
              "l1": lambda y: 100.0 * jnp.mean(jnp.abs(y - target))}
    balancer = L.LossBalancer({"mse": 1.0, "l1": 1.0})
    grads, state, metrics = L.balanced_grads(forward, w, losses, balancer, balancer.init())
    y = x @ w
    g_out, _, _ = balancer.combine(balancer.init(), {k: jax.grad(f)(y) for k, f in losses.items()})
    want = x.T @ g_out + 0.2 * w
    np.testing.assert_allclose(np.asarray(grads), np.asarray(want), rtol=1e-4, atol=1e-5)
    assert set(metrics) >= {"loss/mse", "loss/l1", "grad_norm/mse", "loss/unbalanced"}
    assert float(state.denominator["mse"]) == 1.0
