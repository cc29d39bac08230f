"""Issue 6's benchmark: the streaming Conformer-CTC ASR on CPU.

* Real-time factor per chunk: one jitted `StreamingRecognizer` step (front-end, subsampling,
  Conformer with its caches, CTC head, greedy decoder) on a 160 ms chunk, one stream, at each
  trained look-ahead; RTF = compute time / 160 ms (the issue's target: <= 0.1).
* Time to first token (TTFT): held-out utterances are streamed as if live (chunk k is
  available once its audio has arrived, at (k+1) * 160 ms); the first token appears after
  the chunk that emits it plus its compute. Reported from the stream start and from the
  speech onset (first sample above -40 dBFS), median over utterances.
* Cache-aware vs buffered streaming at equal latency: buffered streaming keeps no encoder
  state and, for every 160 ms chunk, re-encodes an overlapping audio window (the same left
  context, 1.28 s, plus the chunk and the same look-ahead) from scratch (front-end to head,
  full attention inside the window), keeping the chunk's frames. Both emit the same frames
  at the same time; the ratio of their per-chunk compute is the speed-up of caching.

Timing: each case is warmed up (compiled), then timed `--repeats` times; figures are medians
(the machine may be shared: the load average is recorded).

    python benchmarks/asr_stream.py                 # markdown; --out FILE writes JSON
    python benchmarks/asr_stream.py --quick         # smoke run (few repeats/utterances)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
try:
    import streamzoo  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from streamzoo.core.seq import Seq  # noqa: E402
from streamzoo.zoo.asr.conformer import Latency  # noqa: E402
from streamzoo.zoo.asr.model import StreamingRecognizer, audio_batch, pad_to_frame  # noqa: E402
from streamzoo.zoo.asr.pretrained import load_pretrained  # noqa: E402

SAMPLE_RATE = 16000


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def test_audio(limit: int) -> list[np.ndarray]:
    """Held-out corpus utterances (voices unseen in training), or espeak-ng speech."""
    try:
        from streamzoo.zoo.asr.training import DEFAULTS, load_corpus
        from streamzoo.train.data.speech import read_wav

        corpus = load_corpus(DEFAULTS, progress=False)
        return [read_wav(r["path"])[0] for r in corpus.split("test")[:limit]]
    except Exception as err:  # no corpus cached and no espeak-ng: synthesise a few
        print(f"(corpus unavailable: {err}; using espeak-ng phrases)", file=sys.stderr)
        from streamzoo.demos.core_stack import synthesize
        words = ["seven green boat", "open big door", "yellow bird", "black dog eat"]
        return [synthesize(w) for w in words[:limit]]


def step_case(model, latency: Latency, chunk_samples: int, repeats: int) -> float:
    rec = StreamingRecognizer(model, latency, chunk_samples=chunk_samples)
    chunk = np.asarray(jax.random.normal(jax.random.key(0), (chunk_samples,)) * 0.1)
    return _median_ms(lambda: rec.push(chunk), repeats)


def buffered_case(model, latency: Latency, chunk_samples: int, repeats: int) -> float:
    """Re-encode (left + chunk + look-ahead) frames of audio from scratch per chunk."""
    spf = model.samples_per_frame
    window_frames = latency.left + latency.chunk + latency.lookahead
    full = Latency(chunk=window_frames, left=0, lookahead=0)  # full attention in the window
    view = model.with_latency(full)
    window = np.asarray(jax.random.normal(jax.random.key(1), (1, window_frames * spf, 1)) * 0.1)
    x = Seq.from_lengths(window.astype(np.float32), np.array([window.shape[1]], np.int32))
    lo = latency.left
    hi = lo + latency.chunk

    @jax.jit
    def encode(m, x):
        logits = m(x)
        return jax.numpy.argmax(logits.values[:, lo:hi], axis=-1)

    return _median_ms(lambda: jax.block_until_ready(encode(view, x)), repeats)


def ttft(model, latency: Latency, audios, chunk_samples: int) -> dict:
    rec = StreamingRecognizer(model, latency, chunk_samples=chunk_samples)
    rec.push(np.zeros(chunk_samples, np.float32))  # compile
    rec.finish()
    from_start, from_onset = [], []
    for audio in audios:
        audio = pad_to_frame(audio, model.samples_per_frame)
        loud = np.nonzero(np.abs(audio) > 0.01)[0]
        onset = (loud[0] if loud.size else 0) / SAMPLE_RATE
        rec.reset()
        first = None
        for k, start in enumerate(range(0, len(audio), chunk_samples)):
            new = rec.push(audio[start:start + chunk_samples])[0]
            if new and first is None:
                first = min(start + chunk_samples, len(audio)) / SAMPLE_RATE + rec.timings[-1]
        if first is None:
            new = rec.finish()[0]
            if new:
                first = len(audio) / SAMPLE_RATE + rec.timings[-1]
        if first is not None:
            from_start.append(first)
            from_onset.append(first - onset)
    return {"ttft_from_start_ms": 1000 * float(np.median(from_start)) if from_start else None,
            "ttft_from_onset_ms": 1000 * float(np.median(from_onset)) if from_onset else None,
            "utterances": len(audios), "with_tokens": len(from_start)}


def offline_case(model, audios, repeats: int) -> dict:
    x = audio_batch(audios[:1], model.samples_per_frame)
    fn = jax.jit(lambda m, x: m(x).values)
    ms = _median_ms(lambda: jax.block_until_ready(fn(model, x)), repeats)
    seconds = x.length / SAMPLE_RATE
    return {"audio_s": seconds, "ms": ms, "rtf": ms / (1000 * seconds)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="exported checkpoint path stem")
    parser.add_argument("--chunk-ms", type=float, default=160.0)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--utterances", type=int, default=40, help="for TTFT")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.utterances = 5, 4

    model = load_pretrained(args.checkpoint)
    spf = model.samples_per_frame
    chunk_frames = int(round(args.chunk_ms / model.config.encoder.frame_ms))
    chunk_samples = chunk_frames * spf
    audios = test_audio(args.utterances)
    load_before = os.getloadavg()
    rows = []
    for lat in model.latencies:
        lat = Latency(chunk_frames, lat.left, lat.lookahead)
        cache_ms = step_case(model, lat, chunk_samples, args.repeats)
        buffered_ms = buffered_case(model, lat, chunk_samples, args.repeats)
        t = ttft(model, lat, audios, chunk_samples)
        row = {"latency": list(lat.as_tuple()), "chunk_ms": args.chunk_ms,
               "lookahead_ms": lat.lookahead * model.config.encoder.frame_ms,
               "cache_aware_ms": cache_ms, "rtf": cache_ms / args.chunk_ms,
               "buffered_ms": buffered_ms, "buffered_rtf": buffered_ms / args.chunk_ms,
               "speedup": buffered_ms / cache_ms, **t}
        rows.append(row)
        print(json.dumps(row), flush=True)
    offline = offline_case(model, audios, args.repeats)
    load_after = os.getloadavg()

    print(f"\nASR streaming on {jax.devices()[0].platform} ({os.cpu_count()} cores), "
          f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, "
          f"load average {[round(l, 2) for l in load_before]} -> {[round(l, 2) for l in load_after]}")
    print("\n| chunk | look-ahead | cache-aware ms/chunk | RTF | buffered ms/chunk | buffered RTF "
          "| cache-aware speed-up | TTFT from start | TTFT from speech onset |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['chunk_ms']:.0f} ms | {r['lookahead_ms']:.0f} ms | {r['cache_aware_ms']:.2f} "
              f"| {r['rtf']:.4f} | {r['buffered_ms']:.2f} | {r['buffered_rtf']:.4f} "
              f"| {r['speedup']:.2f}x | {r['ttft_from_start_ms']:.0f} ms "
              f"| {r['ttft_from_onset_ms']:.0f} ms |")
    print(f"\nOffline forward of one {offline['audio_s']:.2f} s utterance: {offline['ms']:.2f} ms "
          f"(RTF {offline['rtf']:.4f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "offline": offline, "load_before": load_before,
                       "load_after": load_after, "repeats": args.repeats}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
