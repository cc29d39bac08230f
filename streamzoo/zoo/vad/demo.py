"""The VAD demo: Silero VAD's real weights, streamed chunk by chunk over real speech.

Without `--wav`, espeak-ng speaks two sentences; they are laid out with stretches of digital
silence and of white noise between and around them (16 kHz). The audio is streamed through
the ported Silero VAD one step at a time (`--chunks` 512-sample chunks per jitted step), and
the online segment tracker turns the probabilities into speech segments as they become final.
The demo prints the per-chunk probability timeline, the segments (with where the speech was
placed, for synthesised input), the step latency, and the largest deviation of the stream from
the offline call (exit code 1 when it exceeds `--tolerance`) and, when onnxruntime is
installed, from the original ONNX model.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from streamzoo.core.drivers import jit_step
from streamzoo.core.packed import pack_carry
from streamzoo.core.seq import Seq
from streamzoo.demos.audio import MissingToolError, load_wav, synthesize
from streamzoo.demos.options import positive_int, standalone
from streamzoo.zoo.vad.segments import SegmentConfig, SegmentTracker
from streamzoo.zoo.vad.silero import CHUNK, CONTEXT, SAMPLE_RATE, SileroVAD, wheel_data_dir

DESCRIPTION = "Silero VAD (real weights) streamed over espeak-ng speech, silence and noise"

# (voice, words per minute, pitch, text)
UTTERANCES = [
    ("en-us", 160, 50, "Voice activity detection runs while the audio is still arriving."),
    ("en-gb-scotland", 175, 60, "Each chunk is thirty two milliseconds."),
]
LEVELS_UTF8 = " ▁▂▃▄▅▆▇█"
LEVELS_ASCII = " .:-=+*#%@"
CHUNK_MS = 1000 * CHUNK / SAMPLE_RATE  # 32 ms


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wav", default=None,
                        help="a mono 16-bit WAV file to run on (resampled to 16 kHz); default: "
                             "espeak-ng speech with silence and noise around it")
    parser.add_argument("--chunks", type=positive_int, default=1,
                        help="512-sample chunks per streaming step (default: 1, i.e. 32 ms)")
    parser.add_argument("--onset", type=float, default=0.5,
                        help="probability that opens a speech segment (default: 0.5)")
    parser.add_argument("--offset", type=float, default=None,
                        help="probability below which silence counts (default: onset - 0.15)")
    parser.add_argument("--width", type=positive_int, default=64,
                        help="timeline characters per line (default: 64 chunks = 2.05 s)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted |stream - offline| (default: 1e-4; float32 "
                             "matmuls over different chunk counts round differently, ~1e-6)")


def run_demo(argv: list[str] | None = None) -> int:
    """`streamzoo demo vad [options]` as a function of its arguments; returns the exit code."""
    return standalone(sys.modules[__name__], "vad", argv)


def run(args: argparse.Namespace) -> int:
    try:
        model = SileroVAD.from_pretrained()
    except FileNotFoundError as err:
        print(f"streamzoo demo vad: {err}", file=sys.stderr)
        return 2
    try:
        config = SegmentConfig(onset=args.onset, offset=args.offset)
        audio, truth, source = _load_audio(args)
    except (ValueError, RuntimeError) as err:
        print(f"streamzoo demo vad: {err}", file=sys.stderr)
        return 2

    n = audio.shape[0]
    print(f"Input: {source}, {n / SAMPLE_RATE:.2f} s at 16 kHz ({n // CHUNK} chunks of {CHUNK} "
          f"samples = {CHUNK_MS:g} ms; a partial last chunk gives no probability)")
    print("Model: Silero VAD v6 16 kHz, weights from the silero-vad wheel "
          f"({_param_count(model):,} values: the LSTM's two bias vectors are stored summed); "
          f"carry {_carry_bytes(model):,} bytes per stream")

    probs, step_ms, compile_ms, events = _stream(model, audio, args.chunks, config)
    reference = np.asarray(jax.jit(lambda m, x: m(x))(model, _as_seq(audio)).values[0, :, 0])
    deviation = float(np.max(np.abs(probs - reference), initial=0.0))

    levels = _levels()
    print(f"\nSpeech probability per {CHUNK_MS:g} ms chunk ('{levels[0]}' = 0 .. "
          f"'{levels[-1]}' = 1; 'S' marks the detected segments):")
    print(_timeline(probs, [s for _, s in events], truth, args.width))

    print("\nSegments, as the online tracker released them:")
    for t, seg in events:
        a, b = seg.seconds(SAMPLE_RATE)
        print(f"  at {t:6.2f} s of audio: speech {a:6.2f} .. {b:6.2f} s ({b - a:.2f} s)")
    if not events:
        print("  (none)")
    if truth:
        placed = ", ".join(f"{a / SAMPLE_RATE:.2f} .. {b / SAMPLE_RATE:.2f} s" for a, b in truth)
        print(f"  speech was placed at: {placed}")

    rtf = np.median(step_ms) / (args.chunks * CHUNK_MS)
    print(f"\nStreaming: {len(step_ms)} jitted steps of {args.chunks} chunk(s) on "
          f"{jax.devices()[0].platform}: p50 {np.median(step_ms):.3f} ms, p90 "
          f"{np.percentile(step_ms, 90):.3f} ms per step (compile {compile_ms:.0f} ms), "
          f"real-time factor {rtf:.4f}")
    onnx_dev = _onnx_deviation(audio, probs)
    if onnx_dev is not None:
        print(f"Original ONNX model (onnxruntime): max |JAX - ONNX| = {onnx_dev:.2e}")
    if not deviation <= args.tolerance:
        print(f"\nFAIL: stream and offline differ by {deviation:.2e} > {args.tolerance:g}",
              file=sys.stderr)
        return 1
    print(f"OK: stream == offline (max deviation {deviation:.2e} <= {args.tolerance:g})")
    return 0


# ------------------------------------------------------------------------------ audio
def _load_audio(args) -> tuple[np.ndarray, list[tuple[int, int]], str]:
    if args.wav:
        return load_wav(args.wav, min_samples=CHUNK), [], args.wav

    rng = np.random.default_rng(args.seed)
    try:
        speech = [synthesize(text, voice=voice, speed=speed, pitch=pitch)
                  for voice, speed, pitch, text in UTTERANCES]
    except MissingToolError as err:
        raise RuntimeError(str(err)) from None

    def noise(seconds, level):
        return (level * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)

    parts = [np.zeros(SAMPLE_RATE, np.float32), speech[0], noise(1.2, 0.02), speech[1],
             noise(0.8, 0.005), np.zeros(SAMPLE_RATE // 2, np.float32)]
    audio = np.concatenate(parts)
    starts = np.cumsum([0] + [p.shape[0] for p in parts])
    truth = [_trim(speech[0], starts[1]), _trim(speech[1], starts[3])]
    return audio, truth, ("espeak-ng speech (2 sentences), 1 s silence before, 1.2 s of white "
                          "noise (std 0.02) between, 0.8 s of noise (std 0.005) and 0.5 s "
                          "silence after")


def _trim(x: np.ndarray, offset: int) -> tuple[int, int]:
    """Sample range of x (placed at offset) without espeak-ng's own leading/trailing silence."""
    loud = np.nonzero(np.abs(x) > 0.01)[0]
    return (offset + int(loud[0]), offset + int(loud[-1]) + 1) if loud.size else (offset, offset)


# ------------------------------------------------------------------------ streaming
def _as_seq(audio: np.ndarray) -> Seq:
    return Seq.full(jnp.asarray(audio)[None, :, None])


def _stream(model, audio, chunks_per_step, config):
    """Step through the audio as a live stream; returns probs, step times, compile time and
    the `(seconds of audio seen, segment)` events of the online tracker."""
    size = chunks_per_step * CHUNK
    padded = np.pad(audio, (0, -audio.shape[0] % size))
    length = jnp.asarray([0])
    carry = pack_carry(model.init_carry(1))  # one buffer per dtype crosses each call
    first = Seq.from_lengths(jnp.asarray(padded[None, :size, None]), length + size)
    start = time.perf_counter()
    step = jit_step(model).compile(carry, first)
    compile_ms = (time.perf_counter() - start) * 1e3
    tracker, probs, times, events = SegmentTracker(config), [], [], []
    for begin in range(0, padded.shape[0], size):
        valid = min(size, audio.shape[0] - begin)  # the zero padding is not committed
        x = Seq.from_lengths(jnp.asarray(padded[None, begin:begin + size, None]), length + valid)
        t0 = time.perf_counter()
        carry, y = step(carry, x)
        jax.block_until_ready(y)
        times.append((time.perf_counter() - t0) * 1e3)
        p = np.asarray(y.values[0, :, 0])[np.asarray(y.mask[0])]
        probs.append(p)
        seen = (begin + valid) / SAMPLE_RATE
        events += [(seen, s) for s in tracker.push(p)]
    events += [(audio.shape[0] / SAMPLE_RATE, s) for s in tracker.finish()]
    return np.concatenate(probs), np.array(times), compile_ms, events


def _onnx_deviation(audio: np.ndarray, probs: np.ndarray) -> float | None:
    """Max |probs - the wheel's ONNX model run by onnxruntime|, or None without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(f"{wheel_data_dir()}/silero_vad.onnx",
                                   providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros(CONTEXT, np.float32)
    out = []
    for j in range(probs.shape[0]):
        chunk = audio[j * CHUNK:(j + 1) * CHUNK]
        p, state = session.run(None, {"input": np.concatenate([context, chunk])[None],
                                      "state": state, "sr": np.array(SAMPLE_RATE, np.int64)})
        out.append(float(p.reshape(-1)[0]))
        context = chunk[-CONTEXT:]
    return float(np.max(np.abs(np.array(out) - probs), initial=0.0))


# --------------------------------------------------------------------------- output
def _levels() -> str:
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower()
    return LEVELS_UTF8 if encoding.startswith("utf") else LEVELS_ASCII


def _timeline(probs, segments, truth, width) -> str:
    levels = _levels()
    chars = "".join(levels[min(int(p * (len(levels) - 1) + 0.5), len(levels) - 1)]
                    for p in probs)
    mark = lambda ranges: "".join(  # noqa: E731
        "S" if any(a < (j + 1) * CHUNK and j * CHUNK < b for a, b in ranges) else "."
        for j in range(len(probs)))
    found = mark([(s.start, s.end) for s in segments])
    placed = mark(truth) if truth else None
    lines = []
    for i in range(0, len(probs), width):
        lines.append(f"  {i * CHUNK_MS / 1000:6.2f} s |{chars[i:i + width]}|")
        lines.append(f"  segments |{found[i:i + width]}|")
        if placed:
            lines.append(f"    placed |{placed[i:i + width]}|")
    return "\n".join(lines)


def _param_count(model) -> int:
    from flax import nnx

    return sum(a.size for a in jax.tree_util.tree_leaves(nnx.state(model)))


def _carry_bytes(model) -> int:
    from streamzoo.core.drivers import carry_nbytes

    return carry_nbytes(model.init_carry(1))


if __name__ == "__main__":
    sys.exit(run_demo())
