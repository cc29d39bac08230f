"""ASRModel (log-mel -> subsampling -> chunked Conformer -> CTC head) as one StreamLayer: the
streaming contract at two settings of one set of weights, dynamic-chunk training, config
round-trip, and transcription: offline greedy == streamed greedy (one stream and batched
ragged streams). Tiny sizes: 1600 Hz audio (64-sample encoder frames), 8 mels, D=8. Batch
invariance, NaN isolation, reset_rows and long runs are the encoder's (test_encoder.py); the
CTC head on top is frame-wise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo.testing import assert_stream_contract
from streamzoo.zoo.asr.encoder import ConformerConfig
from streamzoo.zoo.asr.evaluate import stream_texts
from streamzoo.zoo.asr.model import (ASRConfig, ASRModel, StreamingRecognizer, greedy_texts,
                                     stream_transcribe, transcribe)

SETTINGS = ((2, 3, 1), (1, 2, 0))
TINY = ASRConfig(encoder=ConformerConfig(sample_rate=1600, n_mels=8, d_model=8, num_layers=1,
                                         num_heads=2, ff_mult=2, conv_kernel=3,
                                         latencies=SETTINGS))
SAMPLES = 640
LENGTHS = (SAMPLES, 437, 100)


@pytest.fixture(scope="module")
def model() -> ASRModel:
    m = ASRModel(TINY, rngs=nnx.Rngs(params=jax.random.key(5)))
    m.encoder.set_feature_stats(np.linspace(-3, 0, 8), np.linspace(1, 2, 8))
    # A larger head so that random logits are not near-ties (the greedy paths are compared).
    m.head.proj.kernel[...] = m.head.proj.kernel[...] * 8.0
    return m


def audio(key, lengths=LENGTHS, length=SAMPLES) -> sz.Seq:
    return sz.Seq.from_lengths(jax.random.normal(key, (len(lengths), length, 1)) * 0.1,
                               jnp.array(lengths))


def test_stream_contract_own_latency(model, key):
    assert model.latency.as_tuple() == SETTINGS[0]
    assert_stream_contract(model, audio(key),
                           checks=("partitions", "flush", "exec_mask"))


def test_stream_contract_other_latency(model, key):
    assert_stream_contract(model.with_latency(SETTINGS[1]), audio(key), checks=("flush",))


def test_forward_dynamic_and_shapes(model, key):
    x = audio(key)
    dyn = jax.jit(lambda m, x, i: m.forward_dynamic(x, i))
    for i, s in enumerate(SETTINGS):
        want = sz.jitted_apply(model.with_latency(s), x)
        got = dyn(model, x, jnp.int32(i))
        np.testing.assert_allclose(got.values, want.values, atol=1e-5)
    assert got.values.shape[-1] == TINY.vocab_size
    assert list(np.asarray(got.lengths())) == [model.num_frames(n) for n in LENGTHS]


def test_config_round_trip_and_errors():
    again = ASRConfig.from_dict(TINY.to_dict())
    assert again == TINY
    with pytest.raises(ValueError, match="unknown fields"):
        ASRConfig.from_dict({**TINY.to_dict(), "heads": 2})
    with pytest.raises(ValueError, match="blank_id"):
        ASRConfig(blank_id=99)
    with pytest.raises(ValueError, match="config"):
        ASRModel("tiny", rngs=nnx.Rngs(0))


def test_streamed_transcripts_equal_offline(model):
    rng = np.random.default_rng(0)
    audios = [rng.standard_normal(n).astype(np.float32) * 0.2 for n in (700, 330, 1000)]
    offline = transcribe(model, audios, batch_size=2, multiple=640)
    assert any(offline)  # the random model emits something
    one = [stream_transcribe(model, a, chunk_samples=128) for a in audios]
    batched = stream_texts(model, audios, batch_size=2)
    assert one == offline and batched == offline
    # greedy_texts agrees with the streaming decoder on the offline logits as well
    x = sz.Seq.from_lengths(jnp.asarray(audios[0][None, :640, None]), jnp.array([640]))
    assert greedy_texts(sz.jitted_apply(model, x))[0] == transcribe(model, [audios[0][:640]],
                                                                     multiple=640)[0]


def test_streamed_lexicon_beam_equals_offline(model):
    """The recognizer's beam search, fed streamed logits, gives the offline beam's transcripts,
    and with a lexicon every final transcript is made of lexicon words."""
    from streamzoo.zoo.asr.evaluate import lexicon_search, lexicon_texts

    rng = np.random.default_rng(1)
    audios = [rng.standard_normal(n).astype(np.float32) * 0.2 for n in (900, 420, 1300)]
    words = ["a", "at", "tea", "eat", "ate", "tee", "e", "ta"]
    search = lexicon_search(model, words, beam_size=4)
    offline = lexicon_texts(model, audios, None, search, batch_size=2, multiple=640)
    streamed = stream_texts(model, audios, batch_size=2, beam_search=search)
    assert streamed == offline
    assert all(w in words for text in offline for w in text.split())
    with pytest.raises(ValueError, match="beam_search"):
        StreamingRecognizer(model, beam_search="beam")


def test_recognizer_rejects_bad_chunks(model):
    with pytest.raises(ValueError, match="chunk_samples"):
        StreamingRecognizer(model, chunk_samples=100)
    rec = StreamingRecognizer(model, chunk_samples=128)
    with pytest.raises(ValueError, match="chunk"):
        rec.push(np.zeros(129, np.float32))
    with pytest.raises(ValueError, match="audios"):
        transcribe(model, [])
