"""Codec training: a 20-step smoke test on noise + sine waves with `codec_loss` (quantizer
dropout on) and Adam, whose held-out reconstruction loss at full bitrate falls (slow); the
data pipeline; the balancer's surrogate loss; and `streamzoo train codec --config tiny` end to
end through `streamzoo.train` (checkpoints, held-out evaluation, npz export)."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from streamzoo.zoo.codec import Codec, CodecConfig
from streamzoo.zoo.codec import losses as L

CONFIG = CodecConfig(channels=8, strides=(2, 4), latent_dim=8, dilations=(1,), num_quantizers=3,
                     codebook_size=16, codebook_dim=4, quantizer_dropout=0.5)
LOSS = functools.partial(L.codec_loss, fft_sizes=(64, 32, 16), mel_scales=((64, 16), (32, 8)))


def batch(key, size=4, length=256):
    """Sines of random frequency, amplitude and phase plus a little white noise; ragged."""
    kf, ka, kp, kn, kl = jax.random.split(key, 5)
    t = jnp.arange(length) / CONFIG.sample_rate
    freq = jax.random.uniform(kf, (size, 1), minval=200.0, maxval=2000.0)
    amp = jax.random.uniform(ka, (size, 1), minval=0.2, maxval=0.8)
    phase = jax.random.uniform(kp, (size, 1), maxval=2 * np.pi)
    audio = amp * jnp.sin(2 * np.pi * freq * t + phase)
    audio = audio + 0.05 * jax.random.normal(kn, audio.shape)
    lengths = jax.random.randint(kl, (size,), length // 2, length + 1)
    audio = jnp.where(jnp.arange(length)[None] < lengths[:, None], audio, 0.0)
    return {"audio": audio, "audio_lengths": lengths.astype(jnp.int32)}


@pytest.mark.slow  # ~30 s of compiles on 2 cores; by default the tiny-config run below trains
def test_reconstruction_loss_falls(key):
    model = Codec(CONFIG, rngs=nnx.Rngs(params=key))
    graphdef, params = nnx.split(model)
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, data, rng):
        def loss_fn(p):
            return LOSS(nnx.merge(graphdef, p), data, rng)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux

    @jax.jit
    def eval_loss(params, data):
        _, aux = LOSS(nnx.merge(graphdef, params), data, None)  # all quantizers
        return aux["loss/mel"] + aux["loss/stft"] + aux["loss/l1"]

    held_out = batch(jax.random.fold_in(key, 10_000))
    before = float(eval_loss(params, held_out))
    losses = []
    for step in range(20):
        data = batch(jax.random.fold_in(key, step))
        params, opt_state, loss, aux = train_step(params, opt_state, data,
                                                  jax.random.fold_in(key, 50_000 + step))
        losses.append(float(loss))
        assert np.isfinite(losses[-1]), (step, aux)
        assert 1.0 <= float(aux["num_quantizers"]) <= 3.0
    after = float(eval_loss(params, held_out))
    assert after < 0.9 * before, (before, after, losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses


# --------------------------------------------------------------- streamzoo train codec
def test_speech_crops_are_seeded_and_resumable(key):
    from streamzoo.zoo.codec.training import SpeechCrops

    rng = np.random.default_rng(0)
    utterances = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (300, 900, 1500)]
    a = SpeechCrops(utterances, batch_size=3, crop=512, seed=1)
    first = [next(a) for _ in range(3)]
    b = SpeechCrops(utterances, batch_size=3, crop=512, seed=1)
    b.set_state({"index": 2})
    np.testing.assert_array_equal(next(b)["audio"], first[2]["audio"])
    assert a.get_state() == {"index": 3}
    for batch in first:
        lengths = batch["audio_lengths"]
        assert batch["audio"].shape == (3, 512) and ((lengths == 300) | (lengths == 512)).all()
        for row, n in zip(batch["audio"], lengths):
            assert not row[n:].any()  # end padding is zero
    assert np.array_equal(a.fixed_batches(1)[0]["audio"], a.fixed_batches(1)[0]["audio"])


def test_balancer_surrogate_gives_the_balanced_gradient(key):
    """`sum_i stop_gradient(c_i) * loss_i` has the gradient `balanced_grads` computes."""
    kw, kx = jax.random.split(key)
    w = jax.random.normal(kw, (6, 4))
    x = jax.random.normal(kx, (3, 6))
    losses = {"mse": lambda y: jnp.mean((y - 1.0) ** 2), "l1": lambda y: 10 * jnp.mean(jnp.abs(y))}
    balancer = L.LossBalancer({"mse": 2.0, "l1": 1.0}, ema_decay=0.5)
    state = balancer.init()
    state = balancer.scales(state, {n: jax.grad(f)(x @ w) for n, f in losses.items()})[1]

    want, _, _ = L.balanced_grads(lambda p: (x @ p, jnp.zeros(())), w, losses, balancer, state)

    def surrogate(p):
        y = x @ p
        grads = {n: jax.grad(f)(jax.lax.stop_gradient(y)) for n, f in losses.items()}
        scales, _, _ = balancer.scales(state, grads)
        return sum(jax.lax.stop_gradient(scales[n]) * f(y) for n, f in losses.items())

    np.testing.assert_allclose(jax.grad(surrogate)(w), want, rtol=1e-5, atol=1e-6)


def random_codec(config: CodecConfig, seed: int = 0) -> Codec:
    """A codec with random numpy weights, built without running its initialisers (eager
    initialisation compiles one small program per parameter shape: slow on a loaded CPU)."""
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Codec(config, rngs=nnx.Rngs(0))),
                                       nnx.Param, ...)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype),
                          params)
    return nnx.merge(graphdef, params, rest)


def _tiny_config(tmp_path_factory, name="tiny", **overrides):
    from streamzoo.train.configs import load_config
    from streamzoo.train.data.speech import espeak_available

    if not espeak_available():
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng sox)")
    data = tmp_path_factory.getbasetemp() / "codec-speech"
    sets = [f"model_args.data_dir={json.dumps(str(data))}"]
    sets += [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    return load_config("codec", name, sets)


def test_tiny_config_trains_checkpoints_and_exports(tmp_path_factory):
    """`streamzoo train codec --config tiny` end to end: orbax checkpoints, held-out eval,
    then the npz export that `load_pretrained` reads back bit for bit."""
    from streamzoo.train.configs import run
    from streamzoo.zoo.codec.pretrained import load_pretrained, read_metadata
    from streamzoo.zoo.codec.training import (TINY_CODEC, codec_config, export_pretrained,
                                              trained_codec)

    config = _tiny_config(tmp_path_factory)
    out = tmp_path_factory.mktemp("codec-run")
    state = run(config, str(out), progress=False, plot=False)
    assert int(state.step) == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(np.isfinite(r["loss/reconstruction"]) and r["num_quantizers"] == 3 for r in evals)
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]

    path = export_pretrained(str(out), str(out / "weights"), extra={"note": "test"})
    codec = load_pretrained(path)
    assert codec.config == CodecConfig(**TINY_CODEC) == codec_config(config)
    assert read_metadata(path)["step"] == 4 and read_metadata(path)["note"] == "test"
    want = jax.tree_util.tree_leaves(nnx.state(trained_codec(state), nnx.Param))
    got = jax.tree_util.tree_leaves(nnx.state(codec, nnx.Param))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert load_pretrained(path, num_quantizers=1).num_quantizers == 1
    with pytest.raises(ValueError, match="num_quantizers: expected an int in 1..3"):
        load_pretrained(path, num_quantizers=4)

    # Fine-tuning starts from the exported weights, with the SI-SDR term in the loss.
    from streamzoo.train.configs import build_task, load_config
    task = build_task(load_config("codec", "tiny", [f"model_args.init_weights={path}",
                                                    "model_args.weights.sisdr=0.5"]))
    for g, w in zip(jax.tree_util.tree_leaves(nnx.state(task.model, nnx.Param)), want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    loss, aux = jax.jit(task.loss_fn)(task.model, next(iter(task.train_data)))
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(aux["loss/sisdr"]), -float(aux["metric/si_sdr_db"]), rtol=1e-5)
    with pytest.raises(ValueError, match="model_args.init_weights: the codec in"):
        build_task(load_config("codec", "tiny", [f"model_args.init_weights={path}",
                                                 "model_args.codec.latent_dim=4"]))


def test_bad_config_and_weights(tmp_path):
    from streamzoo.train.configs import build_task, load_config
    from streamzoo.zoo.codec.pretrained import load_pretrained, save_pretrained

    with pytest.raises(ValueError, match="model_args: unknown keys \\['bogus'\\]"):
        build_task(load_config("codec", "tiny", ["model_args.bogus=1"]))
    with pytest.raises(ValueError, match="seq_len: expected the crop length 512"):
        build_task(load_config("codec", "tiny", ["seq_len=100"]))
    with pytest.raises(FileNotFoundError, match="path: no such file"):
        load_pretrained(str(tmp_path / "missing.npz"))
    # Weights of another config: named as such.
    path = save_pretrained(random_codec(CONFIG), str(tmp_path), name="c")
    meta = json.loads((tmp_path / "c.json").read_text())
    meta["codec_config"]["latent_dim"] = 16
    (tmp_path / "c.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="expected shape"):
        load_pretrained(path)


@pytest.mark.slow  # ~50 s of compiles on 2 cores
def test_gan_with_balancer_trains_both_parts(tmp_path_factory):
    """`--config tiny-gan-balanced`: one optimizer trains codec and discriminator; the
    balancer's EMA state is carried (and checkpointed) in `TrainState.carry`."""
    from streamzoo.train.configs import build_task
    from streamzoo.train.loop import TrainState, make_optimizer, train_step

    task = build_task(_tiny_config(tmp_path_factory, "tiny-gan-balanced"))
    tx, _ = make_optimizer(1e-3, 10)
    state = TrainState.create(task.model, tx, task.loss_fn, rng=0, carry=task.carry)
    before = nnx.state(task.model, nnx.Param)
    for _ in range(2):
        state, metrics = train_step(state, next(task.train_data))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["loss/discriminator"]) > 0 and "grad_norm/adversarial" in metrics
    np.testing.assert_allclose(float(state.carry.denominator["mel"]), 1 + 0.999)  # two updates
    after = state.params
    for part in ("codec", "discriminator"):
        moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), before[part], after[part])
        assert max(jax.tree_util.tree_leaves(moved)) > 0, part
