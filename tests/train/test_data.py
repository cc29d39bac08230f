"""Data pipelines: espeak-ng speech, moving digits, text windows, grain batching and resumption."""

import json
import os
import shutil
import wave

import numpy as np
import pytest

from streamzoo.train.data import (ByteTokenizer, CharTokenizer, MovingDigits, SpeechCorpusConfig,
                                  SpeechExamples, TokenWindows, WordTokenizer, available_sources,
                                  espeak_available, generate_speech_corpus, load_documents,
                                  load_text_corpus, load_vocabulary, local_batch_size,
                                  make_batches, moving_digits, pad_speech_batch, read_wav)

NO_ESPEAK = "espeak-ng is not installed (apt-get install espeak-ng sox)"
needs_espeak = pytest.mark.skipif(not espeak_available(), reason=NO_ESPEAK)

SMALL = SpeechCorpusConfig(num_utterances=12, seed=7, test_fraction=0.25)
FIELDS = {"id", "path", "text", "voice", "accent", "variant", "speed", "pitch", "split",
          "duration", "num_samples", "sample_rate"}


def _portable(records):
    """Manifest entries without the machine-specific absolute paths."""
    return [{**r, "path": os.path.relpath(r["path"], os.path.dirname(os.path.dirname(r["path"])))}
            for r in records]


# ---------------------------------------------------------------------------------- speech


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if not espeak_available():
        pytest.skip(NO_ESPEAK)
    return generate_speech_corpus(str(tmp_path_factory.mktemp("speech")), SMALL, num_workers=2,
                                  progress=False)


@needs_espeak
def test_speech_manifest_fields_and_splits(corpus):
    vocab = set(load_vocabulary())
    assert len(vocab) >= 300
    assert len(corpus.records) == 12
    assert [r["split"] for r in corpus.records].count("test") == 3
    for r in corpus.records:
        assert set(r) == FIELDS
        words = r["text"].split()
        assert 1 <= len(words) <= 5 and set(words) <= vocab
        assert 130 <= r["speed"] <= 200 and 25 <= r["pitch"] <= 75
        assert r["voice"] == f"{r['accent']}+{r['variant']}"
        assert r["sample_rate"] == 16000
        assert r["duration"] == pytest.approx(r["num_samples"] / 16000, abs=1e-4)
    # speaker-disjoint: test utterances come only from the held-out voices
    heldout = set(SMALL.heldout_speakers())
    assert corpus.speakers("test") <= heldout
    assert not corpus.speakers("train") & heldout
    # the manifest on disk matches the records
    with open(os.path.join(corpus.root, "manifest.jsonl")) as f:
        on_disk = [json.loads(line) for line in f]
    assert on_disk == _portable(corpus.records)


@needs_espeak
def test_speech_audio_is_16khz_int16_speech(corpus):
    for r in corpus.records:
        with wave.open(r["path"]) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        audio, rate = read_wav(r["path"])
        assert rate == 16000 and audio.dtype == np.float32 and len(audio) == r["num_samples"]
        assert 0.2 < r["duration"] < 10.0
        rms = float(np.sqrt(np.mean(audio ** 2)))
        assert 0.01 < rms < 0.7, (r["voice"], rms)
        # speech, not stationary noise: loud 20 ms frames stand far above the quietest quarter
        frames = audio[: len(audio) // 320 * 320].reshape(-1, 320)
        energy = np.sort(np.sqrt((frames ** 2).mean(1)))
        assert energy[-1] > 5 * energy[: len(energy) // 4].mean() + 1e-4


@needs_espeak
def test_speech_is_deterministic_and_cached(corpus, tmp_path):
    again = generate_speech_corpus(str(tmp_path / "a"), SMALL, num_workers=1, progress=False)
    assert _portable(again.records) == _portable(corpus.records)
    for a, b in zip(again.records, corpus.records):
        with open(a["path"], "rb") as fa, open(b["path"], "rb") as fb:
            assert fa.read() == fb.read()
    # a second call reads the cache instead of running espeak-ng again
    stamp = os.path.getmtime(again.records[0]["path"])
    cached = generate_speech_corpus(str(tmp_path / "a"), SMALL, progress=False)
    assert cached.records == again.records
    assert os.path.getmtime(cached.records[0]["path"]) == stamp
    other = SpeechCorpusConfig(num_utterances=12, seed=8, test_fraction=0.25)
    from streamzoo.train.data.speech import plan_utterances
    assert [p["text"] for p in plan_utterances(other)] != [r["text"] for r in corpus.records]


@needs_espeak
def test_speech_scipy_backend_without_sox(tmp_path):
    config = SpeechCorpusConfig(num_utterances=3, seed=3, test_fraction=0.0)
    sox = None
    if shutil.which("sox"):
        sox = generate_speech_corpus(str(tmp_path), config, backend="sox", progress=False)
    plain = generate_speech_corpus(str(tmp_path), config, backend="scipy", progress=False)
    assert plain.root != (sox.root if sox else None)
    for i, r in enumerate(plain.records):
        audio, rate = read_wav(r["path"])
        assert rate == 16000 and np.sqrt(np.mean(audio ** 2)) > 0.01
        if sox:
            assert abs(r["num_samples"] - sox.records[i]["num_samples"]) < 200


@needs_espeak
def test_speech_batches_and_tokenizers(corpus):
    chars = CharTokenizer()
    words = WordTokenizer(load_vocabulary())
    for r in corpus.records:
        assert chars.decode(chars.encode(r["text"])) == r["text"]
        assert words.decode(words.encode(r["text"])) == r["text"]
        assert WordTokenizer.UNK not in words.encode(r["text"]).tolist()
    ds = make_batches(SpeechExamples(corpus.split("train"), chars), batch_size=3, seed=0,
                      shard_index=0, shard_count=1, batch_fn=pad_speech_batch)
    batch = next(iter(ds))
    assert batch["audio"].shape[0] == 3 and batch["audio"].shape[1] % 8000 == 0
    assert batch["audio"].dtype == np.float32 and batch["tokens"].dtype == np.int32
    assert batch["tokens"].shape[1] % 8 == 0
    for row in range(3):
        n, k = batch["audio_lengths"][row], batch["token_lengths"][row]
        assert np.all(batch["audio"][row, n:] == 0) and np.any(batch["audio"][row, :n] != 0)
        assert np.all(batch["tokens"][row, k:] == 0) and np.all(batch["tokens"][row, :k] > 0)


@needs_espeak
def test_speech_rejects_unknown_variant(tmp_path):
    with pytest.raises(ValueError, match="variants"):
        generate_speech_corpus(str(tmp_path), SpeechCorpusConfig(num_utterances=2,
                               variants=("m1", "nosuch")), progress=False)


def test_tokenizer_errors_and_padding():
    chars = CharTokenizer()
    with pytest.raises(ValueError, match="text"):
        chars.encode("Hello")
    ids, lengths = chars.encode_batch(["ab", "abc d"])
    assert ids.shape == (2, 5) and lengths.tolist() == [2, 5] and ids[0, 2:].tolist() == [0] * 3
    with pytest.raises(ValueError, match="length"):
        chars.encode_batch(["abcdef"], length=3)
    words = WordTokenizer(["red", "boat"])
    assert words.encode("red car").tolist() == [2, WordTokenizer.UNK]
    with pytest.raises(ValueError, match="vocabulary"):
        WordTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="test_fraction"):
        SpeechCorpusConfig(test_fraction=1.5)
    with pytest.raises(ValueError, match="speed"):
        SpeechCorpusConfig(speed=(200, 130))


# ---------------------------------------------------------------------------------- video


def test_moving_digits_shapes_labels_and_motion():
    data = moving_digits(6, num_frames=12, frame_size=48, digit_size=16, seed=5)
    assert data["frames"].shape == (6, 12, 48, 48, 1) and data["frames"].dtype == np.float32
    assert data["labels"].shape == (6, 2) and data["positions"].shape == (6, 12, 2, 2)
    assert 0.0 <= data["frames"].min() and data["frames"].max() <= 1.0
    again = moving_digits(6, num_frames=12, frame_size=48, digit_size=16, seed=5)
    for key in data:
        np.testing.assert_array_equal(data[key], again[key])
    other = moving_digits(6, num_frames=12, frame_size=48, digit_size=16, seed=6)
    assert not np.array_equal(data["frames"], other["frames"])
    clips = MovingDigits(6, num_frames=12, frame_size=48, digit_size=16, seed=5)
    np.testing.assert_array_equal(clips[4]["frames"], data["frames"][4])

    half = (16 - 1) / 2
    for n in range(6):
        k = int(data["num_digits"][n])
        labels = data["labels"][n]
        assert 1 <= k <= 2 and np.all((0 <= labels[:k]) & (labels[:k] <= 9))
        assert np.all(labels[k:] == -1) and np.all(data["positions"][n, :, k:] == 0)
        pos = data["positions"][n, :, :k]
        assert np.all((half <= pos) & (pos <= 48 - 1 - half))
        step = np.abs(np.diff(pos, axis=0)).max()
        assert 0 < step <= 3.0 + 1.0  # moves every clip, at most max speed (+1 for rounding)
        # ink only inside the digits' boxes, and every box holds ink
        inside = np.zeros((12, 48, 48), bool)
        for t in range(12):
            for d in range(k):
                r, c = (pos[t, d] - half).astype(int)
                inside[t, r:r + 16, c:c + 16] = True
                assert data["frames"][n, t, r:r + 16, c:c + 16].max() > 0.3
        assert np.all(data["frames"][n, ..., 0][~inside] == 0)


def test_moving_digits_batches():
    clips = MovingDigits(5, num_frames=4, frame_size=32, digit_size=16, seed=2)
    batch = next(iter(make_batches(clips, batch_size=2, seed=0)))  # this process's shard
    assert batch["frames"].shape == (2, 4, 32, 32, 1) and batch["labels"].shape == (2, 2)
    assert batch["positions"].shape == (2, 4, 2, 2) and batch["num_digits"].shape == (2,)


def test_moving_digits_splits_and_errors():
    train = MovingDigits(4, num_frames=3, seed=0, split="train")
    test = MovingDigits(4, num_frames=3, seed=0, split="test")
    assert not np.array_equal(train[0]["frames"], test[0]["frames"])
    with pytest.raises(ValueError, match="digit_size"):
        MovingDigits(2, frame_size=16, digit_size=24)
    with pytest.raises(ValueError, match="split"):
        MovingDigits(2, split="val")


# ---------------------------------------------------------------------------------- text


def test_text_corpus_split_and_windows():
    corpus = load_text_corpus("pydoc-topics", heldout_fraction=0.1, seed=1)
    names = [n for n, _ in load_documents("pydoc-topics")]
    assert not set(corpus.train_names) & set(corpus.heldout_names)
    assert sorted(corpus.train_names + corpus.heldout_names) == names
    assert len(corpus.heldout_names) == round(0.1 * len(names))
    assert load_text_corpus("pydoc-topics", heldout_fraction=0.1, seed=1).heldout_names == \
        corpus.heldout_names
    assert load_text_corpus("pydoc-topics", heldout_fraction=0.1, seed=2).heldout_names != \
        corpus.heldout_names
    tok = ByteTokenizer()
    assert int((corpus.train_tokens == tok.EOS).sum()) == len(corpus.train_names)
    first = dict(load_documents("pydoc-topics"))[corpus.train_names[0]]
    head = tok.decode(corpus.train_tokens[:200])
    assert len(head) > 100 and first.startswith(head)
    assert corpus.train_tokens.size > 300_000 and corpus.train_tokens.max() < tok.vocab_size

    windows = TokenWindows(corpus.heldout_tokens, window=33, stride=16)
    assert len(windows) == (corpus.heldout_tokens.size - 33) // 16 + 1
    w = windows[3]
    assert w.shape == (33,) and w.dtype == np.int32
    np.testing.assert_array_equal(w, corpus.heldout_tokens[48:81])
    with pytest.raises(ValueError, match="window"):
        TokenWindows(corpus.heldout_tokens[:10], window=11)


def test_text_python_docs_if_installed():
    if "python-docs" not in available_sources():
        pytest.skip("python3-doc is not installed (apt-get install python3-doc)")
    docs = load_documents("python-docs")
    assert len(docs) > 300 and sum(len(t) for _, t in docs) > 5_000_000
    assert any(name.startswith("tutorial/") for name, _ in docs)


# ---------------------------------------------------------------------------------- grain


def _windows():
    return TokenWindows(load_text_corpus("pydoc-topics", seed=0).heldout_tokens, window=17)


def test_batches_resume_from_saved_position():
    ds = make_batches(_windows(), batch_size=3, seed=11, shard_index=0, shard_count=1)
    it = iter(ds)
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]
    resumed = iter(ds)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert got.shape == (3, 17) and got.dtype == np.int32
        np.testing.assert_array_equal(got, want)


def test_batches_resume_through_orbax(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    ds = make_batches(_windows(), batch_size=2, seed=3, shard_index=0, shard_count=1)
    it = iter(ds)
    next(it), next(it)
    with ocp.CheckpointManager(str(tmp_path), item_names=("data",)) as mgr:
        mgr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
        expected = [next(it) for _ in range(3)]
        resumed = iter(ds)
        mgr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    for want in expected:
        np.testing.assert_array_equal(next(resumed), want)


def test_batches_shard_by_process_and_reshuffle_epochs():
    source = list(range(23))
    shards = []
    for index in range(2):
        ds = make_batches(source, batch_size=1, seed=4, num_epochs=2, shard_index=index,
                          shard_count=2)
        seen = [int(b[0]) for b in ds]
        assert len(seen) == 22  # 11 records per shard, 2 epochs
        first, second = seen[:11], seen[11:]
        assert sorted(first) == sorted(second) and first != second
        shards.append(set(first))
        again = make_batches(source, batch_size=1, seed=4, num_epochs=2, shard_index=index,
                             shard_count=2)
        assert [int(b[0]) for b in again] == seen
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(22))
    assert local_batch_size(8, 2) == 4
    with pytest.raises(ValueError, match="global_batch_size"):
        local_batch_size(6, 4)
    with pytest.raises(ValueError, match="shard_index"):
        make_batches(source, batch_size=1, seed=0, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="batch_size"):
        make_batches(source, batch_size=12, seed=0, shard_index=0, shard_count=2)
