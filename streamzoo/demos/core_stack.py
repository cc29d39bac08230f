"""The core demo: real synthesised speech streamed through a stack of the core layers.

espeak-ng speaks a few sentences in different voices; each becomes 16 kHz audio and then
log-mel features (25 ms frames every 10 ms, 40 bins). The ragged batch goes through a
randomly initialised stack of streamzoo's core layers, once offline and once chunk by chunk
for several chunk sizes. For each chunk size the demo prints the per-chunk latency, the
real-time factor, the carry size and the largest deviation between stream and offline, and
fails (exit code 1) when that deviation exceeds the tolerance.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from streamzoo.core import Residual, Seq, Serial
from streamzoo.demos.audio import MissingToolError, synthesize  # noqa: F401 (re-exported)
from streamzoo.demos.options import positive_int
from streamzoo.eval.latency import format_table, measure_stream, offline
from streamzoo.layers.attention import StreamingAttention
from streamzoo.layers.conv import Conv1D
from streamzoo.layers.feedforward import FeedForward
from streamzoo.layers.linear_recurrence import LinearRecurrence
from streamzoo.layers.norm import LayerNorm, RMSNorm
from streamzoo.layers.pooling import CumulativeMean
from streamzoo.layers.recurrent import LSTM

DESCRIPTION = "espeak-ng speech -> log-mel -> a stack of core layers, streamed vs offline"

SAMPLE_RATE = 16_000
FRAME_MS, HOP_MS, NUM_MELS = 25, 10, 40

# (voice, words per minute, pitch 0-99, text)
UTTERANCES = [
    ("en-us", 165, 50, "Streaming models answer while the speaker is still talking."),
    ("en-gb", 140, 35, "Every chunk hands its state to the next one, so nothing is recomputed."),
    ("en-gb-scotland", 185, 65, "Offline and streaming outputs must agree, frame for frame."),
]
QUICK_UTTERANCES = [
    ("en-us", 175, 50, "Stream it."),
    ("en-gb", 150, 35, "Chunk by chunk."),
]


def mel_filterbank(num_mels: int, n_fft: int, sample_rate: int) -> np.ndarray:
    """Triangular filters on the HTK mel scale, `[n_fft // 2 + 1, num_mels]`."""
    to_mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    to_hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    edges = to_hz(np.linspace(0.0, to_mel(sample_rate / 2), num_mels + 2))
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    tri = np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid))
    return np.maximum(tri, 0.0).T.astype(np.float32)


def log_mel(audio: np.ndarray, *, sample_rate: int = SAMPLE_RATE, num_mels: int = NUM_MELS,
            frame_ms: int = FRAME_MS, hop_ms: int = HOP_MS) -> np.ndarray:
    """Log-mel features `[frames, num_mels]`; frame t covers samples `[t*hop, t*hop + win)`."""
    win, hop = sample_rate * frame_ms // 1000, sample_rate * hop_ms // 1000
    n_fft = 1 << (win - 1).bit_length()
    if audio.ndim != 1 or audio.shape[0] < win:
        raise ValueError(f"audio: expected a 1-D signal of >= {win} samples, got shape {audio.shape}")
    count = 1 + (audio.shape[0] - win) // hop
    frames = audio[np.arange(win)[None, :] + hop * np.arange(count)[:, None]]
    frames = frames * np.hanning(win + 1)[:-1].astype(np.float32)  # periodic Hann
    power = np.abs(np.fft.rfft(frames, n_fft)) ** 2
    return np.log(power @ mel_filterbank(num_mels, n_fft, sample_rate) + 1e-6).astype(np.float32)


# ------------------------------------------------------------------------------ model
def build_stack(features: int, width: int, *, seed: int = 0, lookahead: int = 2):
    """The demo's stack of core layers (random weights): a feature projection, a depthwise
    conv with `lookahead` frames of look-ahead, windowed attention, a linear recurrence, an
    LSTM, a gated feed-forward block and a running mean (an utterance summary per frame).
    `width` must be a multiple of 8 (4 attention heads of an even size, for RoPE)."""
    if width % 8:
        raise ValueError(f"width: expected a multiple of 8, got {width}")
    rngs = nnx.Rngs(seed)

    def pre_norm(layer):
        return Residual(Serial(RMSNorm(width), layer))

    return Serial(
        LayerNorm(features),
        FeedForward(features, 2 * width, out_features=width, rngs=rngs),
        Conv1D(width, width, 5, groups=width, lookahead=lookahead, rngs=rngs),
        pre_norm(StreamingAttention(width, 4, max_past=32, num_sinks=2, rngs=rngs)),
        pre_norm(LinearRecurrence(width, width, rngs=rngs)),
        pre_norm(LSTM(width, width, rngs=rngs)),
        pre_norm(FeedForward(width, 4 * width, gated=True, rngs=rngs)),
        LayerNorm(width),
        CumulativeMean(width),
    )


def describe(model) -> str:
    """One line per top-level layer, plus the stack's spec."""
    lines = []
    for i, layer in enumerate(model.layers):
        name = type(layer).__name__
        if isinstance(layer, Residual):
            parts = layer.inner.layers if isinstance(layer.inner, Serial) else [layer.inner]
            name = f"Residual({' -> '.join(type(p).__name__ for p in parts)})"
        lines.append(f"  {i}: {name:<44} {layer.input_frame_shape} -> {layer.output_frame_shape}")
    params = sum(a.size for a in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    spec = model.spec
    lines.append(f"  {params:,} parameters; block_size={spec.block_size}, "
                 f"output_ratio={spec.output_ratio}, input_latency={spec.input_latency}, "
                 f"output_latency={spec.output_latency}, receptive_field={spec.receptive_field}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ CLI
def _width(text: str) -> int:
    value = int(text)
    if value < 8 or value % 8:
        raise argparse.ArgumentTypeError(f"expected a positive multiple of 8, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunk-sizes", type=positive_int, nargs="+", default=None, metavar="FRAMES",
                        help="chunk sizes to stream with, in 10 ms frames (default: 1 4 16; "
                             "with --quick: 1 8)")
    parser.add_argument("--width", type=_width, default=None,
                        help="model width, a multiple of 8 (default: 64; with --quick: 16)")
    parser.add_argument("--text", action="append", default=None,
                        help="an utterance to speak (repeat for a batch; default: three "
                             "sentences in three voices)")
    parser.add_argument("--seed", type=int, default=0, help="parameter seed (default: 0)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted |stream - offline| (default: 1e-4)")
    parser.add_argument("--quick", action="store_true",
                        help="short utterances, a narrow model and two chunk sizes (for tests)")


def run(args: argparse.Namespace) -> int:
    utterances = QUICK_UTTERANCES if args.quick else UTTERANCES
    if args.text:  # the given texts, spoken by the default voices in turn
        utterances = [UTTERANCES[i % len(UTTERANCES)][:3] + (text,)
                      for i, text in enumerate(args.text)]
    chunk_sizes = args.chunk_sizes or ([1, 8] if args.quick else [1, 4, 16])
    width = args.width or (16 if args.quick else 64)

    try:
        feats = [log_mel(synthesize(text, voice=voice, speed=speed, pitch=pitch))
                 for voice, speed, pitch, text in tqdm(utterances, desc="espeak-ng", leave=False,
                                                       disable=None)]
    except MissingToolError as err:
        print(f"streamzoo demo: {err}", file=sys.stderr)
        return 2

    lengths = np.array([f.shape[0] for f in feats])
    values = np.zeros((len(feats), lengths.max(), NUM_MELS), np.float32)
    for b, f in enumerate(feats):
        values[b, : f.shape[0]] = f
    x = Seq.from_lengths(values, lengths)

    print("Input: espeak-ng speech, 16 kHz, log-mel "
          f"({FRAME_MS} ms frames every {HOP_MS} ms, {NUM_MELS} bins)")
    for (voice, speed, pitch, text), n in zip(utterances, lengths):
        print(f"  {voice:<15} {speed} wpm, pitch {pitch:<3} {n:4d} frames "
              f"({n * HOP_MS / 1000:.2f} s)  {text!r}")
    # Initialised under jit: one compiled program instead of one dispatch per initialiser.
    model = jax.jit(lambda: build_stack(NUM_MELS, width, seed=args.seed))()
    print(f"Model (random weights, width {width}):\n{describe(model)}\n")

    reference = offline(model, x)
    reports = [measure_stream(model, x, c, reference=reference, frame_ms=HOP_MS)
               for c in tqdm(chunk_sizes, desc="chunk sizes", leave=False, disable=None)]
    print(format_table(reports, title=f"Streaming {len(feats)} utterances as one batch on "
                                      f"{_device()}: wall time per jitted step call"))
    worst = max(r.max_deviation for r in reports)
    if not worst <= args.tolerance:
        print(f"\nFAIL: stream and offline differ by {worst:.2e} > tolerance {args.tolerance:g}",
              file=sys.stderr)
        return 1
    print(f"\nOK: stream == offline for every chunk size (max deviation {worst:.2e} "
          f"<= {args.tolerance:g})")
    return 0


def _device() -> str:
    dev = jax.devices()[0]
    return f"{dev.platform} ({dev.device_kind})"
