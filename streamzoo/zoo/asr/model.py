"""The whole streaming ASR model: audio -> log-mel -> conv subsampling -> chunked Conformer ->
CTC logits, as one `StreamLayer`, plus offline and streaming transcription.

    audio [B, S, 1] --ConformerEncoder(latency)--> [B, S // 640, D] --CTCHead--> logits [B, T, V]

`ASRModel` is multi-latency like its encoder: `config.encoder.latencies` lists the settings it
is trained for (dynamic-chunk training samples one per step, `forward_dynamic`), the first is
its own, and `with_latency(...)` returns the same weights streaming at another setting. The
head is frame-wise, so the model's carry is the encoder's and its spec the encoder's.

Transcription (characters, `text.VOCAB`):
* `transcribe(model, audios, latency=None)`: offline (the masked equivalent of streaming at
  `latency`), greedy CTC, one string per utterance.
* `StreamingRecognizer(model, latency, chunk_samples)`: push audio chunk by chunk and read the
  partial transcript; the greedy decoder's state (the previous frame's argmax) lives in its
  carry, so the streamed transcript equals the offline one whatever the chunking.
Audio is padded with silence to a whole encoder frame (640 samples) before either path, so the
last < 40 ms are not dropped and both paths see the same samples.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from streamzoo.core.drivers import jit_flush, jit_step
from streamzoo.core.seq import Seq
from streamzoo.core.streamer import StreamLayer
from streamzoo.zoo.asr.beam_search import CTCPrefixBeamSearch
from streamzoo.zoo.asr.conformer import AtLatency, Latency, latency_arg
from streamzoo.zoo.asr.ctc import CTCGreedyDecoder, CTCHead
from streamzoo.zoo.asr.encoder import ConformerConfig, ConformerEncoder
from streamzoo.zoo.asr.text import BLANK_ID, VOCAB_SIZE, decode


@dataclasses.dataclass(frozen=True)
class ASRConfig:
    """Hyper-parameters of an `ASRModel` (JSON round-trip with `to_dict` / `from_dict`)."""

    encoder: ConformerConfig = ConformerConfig()
    vocab_size: int = VOCAB_SIZE
    blank_id: int = BLANK_ID

    def __post_init__(self):
        enc = self.encoder
        if isinstance(enc, dict):
            enc = ConformerConfig.from_dict(enc)
        if not isinstance(enc, ConformerConfig):
            raise ValueError(f"encoder: expected a ConformerConfig or a dict, got {type(enc).__name__}")
        object.__setattr__(self, "encoder", enc)
        if not isinstance(self.vocab_size, int) or self.vocab_size < 2:
            raise ValueError(f"vocab_size: expected an int >= 2, got {self.vocab_size!r}")
        if not isinstance(self.blank_id, int) or not 0 <= self.blank_id < self.vocab_size:
            raise ValueError(f"blank_id: expected an int in [0, {self.vocab_size}), got {self.blank_id!r}")

    def to_dict(self) -> dict:
        return {"encoder": self.encoder.to_dict(), "vocab_size": self.vocab_size,
                "blank_id": self.blank_id}

    @classmethod
    def from_dict(cls, d: dict) -> "ASRConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"config: unknown fields {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


class ASRModel(StreamLayer):
    """Audio `[B, S, 1]` -> CTC logits `[B, S // samples_per_frame, vocab_size]` at
    `config.encoder.latency`; `with_latency` for the other settings (module docstring)."""

    def __init__(self, config: ASRConfig = ASRConfig(), *, dtype=None, rngs: nnx.Rngs):
        if not isinstance(config, ASRConfig):
            raise ValueError(f"config: expected an ASRConfig, got {type(config).__name__}")
        self.config = config
        self.dtype = dtype
        self.encoder = ConformerEncoder(config.encoder, dtype=dtype, rngs=rngs)
        self.head = CTCHead(config.encoder.d_model, config.vocab_size, dtype=dtype, rngs=rngs)
        self.latency = config.encoder.latency
        self.in_features = 1
        self.out_features = config.vocab_size

    # -------------------------------------------------------------------- facts
    @property
    def samples_per_frame(self) -> int:
        return self.encoder.samples_per_frame

    @property
    def sample_rate(self) -> int:
        return self.config.encoder.sample_rate

    @property
    def latencies(self) -> tuple[Latency, ...]:
        return self.config.encoder.latencies

    def num_frames(self, num_samples):
        return self.encoder.num_frames(num_samples)

    @property
    def spec(self):
        return self.spec_at(self.latency)

    def spec_at(self, latency: Latency):
        return self.encoder.spec_at(Latency.of(latency))

    def with_latency(self, latency=None, **kwargs) -> AtLatency:
        """This model (same parameters) streaming at another setting (a `Latency`, a
        `(chunk, left, lookahead)` tuple or keywords), in encoder frames."""
        return AtLatency(self, latency_arg(latency, kwargs))

    # ----------------------------------------------------------------- training
    def forward_dynamic(self, x: Seq, index) -> Seq:
        """Offline logits at `config.encoder.latencies[index]` for a traced `index`."""
        return self.head(self.encoder.forward_dynamic(x, index))

    # --------------------------------------------------------------------- paths
    def _init_carry(self, batch_size, dtype):
        return self.init_carry_at(batch_size, dtype, self.latency)

    def init_carry_at(self, batch_size, dtype, latency: Latency):
        return self.encoder.init_carry_at(batch_size, dtype, latency)

    def _forward(self, x: Seq) -> Seq:
        return self.forward_at(x, self.latency)

    def forward_at(self, x: Seq, latency: Latency) -> Seq:
        return self.head(self.encoder.forward_at(x, latency))

    def _step(self, carry, x: Seq):
        return self.step_at(carry, x, self.latency)

    def step_at(self, carry, x: Seq, latency: Latency):
        carry, y = self.encoder.step_at(carry, x, latency)
        return carry, self.head(y)

    def _flush(self, carry, batch_size):
        return self.flush_at(carry, batch_size, self.latency)

    def flush_at(self, carry, batch_size, latency: Latency):
        carry, y = self.encoder.flush_at(carry, batch_size, latency)
        return carry, self.head(y)

    def _reset_rows(self, carry, rows, batch_size):
        return self.reset_rows_at(carry, rows, batch_size, carry.stack.latency)

    def reset_rows_at(self, carry, rows, batch_size, latency: Latency):
        return self.encoder.reset_rows_at(carry, rows, batch_size, latency)


# ------------------------------------------------------------------ transcription
def _as_audio_list(audios) -> list[np.ndarray]:
    if isinstance(audios, np.ndarray) and audios.ndim == 1:
        audios = [audios]
    out = []
    for i, a in enumerate(audios):
        a = np.asarray(a, np.float32)
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"audios[{i}]: expected a non-empty 1-D float array of samples, "
                             f"got shape {a.shape}")
        out.append(a)
    if not out:
        raise ValueError("audios: expected at least one utterance, got none")
    return out


def pad_to_frame(audio: np.ndarray, samples_per_frame: int) -> np.ndarray:
    """`audio` with silence appended up to a whole encoder frame (so no sample is dropped)."""
    n = -(-len(audio) // samples_per_frame) * samples_per_frame
    return np.pad(audio, (0, n - len(audio)))


def audio_batch(audios, samples_per_frame: int, multiple: int | None = None) -> Seq:
    """A compact `Seq [B, S, 1]` of utterances, each padded with silence to a whole frame;
    S is rounded up to `multiple` samples (default: one frame) with invalid frames."""
    audios = [pad_to_frame(a, samples_per_frame) for a in _as_audio_list(audios)]
    multiple = multiple or samples_per_frame
    s = -(-max(len(a) for a in audios) // multiple) * multiple
    values = np.zeros((len(audios), s, 1), np.float32)
    for b, a in enumerate(audios):
        values[b, :len(a), 0] = a
    return Seq.from_lengths(values, np.array([len(a) for a in audios], np.int32))


def greedy_texts(logits: Seq, blank_id: int = BLANK_ID) -> list[str]:
    """Greedy CTC transcripts (argmax, collapse repeats, drop blanks) of offline logits."""
    best = np.asarray(jnp.argmax(logits.values, axis=-1))
    mask = np.asarray(logits.mask)
    texts = []
    for b in range(best.shape[0]):
        ids = best[b][mask[b]]
        keep = np.ones(len(ids), bool)
        keep[1:] = ids[1:] != ids[:-1]
        texts.append(decode(ids[keep & (ids != blank_id)]))
    return texts


@jax.jit
def _offline_logits(model, x: Seq) -> Seq:
    return model(x)


def offline_logits(model: ASRModel, audios, latency=None, *, batch_size: int = 16,
                   multiple: int = 16000):
    """Per batch of `batch_size` utterances, `(logits Seq, number of real rows)`: the offline
    forward at `latency` (default: the model's own), i.e. exactly what streaming at that
    setting computes. The last batch is filled up with copies; lengths are rounded up to
    `multiple` samples (few compiles)."""
    view = model if latency is None else model.with_latency(latency)
    audios = _as_audio_list(audios)
    for i in range(0, len(audios), batch_size):
        part = audios[i:i + batch_size]
        x = audio_batch(part + [part[-1]] * (batch_size - len(part)), model.samples_per_frame,
                        multiple)
        yield _offline_logits(view, x), len(part)


def transcribe(model: ASRModel, audios, latency=None, *, batch_size: int = 16,
               multiple: int = 16000) -> list[str]:
    """Offline greedy transcripts of 1-D float audio arrays (16 kHz, [-1, 1]) at `latency`
    (default: the model's own), i.e. exactly what streaming at that setting gives."""
    texts = []
    for logits, n in offline_logits(model, audios, latency, batch_size=batch_size,
                                    multiple=multiple):
        texts.extend(greedy_texts(logits, model.config.blank_id)[:n])
    return texts


class _RecognizerPipeline(nnx.Module):
    """The encoder and the streaming greedy decoder as one step, for `jit_step`."""

    def __init__(self, model, decoder):
        self.model, self.decoder = model, decoder

    def step(self, carry, x: Seq):
        enc_carry, dec_carry = carry
        enc_carry, logits = self.model.step(enc_carry, x)
        dec_carry, tokens = self.decoder.step(dec_carry, logits)
        return (enc_carry, dec_carry), tokens, logits

    def flush(self, carry):
        enc_carry, dec_carry = carry
        enc_carry, logits = self.model.flush(enc_carry)
        dec_carry, tokens = self.decoder.step(dec_carry, logits)
        return (enc_carry, dec_carry), tokens, logits


class StreamingRecognizer:
    """Chunk-by-chunk CTC transcription of `batch_size` streams at `latency`.

    `push(chunk)` takes `[B, n]` (or `[n]` for one stream) float samples with n <=
    `chunk_samples` (a multiple of the model's 640-sample frame; shorter chunks are padded
    with invalid frames, so one compiled step serves all) and returns the newly decoded text
    of each stream; `finish()` flushes the look-ahead and returns the rest. `text` holds the
    transcript so far, `timings` the seconds each push/finish took (compute only).

    Decoding is greedy (prefix-stable: text only grows). With `beam_search` (a
    `CTCPrefixBeamSearch`, e.g. lexicon-constrained) the same logits also feed the beam on
    the host, and `text` is the beam's best hypothesis, which may revise earlier words until
    `finish()`; `push`/`finish` then return the whole current transcript of each stream.
    """

    def __init__(self, model: ASRModel, latency=None, *, chunk_samples: int | None = None,
                 batch_size: int = 1, beam_search=None):
        self.model = model if latency is None else model.with_latency(latency)
        self.latency = self.model.latency
        spf = model.samples_per_frame
        chunk_samples = chunk_samples or self.latency.chunk * spf
        if chunk_samples <= 0 or chunk_samples % spf:
            raise ValueError(f"chunk_samples: expected a positive multiple of {spf} (one encoder "
                             f"frame), got {chunk_samples}")
        self.chunk_samples = chunk_samples
        self.batch_size = batch_size
        self.decoder = CTCGreedyDecoder(model.config.vocab_size, blank_id=model.config.blank_id)
        if beam_search is not None and not isinstance(beam_search, CTCPrefixBeamSearch):
            raise ValueError(f"beam_search: expected a CTCPrefixBeamSearch or None, got "
                             f"{type(beam_search).__name__}")
        if beam_search is not None and beam_search.blank_id != model.config.blank_id:
            raise ValueError(f"beam_search: expected blank_id {model.config.blank_id} (the "
                             f"model's), got {beam_search.blank_id}")
        self.beam_search = beam_search
        # Jitted with the parameters split out once (read here: a recognizer built before the
        # model's weights change keeps the old ones).
        pipeline = _RecognizerPipeline(self.model, self.decoder)
        self._step, self._flush = jit_step(pipeline), jit_flush(pipeline)
        self.reset()

    def reset(self) -> None:
        self.carry = (self.model.init_carry(self.batch_size),
                      self.decoder.init_carry(self.batch_size))
        self.tokens: list[list[int]] = [[] for _ in range(self.batch_size)]
        self.timings: list[float] = []
        self.beam_state = None if self.beam_search is None else self.beam_search.init(self.batch_size)
        self.finished = False

    @property
    def text(self) -> list[str]:
        if self.beam_search is not None:
            return [decode(t) for t in self.beam_search.best(self.beam_state, self.finished)]
        return [decode(t) for t in self.tokens]

    def _collect(self, tokens: Seq, logits: Seq) -> list[str]:
        values, mask = np.asarray(tokens.values), np.asarray(tokens.mask)
        new = []
        for b in range(self.batch_size):
            ids = [int(v) for v in values[b][mask[b]] if v >= 0]
            self.tokens[b].extend(ids)
            new.append(decode(ids))
        if self.beam_search is not None:
            self.beam_state = self.beam_search.step(self.beam_state, logits)
            return self.text
        return new

    def push(self, chunk, lengths=None) -> list[str]:
        chunk = np.asarray(chunk, np.float32)
        if chunk.ndim == 1:
            chunk = chunk[None]
        if chunk.ndim != 2 or chunk.shape[0] != self.batch_size or chunk.shape[1] > self.chunk_samples:
            raise ValueError(f"chunk: expected [{self.batch_size}, n <= {self.chunk_samples}] "
                             f"samples, got shape {chunk.shape}")
        n = chunk.shape[1]
        lengths = np.full(self.batch_size, n, np.int32) if lengths is None else np.asarray(lengths, np.int32)
        values = np.zeros((self.batch_size, self.chunk_samples, 1), np.float32)
        values[:, :n, 0] = chunk
        x = Seq.from_lengths(values, lengths)
        t0 = time.perf_counter()
        self.carry, tokens, logits = self._step(self.carry, x)
        tokens = jax.block_until_ready(tokens)
        self.timings.append(time.perf_counter() - t0)
        return self._collect(tokens, logits)

    def finish(self) -> list[str]:
        t0 = time.perf_counter()
        self.carry, tokens, logits = self._flush(self.carry)
        tokens = jax.block_until_ready(tokens)
        self.timings.append(time.perf_counter() - t0)
        self.finished = True
        return self._collect(tokens, logits)


def stream_transcribe(model: ASRModel, audio, latency=None, *, chunk_samples: int | None = None,
                      recognizer: StreamingRecognizer | None = None) -> str:
    """Greedy transcript of one utterance streamed chunk by chunk (padded to a whole frame)."""
    rec = recognizer or StreamingRecognizer(model, latency, chunk_samples=chunk_samples)
    rec.reset()
    audio = pad_to_frame(_as_audio_list([audio])[0], model.samples_per_frame)
    for start in range(0, len(audio), rec.chunk_samples):
        rec.push(audio[start:start + rec.chunk_samples])
    rec.finish()
    return rec.text[0]


__all__ = ["ASRConfig", "ASRModel", "StreamingRecognizer", "audio_batch", "greedy_texts",
           "pad_to_frame", "stream_transcribe", "transcribe"]
