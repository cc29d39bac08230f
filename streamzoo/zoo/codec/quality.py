"""Codec quality on held-out voices: SI-SDR and mel distance at several bitrates.

    python -m streamzoo.zoo.codec.quality [--weights NPZ] [--codebooks 2 4 8]
                                          [--utterances 64] [--asr] [--json OUT]

evaluates the checked-in codec (default) on utterances of the speech corpus it was trained on,
taken from the *test* split, whose speakers (espeak-ng accent + voice variant) never occur in
training. Each bitrate is the first n codebooks of the same model (quantizer dropout trained
them to work alone). Two naive codecs give the scale:

* `mu-law 8 bit @ 8 kHz` (64 kbit/s): telephone quality (G.711-style companding; the audio
  is resampled 16 -> 8 -> 16 kHz), 16x the codec's top bitrate;
* `mu-law 4 bit @ 1 kHz` (4 kbit/s): what a naive waveform coder gets at the codec's top
  bitrate (16 -> 1 -> 16 kHz, 16 companded levels).

Metrics, per utterance then averaged (a row also gives the median SI-SDR):

* **SI-SDR** (dB, higher is better): `10 log10(|a s|^2 / |a s - s_hat|^2)` with `a` the
  least-squares scale of the zero-mean reference s onto the zero-mean estimate (Le Roux et al.
  2019). Waveform-exact; spectral training losses do not ask for phase, so codecs trained
  without a waveform loss score low even when they sound right.
* **mel distance** (lower is better): the codec's multi-scale log-mel L1 loss
  (`losses.multi_scale_mel_loss`, windows 64..2048 samples, DAC's "mel distance").
* **ASR error rates** (`--asr`, lower is better): an intelligibility proxy. The shipped
  streaming ASR (`zoo.asr`, trained on clean espeak-ng speech) transcribes each system's audio
  and the original; greedy CER and WER, and the WER of its lexicon-constrained beam search
  (beam 8, the corpus's word list). A reconstruction that keeps the words keeps these near
  the original audio's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from streamzoo.core.seq import Seq
from streamzoo.zoo.codec import losses as L


# ---------------------------------------------------------------------------- metrics
def si_sdr(reference: np.ndarray, estimate: np.ndarray, eps: float = 1e-8) -> float:
    """Scale-invariant signal-to-distortion ratio in dB of `estimate` against `reference`
    (1-D float arrays of the same length; both made zero-mean)."""
    s = np.asarray(reference, np.float64).reshape(-1)
    e = np.asarray(estimate, np.float64).reshape(-1)
    if s.shape != e.shape:
        raise ValueError(f"estimate: expected the shape of reference {s.shape}, got {e.shape}")
    if s.size == 0:
        raise ValueError("reference: expected at least one sample, got none")
    s, e = s - s.mean(), e - e.mean()
    target = (np.dot(e, s) / (np.dot(s, s) + eps)) * s
    noise = e - target
    return float(10 * np.log10((np.dot(target, target) + eps) / (np.dot(noise, noise) + eps)))


_mel_fn = {}


def mel_distance(reference: np.ndarray, estimate: np.ndarray, sample_rate: int = 16_000,
                 *, length: int | None = None) -> float:
    """Multi-scale log-mel L1 distance (`losses.multi_scale_mel_loss`) of two 1-D signals.

    `length`: pad both to this many samples before the (jitted) call, so that signals of
    different lengths share one compiled program; the padding is masked out.
    """
    s = np.asarray(reference, np.float32).reshape(-1)
    e = np.asarray(estimate, np.float32).reshape(-1)
    if s.shape != e.shape:
        raise ValueError(f"estimate: expected the shape of reference {s.shape}, got {e.shape}")
    n = s.size
    length = n if length is None else length
    if length < n:
        raise ValueError(f"length: expected >= the signal's {n} samples, got {length}")
    key = sample_rate
    if key not in _mel_fn:
        def fn(a, b, lengths):
            return L.multi_scale_mel_loss(Seq.from_lengths(b[..., None], lengths),
                                          Seq.from_lengths(a[..., None], lengths),
                                          sample_rate=sample_rate)
        _mel_fn[key] = jax.jit(fn)
    pad = lambda v: np.pad(v, (0, length - n))[None]  # noqa: E731
    return float(_mel_fn[key](pad(s), pad(e), jnp.asarray([n], jnp.int32)))


# ---------------------------------------------------------------------------- baselines
def mu_law(audio: np.ndarray, bits: int, rate: int, sample_rate: int = 16_000) -> np.ndarray:
    """`audio` resampled to `rate`, mu-law companded to `2**bits` levels (mu = 255) and
    resampled back: a naive waveform codec of `rate * bits` bit/s."""
    from scipy.signal import resample_poly

    g = math.gcd(rate, sample_rate)
    x = resample_poly(np.asarray(audio, np.float64), rate // g, sample_rate // g)
    x = np.clip(x, -1.0, 1.0)
    mu = 255.0
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    levels = 2 ** bits
    q = np.clip(np.floor((y + 1) / 2 * levels), 0, levels - 1)
    y = (q + 0.5) / levels * 2 - 1
    x = np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu
    out = resample_poly(x, sample_rate // g, rate // g)[:len(audio)]
    return np.pad(out, (0, len(audio) - len(out))).astype(np.float32)


BASELINES = {
    "mu-law 8 bit @ 8 kHz (G.711-style)": (dict(bits=8, rate=8000), 64000),
    "mu-law 4 bit @ 1 kHz": (dict(bits=4, rate=1000), 4000),
}


# --------------------------------------------------------------------------- evaluation
def held_out_corpus(meta: dict):
    """The speech corpus the codec was trained on (regenerated with espeak-ng, or read from
    the cache); its test split holds the voices never seen in training."""
    from streamzoo.train.configs import TrainConfig
    from streamzoo.zoo.codec.training import make_corpus, model_args

    config = TrainConfig.from_dict(meta["train_config"])
    return make_corpus(model_args(config), config.seed)


def asr_scores(asr, texts: list[str], audios: list[np.ndarray], search) -> dict:
    """Greedy CER / WER and lexicon-beam WER of `asr` (an `ASRModel`, at its own latency
    setting) on `audios` against the reference `texts`; `search` is the lexicon-constrained
    `CTCPrefixBeamSearch`."""
    from streamzoo.zoo.asr.evaluate import lexicon_texts
    from streamzoo.zoo.asr.model import transcribe
    from streamzoo.zoo.asr.text import char_error_rate, normalize, word_error_rate

    refs = [normalize(t) for t in texts]
    greedy = transcribe(asr, audios, asr.latency, multiple=64000)
    beamed = lexicon_texts(asr, audios, asr.latency, search)
    return {"asr_cer": char_error_rate(refs, greedy), "asr_wer": word_error_rate(refs, greedy),
            "asr_lexicon_wer": word_error_rate(refs, beamed)}


def reconstruct(codec, utterances: list[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
    """Offline `codec(x)` of each utterance (batched, one padded shape for every batch)."""
    length = max(len(u) for u in utterances)
    length = -(-length // codec.hop) * codec.hop
    apply = jax.jit(lambda m, x: m(x))
    out = []
    for start in range(0, len(utterances), batch_size):
        rows = utterances[start:start + batch_size]
        audio = np.zeros((batch_size, length, 1), np.float32)
        lengths = np.zeros(batch_size, np.int32)
        for b, u in enumerate(rows):
            audio[b, :len(u), 0] = u
            lengths[b] = len(u)
        y = apply(codec, Seq.from_lengths(jnp.asarray(audio), jnp.asarray(lengths)))
        values = np.asarray(y.values[..., 0])
        out += [values[b, :len(u)] for b, u in enumerate(rows)]
    return out


def score(references, estimates) -> dict:
    length = max(len(r) for r in references)
    sdr = [si_sdr(r, e) for r, e in zip(references, estimates)]
    mel = [mel_distance(r, e, length=length) for r, e in zip(references, estimates)]
    return {"si_sdr_mean": float(np.mean(sdr)), "si_sdr_median": float(np.median(sdr)),
            "mel_distance": float(np.mean(mel))}


def evaluate(codec, meta: dict, codebooks=(2, 4, 8), utterances: int = 64,
             asr: bool = False) -> dict:
    """The quality table's rows (baselines, then the codec at each number of codebooks); with
    `asr`, every row and an "original audio" row also get the shipped ASR's error rates."""
    from streamzoo.train.data.speech import read_wav

    corpus = held_out_corpus(meta)
    records = corpus.split("test")[:utterances]
    refs = [read_wav(r["path"])[0] for r in records]
    rows, estimates = [], []
    for name, (kwargs, bitrate) in BASELINES.items():
        est = [mu_law(r, **kwargs) for r in refs]
        rows.append({"system": name, "bitrate": bitrate, **score(refs, est)})
        estimates.append(est)
    for n in codebooks:
        t0 = time.perf_counter()
        est = reconstruct(codec.with_num_quantizers(n), refs)
        rows.append({"system": f"streamzoo codec, {n} codebook{'s' if n > 1 else ''}",
                     "codebooks": n, "bitrate": codec.config.bitrate(n), **score(refs, est),
                     "seconds": time.perf_counter() - t0})
        estimates.append(est)
    if asr:
        from streamzoo.zoo.asr.evaluate import lexicon_search
        from streamzoo.zoo.asr.pretrained import load_pretrained as load_asr

        model = load_asr()
        search = lexicon_search(model, corpus.config.words(), beam_size=8)
        texts = [r["text"] for r in records]
        rows.insert(0, {"system": "original audio", "bitrate": 256000,
                        **score(refs, refs), **asr_scores(model, texts, refs, search)})
        for row, est in zip(rows[1:], estimates):
            row.update(asr_scores(model, texts, est, search))
    return {"utterances": len(refs), "seconds_of_audio": sum(len(r) for r in refs) / 16000,
            "voices": sorted({r["voice"] for r in records}), "rows": rows}


def markdown(result: dict) -> str:
    asr = all("asr_cer" in r for r in result["rows"])
    lines = ["| system | bitrate | SI-SDR mean (median) dB | mel distance |"
             + (" ASR CER / WER greedy | ASR WER lexicon beam |" if asr else ""),
             "|---|---|---|---|" + ("---|---|" if asr else "")]
    for r in result["rows"]:
        rate = r["bitrate"]
        rate = f"{rate / 1000:g} kbit/s"
        line = (f"| {r['system']} | {rate} | {r['si_sdr_mean']:.2f} "
                f"({r['si_sdr_median']:.2f}) | {r['mel_distance']:.3f} |")
        if asr:
            line += (f" {100 * r['asr_cer']:.1f}% / {100 * r['asr_wer']:.1f}% | "
                     f"{100 * r['asr_lexicon_wer']:.1f}% |")
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamzoo.zoo.codec.quality",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=None, help="codec .npz (default: the checked-in one)")
    parser.add_argument("--codebooks", type=int, nargs="+", default=[2, 4, 8],
                        help="numbers of codebooks to evaluate (default: 2 4 8)")
    parser.add_argument("--utterances", type=int, default=64,
                        help="held-out utterances to score (default: 64)")
    parser.add_argument("--asr", action="store_true",
                        help="also transcribe every system's audio with the shipped streaming "
                             "ASR (intelligibility: CER / WER against the corpus text)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    from streamzoo.zoo.codec.pretrained import load_pretrained, read_metadata

    codec = load_pretrained(args.weights)
    meta = read_metadata(args.weights)
    result = evaluate(codec, meta, args.codebooks, args.utterances, asr=args.asr)
    result["command"] = "python -m streamzoo.zoo.codec.quality " + " ".join(
        sys.argv[1:] if argv is None else argv)
    print(f"{result['utterances']} held-out utterances ({result['seconds_of_audio']:.1f} s), "
          f"{len(result['voices'])} voices never seen in training")
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
