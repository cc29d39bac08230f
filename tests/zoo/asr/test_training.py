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
from streamzoo.zoo.asr.training import DEFAULTS, asr_loss, model_config


def test_configs_registered():
    load_families()
    assert {"tiny", "small", "medium"} <= set(CONFIGS["asr"])
    small = load_config("asr", "small")
    args = {**DEFAULTS, **small.model_args}
    model = nnx.eval_shape(lambda: ASRModel(model_config(args), rngs=nnx.Rngs(0)))
    assert count_params(model) < 2_500_000
    assert [l.as_tuple() for l in model.latencies] == [(4, 32, 0), (4, 32, 2), (4, 32, 12)]
    assert model.config.encoder.frame_ms == 40.0


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
    from streamzoo.zoo.asr.pretrained import export_from_run, load_pretrained, state_arrays
    config = load_config("asr", "tiny", [f"model_args.cache_dir={tmp_path / 'data'}"])
    state = run(config, str(tmp_path / "run"), progress=False, plot=False)
    assert int(state.step) == config.num_steps
    npz, _ = export_from_run(str(tmp_path / "run"), str(tmp_path / "w" / "asr"))
    model = load_pretrained(str(tmp_path / "w" / "asr"))
    arrays = state_arrays(model)
    assert np.allclose(arrays["encoder/frontend/mean/value"],
                       np.asarray(state.model().encoder.frontend.mean[...]))
    assert not np.allclose(arrays["encoder/frontend/std/value"], 1.0)  # statistics were set
