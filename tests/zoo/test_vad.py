"""Silero VAD port: streaming contract, parity with the wheel's ONNX model, segments, bad input.

The parity test needs the silero-vad wheel (`pip install --no-deps silero-vad==6.2.3`: its
weights without torch), onnxruntime and espeak-ng; it is skipped, saying which is missing,
without them. Everything else runs with random weights when the wheel is absent.
"""

from __future__ import annotations

import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from streamzoo import Seq
from streamzoo.testing import assert_stream_contract
from streamzoo.zoo.vad.onnx_weights import read_onnx_initializers
from streamzoo.zoo.vad.segments import Segment, SegmentConfig, SegmentTracker, speech_segments
from streamzoo.zoo.vad.silero import (CHUNK, CONTEXT, SAMPLE_RATE, WHEEL_ONNX, WHEEL_RUNTIME_ONNX,
                                      WHEEL_SAFETENSORS, SileroVAD, hann_dft_basis,
                                      wheel_data_dir)

WHEEL = wheel_data_dir()
needs_wheel = pytest.mark.skipif(
    WHEEL is None,
    reason="silero-vad wheel not installed (pip install --no-deps silero-vad==6.2.3)")


@pytest.fixture(scope="module")
def model():
    """The pretrained model when the wheel is installed, else random weights (same code)."""
    if WHEEL:
        return SileroVAD.from_pretrained()
    return jax.jit(lambda: SileroVAD(rngs=nnx.Rngs(0)))()  # one compile, not one per initialiser


# ---------------------------------------------------------------------- contract
def test_stream_contract(model, key):
    lengths = jnp.array([4 * CHUNK, 2 * CHUNK + 300])  # whole chunks, and a partial tail
    audio = 0.3 * jax.random.normal(key, (2, 4 * CHUNK, 1))
    x = Seq.from_lengths(audio, lengths)
    report = assert_stream_contract(model, x, long_length=7 * CHUNK)
    assert set(report.values()) == {"ok"}


def test_spec_and_carry(model):
    spec = model.spec
    assert (spec.block_size, spec.output_ratio, spec.output_latency) == (CHUNK, 1 / CHUNK, 0)
    assert spec.receptive_field == (-float("inf"), 0.0)
    carry = jax.eval_shape(lambda: model.init_carry(3))
    assert carry.context.shape == (3, CONTEXT) and carry.pending.shape == (3, CHUNK)
    assert carry.lstm.h.shape == carry.lstm.c.shape == (3, 128)
    assert carry.lstm.h.dtype == jnp.float32 and carry.count.dtype == jnp.int32


def test_partial_chunks_wait_in_the_carry(model, key):
    """Samples arriving a few at a time give the same probabilities as whole chunks."""
    audio = 0.2 * jax.random.normal(key, (1, 3 * CHUNK, 1))
    want = jax.jit(lambda m, x: m(x))(model, Seq.full(audio)).values[0, :, 0]
    carry, got = model.init_carry(1), []
    step = jax.jit(lambda m, c, x: m.step(c, x))
    for start, count in [(0, 100), (100, 500), (600, 412), (1012, 512), (1524, 12)]:
        chunk = jnp.zeros((1, CHUNK, 1)).at[:, :count].set(audio[:, start:start + count])
        carry, y = step(model, carry, Seq.from_lengths(chunk, jnp.array([count])))
        got += list(np.asarray(y.values[0, :, 0])[np.asarray(y.mask[0])])
    assert int(carry.count[0]) == 0
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_compute_dtype(model, key):
    m16 = _abstract(dtype=jnp.bfloat16).load_torch_weights(_tensors_of(model))
    audio = Seq.full(0.3 * jax.random.normal(key, (1, 2 * CHUNK, 1)))
    offline = jax.jit(lambda m, x: m(x))
    y16, y32 = offline(m16, audio), offline(model, audio)
    assert y16.dtype == jnp.bfloat16 and model.init_carry(1).lstm.h.dtype == jnp.float32
    assert np.abs(np.asarray(y16.values, np.float32) - np.asarray(y32.values)).max() < 0.05


def _abstract(**kwargs) -> SileroVAD:
    """A model without parameter values (nothing to initialise), to load weights into."""
    return nnx.eval_shape(lambda: SileroVAD(**kwargs))


def _tensors_of(m: SileroVAD) -> dict:
    """The model's weights back in Silero's (torch) names and layouts."""
    t = {"model.stft.forward_basis_buffer": np.asarray(m.stft_basis[...]).T[:, None, :]}
    for i, conv in enumerate(m.encoder):
        kernel = np.asarray(conv.kernel[...])  # [k, in, out]
        t[f"model.encoder.{i}.reparam_conv.weight"] = kernel.transpose(2, 1, 0)
        t[f"model.encoder.{i}.reparam_conv.bias"] = np.asarray(conv.bias[...])
    t["model.decoder.rnn.weight_ih"] = np.asarray(m.lstm.input_proj.kernel[...]).T
    t["model.decoder.rnn.weight_hh"] = np.asarray(m.lstm.recurrent_kernel[...]).T
    t["model.decoder.rnn.bias_ih"] = np.asarray(m.lstm.input_proj.bias[...])
    t["model.decoder.rnn.bias_hh"] = np.zeros(512, np.float32)
    t["model.decoder.decoder.2.weight"] = np.asarray(m.head.kernel[...]).T[:, :, None]
    t["model.decoder.decoder.2.bias"] = np.asarray(m.head.bias[...])
    return t


# ------------------------------------------------------------------------ parity
def _onnx_probabilities(session, audio: np.ndarray) -> np.ndarray:
    """What the package's OnnxWrapper computes: per 512-sample chunk, with 64 context samples
    and the (2, 1, 128) state carried over; a partial last chunk is not scored."""
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros(CONTEXT, np.float32)
    out = []
    for j in range(audio.shape[0] // CHUNK):
        chunk = audio[j * CHUNK:(j + 1) * CHUNK]
        p, state = session.run(None, {"input": np.concatenate([context, chunk])[None],
                                      "state": state, "sr": np.array(SAMPLE_RATE, np.int64)})
        out.append(p.reshape(-1)[0])
        context = chunk[-CONTEXT:]
    return np.asarray(out, np.float32)


@needs_wheel
def test_parity_with_the_wheels_onnx_model(model, tmp_path_factory):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (dev extra)")
    from streamzoo.train.data.speech import (SpeechCorpusConfig, espeak_available,
                                             generate_speech_corpus, read_wav)

    if not espeak_available():
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng)")
    corpus = generate_speech_corpus(str(tmp_path_factory.mktemp("vad-speech")),
                                    SpeechCorpusConfig(num_utterances=50, seed=7),
                                    progress=False)
    rows = [read_wav(r["path"])[0] for r in corpus.records]
    assert len(rows) == 50 and all(rate == SAMPLE_RATE for rate in
                                   (read_wav(r["path"])[1] for r in corpus.records[:3]))
    rng = np.random.default_rng(0)
    silence = np.zeros(2 * SAMPLE_RATE, np.float32)
    noise = (0.1 * rng.standard_normal(2 * SAMPLE_RATE)).astype(np.float32)
    quiet_noise = (0.003 * rng.standard_normal(SAMPLE_RATE + 100)).astype(np.float32)
    # Speech between noise and silence: transitions in both directions within one stream.
    mixed = np.concatenate([quiet_noise, rows[0], silence[:SAMPLE_RATE // 2], rows[1],
                            noise[:4000]])
    rows += [silence, noise, quiet_noise, mixed]

    lengths = np.array([r.shape[0] for r in rows])
    audio = np.zeros((len(rows), -(-lengths.max() // CHUNK) * CHUNK), np.float32)
    for b, r in enumerate(rows):
        audio[b, :r.shape[0]] = r
    y = jax.jit(lambda m, x: m(x))(model, Seq.from_lengths(audio[..., None], lengths))
    got = y.rows()

    session = ort.InferenceSession(os.path.join(WHEEL, WHEEL_RUNTIME_ONNX),
                                   providers=["CPUExecutionProvider"])
    worst = 0.0
    for b, r in enumerate(rows):
        want = _onnx_probabilities(session, r)
        assert got[b].shape == (want.shape[0], 1), f"row {b}: {got[b].shape} vs {want.shape}"
        worst = max(worst, float(np.abs(got[b][:, 0] - want).max()))
    chunks = int(sum(lengths // CHUNK))
    print(f"\nSilero VAD parity: {len(rows)} streams, {chunks} chunks, "
          f"max |JAX - onnxruntime| = {worst:.2e}")
    assert worst < 1e-4
    # And it is a working VAD: speech is found in the utterances, not in silence.
    assert np.mean([g.max() > 0.5 for g in got[:50]]) >= 0.9
    assert got[50].max() < 0.1


@needs_wheel
def test_wheel_onnx_weights_are_the_torchscript_v6_weights():
    """The loader's ONNX file holds bitwise the tensors of the wheel's default torch model."""
    tensors = read_onnx_initializers(os.path.join(WHEEL, WHEEL_ONNX))
    assert len(tensors) == 15
    with zipfile.ZipFile(os.path.join(WHEEL, "silero_vad.jit")) as z:
        blobs = {z.read(n) for n in z.namelist() if "/data/" in n}
    assert all(np.ascontiguousarray(t).tobytes() in blobs for t in tensors.values())
    basis = tensors["model.stft.forward_basis_buffer"][:, 0, :].T
    np.testing.assert_allclose(basis, hann_dft_basis(), atol=1e-6)


@needs_wheel
def test_wheel_safetensors_is_another_checkpoint():
    pytest.importorskip("safetensors", reason="safetensors not installed")
    other = SileroVAD.from_pretrained(os.path.join(WHEEL, WHEEL_SAFETENSORS))
    v6 = SileroVAD.from_pretrained()
    assert np.array_equal(other.stft_basis[...], v6.stft_basis[...])
    assert not np.allclose(other.encoder[0].kernel[...], v6.encoder[0].kernel[...]), (
        "the wheel's safetensors now match the ONNX weights: from_pretrained may load either")


# ---------------------------------------------------------------------- segments
def _track(*runs):
    return np.concatenate([np.full(n, p) for n, p in runs])


def test_segments_hysteresis_min_durations_and_padding():
    cfg = SegmentConfig()  # onset 0.5, offset 0.35, 100 ms silence = 4 chunks, 250 ms speech
    pad = cfg.samples(cfg.pad_ms)
    probs = _track((10, 0.05),
                   (5, 0.9), (6, 0.4), (4, 0.9),  # a long dip into the hysteresis band
                   (2, 0.1), (3, 0.9),  # a 2-chunk silence (< 4 chunks): no break
                   (10, 0.1),  # a real silence: the segment ends at its start (chunk 30)
                   (3, 0.9), (7, 0.1),  # 3 chunks of speech (96 ms < 250 ms): dropped
                   (20, 0.8), (2, 0.2))  # speech running into the end of the track
    segments = speech_segments(probs, cfg)
    assert segments == [Segment(10 * CHUNK - pad, 30 * CHUNK + pad),
                        Segment(50 * CHUNK - pad, 70 * CHUNK + min(pad, 2 * CHUNK))]
    assert segments[0].seconds() == ((10 * CHUNK - pad) / 16000, (30 * CHUNK + pad) / 16000)
    # Without hysteresis (offset = onset) the dip at chunks 15-20 is silence: a split.
    split = speech_segments(probs, SegmentConfig(offset=0.5, pad_ms=0, min_speech_ms=0))
    assert split[:2] == [Segment(10 * CHUNK, 15 * CHUNK), Segment(21 * CHUNK, 30 * CHUNK)]


def test_segments_padding_never_overlaps_and_stays_inside():
    cfg = SegmentConfig(min_silence_ms=50, min_speech_ms=0, pad_ms=100)  # pad 1600 > gap 1024
    probs = _track((1, 0.9), (10, 0.9), (2, 0.0), (12, 0.9), (1, 0.0))
    a, b = speech_segments(probs, cfg)
    assert a.start == 0 and a.end == 11 * CHUNK + CHUNK  # half the 2-chunk gap
    assert b.start == a.end and b.end == 26 * CHUNK  # clamped to the end of the track


def test_segment_tracker_online_equals_offline():
    rng = np.random.default_rng(3)
    probs = np.clip(np.repeat(rng.random(60), rng.integers(1, 12, 60)), 0, 1)
    cfg = SegmentConfig(pad_ms=60)
    want = speech_segments(probs, cfg)
    assert len(want) >= 3
    tracker, got, pos = SegmentTracker(cfg), [], 0
    while pos < probs.size:
        k = int(rng.integers(0, 9))
        released = tracker.push(probs[pos:pos + k])
        pos += k
        assert all(s.end <= pos * CHUNK for s in released)  # nothing from the future
        got += released
    assert got + tracker.finish() == want


# -------------------------------------------------------------------------- demo
@needs_wheel
def test_demo_streams_speech_and_finds_both_sentences(capsys):
    from streamzoo.train.data.speech import espeak_available
    from streamzoo.zoo.vad.demo import run_demo

    if not espeak_available():
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng)")
    assert run_demo(["--chunks", "2"]) == 0
    out = capsys.readouterr().out
    assert "OK: stream == offline" in out
    assert out.count(": speech ") == 2, out  # the two placed sentences, nothing in the noise


def test_demo_bad_wav(tmp_path, capsys):
    from streamzoo.zoo.vad.demo import run_demo

    bad = tmp_path / "bad.wav"
    bad.write_text("not a wav")
    code = run_demo(["--wav", str(bad)])
    assert code == 2
    err = capsys.readouterr().err
    assert "--wav: cannot read" in err or "Silero VAD weights not found" in err


# --------------------------------------------------------------------- bad input
def test_bad_input(model):
    x = Seq.full(jnp.zeros((1, CHUNK, 2)))
    with pytest.raises(ValueError, match=r"x: expected feature shape \(1,\)"):
        model(x)
    with pytest.raises(ValueError, match="multiple of block_size=512"):
        model.step(model.init_carry(1), Seq.full(jnp.zeros((1, 100, 1))))
    with pytest.raises(ValueError, match="floating-kind"):
        model(Seq.full(jnp.zeros((1, CHUNK, 1), jnp.int16)))
    with pytest.raises(ValueError, match="carry.*batch size"):
        model.step(model.init_carry(3), Seq.full(jnp.zeros((2, CHUNK, 1))))


def test_bad_weights(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="path: no such file"):
        SileroVAD.from_pretrained(str(tmp_path / "missing.onnx"))
    text = tmp_path / "weights.txt"
    text.write_text("not weights")
    with pytest.raises(ValueError, match=r"path: expected a \.onnx or \.safetensors file"):
        SileroVAD.from_pretrained(str(text))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(bytes([0x3A, 0x40]) + b"\x00" * 5)
    with pytest.raises(ValueError, match="path: "):
        SileroVAD.from_pretrained(str(garbage))
    with pytest.raises(ValueError, match="lacks"):
        _abstract().load_torch_weights({"model.stft.forward_basis_buffer": np.zeros((258, 1, 256))})
    shapes = {"model.stft.forward_basis_buffer": (258, 1, 256),
              "model.encoder.0.reparam_conv.weight": (128, 129, 5)}
    full = {k: np.zeros(v) for k, v in (_shapes() | shapes).items()}
    with pytest.raises(ValueError, match=r"tensors\['model.encoder.0.reparam_conv.weight'\]: "
                                         r"expected shape \(128, 129, 3\), got \(128, 129, 5\)"):
        _abstract().load_torch_weights(full)


def _shapes():
    from streamzoo.zoo.vad.silero import _expected_shapes

    return _expected_shapes()


def test_bad_segment_input():
    with pytest.raises(ValueError, match="onset: expected in"):
        SegmentConfig(onset=1.5)
    with pytest.raises(ValueError, match="offset: expected in"):
        SegmentConfig(onset=0.5, offset=0.7)
    with pytest.raises(ValueError, match="pad_ms: expected >= 0"):
        SegmentConfig(pad_ms=-1)
    with pytest.raises(ValueError, match="probs: expected a 1-D"):
        speech_segments(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="probs: expected finite"):
        speech_segments(np.array([0.1, np.nan]))
