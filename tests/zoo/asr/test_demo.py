"""`streamzoo demo asr`: transcribes espeak-ng speech or a WAV file chunk by chunk with the
shipped checkpoint; argument errors exit with 2."""

from __future__ import annotations

import shutil
import wave

import numpy as np
import pytest

from streamzoo.zoo.asr import demo


def test_demo_on_wav(tmp_path, capsys):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    from streamzoo.demos.core_stack import synthesize
    audio = synthesize("black dog", voice="en-gb-x-rp+m1")
    path = tmp_path / "x.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    assert demo.main(["--wav", str(path), "--chunk-ms", "160", "--lookahead-ms", "80"]) == 0
    out = capsys.readouterr().out
    assert "Transcript:" in out and "real-time factor" in out
    assert "OK: streamed transcript == offline" in out


@pytest.mark.parametrize("argv", [["--chunk-ms", "100"], ["--lookahead-ms", "30"],
                                  ["--wav", "/nonexistent.wav"]])
def test_demo_bad_arguments(argv, capsys):
    assert demo.main(argv) == 2
    assert "streamzoo demo asr:" in capsys.readouterr().err
