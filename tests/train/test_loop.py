"""The train loop: loss goes down on real data, gradient accumulation equals one big batch,
bf16 compute keeps float32 params, per-step PRNG keys, fit (eval, hooks, metrics, plots), the
CLI, and truncated BPTT / dynamic-chunk helpers."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from streamzoo.core.seq import Seq
from streamzoo.train.configs import (WindowBatches, build_predictor, eeg_series, load_config,
                                     masked_mse, predictor_loss, train_main)
from streamzoo.train.loop import (StepOptions, TrainState, evaluate, fit, make_optimizer,
                                  train_step)
from streamzoo.train.metrics import read_metrics
from streamzoo.train.tbptt import (DynamicChunkSampler, chunk_attention_mask, make_tbptt_loss_fn,
                                   random_partition, tbptt_loss)

B, T, HIDDEN = 4, 16, 8
TX, SCHEDULE = make_optimizer(1e-2, 100, warmup_steps=0)  # lr > 0 from the first update


def new_state(seed=0, *, loss_fn=predictor_loss, options=None, carry=None, tx=TX):
    model = build_predictor(4, HIDDEN, rngs=nnx.Rngs(seed))
    return TrainState.create(model, tx, loss_fn, rng=seed, options=options, carry=carry)


def eeg_batches(seed=0, min_length=None):
    return WindowBatches(eeg_series()[:640], B, T, seed=seed, min_length=min_length)


def test_train_step_reduces_loss_on_real_eeg():
    state = new_state()
    data = eeg_batches()
    held = data.fixed_batches(2)
    before = evaluate(state, held)["loss"]
    for _ in range(25):
        state, metrics = train_step(state, next(data))
    after = evaluate(state, held)["loss"]
    assert int(state.step) == 25
    assert np.isfinite(metrics["loss"]) and float(metrics["grad_norm"]) > 0
    assert after < 0.8 * before, (before, after)


def test_gradient_accumulation_equals_one_big_batch():
    # Ragged rows: the micro batches hold different numbers of valid frames, so only the
    # frame-weighted average (aux["weight"]) matches the big-batch mean.
    batch = next(eeg_batches(seed=3, min_length=5))
    lengths = np.asarray(batch["inputs"].lengths())
    assert lengths[:2].sum() != lengths[2:].sum()
    big, m_big = train_step(new_state(), batch)
    acc, m_acc = train_step(new_state(options=StepOptions(accum_steps=2)), batch)
    np.testing.assert_allclose(m_acc["loss"], m_big["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_acc["grad_norm"], m_big["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(big.params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    for a, b in zip(jax.tree.leaves(acc.opt_state), jax.tree.leaves(big.opt_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_accumulation_rejects_indivisible_batch():
    batch = next(eeg_batches())
    with pytest.raises(ValueError, match="accum_steps=3"):
        train_step(new_state(options=StepOptions(accum_steps=3)), batch)


def test_bf16_compute_with_float32_params():
    seen = []

    def loss_fn(model, batch, rng):
        seen.append((model.inner.layers[0].up.kernel[...].dtype, batch["inputs"].values.dtype,
                     batch["targets"].dtype))
        return predictor_loss(model, batch, rng)

    batch = next(eeg_batches())
    state = new_state(loss_fn=loss_fn, options=StepOptions(compute_dtype="bfloat16"))
    ref, m_ref = train_step(new_state(), batch)
    new, m = train_step(state, batch)
    assert seen[-1] == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(new.params))
    assert all(a.dtype in (jnp.float32, jnp.int32) for a in jax.tree.leaves(new.opt_state))
    assert m["loss"].dtype == jnp.float32
    np.testing.assert_allclose(m["loss"], m_ref["loss"], rtol=3e-2)
    # The update differs from the float32 one only by bf16 rounding, not in kind.
    delta = lambda s: jnp.concatenate([(a - b).ravel() for a, b in
                                       zip(jax.tree.leaves(s.params), jax.tree.leaves(state.params))])
    d16, d32 = delta(new), delta(ref)
    assert jnp.dot(d16, d32) / (jnp.linalg.norm(d16) * jnp.linalg.norm(d32)) > 0.9
    with pytest.raises(ValueError, match="compute_dtype"):
        StepOptions(compute_dtype="int8")


def test_fresh_rng_per_step_and_micro_batch():
    def loss_fn(model, batch, rng):
        loss, aux = predictor_loss(model, batch, rng)
        return loss, {**aux, "noise": jax.random.uniform(rng)}

    batch = next(eeg_batches())
    state = new_state(loss_fn=loss_fn)
    s1, m1 = train_step(state, batch)
    s2, m2 = train_step(s1, batch)
    _, m1_again = train_step(state, batch)
    assert float(m1["noise"]) != float(m2["noise"])
    assert float(m1["noise"]) == float(m1_again["noise"])  # explicit keys: reproducible
    with pytest.raises(ValueError, match="rng"):
        TrainState.create(build_predictor(4, HIDDEN, rngs=nnx.Rngs(0)), TX, loss_fn,
                          rng=np.uint32([0, 1]))


def test_schedule_and_weight_decay_mask():
    tx, schedule = make_optimizer(1.0, 20, warmup_steps=5, end_lr_ratio=0.1, weight_decay=0.5,
                                  clip_norm=None)
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(20)], [0.0, 1.0, 0.1], atol=1e-6)
    assert schedule(3) < schedule(5) and schedule(10) > schedule(15)
    # With zero gradients only weight decay moves parameters: kernels shrink, biases stay.
    state = TrainState.create(build_predictor(4, HIDDEN, rngs=nnx.Rngs(0)), tx, predictor_loss)
    zero = jax.tree.map(jnp.zeros_like, state.params)
    opt = state.opt_state
    for _ in range(6):
        updates, opt = tx.update(zero, opt, state.params)
    new = optax.apply_updates(state.params, updates)
    assert not np.allclose(new["inner"]["layers"][0]["up"]["kernel"][...],
                           state.params["inner"]["layers"][0]["up"]["kernel"][...])
    conv_bias = lambda params: params["inner"]["layers"][1]["bias"][...]
    np.testing.assert_array_equal(conv_bias(new), conv_bias(state.params))
    with pytest.raises(ValueError, match="warmup_steps"):
        make_optimizer(1e-3, 10, warmup_steps=10)


def test_fit_logs_evaluates_calls_hooks_and_plots(tmp_path):
    calls = []
    state = new_state(options=StepOptions(lr_schedule=SCHEDULE))
    held = eeg_batches().fixed_batches(1)
    out = fit(state, eeg_batches(), num_steps=6, eval_data=lambda: held, eval_every=3,
              hooks=[lambda step, s, m: calls.append((step, m["loss"]))],
              metrics_path=tmp_path / "m.jsonl", plot_path=tmp_path / "c.png", progress=False)
    assert int(out.step) == 6
    assert [c[0] for c in calls] == [1, 2, 3, 4, 5, 6]
    records = read_metrics(tmp_path / "m.jsonl")
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [3, 6]
    assert {"loss", "grad_norm", "lr", "step_time"} <= set(train[0])
    assert os.path.getsize(tmp_path / "c.png") > 10_000


def test_cli_trains_a_registered_model(tmp_path, capsys):
    out = tmp_path / "run"
    code = train_main(["predictor", "--config", "tiny", "--set", "num_steps=3", "--set",
                       "eval_every=3", "--out", str(out), "--no-progress"])
    assert code == 0
    assert json.loads((out / "config.json").read_text())["num_steps"] == 3
    assert {"metrics.jsonl", "curves.png", "checkpoints"} <= set(os.listdir(out))
    assert train_main(["predictor", "--config", "no-such-config"]) == 2
    assert "no-such-config" in capsys.readouterr().err
    assert train_main(["no-such-model"]) == 2
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"base": "tiny", "learning_rate": 0.5,
                                    "model_args": {"hidden": 4}}))
    cfg = load_config("predictor", str(cfg_file), ["model_args.kernel_size=2"])
    assert (cfg.learning_rate, cfg.num_steps, cfg.model_args) == (0.5, 40, {"hidden": 4, "kernel_size": 2})
    with pytest.raises(ValueError, match="unknown keys"):
        load_config("predictor", "tiny", ["no_such_key=1"])


# ----------------------------------------------------------------------------- TBPTT
def test_tbptt_carry_passes_between_chunks_and_gradients_stop(key):
    model = build_predictor(4, HIDDEN, rngs=nnx.Rngs(1))
    k1, k2 = jax.random.split(key)
    x = Seq.from_lengths(jax.random.normal(k1, (2, 12, 4)), jnp.array([12, 9]))
    targets = jax.random.normal(k2, (2, 12, 4))

    def tb(values):
        return tbptt_loss(model, x.replace(values=values), targets, masked_mse, chunk_size=4)

    def full_bptt(values):
        return predictor_loss(model, {"inputs": x.replace(values=values), "targets": targets}, None)[0]

    def first_chunk_only(values):
        y = model(x.replace(values=values))
        total, _ = masked_mse(y.time_slice(0, 4), targets[:, :4])
        return total / (x.mask.sum() * 4)

    @jax.jit
    def losses_and_grads(v):
        (loss, aux), g_tb = jax.value_and_grad(tb, has_aux=True)(v)
        offline, g_full = jax.value_and_grad(full_bptt)(v)
        g_first = jax.grad(first_chunk_only)(v)
        return loss, aux, offline, g_tb[:, :4], g_first[:, :4], g_full[:, :4]

    loss, (carry, chunk_losses), offline, g_tb, g_first, g_full = losses_and_grads(x.values)
    # Forward: the carry crosses chunk boundaries, so the loss equals the offline one.
    np.testing.assert_allclose(loss, offline, rtol=1e-5)
    assert chunk_losses.shape == (3,)
    lstm_h = carry.inner.layers[2].h
    assert lstm_h.shape == (2, HIDDEN) and float(jnp.abs(lstm_h).sum()) > 0
    # Backward: d loss / d (chunk-0 inputs) holds only chunk 0's own loss term, while full
    # BPTT also carries the later chunks' terms back through the carry.
    np.testing.assert_allclose(g_tb, g_first, atol=1e-6)
    assert float(jnp.abs(g_full - g_first).max()) > 1e-4

    with pytest.raises(ValueError, match="chunk_size"):
        tbptt_loss(model, x, targets, masked_mse, chunk_size=5)


def test_tbptt_across_steps_keeps_the_carry_in_the_state(key):
    model = build_predictor(4, HIDDEN, rngs=nnx.Rngs(2))
    loss_fn = make_tbptt_loss_fn(masked_mse, chunk_size=4)
    k1, k2 = jax.random.split(key)
    stream = jax.random.normal(k1, (2, 16, 4))
    targets = jax.random.normal(k2, (2, 16, 4))
    seg = lambda i, reset: {"inputs": Seq.full(stream[:, 8 * i:8 * i + 8]),
                            "targets": targets[:, 8 * i:8 * i + 8], "reset": jnp.array(reset)}
    state = TrainState.create(model, optax.sgd(0.0), loss_fn, carry=model.init_carry(2))
    s1, _ = train_step(state, seg(0, [True, True]))
    s2, m2 = train_step(s1, seg(1, [False, True]))
    # lr 0: params fixed, so segment 2's loss must equal the offline loss of its frames for
    # row 0 (carried history) and of a fresh stream for row 1 (reset).
    @jax.jit
    def expected(model):
        y_full = model(Seq.full(stream))
        y_fresh = model(Seq.full(stream[:, 8:]))
        err0 = jnp.square(y_full.values[0, 8:] - targets[0, 8:]).sum()
        err1 = jnp.square(y_fresh.values[1] - targets[1, 8:]).sum()
        return (err0 + err1) / (2 * 8 * 4)

    np.testing.assert_allclose(m2["loss"], expected(model), rtol=1e-5)
    assert not np.allclose(s1.carry.inner.layers[2].h, state.carry.inner.layers[2].h)
    with pytest.raises(ValueError, match="accum_steps"):
        TrainState.create(model, TX, loss_fn, carry=model.init_carry(2),
                          options=StepOptions(accum_steps=2))


def test_dynamic_chunk_helpers():
    sampler = DynamicChunkSampler(chunk_sizes=(2, 4), left_chunks=(None, 1), full_context_prob=0.3,
                                  seed=5)
    draws = [sampler.sample(s) for s in range(40)]
    assert draws == [sampler.sample(s) for s in range(40)]  # a function of (seed, step)
    assert {d.chunk_size for d in draws} == {None, 2, 4}
    assert {d.left_chunks for d in draws if d.chunk_size} == {None, 1}
    m = np.asarray(chunk_attention_mask(6, 2, left_chunks=1))
    expected = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(m, expected)
    assert np.asarray(chunk_attention_mask(5, None)).all()
    parts = random_partition(np.random.default_rng(0), 24, (2, 4, 6), block_size=2)
    assert sum(parts) == 24 and all(p % 2 == 0 for p in parts)
    with pytest.raises(ValueError, match="chunk_sizes"):
        DynamicChunkSampler(chunk_sizes=(0,))
