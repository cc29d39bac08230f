"""Training the codec on the espeak-ng speech corpus: `streamzoo train codec --config small`.

The task (`@register_model("codec")`) plugs into `streamzoo.train` like every model: a
`TrainTask` of the module, a loss function of the loop's form and the data; `run()` gives
AdamW with warm-up + cosine decay, orbax checkpoints (resumable, with the data position),
metrics and curves.

* **Data.** `generate_speech_corpus` (16 kHz, speaker-disjoint split): training batches are
  random crops of `crop` samples from random training utterances with a random gain
  (`SpeechCrops`, seeded per batch index, so its position is one int and a resumed run sees
  the same batches); utterances shorter than the crop are end-padded and marked by
  `audio_lengths`. Evaluation batches are fixed crops of the *held-out voices* (the test split).
* **Loss** (`CodecTrainingLoss`): waveform L1 + multi-scale STFT + multi-scale mel
  reconstruction losses, RVQ commitment and codebook losses, quantizer dropout (a random
  number of codebooks per batch, so one model serves several bitrates; evaluation uses all).
* **Loss balancer (optional).** EnCodec's balancer rescales each loss's gradient *with
  respect to the output audio* by an EMA of its norm, so it needs state across steps. That
  state lives in `TrainState.carry`, the loop's slot for state threaded from step to step
  (`loss_fn(model, batch, rng, carry)` returns the next one in `aux["carry"]`; it is
  checkpointed with the state). The balanced gradient is obtained inside an ordinary
  `loss_fn` through the surrogate `sum_i stop_gradient(c_i) * loss_i`, where `c_i` is the
  balancer's factor for loss i (`LossBalancer.scales`): its parameter gradient is exactly
  `J^T sum_i c_i g_i`. Without the balancer the loss is the fixed weighted sum.
* **Adversarial training (optional).** The module trained is then `CodecWithDiscriminator`
  (the codec and a multi-scale waveform discriminator). One optimizer updates both: the
  generator terms see the discriminator through `stop_gradient`'ed parameters and the
  discriminator's hinge loss sees `stop_gradient`'ed audio, so each part gets exactly the
  gradient of its own objective from one `jax.grad` of the sum.

Configs: `tiny` (tests: a few steps in seconds), `small` (trained on a 2-core CPU, no
discriminator), `small-continue` (7000 more steps of the same losses from the checked-in
weights: how the shipped step-7000 weights were made from the step-600 ones), `small-gan`
(the same with the discriminator and the balancer; not trained here).
`model_args.init_weights="pretrained"` (or a .npz path) starts a run from saved weights
(fine-tuning); `model_args.weights.sisdr` adds a negative SI-SDR term. `export_pretrained`
writes the checked-in weights (`streamzoo.zoo.codec.pretrained`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from streamzoo.core.seq import Seq
from streamzoo.train.configs import TrainConfig, TrainTask, register_config, register_model
from streamzoo.zoo.codec import losses as L
from streamzoo.zoo.codec.model import Codec, CodecConfig

DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "streamzoo", "data")


def data_dir() -> str:
    """Where generated corpora are cached: `$STREAMZOO_DATA` or `~/.cache/streamzoo/data`."""
    return os.environ.get("STREAMZOO_DATA", DEFAULT_DATA_DIR)


# ------------------------------------------------------------------------------------ data
class SpeechCrops:
    """Endless batches `{"audio": [B, crop] float32, "audio_lengths": [B] int32}` of random
    crops of `utterances` (float32 arrays), each scaled by a gain uniform in `gain`.

    A crop whose RMS is below `min_rms` is redrawn (up to `tries` times): a batch of silence
    makes the spectral-convergence loss divide by ~0. Batch i is a pure function of
    `(seed, i)`; the position is `{"index": i}`.
    """

    def __init__(self, utterances: Sequence[np.ndarray], batch_size: int, crop: int, *,
                 seed: int = 0, gain: tuple[float, float] = (0.35, 1.0), min_rms: float = 0.01,
                 tries: int = 8):
        if not utterances:
            raise ValueError("utterances: expected at least one utterance, got none")
        if batch_size < 1 or crop < 1:
            raise ValueError(f"batch_size, crop: expected positive ints, got {batch_size}, {crop}")
        if not 0.0 < gain[0] <= gain[1]:
            raise ValueError(f"gain: expected (low, high) with 0 < low <= high, got {gain}")
        self.utterances = [np.asarray(u, np.float32) for u in utterances]
        self.batch_size, self.crop, self.seed, self.gain = batch_size, crop, seed, gain
        self.min_rms, self.tries = min_rms, tries
        self.index = 0

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != {"index"}:
            raise ValueError(f"state: expected {{'index': int}}, got {state!r}")
        self.index = int(state["index"])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.batch(np.random.default_rng([self.seed, self.index]))
        self.index += 1
        return batch

    def batch(self, rng: np.random.Generator) -> dict:
        audio = np.zeros((self.batch_size, self.crop), np.float32)
        lengths = np.zeros(self.batch_size, np.int32)
        for row in range(self.batch_size):
            for _ in range(self.tries):  # skip crops of (espeak-ng's digital) silence
                u = self.utterances[int(rng.integers(len(self.utterances)))]
                start = int(rng.integers(max(len(u) - self.crop, 0) + 1))
                piece = u[start:start + self.crop]
                if np.sqrt(np.mean(np.square(piece))) >= self.min_rms:
                    break
            piece = piece * rng.uniform(*self.gain)
            audio[row, :len(piece)] = piece
            lengths[row] = len(piece)
        return {"audio": audio, "audio_lengths": lengths}

    def fixed_batches(self, count: int, seed: int = 1) -> list[dict]:
        """`count` deterministic batches (evaluation): the same crops on every call."""
        rng = np.random.default_rng([self.seed, seed, 0xE7A1])
        return [self.batch(rng) for _ in range(count)]


def load_split(corpus, split: str) -> list[np.ndarray]:
    """The float32 audio of every utterance of `split` of a generated corpus."""
    from streamzoo.train.data.speech import read_wav

    return [read_wav(r["path"])[0] for r in corpus.split(split)]


def make_corpus(args: Mapping, seed: int):
    from streamzoo.train.data.speech import SpeechCorpusConfig, generate_speech_corpus

    cfg = SpeechCorpusConfig(num_utterances=args["num_utterances"], seed=args["corpus_seed"],
                             test_fraction=args["test_fraction"])
    return generate_speech_corpus(args["data_dir"] or data_dir(), cfg, progress=False)


# ------------------------------------------------------------------------------------ loss
class CodecWithDiscriminator(nnx.Module):
    """What adversarial training trains: the codec and its discriminator, one module."""

    def __init__(self, codec: Codec, discriminator: L.MultiScaleDiscriminator):
        self.codec = codec
        self.discriminator = discriminator


def _frozen(module: nnx.Module) -> nnx.Module:
    """`module` with stop_gradient'ed parameters (a generator loss must not train D)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.lax.stop_gradient(state))


@dataclasses.dataclass(frozen=True)
class CodecTrainingLoss:
    """`loss_fn(model, batch, rng, carry=None) -> (loss, aux)` for `streamzoo.train.loop`.

    model: a `Codec`, or a `CodecWithDiscriminator` (then `adversarial` and `feature`
    weights apply). batch: `{"audio": [B, S], "audio_lengths": [B]}`. rng: quantizer dropout
    (None: all codebooks, the evaluation setting). carry: the `BalancerState` when
    `balancer` is set (training); then `aux["carry"]` is the next one.

    aux: each term (`loss/<name>`), `loss/reconstruction` (the fixed-weight sum of l1, stft
    and mel: comparable across steps and runs whatever the balancer does), the discriminator
    loss, the mean active codebooks and `weight` (valid samples).
    """

    weights: L.CodecLossWeights = L.CodecLossWeights()
    adversarial: float = 3.0            # generator hinge loss (EnCodec's lambda_g)
    feature: float = 3.0                # feature matching (lambda_feat)
    fft_sizes: tuple = L.DEFAULT_STFT_SIZES
    mel_scales: tuple = L.DEFAULT_MEL_SCALES
    balancer: L.LossBalancer | None = None

    def __call__(self, model, batch: Mapping, rng=None, carry=None):
        if "audio" not in batch or "audio_lengths" not in batch:
            raise ValueError(f"batch: expected keys 'audio' and 'audio_lengths', got "
                             f"{sorted(batch)}")
        audio = jnp.asarray(batch["audio"], jnp.float32)
        if audio.ndim != 2:
            raise ValueError(f"batch['audio']: expected shape [B, S], got {audio.shape}")
        gan = isinstance(model, CodecWithDiscriminator)
        codec = model.codec if gan else model
        x = Seq.from_lengths(audio[..., None], jnp.asarray(batch["audio_lengths"], jnp.int32))
        out = codec.autoencode(x, rng=rng)
        lengths = x.lengths()

        def as_seq(values):
            return Seq(values, out.audio.mask, compact=True)

        terms = {
            "l1": lambda y: L.l1_loss(as_seq(y), x),
            "stft": lambda y: L.multi_scale_stft_loss(as_seq(y), x, fft_sizes=self.fft_sizes),
            "mel": lambda y: L.multi_scale_mel_loss(as_seq(y), x,
                                                    sample_rate=codec.config.sample_rate,
                                                    scales=self.mel_scales),
        }
        fixed = {"l1": self.weights.l1, "stft": self.weights.stft, "mel": self.weights.mel}
        balanced_names = dict(self.balancer.weights) if self.balancer is not None else {}
        if self.weights.sisdr or "sisdr" in balanced_names:
            terms["sisdr"] = lambda y: L.si_sdr_loss(as_seq(y), x)
            fixed["sisdr"] = self.weights.sisdr
        aux = {}
        d_loss = jnp.zeros((), jnp.float32)
        if gan:
            frozen = _frozen(model.discriminator)
            real = model.discriminator(x)
            real_frozen = jax.tree.map(jax.lax.stop_gradient, frozen(x))
            terms["adversarial"] = lambda y: L.generator_adversarial_loss(frozen(as_seq(y)))
            terms["feature"] = lambda y: L.feature_matching_loss(real_frozen, frozen(as_seq(y)))
            fixed.update(adversarial=self.adversarial, feature=self.feature)
            fake = model.discriminator(as_seq(jax.lax.stop_gradient(out.audio.values)))
            d_loss = L.discriminator_loss(real, fake)
            aux["loss/discriminator"] = d_loss
        y = out.audio.values
        values = {name: fn(y) for name, fn in terms.items()}
        quantizer = (self.weights.commitment * out.commitment_loss
                     + self.weights.codebook * out.codebook_loss)
        if self.balancer is not None and carry is not None:
            grads = {name: jax.grad(fn)(jax.lax.stop_gradient(y)) for name, fn in terms.items()}
            scales, carry, metrics = self.balancer.scales(carry, grads)
            balanced = sum(jax.lax.stop_gradient(scales[n]) * v for n, v in values.items())
            aux.update(metrics)
            aux["carry"] = carry
        else:
            balanced = sum(fixed[n] * v for n, v in values.items())
        loss = balanced + quantizer + d_loss
        aux.update({f"loss/{n}": v for n, v in values.items()})
        aux["loss/commitment"] = out.commitment_loss
        aux["loss/codebook"] = out.codebook_loss
        aux["loss/reconstruction"] = sum(fixed[n] * values[n] for n in ("l1", "stft", "mel"))
        aux["metric/si_sdr_db"] = -L.si_sdr_loss(as_seq(jax.lax.stop_gradient(y)), x)
        aux["num_quantizers"] = jnp.mean(out.num_active.astype(jnp.float32))
        aux["weight"] = jnp.sum(lengths).astype(jnp.float32)
        return loss, aux


# ------------------------------------------------------------------------------------ task
MODEL_ARG_DEFAULTS = {
    "codec": {},                 # CodecConfig fields
    "crop": 8000,                # samples per training crop (0.5 s)
    "num_utterances": 1200,      # corpus size (20 % of it, all by held-out voices, for eval)
    "corpus_seed": 0,
    "test_fraction": 0.2,
    "data_dir": None,            # None: $STREAMZOO_DATA or ~/.cache/streamzoo/data
    "fft_sizes": list(L.DEFAULT_STFT_SIZES),
    "mel_scales": [list(s) for s in L.DEFAULT_MEL_SCALES],
    "weights": {},               # CodecLossWeights fields
    "balancer": None,            # None, or {"weights": {name: share}, "total_norm": .., ...}
    "discriminator": None,       # None, or MultiScaleDiscriminator kwargs ({} for defaults)
    "adversarial": 3.0,
    "feature": 3.0,
    "init_weights": None,        # fine-tuning: "pretrained" (the checked-in codec) or a .npz path
}


def model_args(config: TrainConfig) -> dict:
    args = {**MODEL_ARG_DEFAULTS, **config.model_args}
    unknown = sorted(set(args) - set(MODEL_ARG_DEFAULTS))
    if unknown:
        raise ValueError(f"model_args: unknown keys {unknown} for model 'codec'; expected some "
                         f"of {sorted(MODEL_ARG_DEFAULTS)}")
    return args


def codec_config(config: TrainConfig) -> CodecConfig:
    return CodecConfig(**model_args(config)["codec"])


def make_loss(args: Mapping) -> CodecTrainingLoss:
    balancer = None
    if args["balancer"] is not None:
        b = dict(args["balancer"])
        balancer = L.LossBalancer(b.pop("weights"), **b)
    return CodecTrainingLoss(weights=L.CodecLossWeights(**args["weights"]),
                             adversarial=float(args["adversarial"]),
                             feature=float(args["feature"]),
                             fft_sizes=tuple(args["fft_sizes"]),
                             mel_scales=tuple(tuple(s) for s in args["mel_scales"]),
                             balancer=balancer)


def build_model(args: Mapping, seed: int):
    """The module to train: the codec, or `CodecWithDiscriminator` when `args` name one."""
    codec = Codec(CodecConfig(**args["codec"]), rngs=nnx.Rngs(params=seed))
    if args["discriminator"] is None:
        return codec
    disc = L.MultiScaleDiscriminator(**args["discriminator"], rngs=nnx.Rngs(seed + 1))
    return CodecWithDiscriminator(codec, disc)


def init_weights(codec: Codec, path: str) -> None:
    """Load a saved codec's weights into `codec` (whose config must match the saved one)."""
    from streamzoo.zoo.codec.pretrained import load_pretrained

    source = load_pretrained(None if path == "pretrained" else path)
    if source.config != codec.config:
        raise ValueError(f"model_args.init_weights: the codec in {path!r} has config "
                         f"{source.config}, the run's config is {codec.config}")
    nnx.update(codec, nnx.state(source, nnx.Param))


@register_model("codec")
def codec_task(config: TrainConfig) -> TrainTask:
    """The codec on espeak-ng speech crops; evaluation on crops of held-out voices."""
    args = model_args(config)
    if config.seq_len != args["crop"]:
        raise ValueError(f"seq_len: expected the crop length {args['crop']} (model_args.crop), "
                         f"got {config.seq_len}")
    model = build_model(args, config.seed)
    if args["init_weights"] is not None:
        init_weights(model.codec if isinstance(model, CodecWithDiscriminator) else model,
                     args["init_weights"])
    loss = make_loss(args)
    corpus = make_corpus(args, config.seed)
    train = SpeechCrops(load_split(corpus, "train"), config.batch_size, args["crop"],
                        seed=config.seed)
    held_out = SpeechCrops(load_split(corpus, "test"), config.batch_size, args["crop"],
                           seed=config.seed)
    eval_batches = held_out.fixed_batches(config.eval_batches)
    carry = loss.balancer.init() if loss.balancer is not None else None
    return TrainTask(model, loss, train, lambda: eval_batches, carry=carry)


TINY_CODEC = {"channels": 4, "strides": [2, 4], "latent_dim": 8, "dilations": [1],
              "num_quantizers": 3, "codebook_size": 16, "codebook_dim": 4}
TINY_ARGS = {"codec": TINY_CODEC, "crop": 512, "num_utterances": 8, "test_fraction": 0.25,
             "fft_sizes": [128, 64, 32], "mel_scales": [[128, 16], [64, 8]]}
SMALL_CODEC = {"channels": 8, "strides": [2, 4, 5, 8], "latent_dim": 64,
               "dilations": [1, 3, 9], "num_quantizers": 8, "codebook_size": 1024,
               "codebook_dim": 8, "quantizer_dropout": 0.5}
SMALL_ARGS = {"codec": SMALL_CODEC, "crop": 6400}

register_config("codec", "tiny", num_steps=4, batch_size=2, seq_len=512, warmup_steps=1,
                eval_every=2, eval_batches=1, save_every=2, learning_rate=3e-3,
                model_args=TINY_ARGS)
register_config("codec", "tiny-gan-balanced", num_steps=2, batch_size=2, seq_len=512,
                warmup_steps=1, eval_every=2, eval_batches=1, save_every=2,
                model_args={**TINY_ARGS, "discriminator": {"num_scales": 2, "channels": 4,
                                                           "depth": 2},
                            "balancer": {"weights": {"l1": 0.1, "stft": 1.0, "mel": 1.0,
                                                     "adversarial": 1.0, "feature": 1.0}}})
register_config("codec", "small", num_steps=1100, batch_size=8, seq_len=6400, warmup_steps=50,
                learning_rate=2e-3, end_lr_ratio=0.05, eval_every=550, eval_batches=4,
                save_every=100, log_every=10, model_args=SMALL_ARGS)
register_config("codec", "small-continue", num_steps=7000, batch_size=8, seq_len=6400,
                warmup_steps=50, learning_rate=1e-3, end_lr_ratio=0.05, eval_every=1000,
                eval_batches=4, save_every=250, log_every=10,
                model_args={**SMALL_ARGS, "init_weights": "pretrained"})
register_config("codec", "small-gan", num_steps=20000, batch_size=16, seq_len=6400,
                warmup_steps=500, learning_rate=3e-4, eval_every=1000, save_every=1000,
                log_every=50, model_args={**SMALL_ARGS, "discriminator": {},
                                          "balancer": {"weights": {"l1": 0.1, "stft": 1.0,
                                                                   "mel": 1.0, "adversarial": 3.0,
                                                                   "feature": 3.0}}})


# ---------------------------------------------------------------------------- export
def trained_codec(state) -> Codec:
    """The codec of a `TrainState` of this task (without the discriminator)."""
    model = state.model()
    return model.codec if isinstance(model, CodecWithDiscriminator) else model


def export_pretrained(run_dir: str, out_dir: str, *, extra: Mapping | None = None) -> str:
    """Restore the latest checkpoint of a `streamzoo train codec` run directory and write its
    codec's weights for `load_pretrained` (npz + JSON). Returns the npz path."""
    from streamzoo.train.checkpoint import Checkpointer
    from streamzoo.train.loop import TrainState, make_optimizer
    from streamzoo.zoo.codec.pretrained import save_pretrained

    with open(os.path.join(run_dir, "config.json")) as f:
        config = TrainConfig.from_dict(json.load(f))
    args = model_args(config)
    loss = make_loss(args)
    tx, _ = make_optimizer(config.learning_rate, config.num_steps,
                           warmup_steps=min(config.warmup_steps, config.num_steps - 1),
                           end_lr_ratio=config.end_lr_ratio, weight_decay=config.weight_decay,
                           clip_norm=config.clip_norm)

    def abstract_state():
        # Built under eval_shape: the restore target needs shapes only, and initialising
        # the parameters eagerly compiles one small program per shape (slow on a CPU).
        model = build_model(args, config.seed)
        carry = loss.balancer.init() if loss.balancer is not None else None
        return TrainState.create(model, tx, loss, rng=config.seed, carry=carry)

    state = jax.eval_shape(abstract_state).replace(rng=jax.random.key(config.seed))
    with Checkpointer(os.path.join(run_dir, "checkpoints")) as ckpt:
        state, restored = ckpt.restore(state, config=config.to_dict())
    meta = {"train_config": config.to_dict(), "step": restored.step, **(extra or {})}
    return save_pretrained(trained_codec(state), out_dir, metadata=meta)
