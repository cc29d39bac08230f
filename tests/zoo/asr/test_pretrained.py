"""The shipped ASR checkpoint: size, format (npz + JSON, no orbax), exact export/load
round-trip, and that it transcribes an utterance of a voice unseen in training."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from flax import nnx

from streamzoo.zoo.asr.model import ASRModel, transcribe
from streamzoo.zoo.asr.pretrained import (default_path, export_pretrained, load_pretrained,
                                          pretrained_info)
from streamzoo.zoo.asr.text import char_error_rate
from streamzoo.zoo.weights import state_arrays

SHIPPED = default_path()


@pytest.fixture(scope="module")
def model() -> ASRModel:
    return load_pretrained()


def test_files_and_size():
    npz, js = f"{SHIPPED}.npz", f"{SHIPPED}.json"
    assert os.path.getsize(npz) + os.path.getsize(js) <= 10 * 2**20
    info = pretrained_info()
    assert info["train_step"] > 0 and "held_out" in info
    with np.load(npz) as data:
        assert all(data[k].dtype == np.float32 for k in data.files)


def test_round_trip(model, tmp_path):
    stem = str(tmp_path / "copy")
    export_pretrained(model, stem, {"note": "copy"})
    again = load_pretrained(stem)
    a, b = state_arrays(model), state_arrays(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert again.config == model.config
    assert pretrained_info(stem)["note"] == "copy"


def test_bad_paths_and_arrays(model, tmp_path):
    with pytest.raises(ValueError, match="path"):
        load_pretrained(str(tmp_path / "missing"))
    from streamzoo.zoo.weights import load_state_arrays
    arrays = state_arrays(model)
    arrays.pop(next(iter(arrays)))
    with pytest.raises(ValueError, match="missing"):
        load_state_arrays(ASRModel(model.config, rngs=nnx.Rngs(0)), arrays)


def test_transcribes_unseen_voice(model):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    from streamzoo.demos.core_stack import synthesize
    text = "green boat"
    audio = np.concatenate([np.zeros(1600, np.float32),
                            synthesize(text, voice="en-us+m3", speed=160),
                            np.zeros(1600, np.float32)])
    hyp = transcribe(model, [audio], batch_size=1)[0]
    assert char_error_rate([text], [hyp]) <= 0.5, hyp
