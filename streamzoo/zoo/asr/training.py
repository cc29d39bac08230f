"""Training the streaming ASR model (`streamzoo train asr --config small`).

Data: the espeak-ng speech corpus (`streamzoo.train.data.speech`), generated once into
`model_args.cache_dir` (default `$STREAMZOO_DATA` or `~/.cache/streamzoo-data`); the train
split trains, the speaker-disjoint test split (held-out voices) evaluates. Batches are padded
to a multiple of `audio_multiple_s` seconds, so only a few shapes are compiled.

Loss: per-token CTC (optionally delay-penalised), averaged over the batch's label tokens.
Dynamic-chunk / multi-look-ahead training: every step samples one of the encoder's
`latencies` (with `latency_probs`) and runs the offline forward of that setting
(`ASRModel.forward_dynamic`, one compiled program for all settings), so one set of weights
serves every listed latency. A random gain (`gain_db`) per utterance makes the model
indifferent to the recording level. Log-mel statistics are estimated once from
`stats_utterances` training utterances and frozen into the front-end.

Configs: `tiny` (seconds; tests), `small` (the shipped checkpoint: d_model 96, 3 layers,
712k parameters, 40 ms frames, 160 ms chunks with 0 / 80 / 480 ms look-ahead; sized for ~35
minutes on a shared 2-core CPU), `medium` (d_model 144, 4 layers, 2.06M parameters: for a
longer run). 40 ms frames, not 80: character CTC needs at least one frame per character (plus
one between repeated letters), and fast espeak-ng speech reaches ~20 characters/s.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from streamzoo.core.seq import Seq
from streamzoo.train.configs import TrainConfig, TrainTask, register_config, register_model
from streamzoo.zoo.asr.ctc import ctc_loss
from streamzoo.zoo.asr.encoder import ConformerConfig
from streamzoo.zoo.asr.model import ASRConfig, ASRModel
from streamzoo.zoo.asr.text import encode, normalize

DEFAULTS = {
    "cache_dir": None,              # None: $STREAMZOO_DATA or ~/.cache/streamzoo-data
    "num_utterances": 6000,         # corpus size (train + test)
    "corpus_seed": 0,
    "test_fraction": 0.1,
    "words_per_utterance": [1, 5],
    "d_model": 144, "num_layers": 4, "num_heads": 4, "ff_mult": 4, "conv_kernel": 15,
    "n_mels": 80, "subsampling": 4, "subsampling_channels": None,
    "latencies": [[4, 32, 0], [4, 32, 2], [4, 32, 12]],
    "latency_probs": None,          # None: uniform
    "delay_penalty": 0.0,
    "gain_db": 6.0,                 # random per-utterance gain in [-gain_db, +gain_db]
    "stats_utterances": 200,
    "audio_multiple_s": 1.28,
    "token_multiple": 64,
    "eval_utterances": 64,
    "lead_s": 0.0,                  # random leading silence up to this many seconds, and
    "dither_db": None,              # [lo, hi]: white noise at a random level in dBFS (None: off)
    "init_weights": None,           # a checkpoint stem (export_pretrained) or "pretrained" to
                                    # fine-tune; its architecture must match the config's
}


def default_cache_dir() -> str:
    return os.environ.get("STREAMZOO_DATA") or os.path.expanduser("~/.cache/streamzoo-data")


class CharTokens:
    """`encode(text)` -> character ids of `streamzoo.zoo.asr.text` (after `normalize`)."""

    def encode(self, text: str) -> np.ndarray:
        return encode(normalize(text))


def model_config(args: dict) -> ASRConfig:
    enc = ConformerConfig(
        n_mels=args["n_mels"], subsampling=args["subsampling"],
        subsampling_channels=args["subsampling_channels"], d_model=args["d_model"],
        num_layers=args["num_layers"], num_heads=args["num_heads"], ff_mult=args["ff_mult"],
        conv_kernel=args["conv_kernel"], latencies=tuple(tuple(l) for l in args["latencies"]))
    return ASRConfig(encoder=enc)


def load_corpus(args: dict, progress: bool = True):
    from streamzoo.train.data.speech import SpeechCorpusConfig, generate_speech_corpus

    config = SpeechCorpusConfig(num_utterances=args["num_utterances"], seed=args["corpus_seed"],
                                test_fraction=args["test_fraction"],
                                words_per_utterance=tuple(args["words_per_utterance"]))
    return generate_speech_corpus(args["cache_dir"] or default_cache_dir(), config,
                                  progress=progress)


def delay_rows(key, audio, lengths, max_samples: int):
    """Each row's audio delayed by a random 0..`max_samples` samples of digital silence (at most
    the row's padding, so nothing is cut); returns the new audio and lengths. Real recordings
    start before the speech does, while espeak-ng's start on it."""
    batch, total = audio.shape
    room = jnp.minimum(total - lengths, max_samples)
    shift = jnp.floor(jax.random.uniform(key, (batch,)) * (room + 1)).astype(jnp.int32)
    index = jnp.arange(total)[None, :] - shift[:, None]
    delayed = jnp.where(index >= 0, jnp.take_along_axis(audio, jnp.maximum(index, 0), axis=1), 0)
    return delayed.astype(audio.dtype), lengths + shift


def add_dither(key, audio, lengths, level_db):
    """White noise over each row's valid samples at a random level in `level_db` = (lo, hi) dBFS."""
    k_level, k_noise = jax.random.split(key)
    db = jax.random.uniform(k_level, (audio.shape[0], 1), minval=level_db[0], maxval=level_db[1])
    noise = jax.random.normal(k_noise, audio.shape) * 10.0 ** (db / 20.0)
    valid = jnp.arange(audio.shape[1])[None, :] < lengths[:, None]
    return (audio + jnp.where(valid, noise, 0.0)).astype(audio.dtype)


def asr_loss(model: ASRModel, batch: dict, rng, *, latency_probs=None, delay_penalty=0.0,
             gain_db=0.0, lead_samples: int = 0, dither_db=None):
    """Per-token CTC loss of a padded speech batch; with `rng` (training) a sampled latency, a
    random gain, leading silence and dither, without it (evaluation) the model's own latency
    and the audio as it is."""
    audio = jnp.asarray(batch["audio"])
    lengths = jnp.asarray(batch["audio_lengths"])
    if rng is not None:
        k_lat, k_gain, k_lead, k_noise = jax.random.split(rng, 4)
        index = model.encoder.sample_latency(k_lat, latency_probs)
        if gain_db:
            db = jax.random.uniform(k_gain, (audio.shape[0], 1), minval=-gain_db, maxval=gain_db)
            audio = audio * (10.0 ** (db / 20.0)).astype(audio.dtype)
        if lead_samples:
            audio, lengths = delay_rows(k_lead, audio, lengths, lead_samples)
        if dither_db is not None:
            audio = add_dither(k_noise, audio, lengths, dither_db)
    else:
        index = 0
    x = Seq.from_lengths(audio[..., None], lengths)
    logits = model.forward_dynamic(x, index)
    labels, label_lengths = batch["tokens"], batch["token_lengths"]
    per_row = ctc_loss(logits, labels, label_lengths, blank_id=model.config.blank_id,
                       delay_penalty=delay_penalty)
    tokens = jnp.asarray(label_lengths).sum().astype(jnp.float32)
    return per_row.sum() / jnp.maximum(tokens, 1.0), {"weight": tokens}


def init_weights(model: ASRModel, path: str) -> None:
    """Load a checkpoint's weights into `model` (whose config must match the checkpoint's)."""
    from streamzoo.zoo.asr.pretrained import load_pretrained

    source = load_pretrained(None if path == "pretrained" else path)
    if source.config.to_dict() != model.config.to_dict():
        raise ValueError(f"model_args.init_weights: the checkpoint {path!r} has config "
                         f"{source.config}, the run's config is {model.config}")
    nnx.update(model, nnx.state(source))


@register_model("asr")
def asr_task(config: TrainConfig) -> TrainTask:
    from streamzoo.layers.logmel import estimate_log_mel_stats
    from streamzoo.train.data.pipeline import make_batches
    from streamzoo.train.data.speech import SpeechExamples, pad_speech_batch, read_wav

    args = {**DEFAULTS, **config.model_args}
    unknown = sorted(set(args) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"model_args: unknown keys {unknown} for model 'asr'; expected some of "
                         f"{sorted(DEFAULTS)}")
    corpus = load_corpus(args)
    train_records, test_records = corpus.split("train"), corpus.split("test")
    model = ASRModel(model_config(args), rngs=nnx.Rngs(config.seed))
    spf = model.samples_per_frame
    if args["init_weights"] is not None:  # fine-tuning: weights and log-mel statistics
        init_weights(model, args["init_weights"])
    else:  # fixed log-mel statistics from a sample of the training audio
        sample = [read_wav(r["path"])[0] for r in train_records[:args["stats_utterances"]]]
        from streamzoo.zoo.asr.model import audio_batch
        mean, std = estimate_log_mel_stats(model.encoder.raw_frontend(),
                                           audio_batch(sample, spf, 16000))
        model.encoder.set_feature_stats(mean, std)

    multiple = int(round(args["audio_multiple_s"] * 16000 / spf)) * spf
    batch_fn = functools.partial(pad_speech_batch, audio_multiple=multiple,
                                 token_multiple=args["token_multiple"])
    tokens = CharTokens()
    train = iter(make_batches(SpeechExamples(train_records, tokens), batch_size=config.batch_size,
                              seed=config.seed, batch_fn=batch_fn))
    held_out = SpeechExamples(test_records[:args["eval_utterances"]], tokens)

    def eval_data():
        n = len(held_out) // config.batch_size
        return [batch_fn([held_out[i] for i in range(b * config.batch_size,
                                                     (b + 1) * config.batch_size)])
                for b in range(min(n, config.eval_batches))]

    probs = args["latency_probs"]
    dither = args["dither_db"]
    loss = functools.partial(asr_loss, latency_probs=None if probs is None else tuple(probs),
                             delay_penalty=args["delay_penalty"], gain_db=args["gain_db"],
                             lead_samples=int(args["lead_s"] * 16000),
                             dither_db=None if dither is None else tuple(dither))
    return TrainTask(model, loss, train, eval_data)


register_config("asr", "tiny", num_steps=4, batch_size=2, warmup_steps=1, eval_every=4,
                eval_batches=1, save_every=4, learning_rate=2e-3, async_checkpointing=False,
                model_args={"num_utterances": 24, "test_fraction": 0.25, "d_model": 16,
                            "num_layers": 1, "num_heads": 2, "ff_mult": 2, "conv_kernel": 3,
                            "n_mels": 16, "latencies": [[2, 4, 0], [2, 4, 1]],
                            "stats_utterances": 4, "eval_utterances": 2,
                            "words_per_utterance": [1, 2], "token_multiple": 16})
# The shipped checkpoint: sized for a shared 2-core CPU and a ~40-minute budget (d_model 96,
# 3 layers, one padded shape so one compile, the costly 480 ms look-ahead sampled less).
register_config("asr", "small", num_steps=1000, batch_size=16, warmup_steps=80,
                learning_rate=3e-3, end_lr_ratio=0.05, weight_decay=1e-3, clip_norm=5.0,
                eval_every=0, eval_batches=2, save_every=50, max_to_keep=2, log_every=10,
                model_args={"d_model": 96, "num_layers": 3, "num_heads": 4,
                            "latency_probs": [0.45, 0.4, 0.15], "audio_multiple_s": 3.84})
# The shipped checkpoint's second stage: `small` resumed from its exported weights with a
# fresh, lower schedule (the first stage was cut at step 750 of 1000 by a session limit), and
# with leading silence and dither, so speech that does not start at sample 0 is transcribed.
register_config("asr", "small-finetune", num_steps=1500, batch_size=16, warmup_steps=50,
                learning_rate=1.5e-3, end_lr_ratio=0.03, weight_decay=1e-3, clip_norm=5.0,
                eval_every=0, eval_batches=2, save_every=50, max_to_keep=2, log_every=10,
                seed=1, model_args={"d_model": 96, "num_layers": 3, "num_heads": 4,
                                    "latency_probs": [0.45, 0.4, 0.15], "audio_multiple_s": 3.84,
                                    "lead_s": 0.4, "dither_db": [-70.0, -40.0],
                                    "init_weights": "pretrained"})
# A larger model for a longer run (e.g. on an accelerator).
register_config("asr", "medium", num_steps=6000, batch_size=32, warmup_steps=300,
                learning_rate=2e-3, end_lr_ratio=0.05, weight_decay=1e-3, clip_norm=5.0,
                eval_every=500, eval_batches=2, save_every=200, max_to_keep=2, log_every=10,
                model_args={"latency_probs": [0.4, 0.35, 0.25]})
