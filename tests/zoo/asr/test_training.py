"""`streamzoo train asr`: the registered configs, the dynamic-latency CTC loss and (slow) a
tiny end-to-end run on a freshly generated espeak-ng corpus, exported and reloaded."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from streamzoo.train.configs import CONFIGS, load_config, load_families
from streamzoo.zoo.asr.encoder import count_params
from streamzoo.zoo.asr.model import ASRModel
from streamzoo.zoo.asr.text import encode_batch
from streamzoo.zoo.asr.training import (DEFAULTS, add_dither, asr_loss, delay_rows, init_weights,
                                        model_config)


def test_configs_registered():
    load_families()
    assert {"tiny", "small", "small-finetune", "medium"} <= set(CONFIGS["asr"])
    small = load_config("asr", "small")
    args = {**DEFAULTS, **small.model_args}
    model = nnx.eval_shape(lambda: ASRModel(model_config(args), rngs=nnx.Rngs(0)))
    assert count_params(model) < 2_500_000
    assert [l.as_tuple() for l in model.latencies] == [(4, 32, 0), (4, 32, 2), (4, 32, 12)]
    assert model.config.encoder.frame_ms == 40.0


def test_delay_rows_moves_each_row_within_its_padding(key):
    k1, k2, k3 = jax.random.split(key, 3)
    lengths = jax.numpy.array([40, 25, 9, 33])
    audio = jax.random.normal(k1, (4, 40))
    audio = jax.numpy.where(jax.numpy.arange(40)[None] < lengths[:, None], audio, 0.0)
    delayed, new_lengths = delay_rows(k2, audio, lengths, max_samples=12)
    shifts = np.asarray(new_lengths - lengths)
    assert shifts[0] == 0 and np.all(shifts >= 0) and np.all(shifts <= np.minimum(40 - lengths, 12))
    assert shifts.sum() > 0
    for b, s in enumerate(shifts):
        n = int(lengths[b])
        np.testing.assert_array_equal(delayed[b, s:s + n], audio[b, :n])  # nothing cut or changed
        assert np.all(delayed[b, :s] == 0) and np.all(delayed[b, s + n:] == 0)
    noisy = add_dither(k3, delayed, new_lengths, (-30.0, -20.0))
    valid = np.arange(40)[None] < np.asarray(new_lengths)[:, None]
    assert np.all(np.asarray(noisy)[~valid] == 0)  # padding stays silent
    rms = np.sqrt(np.mean((np.asarray(noisy - delayed)[valid]) ** 2))
    assert 10 ** (-31 / 20) < rms < 10 ** (-19 / 20)


def test_init_weights_loads_the_shipped_checkpoint_and_rejects_another_config():
    from streamzoo.zoo.asr.pretrained import load_pretrained

    small = {**DEFAULTS, **CONFIGS["asr"]["small"]["model_args"]}
    model = nnx.eval_shape(lambda: ASRModel(model_config(small), rngs=nnx.Rngs(3)))
    init_weights(model, "pretrained")
    shipped = nnx.state(load_pretrained())
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(shipped)):
        np.testing.assert_array_equal(a, b)
    tiny = ASRModel(model_config({**DEFAULTS, **CONFIGS["asr"]["tiny"]["model_args"]}),
                    rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="init_weights"):
        init_weights(tiny, "pretrained")


def test_loss_samples_latency_and_is_finite():
    args = {**DEFAULTS, **CONFIGS["asr"]["tiny"]["model_args"]}
    model = ASRModel(model_config(args), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    labels, lengths = encode_batch(["go", "a b"])
    batch = {"audio": rng.standard_normal((2, 6400)).astype(np.float32) * 0.1,
             "audio_lengths": np.array([6400, 4000], np.int32),
             "tokens": labels, "token_lengths": lengths}

    @jax.jit
    def loss_and_grad(m, key):
        return nnx.value_and_grad(lambda m: asr_loss(m, batch, key, gain_db=6.0)[0])(m)

    for seed in (0, 1):
        loss, grads = loss_and_grad(model, jax.random.key(seed))
        assert np.isfinite(float(loss)) and float(loss) > 0
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    # evaluation (rng=None): the model's own latency, no gain
    loss, aux = asr_loss(model, batch, None)
    assert np.isfinite(float(loss)) and float(aux["weight"]) == 5.0
    with pytest.raises(ValueError, match="model_args"):
        from streamzoo.train.configs import build_task
        build_task(load_config("asr", "tiny", ["model_args.bogus=1"]))


@pytest.mark.slow
def test_tiny_run_exports(tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    from streamzoo.train.configs import run
    from streamzoo.zoo.asr.pretrained import export_from_run, load_pretrained
    from streamzoo.zoo.weights import state_arrays
    config = load_config("asr", "tiny", [f"model_args.cache_dir={tmp_path / 'data'}"])
    state = run(config, str(tmp_path / "run"), progress=False, plot=False)
    assert int(state.step) == config.num_steps
    npz, _ = export_from_run(str(tmp_path / "run"), str(tmp_path / "w" / "asr"))
    model = load_pretrained(str(tmp_path / "w" / "asr"))
    arrays = state_arrays(model)
    assert np.allclose(arrays["encoder/frontend/mean"],
                       np.asarray(state.model().encoder.frontend.mean[...]))
    assert not np.allclose(arrays["encoder/frontend/std"], 1.0)  # statistics were set
