"""LM training on real text: the "lm" tiny config trains (loss drops) through train/; batches
are shifted windows; ragged (masked) rows; weights export/load round trip; the checked-in
weights load and give a low held-out loss; bad input."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from streamzoo.layers.kv_policies import FullCache, SinksWindow
from streamzoo.train.configs import CONFIGS, build_task, load_config, run
from streamzoo.train.data.text import available_sources
from streamzoo.train.metrics import read_metrics
from streamzoo.zoo.lm import training
from streamzoo.zoo.lm.perplexity import offline_nll


def test_registered_configs():
    assert {"default", "tiny", "small"} <= set(CONFIGS["lm"])
    small = load_config("lm", "small")
    assert small.seq_len == 128 and small.model_args["source"] == "python-docs"


def test_tiny_config_trains(tmp_path):
    """A few steps of the tiny config through `streamzoo.train.configs.run` (orbax checkpoint,
    metrics, held-out eval): the loss falls well below the uniform 5.55 nats/byte."""
    config = load_config("lm", "tiny")
    state = run(config, str(tmp_path), progress=False, plot=False)
    assert int(state.step) == config.num_steps
    records = read_metrics(tmp_path / "metrics.jsonl")
    train = [r["loss"] for r in records if r["split"] == "train"]
    evals = [r["loss"] for r in records if r["split"] == "eval"]
    assert np.isfinite(train).all() and len(evals) == 1
    assert np.mean(train[-5:]) < np.mean(train[:3]) - 1.0, train
    assert evals[0] < 4.5, evals


def test_batches_and_masked_loss(key):
    """Targets are the inputs shifted by one token; with `min_length` and a key the loss counts
    only each row's random valid prefix (masked windows), without a key every token."""
    config = load_config("lm", "tiny")
    task = build_task(config)
    batch = next(task.train_data)
    x, targets = batch["inputs"], batch["targets"]
    assert x.values.shape == targets.shape == (config.batch_size, config.seq_len)
    assert x.values.dtype == jnp.int32 and bool(x.mask.all())
    np.testing.assert_array_equal(x.values[:, 1:], targets[:, :-1])
    both = jax.jit(lambda m, b, k: (task.loss_fn(m, b, k), task.loss_fn(m, b, None)))
    (loss, aux), (full_loss, full_aux) = both(task.model, batch, key)
    total = config.batch_size * config.seq_len
    assert float(full_aux["weight"]) == total
    assert config.batch_size * 16 <= float(aux["weight"]) < total
    assert np.isfinite(float(loss)) and abs(float(loss) - float(full_loss)) < 0.5


def test_export_load_round_trip(tmp_path, key):
    """save_weights + load_pretrained give back the parameters bitwise under another policy;
    weights that do not fit their JSON architecture raise."""
    arch = {"vocab_size": 258, "features": 16, "num_layers": 2, "num_heads": 4,
            "num_kv_heads": 2, "hidden": 32, "tie_embeddings": True, "rope_base": 10000.0}
    model = training.build_lm(arch, FullCache(16), seed=3)
    npz, meta = training.save_weights(model, str(tmp_path), "t", context=16, info={"x": 1})
    loaded = training.load_pretrained(SinksWindow(2, 6), name="t", directory=str(tmp_path))
    assert loaded.policy == SinksWindow(2, 6)
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                    jax.tree.leaves(nnx.state(loaded, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert training.pretrained_info("t", str(tmp_path))["x"] == 1
    data = json.load(open(meta))
    data["architecture"]["hidden"] = 48
    json.dump(data, open(meta, "w"))
    with pytest.raises(ValueError, match=r"t.npz \(for the architecture in t.json\): .*expected shape"):
        training.load_pretrained(name="t", directory=str(tmp_path))
    with pytest.raises(ValueError, match="name: expected weights 'nope'"):
        training.load_pretrained(name="nope", directory=str(tmp_path))
    with pytest.raises(ValueError, match="policy"):
        training.load_pretrained("full", name="t", directory=str(tmp_path))


@pytest.mark.skipif("python-docs" not in available_sources(),
                    reason="python3-doc is not installed (the checked-in models' corpus)")
@pytest.mark.parametrize("name", ["lm-small", "lm-small-sink"])
def test_checked_in_weights_heldout_loss(name):
    """The checked-in models load (< 5 MB each) and predict held-out text they never saw at a
    low loss (the start-token model with its start token in front)."""
    info = training.pretrained_info(name)
    assert os.path.getsize(os.path.join(training.WEIGHTS_DIR, name + ".npz")) < 5 * 2 ** 20
    corpus_info = info["corpus"]
    corpus = training.text_corpus(corpus_info["source"], corpus_info["heldout_fraction"],
                                  corpus_info["split_seed"])
    assert list(corpus.heldout_names) == corpus_info["heldout_documents"]
    model = training.load_pretrained(name=name)
    context, start = info["context"], info["start_token"]
    offset = len(corpus.heldout_tokens) // 2
    width = context + (start is None)     # C + 1 tokens, or START + C tokens
    tokens = np.asarray(corpus.heldout_tokens[offset:offset + 2 * width], np.int32)
    tokens = tokens.reshape(2, width)
    if start is not None:
        tokens = np.concatenate([np.full((2, 1), start, np.int32), tokens], axis=1)
    nll = offline_nll(model, tokens)
    assert np.isfinite(nll).all()
    assert float(nll.mean()) < 2.0, float(nll.mean())   # uniform over 258 ids: 5.55 nats/byte


def test_bad_model_args():
    with pytest.raises(ValueError, match="model_args: unknown keys"):
        build_task(load_config("lm", "tiny", ["model_args.depth=3"]))
    with pytest.raises(ValueError, match="model_args.min_length"):
        build_task(load_config("lm", "tiny", ["model_args.min_length=99"]))
