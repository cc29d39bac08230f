"""Codec training losses: reconstruction (waveform L1, multi-scale STFT, multi-scale mel), a
small multi-scale waveform discriminator with hinge and feature-matching losses, and
EnCodec's loss balancer.

All reconstruction losses take `Seq` audio `[B, T, 1]` (or `[B, T]`) with per-row lengths and
ignore samples past each row's end. Spectral frames start every `hop` samples from sample 0;
frame j counts when it starts inside the row (its tail beyond the row reads zeros in both
signals), so short rows still contribute.

`LossBalancer` (Defossez et al. 2022, EnCodec section 3.4): with y the model output and
`g_i = d loss_i / d y`, the gradient sent back through the model is
`total_norm * sum_i w_i / sum(w) * g_i / <|g_i|>`, where `<|g_i|>` is an EMA of the per-item
gradient norm. So each weight sets the loss's *share* of the gradient, independent of the
loss's scale. `balanced_grads` runs it for a `forward(params) -> (y, unbalanced_loss)`.

`codec_loss` has the `loss_fn(model, batch, rng) -> (loss, aux)` form of
`streamzoo.train.loop` (plain weighted sum, no discriminator), for batches
`{"audio": [B, S] float32, "audio_lengths": [B] int32}`. The registered training task
(`streamzoo.zoo.codec.training.CodecTrainingLoss`) adds the optional discriminator and the
balancer, whose EMA state it threads through the loop's `TrainState.carry`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from streamzoo.core.seq import Seq
from streamzoo.layers.stft import magnitude, mel_filterbank, stft

_HIGHEST = jax.lax.Precision.HIGHEST

DEFAULT_STFT_SIZES = (2048, 1024, 512, 256, 128)
# (window, mel bands) per scale: EnCodec's windows 2^6..2^11 with fewer bands at small windows.
DEFAULT_MEL_SCALES = ((2048, 80), (1024, 80), (512, 64), (256, 32), (128, 16), (64, 8))


# --------------------------------------------------------------------------- inputs
def as_audio(x, name: str = "x") -> tuple[jax.Array, jax.Array]:
    """`(samples [B, T] float32 with zeros past each row's end, lengths [B] int32)` of a Seq
    `[B, T, 1]` / `[B, T]` (valid frames first) or a plain `[B, T]` / `[B, T, 1]` array."""
    if isinstance(x, Seq):
        v = x.compacted().values
        lengths = x.lengths()
    else:
        v = jnp.asarray(x)
        lengths = None
    if v.ndim == 3 and v.shape[-1] == 1:
        v = v[..., 0]
    if v.ndim != 2:
        raise ValueError(f"{name}: expected audio of shape [B, T] or [B, T, 1], got {tuple(v.shape)}")
    if not jnp.issubdtype(v.dtype, jnp.floating):
        raise ValueError(f"{name}: expected floating samples, got dtype {v.dtype}")
    if lengths is None:
        lengths = jnp.full((v.shape[0],), v.shape[1], jnp.int32)
    return v.astype(jnp.float32), lengths


def _pair(pred, target):
    p, lp = as_audio(pred, "pred")
    t, lt = as_audio(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred: expected the shape of target {tuple(t.shape)}, got {tuple(p.shape)}")
    return p, t, jnp.minimum(lp, lt)


def _frame_weights(lengths, num_frames, hop):
    """`[B, F]` 1.0 for frames that start inside the row."""
    return (jnp.arange(num_frames)[None, :] * hop < lengths[:, None]).astype(jnp.float32)


def _padded(v, window, hop):
    """Zeros appended so that every frame starting inside the signal is complete."""
    return jnp.pad(v, ((0, 0), (0, max(window - hop, 0))))


# -------------------------------------------------------------------- reconstruction
def l1_loss(pred, target) -> jax.Array:
    """Mean absolute sample difference over the valid samples."""
    p, t, n = _pair(pred, target)
    w = (jnp.arange(p.shape[1])[None, :] < n[:, None]).astype(jnp.float32)
    return jnp.sum(w * jnp.abs(p - t)) / jnp.maximum(w.sum(), 1.0)


def si_sdr_loss(pred, target, eps: float = 1e-8) -> jax.Array:
    """Negative scale-invariant SDR in dB, averaged over rows (valid samples only; both
    signals zero-mean). The only reconstruction term that rewards the waveform's phase: the
    spectral losses see magnitudes, and a small waveform L1 weight barely moves them."""
    p, t, n = _pair(pred, target)
    w = (jnp.arange(p.shape[1])[None, :] < n[:, None]).astype(jnp.float32)
    count = jnp.maximum(w.sum(axis=1, keepdims=True), 1.0)
    p = w * (p - jnp.sum(w * p, axis=1, keepdims=True) / count)
    t = w * (t - jnp.sum(w * t, axis=1, keepdims=True) / count)
    scale = jnp.sum(p * t, axis=1, keepdims=True) / (jnp.sum(t * t, axis=1, keepdims=True) + eps)
    target_part = scale * t
    noise = p - target_part
    ratio = (jnp.sum(target_part ** 2, axis=1) + eps) / (jnp.sum(noise ** 2, axis=1) + eps)
    return -jnp.mean(10.0 * jnp.log10(ratio))


def multi_scale_stft_loss(pred, target, *, fft_sizes: Sequence[int] = DEFAULT_STFT_SIZES,
                          hop_divisor: int = 4, eps: float = 1e-5) -> jax.Array:
    """Sum over scales of spectral convergence `|S_t - S_p|_F / |S_t|_F` plus mean
    `|log S_t - log S_p|` (Hann windows of each size, hop size / hop_divisor)."""
    p, t, n = _pair(pred, target)
    total = jnp.zeros((), jnp.float32)
    for size in fft_sizes:
        hop = max(size // hop_divisor, 1)
        sp = magnitude(stft(_padded(p, size, hop), size, hop))
        st = magnitude(stft(_padded(t, size, hop), size, hop))
        w = _frame_weights(n, sp.shape[1], hop)[..., None]
        diff = jnp.sqrt(jnp.sum(w * (st - sp) ** 2) + eps)
        ref = jnp.sqrt(jnp.sum(w * st ** 2) + eps)
        count = jnp.maximum(w.sum() * sp.shape[-1], 1.0)
        log_l1 = jnp.sum(w * jnp.abs(jnp.log(st + eps) - jnp.log(sp + eps))) / count
        total = total + diff / ref + log_l1
    return total


def multi_scale_mel_loss(pred, target, *, sample_rate: int,
                         scales: Sequence[tuple[int, int]] = DEFAULT_MEL_SCALES,
                         hop_divisor: int = 4, l2_weight: float = 0.0,
                         eps: float = 1e-5) -> jax.Array:
    """Mean over scales of the L1 distance between log mel spectrograms (DAC), plus
    `l2_weight` times the mean squared distance of the linear mel spectrograms (EnCodec's
    L1 + L2 form). `scales`: `(window, n_mels)` pairs."""
    p, t, n = _pair(pred, target)
    total = jnp.zeros((), jnp.float32)
    for window, n_mels in scales:
        hop = max(window // hop_divisor, 1)
        fb = jnp.asarray(mel_filterbank(sample_rate, window, n_mels))
        mp = jnp.einsum("bfk,km->bfm", magnitude(stft(_padded(p, window, hop), window, hop)), fb,
                        precision=_HIGHEST)
        mt = jnp.einsum("bfk,km->bfm", magnitude(stft(_padded(t, window, hop), window, hop)), fb,
                        precision=_HIGHEST)
        w = _frame_weights(n, mp.shape[1], hop)[..., None]
        count = jnp.maximum(w.sum() * n_mels, 1.0)
        loss = jnp.sum(w * jnp.abs(jnp.log(mt + eps) - jnp.log(mp + eps))) / count
        if l2_weight:
            loss = loss + l2_weight * jnp.sum(w * (mt - mp) ** 2) / count
        total = total + loss
    return total / len(scales)


# ---------------------------------------------------------------------- discriminator
class WaveDiscriminator(nnx.Module):
    """One MelGAN-style waveform discriminator: a wide conv, `depth` strided grouped convs
    (channels x4, stride 4), a conv and a 1-channel output conv, leaky ReLU(0.2) between.
    Non-causal (it only ever sees whole training crops)."""

    def __init__(self, *, channels: int = 16, depth: int = 3, max_channels: int = 256,
                 kernel_size: int = 15, stride_kernel: int = 41, rngs: nnx.Rngs):
        convs = [nnx.Conv(1, channels, (kernel_size,), padding="SAME", rngs=rngs)]
        c = channels
        for _ in range(depth):
            out = min(c * 4, max_channels)
            groups = max(1, c // 4)
            while c % groups or out % groups:
                groups -= 1
            convs.append(nnx.Conv(c, out, (stride_kernel,), strides=(4,), padding="SAME",
                                  feature_group_count=groups, rngs=rngs))
            c = out
        convs.append(nnx.Conv(c, c, (5,), padding="SAME", rngs=rngs))
        self.convs = nnx.List(convs)
        self.head = nnx.Conv(c, 1, (3,), padding="SAME", rngs=rngs)

    def __call__(self, audio: jax.Array):
        """audio `[B, T, 1]` -> (feature maps, logits `[B, T', 1]`)."""
        h, features = audio, []
        for conv in self.convs:
            h = jax.nn.leaky_relu(conv(h), 0.2)
            features.append(h)
        return features, self.head(h)


class MultiScaleDiscriminator(nnx.Module):
    """`num_scales` WaveDiscriminators on the audio average-pooled by 1, 2, 4, ... (MelGAN)."""

    def __init__(self, *, num_scales: int = 3, channels: int = 16, depth: int = 3,
                 kernel_size: int = 15, stride_kernel: int = 41, rngs: nnx.Rngs):
        if not isinstance(num_scales, int) or num_scales < 1:
            raise ValueError(f"num_scales: expected a positive int, got {num_scales!r}")
        self.discriminators = nnx.List([
            WaveDiscriminator(channels=channels, depth=depth, kernel_size=kernel_size,
                              stride_kernel=stride_kernel, rngs=rngs)
            for _ in range(num_scales)])

    def __call__(self, audio) -> list:
        """Per scale `(features, logits)` of audio (Seq or array `[B, T]` / `[B, T, 1]`)."""
        v, _ = as_audio(audio, "audio")
        h = v[..., None]
        outs = []
        for i, d in enumerate(self.discriminators):
            if i:
                h = nnx.avg_pool(h, (4,), strides=(2,), padding="SAME")
            outs.append(d(h))
        return outs


def discriminator_loss(real_outputs, fake_outputs) -> jax.Array:
    """Hinge loss of the discriminator: `mean relu(1 - D(x)) + mean relu(1 + D(G(z)))`,
    summed over scales (pass `fake_outputs` computed on stop_gradient'ed audio)."""
    return sum(jnp.mean(jax.nn.relu(1 - r[1])) + jnp.mean(jax.nn.relu(1 + f[1]))
               for r, f in zip(real_outputs, fake_outputs))


def generator_adversarial_loss(fake_outputs) -> jax.Array:
    """Hinge loss of the generator, `mean relu(1 - D(G(z)))`, averaged over scales."""
    return sum(jnp.mean(jax.nn.relu(1 - f[1])) for f in fake_outputs) / len(fake_outputs)


def feature_matching_loss(real_outputs, fake_outputs, eps: float = 1e-8) -> jax.Array:
    """Relative L1 between discriminator features of real and generated audio
    (`|f_real - f_fake|_1 / mean|f_real|`, averaged over layers and scales; EnCodec)."""
    total, count = jnp.zeros((), jnp.float32), 0
    for (real_feats, _), (fake_feats, _) in zip(real_outputs, fake_outputs):
        for r, f in zip(real_feats, fake_feats):
            r = jax.lax.stop_gradient(r)
            total = total + jnp.mean(jnp.abs(r - f)) / (jnp.mean(jnp.abs(r)) + eps)
            count += 1
    return total / max(count, 1)


# --------------------------------------------------------------------------- balancer
@struct.dataclass
class BalancerState:
    """Bias-corrected EMA of each loss's gradient norm: `numerator / denominator`."""

    numerator: dict
    denominator: dict


@dataclasses.dataclass(frozen=True)
class LossBalancer:
    """EnCodec's loss balancer (see the module docstring).

    weights: loss name -> its share of the gradient (relative). total_norm: the norm of the
    combined gradient when each `g_i` has its average norm. ema_decay: of the norm EMA.
    per_batch_item: norms per batch item (axis 0) then averaged (EnCodec), or of the whole.
    """

    weights: tuple
    total_norm: float = 1.0
    ema_decay: float = 0.999
    per_batch_item: bool = True
    eps: float = 1e-12

    def __init__(self, weights: Mapping[str, float], *, total_norm: float = 1.0,
                 ema_decay: float = 0.999, per_batch_item: bool = True, eps: float = 1e-12):
        if not isinstance(weights, Mapping) or not weights:
            raise ValueError(f"weights: expected a non-empty mapping name -> weight, got {weights!r}")
        for name, w in weights.items():
            if not (isinstance(w, (int, float)) and w >= 0):
                raise ValueError(f"weights[{name!r}]: expected a non-negative number, got {w!r}")
        if sum(weights.values()) <= 0:
            raise ValueError(f"weights: expected a positive total, got {dict(weights)}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay: expected a float in [0, 1), got {ema_decay!r}")
        if not total_norm > 0:
            raise ValueError(f"total_norm: expected > 0, got {total_norm!r}")
        object.__setattr__(self, "weights", tuple(sorted((str(k), float(v)) for k, v in weights.items())))
        object.__setattr__(self, "total_norm", float(total_norm))
        object.__setattr__(self, "ema_decay", float(ema_decay))
        object.__setattr__(self, "per_batch_item", bool(per_batch_item))
        object.__setattr__(self, "eps", float(eps))

    def init(self) -> BalancerState:
        # Fresh arrays for every entry: a train step that donates its state must not see
        # one buffer twice.
        fresh = lambda: {name: jnp.zeros((), jnp.float32) for name, _ in self.weights}  # noqa: E731
        return BalancerState(fresh(), fresh())

    def _norm(self, g):
        g = g.astype(jnp.float32)
        if self.per_batch_item and g.ndim > 1:
            return jnp.mean(jnp.sqrt(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1)))
        return jnp.sqrt(jnp.sum(g ** 2))

    def scales(self, state: BalancerState, grads: Mapping[str, jax.Array]):
        """`(scales, new state, metrics)`: the factor `c_i` by which each loss's output
        gradient is multiplied, from per-loss gradients w.r.t. the output (same names as
        `weights`). The combined output gradient is `sum_i c_i * g_i`, so the parameter
        gradient of the surrogate `sum_i stop_gradient(c_i) * loss_i` is the balanced one
        (how `codec.training` uses it inside an ordinary `loss_fn`)."""
        names = [name for name, _ in self.weights]
        if sorted(grads) != names:
            raise ValueError(f"grads: expected gradients for exactly {names}, got {sorted(grads)}")
        total_weight = sum(w for _, w in self.weights)
        num, den, metrics, scales = dict(state.numerator), dict(state.denominator), {}, {}
        for name, weight in self.weights:
            norm = self._norm(grads[name])
            num[name] = self.ema_decay * num[name] + norm
            den[name] = self.ema_decay * den[name] + 1.0
            avg = num[name] / den[name]
            scales[name] = self.total_norm * (weight / total_weight) / (avg + self.eps)
            metrics[f"grad_norm/{name}"] = norm
        return scales, BalancerState(num, den), metrics

    def combine(self, state: BalancerState, grads: Mapping[str, jax.Array]):
        """`(combined gradient w.r.t. the output, new state, metrics)` from per-loss
        gradients w.r.t. the output (same names as `weights`)."""
        scales, state, metrics = self.scales(state, grads)
        combined = None
        for name, _ in self.weights:
            g = grads[name]
            part = (scales[name] * g.astype(jnp.float32)).astype(g.dtype)
            combined = part if combined is None else combined + part
        return combined, state, metrics


def balanced_grads(forward: Callable, params, losses: Mapping[str, Callable], balancer: LossBalancer,
                   state: BalancerState):
    """Parameter gradients with the balanced output gradient plus, unbalanced, the gradient
    of the second output of `forward(params) -> (y, unbalanced_loss)` (e.g. commitment).

    `losses[name](y) -> scalar` are the balanced losses. Returns
    `(grads, new_state, metrics)` with the loss values in `metrics["loss/<name>"]`.
    """
    (y, extra), vjp = jax.vjp(forward, params)
    values, grads = {}, {}
    for name, fn in losses.items():
        values[name], grads[name] = jax.value_and_grad(fn)(y)
    g, state, metrics = balancer.combine(state, grads)
    (param_grads,) = vjp((g, jnp.ones_like(extra)))
    metrics.update({f"loss/{k}": v for k, v in values.items()})
    metrics["loss/unbalanced"] = extra
    return param_grads, state, metrics


# ------------------------------------------------------------------- training loss fn
@dataclasses.dataclass(frozen=True)
class CodecLossWeights:
    l1: float = 0.1
    stft: float = 1.0
    mel: float = 1.0
    sisdr: float = 0.0   # negative SI-SDR in dB (0: off)
    commitment: float = 0.25
    codebook: float = 1.0


def codec_loss(model, batch: Mapping, rng=None, *, weights: CodecLossWeights = CodecLossWeights(),
               fft_sizes: Sequence[int] = DEFAULT_STFT_SIZES,
               mel_scales: Sequence[tuple[int, int]] = DEFAULT_MEL_SCALES):
    """`(loss, aux)` for a `Codec` on `{"audio": [B, S], "audio_lengths": [B]}`: weighted
    waveform L1 + multi-scale STFT + multi-scale mel + negative SI-SDR + commitment + codebook
    losses, with quantizer dropout when `rng` is given. aux holds each term, the active
    quantizer count and `weight` (the number of valid samples)."""
    if "audio" not in batch or "audio_lengths" not in batch:
        raise ValueError(f"batch: expected keys 'audio' and 'audio_lengths', got {sorted(batch)}")
    audio = jnp.asarray(batch["audio"], jnp.float32)
    if audio.ndim != 2:
        raise ValueError(f"batch['audio']: expected shape [B, S], got {audio.shape}")
    x = Seq.from_lengths(audio[..., None], jnp.asarray(batch["audio_lengths"], jnp.int32))
    out = model.autoencode(x, rng=rng)
    terms = {
        "l1": l1_loss(out.audio, x),
        "stft": multi_scale_stft_loss(out.audio, x, fft_sizes=fft_sizes),
        "mel": multi_scale_mel_loss(out.audio, x, sample_rate=model.config.sample_rate,
                                    scales=mel_scales),
        "sisdr": si_sdr_loss(out.audio, x),
        "commitment": out.commitment_loss,
        "codebook": out.codebook_loss,
    }
    loss = sum(getattr(weights, k) * v for k, v in terms.items())
    aux = {f"loss/{k}": v for k, v in terms.items()}
    aux["num_quantizers"] = jnp.mean(out.num_active.astype(jnp.float32))
    aux["weight"] = jnp.sum(x.lengths()).astype(jnp.float32)
    return loss, aux
