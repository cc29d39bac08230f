"""The codec demo: the checked-in trained codec encodes and decodes live, chunk by chunk.

Without `--wav`, espeak-ng speaks a sentence in a voice the codec never heard in training
(resampled to 16 kHz with sox, or scipy without it). The audio goes through the encoder one
jitted `step` per chunk (`--chunk-ms`, default one 20 ms frame), each chunk's codes go straight
into the decoder's `step`, and at the end of the stream `flush` completes the last partial
frame, so the reconstruction has exactly the input's length. The demo writes the
reconstruction (`--out`), prints the bitrate, the algorithmic latency (from the codec's
`StreamSpec`), the step time, the quality (SI-SDR, mel distance) and the largest deviation of
the stream from the offline `codec(x)` (codes must be identical; exit code 1 when the audio
differs by more than `--tolerance`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import wave

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from streamzoo.core.seq import Seq
from streamzoo.demos.audio import load_wav
from streamzoo.demos.options import positive_int, standalone
from streamzoo.zoo.weights import state_arrays

DESCRIPTION = "the trained streaming codec (checked-in weights): encode + decode live, write a WAV"
SAMPLE_RATE = 16_000
# "en-us+f3" is one of the held-out voices of the checked-in codec's corpus: no training
# utterance uses it (the demo checks and says so).
VOICE, SPEED, PITCH = "en-us+f3", 155, 55
TEXT = "The codec sends fifty frames a second, and the listener hears them right away."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wav", default=None,
                        help="a 16-bit WAV file to code (mono or mixed down; resampled to 16 kHz); "
                             "default: an espeak-ng sentence in a held-out voice")
    parser.add_argument("--out", default="codec_reconstruction.wav",
                        help="where to write the reconstruction (default: "
                             "codec_reconstruction.wav)")
    parser.add_argument("--codebooks", type=positive_int, default=None,
                        help="codebooks to use, 1..8 (default: all; fewer = lower bitrate)")
    parser.add_argument("--chunk-ms", type=positive_int, default=20,
                        help="audio per streaming step, a multiple of 20 ms (default: 20)")
    parser.add_argument("--weights", default=None,
                        help="codec .npz (default: the checked-in streamzoo/zoo/codec/weights)")
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="largest accepted |stream - offline| audio difference (default: 1e-5)")


def run_demo(argv: list[str] | None = None) -> int:
    """`streamzoo demo codec [options]` as a function of its arguments; returns the exit code."""
    return standalone(sys.modules[__name__], "codec", argv)


def run(args: argparse.Namespace) -> int:
    from streamzoo.zoo.codec.pretrained import load_pretrained, read_metadata
    from streamzoo.zoo.codec.quality import mel_distance, si_sdr

    try:
        codec = load_pretrained(args.weights)
        meta = read_metadata(args.weights)
        n_q = codec.quantizer.num_quantizers if args.codebooks is None else args.codebooks
        codec = codec.with_num_quantizers(n_q)
        hop = codec.hop
        chunk = args.chunk_ms * SAMPLE_RATE // 1000
        if chunk % hop:
            raise ValueError(f"--chunk-ms: expected a multiple of {1000 * hop // SAMPLE_RATE} ms "
                             f"(one frame), got {args.chunk_ms}")
        audio, source = _load_audio(args, meta)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"streamzoo demo codec: {err}", file=sys.stderr)
        return 2

    cfg = codec.config
    n = audio.shape[0]
    print(f"Input: {source}, {n / SAMPLE_RATE:.2f} s ({n} samples at 16 kHz)")
    params = sum(a.size for a in state_arrays(codec, nnx.Param).values())
    print(f"Codec: {params:,} parameters, hop {hop} samples ({cfg.frame_rate:g} frames/s), "
          f"{n_q} of {cfg.total_quantizers} codebooks x {cfg.codes_per_quantizer} codes "
          f"-> {cfg.bitrate(n_q) / 1000:g} kbit/s; trained {meta.get('step', '?')} steps")
    latency = algorithmic_latency(codec.spec)
    print(f"Algorithmic latency: {latency} samples = {1000 * latency / SAMPLE_RATE:.2f} ms "
          f"(a frame's audio comes out once its last sample is in: the codec is causal, "
          f"output_latency {codec.spec.output_latency}); plus the chunk buffering of "
          f"{args.chunk_ms} ms per step")

    codes, recon, step_ms, compile_ms = stream(codec, audio, chunk)
    # Offline: codec(x) is decode(encode(x)) cut to the input length (two programs, so the
    # encoder is compiled once for the codes and the audio).
    x = Seq.full(jnp.asarray(audio)[None, :, None])
    offline_codes = jax.jit(lambda m, v: m.encode(v))(codec, x)
    offline = np.asarray(jax.jit(lambda m, c: m.decode(c))(codec, offline_codes).values[0, :n, 0])
    offline_codes = np.asarray(offline_codes.values[0])
    same_codes = codes.shape == offline_codes.shape and np.array_equal(codes, offline_codes)
    deviation = (float(np.max(np.abs(recon - offline), initial=0.0))
                 if recon.shape == offline.shape else float("inf"))

    _write_wav(args.out, recon)
    bits = codes.size * np.log2(cfg.codes_per_quantizer)
    print(f"\nStreamed {len(step_ms)} steps of {args.chunk_ms} ms + flush: {codes.shape[0]} frames "
          f"x {codes.shape[1]} codes = {bits / 1000:.1f} kbit for {n / SAMPLE_RATE:.2f} s "
          f"({bits / (n / SAMPLE_RATE) / 1000:.2f} kbit/s incl. the partial last frame)")
    rtf = np.median(step_ms) / args.chunk_ms
    print(f"Step time (encoder step + decoder step, jit_step, "
          f"{jax.devices()[0].platform}): "
          f"p50 {np.median(step_ms):.2f} ms, p90 {np.percentile(step_ms, 90):.2f} ms per "
          f"{args.chunk_ms} ms chunk (real-time factor {rtf:.3f}; compile {compile_ms:.0f} ms)")
    print(f"Quality vs the input: SI-SDR {si_sdr(audio, recon):.2f} dB, mel distance "
          f"{mel_distance(audio, recon):.3f}")
    print(f"Wrote {args.out} ({recon.shape[0]} samples = the input length: "
          f"{recon.shape[0] == n})")
    if not same_codes:
        print("\nFAIL: streamed codes differ from the offline codes", file=sys.stderr)
        return 1
    if not deviation <= args.tolerance:
        print(f"\nFAIL: stream and offline audio differ by {deviation:.2e} > {args.tolerance:g}",
              file=sys.stderr)
        return 1
    print(f"OK: stream == offline (codes identical, max |audio difference| {deviation:.2e} "
          f"<= {args.tolerance:g}, same length)")
    return 0


# ---------------------------------------------------------------------------- streaming
def stream(codec, audio: np.ndarray, chunk: int):
    """Encode and decode `audio` live, `chunk` samples per step, then flush.

    Returns (codes [frames, n_q], reconstruction [len(audio)], step times ms, compile ms).
    """
    from streamzoo.core.drivers import jit_flush, jit_step
    from streamzoo.core.packed import pack_carry

    enc_module, dec_module = codec.encoder(), codec.decoder()
    hop = codec.hop
    # Modules split into parameter leaves once: a module argument costs ~2 ms per call to flatten.
    enc_step, dec_step = jit_step(enc_module), jit_step(dec_module)
    enc_flush = jit_flush(enc_module)
    # Carries packed into one buffer per dtype: ~2 arrays per call instead of ~70.
    ec, dc = pack_carry(enc_module.init_carry(1)), pack_carry(dec_module.init_carry(1))
    n = audio.shape[0]
    padded = np.pad(audio, (0, -n % chunk))

    def piece(begin):
        valid = min(chunk, n - begin)  # the zero padding is not committed
        return Seq.from_lengths(jnp.asarray(padded[None, begin:begin + chunk, None]),
                                jnp.asarray([valid]))

    t0 = time.perf_counter()
    x0 = piece(0)
    ec_c, codes0 = enc_step(ec, x0)
    jax.block_until_ready(dec_step(dc, codes0))
    compile_ms = (time.perf_counter() - t0) * 1e3

    codes, out, times = [], [], []
    for begin in range(0, padded.shape[0], chunk):
        x = piece(begin)
        t = time.perf_counter()
        ec, c = enc_step(ec, x)
        dc, y = dec_step(dc, c)
        jax.block_until_ready(y)
        times.append((time.perf_counter() - t) * 1e3)
        codes.append(np.asarray(c.values[0])[np.asarray(c.mask[0])])
        out.append(np.asarray(y.values[0, :, 0])[np.asarray(y.mask[0])])
    # End of stream: the encoder completes the partial frame with zeros and emits its codes;
    # the decoder turns them into one frame of audio, of which the first n mod hop samples
    # belong to the input (what `Codec.flush` does in one call).
    ec, c = enc_flush(ec)
    tail_codes = np.asarray(c.values[0])[np.asarray(c.mask[0])]
    if tail_codes.shape[0]:
        dc, y = dec_step(dc, c)
        tail = np.asarray(y.values[0, :, 0])[np.asarray(y.mask[0])]
        codes.append(tail_codes)
        out.append(tail[:n % hop])
    return (np.concatenate(codes), np.concatenate(out).astype(np.float32), np.array(times),
            compile_ms)


def algorithmic_latency(spec) -> int:
    """Worst case over output samples j of (input samples needed to emit j) - (j + 1):
    how long a sample waits inside the codec, from its `StreamSpec`."""
    block = int(round(spec.block_size / float(spec.output_ratio)))
    worst = 0
    for j in range(max(block, 1)):
        lo, hi = 0, 1
        while spec.outputs_after(hi) <= j:
            hi *= 2
        while lo < hi:  # the smallest n with outputs_after(n) > j
            mid = (lo + hi) // 2
            if spec.outputs_after(mid) > j:
                hi = mid
            else:
                lo = mid + 1
        worst = max(worst, lo - (j + 1))
    return worst


# -------------------------------------------------------------------------------- audio
def _load_audio(args, meta) -> tuple[np.ndarray, str]:
    if args.wav:
        return load_wav(args.wav), args.wav
    audio = synthesize(TEXT, VOICE, SPEED, PITCH)
    voices = _training_voices(meta)
    seen = "" if voices is None else (" (a voice NOT in the training split)"
                                      if VOICE not in voices else " (a training voice)")
    return audio, f"espeak-ng '{TEXT}' in voice {VOICE}{seen}"


def _training_voices(meta) -> set | None:
    """The voices of the training split the checked-in weights were trained on (no audio
    is generated: the split is planned from the corpus config alone)."""
    try:
        from streamzoo.train.data.speech import SpeechCorpusConfig, plan_utterances

        args = meta["train_config"]["model_args"]
        cfg = SpeechCorpusConfig(num_utterances=args.get("num_utterances", 1200),
                                 seed=args.get("corpus_seed", 0),
                                 test_fraction=args.get("test_fraction", 0.2))
        return {e["voice"] for e in plan_utterances(cfg) if e["split"] == "train"}
    except (KeyError, TypeError, ValueError):
        return None


def synthesize(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng speech as float32 16 kHz mono (sox resamples when installed, else scipy)."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng sox); or pass "
                           "--wav FILE")
    accent, variant = voice.split("+")
    cmd = ["espeak-ng", "--stdout", "-v", f"{accent}+{variant}", "-s", str(speed), "-p",
           str(pitch), text]
    raw = subprocess.run(cmd, capture_output=True, check=False)
    if raw.returncode or not raw.stdout:
        raise RuntimeError(f"{' '.join(cmd)!r} failed: {raw.stderr.decode(errors='replace')}")
    if shutil.which("sox"):
        done = subprocess.run(["sox", "-R", "-D", "-V1", "-t", "wav", "-", "-t", "raw", "-r",
                               str(SAMPLE_RATE), "-c", "1", "-b", "16", "-e", "signed-integer",
                               "-L", "-"], input=raw.stdout, capture_output=True, check=False)
        if done.returncode:
            raise RuntimeError(f"sox failed: {done.stderr.decode(errors='replace')}")
        return np.frombuffer(done.stdout, "<i2").astype(np.float32) / 32768.0
    from streamzoo.train.data.speech import _parse_espeak_wav, _resample_int16

    pcm, rate = _parse_espeak_wav(raw.stdout)
    return _resample_int16(pcm, rate, SAMPLE_RATE).astype(np.float32) / 32768.0


def _write_wav(path: str, samples: np.ndarray) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        pcm = np.clip(np.rint(samples * 32768.0), -32768, 32767).astype("<i2")
        w.writeframes(pcm.tobytes())


if __name__ == "__main__":
    sys.exit(run_demo())
