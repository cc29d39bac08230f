"""`ConformerEncoder`: raw audio -> streaming log-mel -> conv subsampling -> chunked Conformer.

    audio [B, S, 1] --LogMel--> [B, S/hop, n_mels] --ConvSubsampling--> [B, S/(hop*f), D]
        --ConformerStack(latency)--> encoder frames [B, S/(hop*f), D]

With the defaults (16 kHz, 10 ms hop, subsampling 4) an encoder frame is 40 ms = 640 samples,
and a `step` takes any multiple of 640 samples. The front-end and the subsampling are causal
(no latency); all look-ahead is the Conformer's chunk and peeked look-ahead (`Latency`).

**Multi-latency.** One set of weights; `config.latencies` lists the settings it is trained for
and `latency` (default: the first) is the encoder's own. `with_latency(...)` returns the same
weights as a streamer at another setting (any setting works; the trained ones work well).
Dynamic-chunk training samples a setting per step: `forward_dynamic(x, index)` runs the offline
forward of `config.latencies[index]` for a traced index (`lax.switch`: one compile for all
settings), and `sample_latency(key)` draws an index.

**Lengths.** The output of n samples has `(n // hop) // factor` frames offline and after
stream + flush (the final partial chunk is emitted by `flush`); samples after the last whole
encoder frame (< 40 ms) give no frame, so append that much silence to keep them.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from streamzoo.core.seq import Seq
from streamzoo.core.streamer import StreamLayer
from streamzoo.layers.logmel import LogMel
from streamzoo.zoo.asr.conformer import (AtLatency, ChunkedSpec, ConformerStack, Latency,
                                         latency_arg)
from streamzoo.zoo.asr.subsampling import ConvSubsampling


@dataclasses.dataclass(frozen=True)
class ConformerConfig:
    """Hyper-parameters of a `ConformerEncoder` (JSON round-trip with `to_dict`/`from_dict`).

    `latencies`: the `(chunk, left, lookahead)` settings in encoder frames; the first is the
    default. The defaults give 160 ms chunks, 1.28 s left context per layer and 0, 80 and
    480 ms of peeked look-ahead. `normalize`: fixed per-bin log-mel statistics held in the
    front-end (set them with `set_feature_stats`; identity until then).
    """

    sample_rate: int = 16000
    n_mels: int = 80
    window_ms: float = 25.0
    hop_ms: float = 10.0
    preemphasis: float | None = None
    normalize: bool = True
    subsampling: int = 4
    subsampling_channels: int | None = None
    subsampling_kernel: int = 3
    d_model: int = 144
    num_layers: int = 4
    num_heads: int = 4
    ff_mult: int = 4
    conv_kernel: int = 15
    latencies: tuple = ((4, 32, 0), (4, 32, 2), (4, 32, 12))

    def __post_init__(self):
        lats = self.latencies
        if not isinstance(lats, (tuple, list)) or not lats:
            raise ValueError(f"latencies: expected a non-empty list of (chunk, left, lookahead), "
                             f"got {lats!r}")
        object.__setattr__(self, "latencies", tuple(Latency.of(l) for l in lats))

    @property
    def latency(self) -> Latency:
        return self.latencies[0]

    @property
    def frame_ms(self) -> float:
        """Duration of one encoder frame."""
        return self.hop_ms * self.subsampling

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["latencies"] = [list(l.as_tuple()) for l in self.latencies]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ConformerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"config: unknown fields {sorted(unknown)}; expected some of "
                             f"{sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


@struct.dataclass
class EncoderCarry:
    frontend: object
    subsampling: object
    stack: object

    @property
    def batch_size(self) -> int:
        return self.stack.batch_size


class ConformerEncoder(StreamLayer):
    """Audio `[B, S, 1]` -> encoder frames `[B, S // (hop * subsampling), d_model]` (see the
    module docstring). A `StreamLayer` at `config.latency`; `with_latency` for the others."""

    def __init__(self, config: ConformerConfig = ConformerConfig(), *, dtype=None,
                 rngs: nnx.Rngs):
        if not isinstance(config, ConformerConfig):
            raise ValueError(f"config: expected a ConformerConfig, got {type(config).__name__}")
        self.config = config
        self.dtype = dtype
        stats = {}
        if config.normalize:
            stats = dict(mean=np.zeros(config.n_mels, np.float32),
                         std=np.ones(config.n_mels, np.float32))
        self.frontend = LogMel(sample_rate=config.sample_rate, n_mels=config.n_mels,
                               window_ms=config.window_ms, hop_ms=config.hop_ms,
                               preemphasis=config.preemphasis, dtype=dtype, **stats)
        self.subsampling = ConvSubsampling(
            config.n_mels, config.d_model, factor=config.subsampling,
            channels=config.subsampling_channels, kernel_size=config.subsampling_kernel,
            dtype=dtype, rngs=rngs)
        self.stack = ConformerStack(config.d_model, config.num_layers, config.num_heads,
                                    latency=config.latency, ff_mult=config.ff_mult,
                                    conv_kernel=config.conv_kernel, dtype=dtype, rngs=rngs)
        self.latency = config.latency
        self.in_features = 1
        self.out_features = config.d_model
        self._prefix = self.frontend.spec.then(self.subsampling.spec)

    # -------------------------------------------------------------------- facts
    @property
    def samples_per_frame(self) -> int:
        """Audio samples per encoder frame (the step block size)."""
        return self.frontend.hop * self.config.subsampling

    @property
    def frame_ms(self) -> float:
        return self.config.frame_ms

    def num_frames(self, num_samples):
        """Encoder frames for `num_samples` samples (int or array)."""
        return (num_samples // self.frontend.hop) // self.config.subsampling

    @property
    def spec(self) -> ChunkedSpec:
        return self.spec_at(self.latency)

    def spec_at(self, latency: Latency) -> ChunkedSpec:
        return self.stack.spec_at(latency).after(self._prefix)

    def set_feature_stats(self, mean, std) -> None:
        """Fixed log-mel normalisation statistics (`[n_mels]` each, e.g. from
        `streamzoo.layers.logmel.estimate_log_mel_stats(encoder.raw_frontend(), audio)`)."""
        if self.frontend.mean is None:
            raise ValueError("config.normalize: expected True to hold statistics, got False")
        mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        n = self.config.n_mels
        if mean.shape != (n,) or std.shape != (n,) or not np.all(std > 0):
            raise ValueError(f"mean, std: expected shape ({n},) with std > 0, got "
                             f"{mean.shape} and {std.shape}")
        self.frontend.mean[...] = jnp.asarray(mean)
        self.frontend.std[...] = jnp.asarray(std)

    def raw_frontend(self) -> LogMel:
        """A front-end like this one without normalisation (to estimate statistics)."""
        c = self.config
        return LogMel(sample_rate=c.sample_rate, n_mels=c.n_mels, window_ms=c.window_ms,
                      hop_ms=c.hop_ms, preemphasis=c.preemphasis)

    # ------------------------------------------------------------------ latency API
    def with_latency(self, latency=None, **kwargs) -> AtLatency:
        """This encoder (same parameters) as a streamer at another setting: a `Latency`, a
        `(chunk, left, lookahead)` tuple, or keywords `chunk=, left=, lookahead=`."""
        return AtLatency(self, latency_arg(latency, kwargs))

    def sample_latency(self, key, probs=None) -> jax.Array:
        """A random index into `config.latencies` (uniform, or with `probs`), for
        `forward_dynamic` in a jitted training step."""
        n = len(self.config.latencies)
        p = None if probs is None else jnp.asarray(probs, jnp.float32)
        if p is not None and p.shape != (n,):
            raise ValueError(f"probs: expected shape ({n},) (one per latency), got {p.shape}")
        return jax.random.choice(key, n, p=p)

    def forward_dynamic(self, x: Seq, index) -> Seq:
        """Offline forward at `config.latencies[index]` for a traced int `index` (dynamic-chunk
        training: one compiled program serves every setting)."""
        self.check_input(x, "x")
        x = x.compacted()
        feats = self.subsampling(self.frontend(x))
        branches = [lambda f, lat=lat: self.stack.forward_at(f, lat)
                    for lat in self.config.latencies]
        return jax.lax.switch(jnp.asarray(index, jnp.int32), branches, feats)

    def features(self, x: Seq) -> Seq:
        """The (normalised) log-mel frames of audio `x [B, S, 1]` (e.g. for SpecAugment before
        `encode_features`)."""
        return self.frontend(x)

    def encode_features(self, feats: Seq, latency=None) -> Seq:
        """Offline encoder from log-mel frames `[B, T, n_mels]` at `latency` (default: own)."""
        latency = self.latency if latency is None else Latency.of(latency)
        return self.stack.forward_at(self.subsampling(feats).compacted(), latency)

    # ------------------------------------------------------------------------ paths
    def _init_carry(self, batch_size, dtype):
        return self.init_carry_at(batch_size, dtype, self.latency)

    def init_carry_at(self, batch_size, dtype, latency: Latency) -> EncoderCarry:
        return EncoderCarry(self.frontend.init_carry(batch_size, dtype),
                            self.subsampling.init_carry(batch_size, dtype),
                            self.stack.init_carry_at(batch_size, dtype, latency))

    def _forward(self, x: Seq) -> Seq:
        return self.forward_at(x, self.latency)

    def forward_at(self, x: Seq, latency: Latency) -> Seq:
        return self.stack.forward_at(self.subsampling(self.frontend(x)), latency)

    def _step(self, carry: EncoderCarry, x: Seq):
        return self.step_at(carry, x, self.latency)

    def step_at(self, carry: EncoderCarry, x: Seq, latency: Latency):
        front, y = self.frontend.step(carry.frontend, x)
        sub, y = self.subsampling.step(carry.subsampling, y)
        stack, y = self.stack.step_at(carry.stack, y.compacted(), latency)
        return EncoderCarry(front, sub, stack), y

    def _flush(self, carry: EncoderCarry, batch_size):
        return self.flush_at(carry, batch_size, self.latency)

    def flush_at(self, carry: EncoderCarry, batch_size, latency: Latency):
        # The front-end and the subsampling are causal: only the stack holds frames back.
        stack, y = self.stack.flush_at(carry.stack, batch_size, latency)
        return EncoderCarry(carry.frontend, carry.subsampling, stack), y

    def _reset_rows(self, carry: EncoderCarry, rows, batch_size):
        return self.reset_rows_at(carry, rows, batch_size, self.latency)

    def reset_rows_at(self, carry: EncoderCarry, rows, batch_size, latency: Latency):
        return EncoderCarry(self.frontend.reset_rows(carry.frontend, rows),
                            self.subsampling.reset_rows(carry.subsampling, rows),
                            self.stack.reset_rows_at(carry.stack, rows, batch_size, latency))


def count_params(model: nnx.Module) -> int:
    """Trainable parameters (`nnx.Param` leaves) of a model."""
    return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))))


__all__ = ["ConformerConfig", "ConformerEncoder", "EncoderCarry", "count_params"]
