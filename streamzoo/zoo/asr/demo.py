"""The ASR demo: the shipped streaming Conformer-CTC transcribes audio chunk by chunk.

Without `--wav`, espeak-ng speaks a few words of the training vocabulary in a voice held out
from training (`--text`, `--voice`). The audio is pushed through the model in `--chunk-ms`
chunks (160 ms by default) at the chosen look-ahead; after every chunk the demo prints the
audio time, the chunk's compute time and the partial transcript (greedy CTC; the decoder's
state is in the carry). At the end it flushes the look-ahead, prints the final transcript,
the latency figures and whether the streamed transcript equals the offline (masked) one
(exit code 1 when it does not).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from streamzoo.demos.audio import MissingToolError, load_wav, synthesize
from streamzoo.demos.options import positive_float, standalone

DESCRIPTION = "streaming Conformer-CTC ASR (shipped checkpoint) transcribing speech chunk by chunk"
DEFAULT_TEXT = "seven green boat open big door"
DEFAULT_VOICE = "en-us+m3"  # a voice held out from training (corpus seed 0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wav", default=None,
                        help="a mono 16-bit WAV file to transcribe (resampled to 16 kHz); "
                             "default: espeak-ng speaks --text")
    parser.add_argument("--text", default=DEFAULT_TEXT,
                        help=f"what espeak-ng says without --wav (default: {DEFAULT_TEXT!r}; the "
                             "model knows the corpus's ~700 common words)")
    parser.add_argument("--voice", default=DEFAULT_VOICE,
                        help=f"espeak-ng voice without --wav (default: {DEFAULT_VOICE}, unseen "
                             "in training)")
    parser.add_argument("--chunk-ms", type=positive_float, default=160.0,
                        help="audio per streaming step, a multiple of 40 ms (default: 160)")
    parser.add_argument("--lookahead-ms", type=float, default=0.0,
                        help="peeked look-ahead, a multiple of 40 ms; trained: 0, 80, 480 "
                             "(default: 0)")
    parser.add_argument("--left-ms", type=float, default=None,
                        help="attention left context (default: the trained 1280 ms)")
    parser.add_argument("--checkpoint", default=None,
                        help="path stem of an exported checkpoint (default: the shipped one)")


def _frames(name: str, ms: float, frame_ms: float, minimum: int) -> int:
    n = ms / frame_ms
    if abs(n - round(n)) > 1e-6 or round(n) < minimum:
        raise ValueError(f"--{name}: expected a multiple of {frame_ms:g} ms"
                         f"{' (at least one frame)' if minimum else ''}, got {ms:g}")
    return int(round(n))


def _load_audio(args) -> tuple[np.ndarray, str]:
    if args.wav:
        return load_wav(args.wav, min_samples=640), args.wav

    try:
        speech = synthesize(args.text, voice=args.voice, speed=160, pitch=50)
    except MissingToolError as err:
        raise RuntimeError(str(err)) from None
    silence = np.zeros(3200, np.float32)  # 200 ms before and after
    return np.concatenate([silence, speech, silence]), \
        f"espeak-ng ({args.voice}) saying {args.text!r}"


def run(args: argparse.Namespace) -> int:
    import jax

    from streamzoo.zoo.asr.model import StreamingRecognizer, pad_to_frame, transcribe
    from streamzoo.zoo.asr.pretrained import load_pretrained, pretrained_info

    try:
        model = load_pretrained(args.checkpoint)
        frame_ms = model.config.encoder.frame_ms
        base = model.latency
        chunk = _frames("chunk-ms", args.chunk_ms, frame_ms, 1)
        lookahead = _frames("lookahead-ms", args.lookahead_ms, frame_ms, 0)
        left = base.left if args.left_ms is None else _frames("left-ms", args.left_ms, frame_ms, 0)
        audio, source = _load_audio(args)
    except (ValueError, RuntimeError) as err:
        print(f"streamzoo demo asr: {err}", file=sys.stderr)
        return 2
    latency = (chunk, left, lookahead)
    trained = [l.as_tuple() for l in model.latencies]
    info = pretrained_info(args.checkpoint)
    audio = pad_to_frame(audio, model.samples_per_frame)
    n = audio.shape[0]
    print(f"Input: {source}, {n / 16000:.2f} s at 16 kHz")
    print(f"Model: Conformer-CTC, {model.config.encoder.num_layers} layers x d_model "
          f"{model.config.encoder.d_model}, {frame_ms:g} ms frames, characters; trained "
          f"{info.get('train_step', '?')} steps")
    print(f"Streaming: {args.chunk_ms:g} ms chunks, {lookahead * frame_ms:g} ms peeked look-ahead, "
          f"{left * frame_ms:g} ms left context"
          + ("" if latency in trained else "  (not a trained setting: expect more errors)"))
    rec = StreamingRecognizer(model, latency, chunk_samples=chunk * model.samples_per_frame)
    warm = rec.chunk_samples
    rec.push(audio[:warm])  # compile outside the timed loop
    rec.finish()
    rec.reset()
    print(f"\n{'audio':>7} {'compute':>9}  transcript so far")
    for start in range(0, n, rec.chunk_samples):
        rec.push(audio[start:start + rec.chunk_samples])
        end = min(start + rec.chunk_samples, n)
        print(f"{end / 16000:6.2f}s {1000 * rec.timings[-1]:7.2f}ms  {rec.text[0]}", flush=True)
    rec.finish()
    print(f"{'flush':>7} {1000 * rec.timings[-1]:7.2f}ms  {rec.text[0]}")
    streamed = rec.text[0]
    offline = transcribe(model, [audio], latency, batch_size=1)[0]
    step_ms = 1000 * np.asarray(rec.timings[:-1])
    rtf = np.median(step_ms) / args.chunk_ms
    print(f"\nTranscript: {streamed!r}")
    print(f"Per-chunk compute on {jax.devices()[0].platform}: p50 {np.median(step_ms):.2f} ms, "
          f"p90 {np.percentile(step_ms, 90):.2f} ms for {args.chunk_ms:g} ms of audio "
          f"(real-time factor {rtf:.3f}); algorithmic latency {args.chunk_ms + lookahead * frame_ms:g} ms")
    if streamed != offline:
        print(f"FAIL: the offline model at the same setting says {offline!r}", file=sys.stderr)
        return 1
    print("OK: streamed transcript == offline (masked) transcript")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`streamzoo demo asr [options]` as a function of its arguments; returns the exit code."""
    return standalone(sys.modules[__name__], "asr", argv)


if __name__ == "__main__":
    sys.exit(main())
