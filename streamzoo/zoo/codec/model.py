"""A streaming neural audio codec (SoundStream / EnCodec / Mimi style).

    audio [B, T, 1] --SEANet encoder--> latents [B, T/hop, D] --(transformer)--> quantizer
        --> codes int32 [B, T/hop, n_q] --> dequantize --(transformer)--> SEANet decoder
        --> audio [B, T, 1]

* Encoder: a causal `Conv1D`, then per stride s a few dilated residual units and a strided
  `Conv1D` (kernel 2s, channels doubled), then a `Conv1D` to `latent_dim`. hop = prod(strides)
  (e.g. (2, 4, 5, 8) = 320 samples: 50 frames/s at 16 kHz).
* Decoder: the mirror image with `ConvTranspose1D` upsamplers (overlap tail in the carry).
* Optional causal transformer bottleneck after the encoder and before the decoder
  (`StreamingAttention` with a sliding window: its KV cache is part of the carry).
* Quantizer: `ResidualVQ` (learned codebooks, quantizer dropout) or `FSQ`.

Everything is causal, so the only latency is one frame: a frame's codes exist once its last
sample has arrived, and its `hop` output samples appear in the same step.

**Lengths.** A stream of n samples ends, in general, inside a frame. `Codec` never drops
those tail samples: offline, the last partial frame is completed with zeros, encoded and
decoded, and the output is cut back to exactly n samples; streaming, `step` emits the samples
of complete frames (`floor(n / hop) * hop` after n samples) and `flush` completes the pending
partial frame with zeros and emits its remaining `n mod hop` samples. So stream and offline
agree on every sample and on the length n. `CodecEncoder` likewise gives `ceil(n / hop)` code
frames offline and emits the last, partial one at `flush`; `CodecDecoder` gives `m * hop`
samples for m code frames. Their `spec` is a `TailPaddedSpec`, which says so (a plain
`StreamSpec` would promise `floor` lengths: a partial block produces nothing).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from streamzoo.core.combinators import Repeat, Residual, Serial
from streamzoo.core.seq import Seq
from streamzoo.core.spec import StreamSpec
from streamzoo.core.streamer import StreamLayer, batch_size_of
from streamzoo.layers.attention import StreamingAttention
from streamzoo.layers.conv import Conv1D
from streamzoo.layers.conv_transpose import ConvTranspose1D
from streamzoo.layers.feedforward import FeedForward
from streamzoo.layers.norm import RMSNorm
from streamzoo.layers.quantizers import FSQ, ResidualVQ, sample_active_quantizers


# -------------------------------------------------------------------------------- spec
@dataclasses.dataclass(frozen=True)
class TailPaddedSpec(StreamSpec):
    """The spec of a layer whose end of stream completes a partial block of `pad_to` input
    frames with zeros (offline and in `flush`) instead of dropping it.

    `offline_length(n)` is the stages' count for n rounded up to a multiple of `pad_to`, and,
    with `trim`, no more than `floor(n * output_ratio)` (an autoencoder cut back to its input
    length). `outputs_after(n)` (before flush) is unchanged: whole blocks only. Composing it
    with `then` gives a plain `StreamSpec` (the padding is a property of this layer's flush).
    """

    pad_to: int = 1
    trim: bool = False

    def offline_length(self, n: int) -> int:
        padded = -(-n // self.pad_to) * self.pad_to
        out = super().offline_length(padded)
        return min(out, math.floor(n * self.output_ratio)) if self.trim else out


def _tail_padded(spec: StreamSpec, pad_to: int, trim: bool) -> TailPaddedSpec:
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(StreamSpec)}
    return TailPaddedSpec(**fields, pad_to=pad_to, trim=trim)


# ------------------------------------------------------------------------------ config
def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class CodecConfig:
    """Hyper-parameters of `Codec` (frozen and hashable: static under `jax.jit`).

    Defaults: 16 kHz, hop 320 (50 Hz frames), 8 x 1024-code RVQ = 4 kbit/s at full rate.
    """

    sample_rate: int = 16_000
    channels: int = 32                 # encoder's first width; doubled at every stride
    strides: tuple = (2, 4, 5, 8)
    latent_dim: int = 128
    dilations: tuple = (1, 3, 9)       # one residual unit per dilation, at every resolution
    kernel_size: int = 7               # first and last convolutions
    residual_kernel_size: int = 3
    quantizer: str = "rvq"             # "rvq" or "fsq"
    num_quantizers: int = 8
    codebook_size: int = 1024
    codebook_dim: int = 8              # RVQ lookup dimension (DAC's factorised codes)
    normalize_codes: bool = True       # RVQ lookup by cosine similarity
    quantizer_dropout: float = 0.5     # probability that a training batch uses 1..n_q quantizers
    dropout_per_row: bool = False      # one random count per batch (False) or per row (True)
    fsq_levels: tuple = (8, 5, 5, 5)
    transformer_layers: int = 0        # causal transformer blocks in encoder and in decoder
    transformer_heads: int = 4
    transformer_window: int = 64       # frames of attention context (the KV ring)
    transformer_hidden: int = 0        # feed-forward width (0: 4 * latent_dim)

    def __post_init__(self):
        object.__setattr__(self, "strides", tuple(self.strides))
        object.__setattr__(self, "dilations", tuple(self.dilations))
        object.__setattr__(self, "fsq_levels", tuple(self.fsq_levels))
        for name in ("sample_rate", "channels", "latent_dim", "kernel_size",
                     "residual_kernel_size", "num_quantizers", "codebook_size", "codebook_dim",
                     "transformer_heads", "transformer_window"):
            _positive_int(name, getattr(self, name))
        if not self.strides:
            raise ValueError("strides: expected at least one stride, got ()")
        for s in self.strides:
            _positive_int("strides", s)
        for d in self.dilations:
            _positive_int("dilations", d)
        if self.quantizer not in ("rvq", "fsq"):
            raise ValueError(f"quantizer: expected 'rvq' or 'fsq', got {self.quantizer!r}")
        if not 0.0 <= self.quantizer_dropout <= 1.0:
            raise ValueError(f"quantizer_dropout: expected a probability in [0, 1], "
                             f"got {self.quantizer_dropout!r}")
        if not isinstance(self.transformer_layers, int) or self.transformer_layers < 0:
            raise ValueError(f"transformer_layers: expected an int >= 0, got {self.transformer_layers!r}")
        if not isinstance(self.transformer_hidden, int) or self.transformer_hidden < 0:
            raise ValueError(f"transformer_hidden: expected an int >= 0, got {self.transformer_hidden!r}")
        if self.transformer_layers and self.latent_dim % self.transformer_heads:
            raise ValueError(f"transformer_heads: expected a divisor of latent_dim="
                             f"{self.latent_dim}, got {self.transformer_heads}")

    @property
    def hop_length(self) -> int:
        """Samples per code frame."""
        return math.prod(self.strides)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def total_quantizers(self) -> int:
        return 1 if self.quantizer == "fsq" else self.num_quantizers

    @property
    def codes_per_quantizer(self) -> int:
        return math.prod(self.fsq_levels) if self.quantizer == "fsq" else self.codebook_size

    def bitrate(self, num_quantizers: int | None = None) -> float:
        """Bits per second with the first `num_quantizers` codebooks (default all)."""
        n = self.total_quantizers if num_quantizers is None else num_quantizers
        return self.frame_rate * n * math.log2(self.codes_per_quantizer)


# ------------------------------------------------------------------------------ blocks
class Activation(StreamLayer):
    """A point-wise nonlinearity as a frame-wise layer (default ELU, SEANet's choice)."""

    frame_wise = True

    def __init__(self, features: int, fn: Callable = jax.nn.elu):
        _positive_int("features", features)
        self.in_features = self.out_features = features
        self.fn = fn

    def _forward(self, x: Seq) -> Seq:
        return x.map(self.fn).masked()

    def _step(self, carry, x):
        return carry, self._forward(x)


def residual_unit(features: int, dilation: int, kernel_size: int, *, rngs: nnx.Rngs) -> Residual:
    """SEANet residual unit: `x + Conv1x1(ELU(DilatedConv(ELU(x))))`, hidden width features/2."""
    hidden = max(features // 2, 1)
    return Residual(Serial(Activation(features),
                           Conv1D(features, hidden, kernel_size, dilation=dilation, rngs=rngs),
                           Activation(hidden),
                           Conv1D(hidden, features, 1, rngs=rngs)))


def seanet_encoder(config: CodecConfig, *, rngs: nnx.Rngs) -> Serial:
    """Causal SEANet encoder: audio `[B, T, 1]` -> latents `[B, T // hop, latent_dim]`."""
    c = config.channels
    layers = [Conv1D(1, c, config.kernel_size, rngs=rngs)]
    for s in config.strides:
        layers += [residual_unit(c, d, config.residual_kernel_size, rngs=rngs)
                   for d in config.dilations]
        layers += [Activation(c), Conv1D(c, 2 * c, 2 * s, stride=s, rngs=rngs)]
        c *= 2
    layers += [Activation(c), Conv1D(c, config.latent_dim, config.kernel_size, rngs=rngs)]
    return Serial(*layers)


def seanet_decoder(config: CodecConfig, *, rngs: nnx.Rngs) -> Serial:
    """Causal SEANet decoder: latents `[B, m, latent_dim]` -> audio `[B, m * hop, 1]`."""
    c = config.channels * 2 ** len(config.strides)
    layers = [Conv1D(config.latent_dim, c, config.kernel_size, rngs=rngs)]
    for s in reversed(config.strides):
        layers += [Activation(c), ConvTranspose1D(c, c // 2, 2 * s, stride=s, rngs=rngs)]
        c //= 2
        layers += [residual_unit(c, d, config.residual_kernel_size, rngs=rngs)
                   for d in config.dilations]
    layers += [Activation(c), Conv1D(c, 1, config.kernel_size, rngs=rngs)]
    return Serial(*layers)


def transformer_block(features: int, num_heads: int, window: int, hidden: int, *,
                      rngs: nnx.Rngs) -> Serial:
    """Pre-norm causal transformer block over frames: sliding-window attention (KV ring of
    `window` frames in the carry) and a SwiGLU feed-forward, each residual."""
    return Serial(
        Residual(Serial(RMSNorm(features),
                        StreamingAttention(features, num_heads, max_past=window, rngs=rngs))),
        Residual(Serial(RMSNorm(features),
                        FeedForward(features, hidden, gated=True, rngs=rngs))))


def causal_transformer(config: CodecConfig, *, rngs: nnx.Rngs) -> Repeat:
    """`transformer_layers` blocks, parameters and carries stacked `[L, ...]`."""
    hidden = config.transformer_hidden or 4 * config.latent_dim
    return Repeat(lambda r: transformer_block(config.latent_dim, config.transformer_heads,
                                              config.transformer_window, hidden, rngs=r),
                  config.transformer_layers, rngs=rngs)


def make_quantizer(config: CodecConfig, *, rngs: nnx.Rngs):
    if config.quantizer == "fsq":
        return FSQ(config.latent_dim, config.fsq_levels, rngs=rngs)
    return ResidualVQ(config.latent_dim, num_quantizers=config.num_quantizers,
                      codebook_size=config.codebook_size,
                      codebook_dim=min(config.codebook_dim, config.latent_dim),
                      normalize=config.normalize_codes, rngs=rngs)


def _check_num_quantizers(quantizer, n):
    total = quantizer.num_quantizers
    if n is None:
        return total
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= total:
        raise ValueError(f"num_quantizers: expected an int in 1..{total}, got {n!r}")
    return int(n)


def _padded_to_frames(x: Seq, hop: int) -> Seq:
    """x (compact) with each row's valid samples extended by zeros to whole frames."""
    x = x.pad_to_multiple(hop)
    n = x.lengths()
    padded = -(-n // hop) * hop
    return Seq(x.values, jnp.arange(x.length)[None, :] < padded[:, None], compact=True).masked()


# ------------------------------------------------------------------------------ encoder
@struct.dataclass
class CodecEncoderCarry:
    net: object
    transformer: object
    phase: jax.Array  # [B] int32: committed samples mod hop (the pending partial frame)

    @property
    def batch_size(self):
        return self.phase.shape[0]


class CodecEncoder(StreamLayer):
    """Audio `[B, T, 1]` float -> codes `[B, ceil(T / hop), num_quantizers]` int32.

    Made by `Codec.encoder()` (it shares the codec's parameters). `step` emits the codes of
    complete frames; `flush` completes the pending partial frame with zeros and emits its
    codes, so the stream gives exactly the offline codes.
    """

    def __init__(self, net: Serial, transformer, quantizer, num_quantizers: int):
        self.net, self.transformer, self.quantizer = net, transformer, quantizer
        self.num_quantizers = _check_num_quantizers(quantizer, num_quantizers)
        self.in_features = 1
        self.out_features = self.num_quantizers
        self.hop = int(1 / net.spec.output_ratio)
        s = net.spec if transformer is None else net.spec.then(transformer.spec)
        self._spec = _tail_padded(s, self.hop, trim=False)

    @property
    def spec(self) -> TailPaddedSpec:
        return self._spec

    def output_dtype(self, input_dtype=jnp.float32):
        return jnp.int32

    def latents(self, x: Seq) -> Seq:
        """Offline latents `[B, ceil(T / hop), latent_dim]` of compact x (tail padded)."""
        y = self.net(_padded_to_frames(x, self.hop))
        return y if self.transformer is None else self.transformer(y)

    def _codes(self, lat: Seq) -> Seq:
        codes = self.quantizer.encode(lat.values, self.num_quantizers)
        return Seq(codes, lat.mask, compact=True).masked()

    def _forward(self, x: Seq) -> Seq:
        return self._codes(self.latents(x))

    def _init_carry(self, batch_size, dtype):
        t = None if self.transformer is None else self.transformer.init_carry(batch_size, dtype)
        return CodecEncoderCarry(self.net.init_carry(batch_size, dtype), t,
                                 jnp.zeros((batch_size,), jnp.int32))

    def _run(self, carry: CodecEncoderCarry, x: Seq):
        net, lat = self.net.step(carry.net, x)
        t = carry.transformer
        if self.transformer is not None:
            t, lat = self.transformer.step(t, lat)
        return net, t, lat

    def _step(self, carry: CodecEncoderCarry, x: Seq):
        net, t, lat = self._run(carry, x)
        phase = jnp.mod(carry.phase + x.lengths(), self.hop)
        return CodecEncoderCarry(net, t, phase), self._codes(lat)

    def _flush(self, carry: CodecEncoderCarry, batch_size: int):
        """The codes of the pending partial frame (rows with one), the frame completed with
        zeros. The carry is returned unchanged: flushing commits nothing."""
        _, _, lat = self._run(carry, self._tail_padding(carry, batch_size))
        return carry, self._codes(lat)

    def _tail_padding(self, carry, batch_size):
        """`hop` zero samples, of which row b's first `(hop - phase_b) % hop` are valid."""
        need = jnp.mod(self.hop - carry.phase, self.hop)
        zeros = jnp.zeros((batch_size, self.hop, 1), carry.net.layers[0].history.dtype)
        return Seq(zeros, jnp.arange(self.hop)[None, :] < need[:, None], compact=True)

    def _reset_rows(self, carry, rows, batch_size):
        t = None if self.transformer is None else self.transformer.reset_rows(carry.transformer, rows)
        return CodecEncoderCarry(self.net.reset_rows(carry.net, rows), t,
                                 jnp.where(rows, 0, carry.phase))


# ------------------------------------------------------------------------------ decoder
@struct.dataclass
class CodecDecoderCarry:
    transformer: object
    net: object

    @property
    def batch_size(self):
        return batch_size_of(self.net)


class CodecDecoder(StreamLayer):
    """Codes `[B, m, num_quantizers]` int32 -> audio `[B, m * hop, 1]` float32.

    Made by `Codec.decoder()`; `num_quantizers` may be fewer than the codec has (a lower
    bitrate: the first codebooks only). Code -1 marks an inactive codebook (adds nothing, as
    quantizer dropout trains); other codes outside the codebook are clipped.
    """

    def __init__(self, quantizer, transformer, net: Serial, num_quantizers: int):
        self.quantizer, self.transformer, self.net = quantizer, transformer, net
        self.num_quantizers = _check_num_quantizers(quantizer, num_quantizers)
        self.in_features = self.num_quantizers
        self.out_features = 1
        self._spec = net.spec if transformer is None else transformer.spec.then(net.spec)

    def input_kind(self):
        return jnp.integer

    @property
    def spec(self) -> StreamSpec:
        return self._spec

    def latents(self, codes: Seq) -> Seq:
        lat = Seq(self.quantizer.decode(codes.values), codes.mask, compact=codes.compact)
        return lat.masked()

    def _forward(self, codes: Seq) -> Seq:
        lat = self.latents(codes)
        if self.transformer is not None:
            lat = self.transformer(lat)
        return self.net(lat)

    def _init_carry(self, batch_size, dtype):
        t = None if self.transformer is None else self.transformer.init_carry(batch_size, dtype)
        return CodecDecoderCarry(t, self.net.init_carry(batch_size, dtype))

    def _step(self, carry: CodecDecoderCarry, codes: Seq):
        lat, t = self.latents(codes), carry.transformer
        if self.transformer is not None:
            t, lat = self.transformer.step(t, lat)
        net, audio = self.net.step(carry.net, lat)
        return CodecDecoderCarry(t, net), audio

    def _reset_rows(self, carry, rows, batch_size):
        t = None if self.transformer is None else self.transformer.reset_rows(carry.transformer, rows)
        return CodecDecoderCarry(t, self.net.reset_rows(carry.net, rows))


# -------------------------------------------------------------------------------- codec
@struct.dataclass
class CodecCarry:
    encoder: CodecEncoderCarry
    decoder: CodecDecoderCarry

    @property
    def batch_size(self):
        return self.encoder.batch_size


@struct.dataclass
class CodecOutput:
    """What `Codec.autoencode` returns (the training path)."""

    audio: Seq                  # [B, T, 1] reconstruction, each row cut to its input length
    latents: Seq                # [B, F, latent_dim] encoder output (before quantization)
    quantized: Seq              # [B, F, latent_dim] straight-through quantized latents
    codes: Seq                  # [B, F, n_q] int32 (-1 for quantizers dropped in this batch)
    commitment_loss: jax.Array  # scalar
    codebook_loss: jax.Array    # scalar
    num_active: jax.Array       # [B] int32 active quantizers per row


class Codec(StreamLayer):
    """The streaming codec: audio `[B, T, 1]` -> audio `[B, T, 1]` through discrete codes.

    * `encode(x, num_quantizers=None) -> Seq` codes, `decode(codes) -> Seq` audio (the bitrate
      follows `codes`' last axis), `__call__(x)` = decode(encode(x)) cut to each row's length.
    * `encoder(n)` / `decoder(n)`: the two halves as StreamLayers (sharing these parameters).
    * `step` / `flush`: the whole autoencoder streaming (`num_quantizers` active codebooks).
    * `autoencode(x, rng=...)`: the differentiable training path (straight-through
      quantization, quantizer dropout when `rng` is given).
    """

    def __init__(self, config: CodecConfig = CodecConfig(), *, rngs: nnx.Rngs | None = None,
                 num_quantizers: int | None = None, _parts: dict | None = None):
        if not isinstance(config, CodecConfig):
            raise ValueError(f"config: expected a CodecConfig, got {type(config).__name__}")
        self.config = config
        if _parts is None:
            if rngs is None:
                raise ValueError("rngs: expected an nnx.Rngs to initialise the parameters, got None")
            layers = config.transformer_layers
            _parts = dict(
                encoder_net=seanet_encoder(config, rngs=rngs),
                encoder_transformer=causal_transformer(config, rngs=rngs) if layers else None,
                quantizer=make_quantizer(config, rngs=rngs),
                decoder_transformer=causal_transformer(config, rngs=rngs) if layers else None,
                decoder_net=seanet_decoder(config, rngs=rngs))
        for name, part in _parts.items():
            setattr(self, name, part)
        self.num_quantizers = _check_num_quantizers(self.quantizer, num_quantizers)
        self.in_features = self.out_features = 1
        self.hop = config.hop_length
        self._spec = _tail_padded(self.encoder().spec.then(self.decoder().spec), self.hop,
                                  trim=True)

    def _parts(self) -> dict:
        return {name: getattr(self, name) for name in (
            "encoder_net", "encoder_transformer", "quantizer", "decoder_transformer", "decoder_net")}

    def with_num_quantizers(self, num_quantizers: int) -> "Codec":
        """The same codec (shared parameters) streaming at another bitrate."""
        return Codec(self.config, num_quantizers=num_quantizers, _parts=self._parts())

    def encoder(self, num_quantizers: int | None = None) -> CodecEncoder:
        """Audio -> codes as a StreamLayer (default: this codec's `num_quantizers`)."""
        n = self.num_quantizers if num_quantizers is None else num_quantizers
        return CodecEncoder(self.encoder_net, self.encoder_transformer, self.quantizer, n)

    def decoder(self, num_quantizers: int | None = None) -> CodecDecoder:
        """Codes -> audio as a StreamLayer (default: this codec's `num_quantizers`)."""
        n = self.num_quantizers if num_quantizers is None else num_quantizers
        return CodecDecoder(self.quantizer, self.decoder_transformer, self.decoder_net, n)

    # ------------------------------------------------------------------- offline API
    def encode(self, x: Seq, num_quantizers: int | None = None) -> Seq:
        """Codes `[B, ceil(T / hop), n]` int32 (a partial last frame is zero-completed)."""
        return self.encoder(num_quantizers)(x)

    def decode(self, codes: Seq) -> Seq:
        """Audio `[B, m * hop, 1]` from codes `[B, m, n]` (n <= the codec's quantizers)."""
        if not isinstance(codes, Seq):
            raise ValueError(f"codes: expected a streamzoo.Seq, got {type(codes).__name__}")
        if codes.values.ndim != 3:
            raise ValueError(f"codes: expected values of shape [B, m, n_q], got {codes.values.shape}")
        return self.decoder(codes.values.shape[-1])(codes)

    @property
    def spec(self) -> TailPaddedSpec:
        return self._spec

    def _forward(self, x: Seq) -> Seq:
        audio = self.decoder()(self.encoder()(x))
        return _cut_to(audio, x)

    def autoencode(self, x: Seq, *, rng: jax.Array | None = None,
                   num_quantizers: int | jax.Array | None = None) -> CodecOutput:
        """The training path: straight-through quantization, losses, quantizer dropout.

        `rng` given and `config.quantizer_dropout > 0`: a random number of active quantizers
        (see `sample_active_quantizers`); otherwise `num_quantizers` (int or `[B]`, default
        this codec's). The output audio equals `self(x)` up to float rounding (exactly the same
        codes) when no quantizer is dropped.
        """
        self.check_input(x, "x")
        x = x.compacted()
        enc = self.encoder()
        lat = enc.latents(x)
        cfg = self.config
        if num_quantizers is None:
            num_quantizers = self.num_quantizers
        if rng is not None and cfg.quantizer_dropout > 0 and cfg.quantizer == "rvq":
            num_quantizers = sample_active_quantizers(
                rng, x.batch_size, self.quantizer.num_quantizers,
                dropout_rate=cfg.quantizer_dropout, per_row=cfg.dropout_per_row)
        q = self.quantizer.quantize(lat.values, num_active=num_quantizers, mask=lat.mask)
        quantized = Seq(q.quantized, lat.mask, compact=True).masked()
        y = quantized
        if self.decoder_transformer is not None:
            y = self.decoder_transformer(y)
        audio = _cut_to(self.decoder_net(y), x)
        codes = Seq(q.codes, lat.mask, compact=True).masked()
        num_active = q.num_active.reshape(q.num_active.shape[0], -1)[:, 0]
        return CodecOutput(audio, lat, quantized, codes, q.commitment_loss, q.codebook_loss,
                           num_active)

    # ----------------------------------------------------------------- streaming API
    def _init_carry(self, batch_size, dtype):
        return CodecCarry(self.encoder().init_carry(batch_size, dtype),
                          self.decoder().init_carry(batch_size, dtype))

    def _step(self, carry: CodecCarry, x: Seq):
        enc, codes = self.encoder().step(carry.encoder, x)
        dec, audio = self.decoder().step(carry.decoder, codes)
        return CodecCarry(enc, dec), audio

    def _flush(self, carry: CodecCarry, batch_size: int):
        """Decode the zero-completed partial frame and emit its first `n mod hop` samples."""
        _, codes = self.encoder().flush(carry.encoder)
        _, audio = self.decoder().step(carry.decoder, codes)
        keep = jnp.arange(audio.length)[None, :] < carry.encoder.phase[:, None]
        return carry, Seq(audio.values, audio.mask & keep, compact=True).masked()

    def _reset_rows(self, carry, rows, batch_size):
        return CodecCarry(self.encoder().reset_rows(carry.encoder, rows),
                          self.decoder().reset_rows(carry.decoder, rows))


def _cut_to(audio: Seq, x: Seq) -> Seq:
    """`audio` with each row cut to x's valid length and x's physical length."""
    values = audio.values[:, :x.length]
    if values.shape[1] < x.length:
        values = jnp.pad(values, ((0, 0), (0, x.length - values.shape[1]), (0, 0)))
    return Seq(values, jnp.arange(x.length)[None, :] < x.lengths()[:, None], compact=True).masked()
