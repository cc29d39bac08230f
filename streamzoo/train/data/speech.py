"""A synthetic-but-real speech corpus: espeak-ng reads random English words in many voices.

Each utterance is 1-5 words from a fixed vocabulary of common English words (`words.txt`,
shipped with the package so a seed gives the same corpus on every machine), spoken by a random
speaker (an espeak-ng accent such as `en-gb-scotland` plus a voice variant such as `+m3`,
`+f2`, `+croak`, `+whisper`) at a random speed (words/min) and pitch. Audio is 16 kHz mono
int16 WAV:

    espeak-ng --stdout -v VOICE -s SPEED -p PITCH TEXT |
        sox -R -D -t wav - -r 16000 -c 1 -b 16 OUT.wav

(`-R -D`: repeatable, no dither, so the bytes depend only on the inputs), or, without sox, the
espeak-ng stream resampled 22050 -> 16000 Hz with `scipy.signal.resample_poly` (different,
equally deterministic audio; the backend is part of the cache key).

The audio of a seed is byte-identical for the same espeak-ng and sox versions (recorded in
`config.json`; espeak-ng 1.51 and SoX 14.4.2 on Debian 12). The split is speaker-disjoint: a
seeded `heldout_speaker_fraction` of the speakers is held out and only they speak the `test`
utterances. All randomness is drawn up front from the seed, so the corpus does not depend on
the number of workers. The corpus lives in
`<cache_dir>/speech-<hash of the config>/` (`manifest.jsonl`, `config.json`, `wav/*.wav`); a
second call with the same config reads it back without running espeak-ng.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import importlib.resources
import io
import json
import math
import os
import shutil
import subprocess
import threading
import wave
from collections.abc import Sequence

import numpy as np

from streamzoo.train.data.tokenizers import PAD

SAMPLE_RATE = 16000
SPLITS = ("train", "test")
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd", "en-us-nyc")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "croak",
            "whisper", "klatt", "klatt2", "klatt3", "klatt4")
# espeak-ng 1.51 resolves "en-gb" to a voice that ignores "+variant"; "en" is the same
# English (Great Britain) voice with variants working.
_ESPEAK_VOICE = {"en-gb": "en"}
_FORMAT_VERSION = 1  # bump when the generated audio or manifest layout changes


def load_vocabulary() -> tuple[str, ...]:
    """The shipped vocabulary: common English words, each in Debian's /usr/share/dict/words."""
    text = importlib.resources.files("streamzoo.train.data").joinpath("words.txt").read_text()
    return tuple(w for w in (line.strip() for line in text.splitlines())
                 if w and not w.startswith("#"))


@dataclasses.dataclass(frozen=True)
class SpeechCorpusConfig:
    """Everything that determines the corpus (and its cache directory)."""

    num_utterances: int = 1000
    seed: int = 0
    test_fraction: float = 0.2  # of utterances, all spoken by held-out speakers
    heldout_speaker_fraction: float = 0.2  # of the accent x variant speakers
    words_per_utterance: tuple[int, int] = (1, 5)
    speed: tuple[int, int] = (130, 200)  # espeak-ng -s, words per minute
    pitch: tuple[int, int] = (25, 75)  # espeak-ng -p, 0..99
    accents: tuple[str, ...] = ACCENTS
    variants: tuple[str, ...] = VARIANTS
    vocabulary: tuple[str, ...] | None = None  # None: `load_vocabulary()`

    def __post_init__(self):
        if self.num_utterances < 1:
            raise ValueError(f"num_utterances: expected >= 1, got {self.num_utterances}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction: expected in [0, 1), got {self.test_fraction}")
        if not 0.0 < self.heldout_speaker_fraction < 1.0:
            raise ValueError(f"heldout_speaker_fraction: expected in (0, 1), got "
                             f"{self.heldout_speaker_fraction}")
        for name, (lo, hi), bounds in (("words_per_utterance", self.words_per_utterance, (1, 100)),
                                       ("speed", self.speed, (80, 450)),
                                       ("pitch", self.pitch, (0, 99))):
            if not bounds[0] <= lo <= hi <= bounds[1]:
                raise ValueError(f"{name}: expected (min, max) with {bounds[0]} <= min <= max "
                                 f"<= {bounds[1]}, got {(lo, hi)}")
        if len(self.speakers()) < 2:
            raise ValueError(f"accents/variants: expected >= 2 speakers, got {self.speakers()}")
        if self.vocabulary is not None and not self.vocabulary:
            raise ValueError("vocabulary: expected a non-empty word tuple or None, got ()")

    def speakers(self) -> list[str]:
        """All `accent+variant` voices, sorted."""
        return sorted(f"{a}+{v}" for a in self.accents for v in self.variants)

    def heldout_speakers(self) -> list[str]:
        speakers = self.speakers()
        k = min(max(1, round(len(speakers) * self.heldout_speaker_fraction)), len(speakers) - 1)
        order = np.random.default_rng([self.seed, 1]).permutation(len(speakers))
        return sorted(speakers[i] for i in order[:k])

    def words(self) -> tuple[str, ...]:
        return load_vocabulary() if self.vocabulary is None else tuple(self.vocabulary)


@dataclasses.dataclass(frozen=True)
class SpeechCorpus:
    """A generated corpus: `records` are manifest entries with `path` made absolute."""

    root: str
    config: SpeechCorpusConfig
    backend: str
    records: tuple[dict, ...]

    def split(self, name: str) -> list[dict]:
        if name not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {name!r}")
        return [r for r in self.records if r["split"] == name]

    def speakers(self, split: str) -> set[str]:
        return {r["voice"] for r in self.split(split)}


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def _resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "sox" if shutil.which("sox") else "scipy"
    if backend not in ("sox", "scipy"):
        raise ValueError(f"backend: expected 'auto', 'sox' or 'scipy', got {backend!r}")
    if backend == "sox" and not shutil.which("sox"):
        raise RuntimeError("backend='sox': sox is not installed (apt-get install sox)")
    return backend


def _cache_key(config: SpeechCorpusConfig, backend: str) -> str:
    fields = dataclasses.asdict(config)
    fields["vocabulary"] = config.words()
    blob = json.dumps({"v": _FORMAT_VERSION, "backend": backend, "config": fields},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def plan_utterances(config: SpeechCorpusConfig) -> list[dict]:
    """The manifest entries without audio facts: all randomness of the corpus, from the seed."""
    rng = np.random.default_rng([config.seed, 0])
    words = config.words()
    heldout = config.heldout_speakers()
    pools = {"train": [s for s in config.speakers() if s not in heldout], "test": heldout}
    n_test = round(config.num_utterances * config.test_fraction)
    splits = np.array(["train"] * (config.num_utterances - n_test) + ["test"] * n_test)
    splits = splits[rng.permutation(config.num_utterances)]
    plan = []
    for i, split in enumerate(splits.tolist()):
        voice = pools[split][int(rng.integers(len(pools[split])))]
        lo, hi = config.words_per_utterance
        n_words = int(rng.integers(lo, hi + 1))
        text = " ".join(words[j] for j in rng.integers(len(words), size=n_words))
        accent, variant = voice.split("+")
        plan.append({
            "id": f"{i:06d}", "path": f"wav/{i:06d}.wav", "text": text, "voice": voice,
            "accent": accent, "variant": variant,
            "speed": int(rng.integers(config.speed[0], config.speed[1] + 1)),
            "pitch": int(rng.integers(config.pitch[0], config.pitch[1] + 1)),
            "split": split,
        })
    return plan


def _synthesize(entry: dict, out_path: str, backend: str) -> None:
    """Speak one planned utterance into `out_path` (16 kHz mono int16), atomically."""
    voice = f"{_ESPEAK_VOICE.get(entry['accent'], entry['accent'])}+{entry['variant']}"
    espeak = ["espeak-ng", "--stdout", "-v", voice, "-s", str(entry["speed"]),
              "-p", str(entry["pitch"]), entry["text"]]
    tmp = f"{out_path}.{os.getpid()}.{threading.get_ident()}.tmp"
    raw = _run(espeak)
    if backend == "sox":
        _run(["sox", "-R", "-D", "-V1", "-t", "wav", "-", "-t", "wav", "-r", str(SAMPLE_RATE),
              "-c", "1", "-b", "16", tmp], stdin=raw)
    else:
        audio, rate = _parse_espeak_wav(raw)
        _write_wav(tmp, _resample_int16(audio, rate, SAMPLE_RATE), SAMPLE_RATE)
    os.replace(tmp, out_path)


def _check_variants(variants: Sequence[str]) -> None:
    """espeak-ng silently ignores an unknown `+variant`; fail instead."""
    version = _run(["espeak-ng", "--version"]).decode(errors="replace")
    data = version.split("Data at:")[-1].strip()
    known = set(os.listdir(os.path.join(data, "voices", "!v"))) if os.path.isdir(data) else None
    missing = [v for v in variants if known is not None and v not in known]
    if missing:
        raise ValueError(f"variants: expected espeak-ng variants from {sorted(known)}, got "
                         f"unknown {missing}")


def _run(cmd: list[str], stdin: bytes | None = None) -> bytes:
    done = subprocess.run(cmd, input=stdin, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed (exit {done.returncode}) on {cmd!r}: "
                           f"{done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def _parse_espeak_wav(raw: bytes) -> tuple[np.ndarray, int]:
    """int16 samples and rate of espeak-ng's streamed WAV (its size fields are placeholders)."""
    if raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise RuntimeError(f"espeak-ng: expected a WAV stream, got {raw[:12]!r}")
    pos, rate = 12, None
    while pos + 8 <= len(raw):
        tag, size = raw[pos:pos + 4], int.from_bytes(raw[pos + 4:pos + 8], "little")
        if tag == b"fmt ":
            rate = int.from_bytes(raw[pos + 12:pos + 16], "little")
        elif tag == b"data":
            data = raw[pos + 8:]
            return np.frombuffer(data[:len(data) // 2 * 2], "<i2"), rate
        pos += 8 + size
    raise RuntimeError("espeak-ng: WAV stream without a data chunk")


def _resample_int16(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    from scipy.signal import resample_poly

    g = math.gcd(rate, target)
    out = resample_poly(audio.astype(np.float64), target // g, rate // g)
    return np.clip(np.rint(out), -32768, 32767).astype(np.int16)


def _write_wav(path: str, samples: np.ndarray, rate: int) -> None:
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())


def _num_frames(path: str) -> tuple[int, int]:
    with wave.open(path, "rb") as w:
        return w.getnframes(), w.getframerate()


def read_wav(path: str) -> tuple[np.ndarray, int]:
    """`(samples float32 in [-1, 1), sample_rate)` of a mono 16-bit WAV."""
    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"path: expected mono 16-bit WAV, got {w.getnchannels()} channel(s) "
                             f"of {8 * w.getsampwidth()} bits in {path}")
        data = w.readframes(w.getnframes())
        rate = w.getframerate()
    return np.frombuffer(data, "<i2").astype(np.float32) / 32768.0, rate


def generate_speech_corpus(cache_dir: str, config: SpeechCorpusConfig = SpeechCorpusConfig(), *,
                           num_workers: int = 2, backend: str = "auto",
                           progress: bool = True) -> SpeechCorpus:
    """Generate (or load from `cache_dir`) the corpus of `config`; see the module docstring.

    `num_workers` espeak-ng/sox pipelines run at once (threads that wait on the subprocesses:
    the work is in espeak-ng and sox, and no Python process is forked, which matters after JAX
    has started its threads). Interrupted runs resume: finished WAVs are kept.
    """
    if not espeak_available():
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng sox)")
    if num_workers < 1:
        raise ValueError(f"num_workers: expected >= 1, got {num_workers}")
    backend = _resolve_backend(backend)
    _check_variants(config.variants)
    root = os.path.join(os.path.abspath(cache_dir), f"speech-{_cache_key(config, backend)}")
    manifest = os.path.join(root, "manifest.jsonl")
    if os.path.exists(manifest):
        return load_speech_corpus(root)

    os.makedirs(os.path.join(root, "wav"), exist_ok=True)
    plan = plan_utterances(config)
    todo = [e for e in plan if not os.path.exists(os.path.join(root, e["path"]))]
    from tqdm.auto import tqdm

    with tqdm(total=len(plan), initial=len(plan) - len(todo), desc="espeak-ng speech",
              unit="utt", disable=not progress) as bar, \
            concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
        futures = [pool.submit(_synthesize, e, os.path.join(root, e["path"]), backend)
                   for e in todo]
        for future in concurrent.futures.as_completed(futures):
            future.result()
            bar.update(1)

    lines = []
    for entry in plan:
        frames, rate = _num_frames(os.path.join(root, entry["path"]))
        lines.append(json.dumps({**entry, "duration": round(frames / rate, 4),
                                 "num_samples": frames, "sample_rate": rate}))
    config_blob = {"backend": backend, "format_version": _FORMAT_VERSION,
                   "tools": _tool_versions(backend), "config": dataclasses.asdict(config),
                   "words": config.words()}
    _write_atomic(os.path.join(root, "config.json"), json.dumps(config_blob, indent=1))
    _write_atomic(manifest, "\n".join(lines) + "\n")  # last: its presence means complete
    return load_speech_corpus(root)


def _tool_versions(backend: str) -> dict[str, str]:
    """Provenance: the audio of a seed is reproducible for these exact tool versions."""
    tools = ["espeak-ng", "sox"] if backend == "sox" else ["espeak-ng"]
    return {tool: _run([tool, "--version"]).decode(errors="replace").strip() for tool in tools}


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_speech_corpus(root: str) -> SpeechCorpus:
    """Read a generated corpus directory back (paths in `records` become absolute)."""
    with open(os.path.join(root, "config.json")) as f:
        blob = json.load(f)
    fields = blob["config"]
    config = SpeechCorpusConfig(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in fields.items()})
    with open(os.path.join(root, "manifest.jsonl")) as f:
        records = tuple({**r, "path": os.path.join(root, r["path"])}
                        for r in map(json.loads, f) if r)
    if len(records) != config.num_utterances:
        raise ValueError(f"root: expected {config.num_utterances} manifest entries, got "
                         f"{len(records)} in {root}")
    return SpeechCorpus(root=root, config=config, backend=blob["backend"], records=records)


class SpeechExamples(Sequence):
    """Random-access `{"audio": float32 [S], "tokens": int32 [L]}` of manifest records, for
    `make_batches(..., batch_fn=pad_speech_batch)`. `tokenizer` is a `CharTokenizer` or
    `WordTokenizer` (any object with `encode(text) -> int array`)."""

    def __init__(self, records: Sequence[dict], tokenizer):
        if not records:
            raise ValueError("records: expected at least one manifest record, got none")
        self.records = list(records)
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = self.records[index]
        audio, rate = read_wav(record["path"])
        if rate != SAMPLE_RATE:
            raise ValueError(f"sample rate: expected {SAMPLE_RATE}, got {rate} in {record['path']}")
        return {"audio": audio, "tokens": self.tokenizer.encode(record["text"])}


def pad_speech_batch(examples: Sequence[dict], *, audio_multiple: int = SAMPLE_RATE // 2,
                     token_multiple: int = 8) -> dict[str, np.ndarray]:
    """Pad a list of `SpeechExamples` items into `audio [B, S]`, `audio_lengths [B]`,
    `tokens [B, L]`, `token_lengths [B]`. S and L are the longest item rounded up to a multiple
    (so few distinct shapes reach `jax.jit`); padding is 0 (`PAD` for tokens)."""
    audio_lengths = np.array([len(e["audio"]) for e in examples], np.int32)
    token_lengths = np.array([len(e["tokens"]) for e in examples], np.int32)
    s = -(-int(audio_lengths.max()) // audio_multiple) * audio_multiple
    n = max(1, -(-int(token_lengths.max()) // token_multiple)) * token_multiple
    audio = np.zeros((len(examples), s), np.float32)
    tokens = np.full((len(examples), n), PAD, np.int32)
    for row, e in enumerate(examples):
        audio[row, :len(e["audio"])] = e["audio"]
        tokens[row, :len(e["tokens"])] = e["tokens"]
    return {"audio": audio, "audio_lengths": audio_lengths, "tokens": tokens,
            "token_lengths": token_lengths}


def wav_bytes(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """An in-memory int16 WAV of float samples in [-1, 1] (for notebooks' audio widgets)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        pcm = np.clip(np.rint(np.asarray(samples) * 32768.0), -32768, 32767).astype("<i2")
        w.writeframes(pcm.tobytes())
    return buf.getvalue()
