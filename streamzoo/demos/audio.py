"""Audio in and out for the demos: espeak-ng speech and WAV files, as float32 mono.

The demos stream real audio: `synthesize` speaks text with espeak-ng, `load_wav` reads a
user's `--wav` file (16-bit PCM, any channel count, any rate, mixed to mono and resampled), and
`save_wav` writes a result. Errors name the option the user passed.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import wave

import numpy as np
from scipy.signal import resample_poly

SAMPLE_RATE = 16_000


class MissingToolError(RuntimeError):
    """A command-line tool the demo needs is not installed."""


def _resample(audio: np.ndarray, rate: int, sample_rate: int) -> np.ndarray:
    if rate == sample_rate:
        return audio
    g = np.gcd(rate, sample_rate)
    return resample_poly(audio, sample_rate // g, rate // g)


def synthesize(text: str, *, voice: str = "en-us", speed: int = 160, pitch: int = 50,
               sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`text` spoken by espeak-ng, as float32 mono audio in [-1, 1] at `sample_rate`."""
    if shutil.which("espeak-ng") is None:
        raise MissingToolError(
            "espeak-ng is not installed. The demo streams real synthesised speech and has no "
            "random-data fallback; install it with:\n"
            "    sudo apt-get update && sudo apt-get install -y espeak-ng")
    cmd = ["espeak-ng", "--stdout", "-v", voice, "-s", str(speed), "-p", str(pitch), text]
    done = subprocess.run(cmd, capture_output=True, check=False)
    if done.returncode or not done.stdout:
        raise RuntimeError(f"{' '.join(cmd)!r} failed: {done.stderr.decode(errors='replace')}")
    # espeak-ng streams its WAV, so the header's frame count is a placeholder: read what is there.
    with wave.open(io.BytesIO(done.stdout)) as wav:
        if wav.getsampwidth() != 2:
            raise RuntimeError(f"espeak-ng: expected 16-bit audio, got {8 * wav.getsampwidth()}-bit")
        rate, channels = wav.getframerate(), wav.getnchannels()
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), "<i2")
    audio = pcm.reshape(-1, channels).mean(axis=1) / 32768.0
    return _resample(audio, rate, sample_rate).astype(np.float32)


def load_wav(path: str, *, sample_rate: int = SAMPLE_RATE, min_samples: int = 1,
             option: str = "--wav") -> np.ndarray:
    """A 16-bit PCM WAV file as float32 mono in [-1, 1] at `sample_rate`; errors name `option`."""
    try:
        with wave.open(path, "rb") as w:
            if w.getsampwidth() != 2:
                raise ValueError(f"{option}: expected 16-bit PCM, got {8 * w.getsampwidth()}-bit "
                                 f"in {path}")
            rate, channels = w.getframerate(), w.getnchannels()
            pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    except (OSError, wave.Error) as err:
        raise ValueError(f"{option}: cannot read {path!r} as a WAV file ({err})") from None
    audio = _resample(pcm.reshape(-1, channels).mean(axis=1) / 32768.0, rate, sample_rate)
    if audio.shape[0] < min_samples:
        raise ValueError(f"{option}: expected at least {min_samples} samples "
                         f"({1000 * min_samples / sample_rate:g} ms) at {sample_rate} Hz, got "
                         f"{audio.shape[0]} in {path}")
    return audio.astype(np.float32)
