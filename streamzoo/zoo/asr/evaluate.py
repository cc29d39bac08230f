"""Held-out evaluation of the streaming ASR model: WER / CER per latency, and how often the
streamed transcript is identical to the offline (masked) model's.

    python -m streamzoo.zoo.asr.evaluate [--checkpoint PATH | --run RUN_DIR] [--limit N]
                                          [--lexicon] [--beam N]

The test split of the espeak-ng corpus is spoken only by voices held out from training
(speaker-disjoint). For each trained latency setting the offline forward of that setting
(the exact masked equivalent of streaming) gives greedy CTC transcripts, scored with
corpus-level WER and CER; then the same utterances are streamed in 160 ms chunks (the
setting's chunk) through `StreamingRecognizer`, 16 streams at a time with ragged ends, and
the streamed transcripts are compared with the offline ones string for string.

With `--beam N` the same logits are also decoded by CTC prefix beam search constrained to the
corpus's word list (`beam_search.Lexicon`: closed-vocabulary decoding without a language
model), which is frame-synchronous and so gives the same result streamed or offline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from streamzoo.zoo.asr.beam_search import CTCPrefixBeamSearch, Lexicon
from streamzoo.zoo.asr.model import (ASRModel, StreamingRecognizer, audio_batch, offline_logits,
                                     transcribe)
from streamzoo.zoo.asr.text import (char_error_rate, decode, encode, normalize,
                                    word_error_rate)


def stream_texts(model: ASRModel, audios, latency=None, *, batch_size: int = 16,
                 chunk_samples: int | None = None, beam_search=None) -> list[str]:
    """Transcripts of `audios` streamed chunk by chunk, `batch_size` streams at once (each
    row's valid samples per chunk are its own; rows that ended push nothing); greedy, or by
    `beam_search` (a `CTCPrefixBeamSearch`) fed the streamed logits."""
    rec = StreamingRecognizer(model, latency, chunk_samples=chunk_samples, batch_size=batch_size,
                              beam_search=beam_search)
    c = rec.chunk_samples
    out = []
    for i in range(0, len(audios), batch_size):
        part = list(audios[i:i + batch_size])
        n_real = len(part)
        part += [part[-1]] * (batch_size - n_real)
        x = audio_batch(part, model.samples_per_frame, c)
        values, lengths = np.asarray(x.values[..., 0]), np.asarray(x.lengths())
        rec.reset()
        for start in range(0, values.shape[1], c):
            rec.push(values[:, start:start + c], np.clip(lengths - start, 0, c))
        rec.finish()
        out.extend(rec.text[:n_real])
    return out


def snap_to_lexicon(text: str, words) -> str:
    """Each word of `text` replaced by the nearest word of `words` (edit distance; ties: the
    first). A closed-vocabulary correction for diagnosis, not part of the streaming decoder."""
    from streamzoo.zoo.asr.text import edit_distance

    words = list(words)
    return " ".join(w if w in words else min(words, key=lambda v: edit_distance(w, v))
                    for w in text.split())


def lexicon_search(model: ASRModel, words, beam_size: int = 8) -> CTCPrefixBeamSearch:
    """CTC prefix beam search over the model's characters, constrained to `words` (text)."""
    lexicon = Lexicon.from_text(words, encode, separator_id=int(encode(" ")[0]))
    return CTCPrefixBeamSearch(beam_size, blank_id=model.config.blank_id, token_top_k=6,
                               lexicon=lexicon)


def lexicon_texts(model: ASRModel, audios, latency, search: CTCPrefixBeamSearch, *,
                  batch_size: int = 16, multiple: int = 64000) -> list[str]:
    """Offline transcripts by `search` (see `lexicon_search`) at `latency`."""
    texts = []
    for logits, n in offline_logits(model, audios, latency, batch_size=batch_size,
                                    multiple=multiple):
        state = search.step(search.init(logits.batch_size), logits)
        texts.extend(decode(tokens) for tokens in search.best(state, final=True)[:n])
    return texts


def latency_ms(model: ASRModel, latency) -> dict:
    """The setting in milliseconds: chunk, look-ahead, left context, and the algorithmic
    latency of a chunk's first frame (chunk + look-ahead)."""
    f = model.config.encoder.frame_ms
    return {"chunk_ms": latency.chunk * f, "lookahead_ms": latency.lookahead * f,
            "left_ms": latency.left * f, "algorithmic_ms": (latency.chunk + latency.lookahead) * f}


def evaluate_model(model: ASRModel, records, *, latencies=None, stream: bool = True,
                   batch_size: int = 16, multiple: int = 64000, lexicon=None,
                   beam_size: int | None = None, progress=None) -> dict:
    """WER/CER per latency on `records` (corpus manifest entries) and the streaming==offline
    rate; with `lexicon` (a word list) also the WER after `snap_to_lexicon`, and with
    `beam_size` too the WER/CER of lexicon-constrained beam search. Offline batches are padded
    to `multiple` samples (one compile per setting). Returns a JSON-able dict."""
    from streamzoo.train.data.speech import read_wav

    audios = [read_wav(r["path"])[0] for r in records]
    refs = [normalize(r["text"]) for r in records]
    results = []
    for lat in latencies or model.latencies:
        t0 = time.perf_counter()
        hyps = transcribe(model, audios, lat, batch_size=batch_size, multiple=multiple)
        row = {"latency": list(lat.as_tuple()), **latency_ms(model, lat),
               "wer": word_error_rate(refs, hyps), "cer": char_error_rate(refs, hyps),
               "sentence_accuracy": float(np.mean([h == r for h, r in zip(hyps, refs)])),
               "offline_s": time.perf_counter() - t0}
        if lexicon is not None:
            row["wer_lexicon_snapped"] = word_error_rate(
                refs, [snap_to_lexicon(h, lexicon) for h in hyps])
            if beam_size:
                t0 = time.perf_counter()
                search = lexicon_search(model, lexicon, beam_size)
                beamed = lexicon_texts(model, audios, lat, search, batch_size=batch_size,
                                       multiple=multiple)
                row["lexicon_beam"] = {"beam_size": beam_size,
                                       "wer": word_error_rate(refs, beamed),
                                       "cer": char_error_rate(refs, beamed),
                                       "sentence_accuracy": float(np.mean(
                                           [h == r for h, r in zip(beamed, refs)])),
                                       "seconds": time.perf_counter() - t0}
                if stream:
                    streamed = stream_texts(model, audios, lat, batch_size=batch_size,
                                            beam_search=search)
                    row["lexicon_beam"]["stream_equals_offline"] = float(np.mean(
                        [s == h for s, h in zip(streamed, beamed)]))
                row["lexicon_beam"]["examples"] = [{"ref": r, "hyp": h}
                                                   for r, h in list(zip(refs, beamed))[:5]]
        if stream:
            t0 = time.perf_counter()
            streamed = stream_texts(model, audios, lat, batch_size=batch_size)
            row["stream_equals_offline"] = float(np.mean([s == h for s, h in zip(streamed, hyps)]))
            row["stream_wer"] = word_error_rate(refs, streamed)
            row["stream_s"] = time.perf_counter() - t0
        row["examples"] = [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:5]]
        results.append(row)
        if progress:
            progress(row)
    voices = sorted({r["voice"] for r in records})
    return {"utterances": len(records), "voices": voices, "results": results}


def format_table(report: dict) -> str:
    beam = any("lexicon_beam" in r for r in report["results"])
    lines = ["| chunk | look-ahead | left | WER | CER | utterance acc. | stream == offline "
             + ("| lexicon beam WER | lexicon beam CER | lexicon beam stream == offline |"
                if beam else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|---|" if beam else "")]
    for r in report["results"]:
        eq, lb = r.get("stream_equals_offline"), r.get("lexicon_beam")
        lb_wer = "-" if lb is None else f"{100 * lb['wer']:.1f}%"
        lb_cer = "-" if lb is None else f"{100 * lb['cer']:.1f}%"
        if lb is not None and "stream_equals_offline" in lb:
            lb_cer += f" | {100 * lb['stream_equals_offline']:.1f}%"
        elif lb is not None:
            lb_cer += " | -"
        lines.append(f"| {r['chunk_ms']:.0f} ms | {r['lookahead_ms']:.0f} ms | {r['left_ms']:.0f} ms "
                     f"| {100 * r['wer']:.1f}% | {100 * r['cer']:.1f}% "
                     f"| {100 * r['sentence_accuracy']:.1f}% "
                     f"| {'-' if eq is None else f'{100 * eq:.1f}%'} "
                     + (f"| {lb_wer} | {lb_cer} |" if beam else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamzoo.zoo.asr.evaluate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None,
                        help="path stem of an exported checkpoint (default: the shipped one)")
    parser.add_argument("--run", default=None, help="a training run directory (latest checkpoint)")
    parser.add_argument("--cache-dir", default=None, help="speech corpus cache directory")
    parser.add_argument("--num-utterances", type=int, default=6000,
                        help="corpus size (must match the one trained on; default 6000)")
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N test utterances")
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming comparison")
    parser.add_argument("--lexicon", action="store_true",
                        help="also report the WER after snapping each word to the nearest corpus "
                             "vocabulary word (a diagnostic of near-miss spellings)")
    parser.add_argument("--beam", type=int, default=None, metavar="N",
                        help="with --lexicon, also decode by CTC prefix beam search of width N "
                             "constrained to the corpus's words")
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)

    from streamzoo.zoo.asr.pretrained import load_pretrained, model_from_run
    from streamzoo.zoo.asr.training import DEFAULTS, load_corpus

    model = model_from_run(args.run)[0] if args.run else load_pretrained(args.checkpoint)
    corpus = load_corpus({**DEFAULTS, "cache_dir": args.cache_dir,
                          "num_utterances": args.num_utterances,
                          "test_fraction": args.test_fraction})
    records = corpus.split("test")[:args.limit]
    train_voices = corpus.speakers("train")
    if any(r["voice"] in train_voices for r in records):
        raise ValueError("corpus: expected test voices disjoint from training voices")

    def show(row):
        print(f"latency {row['latency']}: WER {100 * row['wer']:.2f}%  CER {100 * row['cer']:.2f}%"
              + (f"  stream==offline {100 * row['stream_equals_offline']:.1f}%"
                 if "stream_equals_offline" in row else "")
              + (f"  WER after lexicon snapping {100 * row['wer_lexicon_snapped']:.2f}%"
                 if "wer_lexicon_snapped" in row else "")
              + (f"  lexicon beam WER {100 * row['lexicon_beam']['wer']:.2f}%"
                 if "lexicon_beam" in row else ""), flush=True)

    if args.beam is not None and not args.lexicon:
        parser.error("--beam: needs --lexicon (the beam search is lexicon-constrained)")
    report = evaluate_model(model, records, stream=not args.no_stream, progress=show,
                            lexicon=corpus.config.words() if args.lexicon else None,
                            beam_size=args.beam)
    print(f"{report['utterances']} held-out utterances, {len(report['voices'])} unseen voices")
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
