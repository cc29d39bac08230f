"""The training loop: `TrainState`, a pure jitted `train_step`, `evaluate` and `fit`.

`TrainState` holds everything that changes during training as arrays (step, float32 params,
optimizer state, PRNG key, optionally a live stream carry) and, as static fields, what does
not (the model's graphdef, the optax transformation, the loss function, `StepOptions`). So
`train_step(state, batch) -> (state, metrics)` is one pure function, jitted once per model.

The loss function has the form `loss_fn(model, batch, rng) -> (loss, aux)`: `model` is the
merged module (in the compute dtype), `aux` a dict of scalar metrics, `rng` a fresh key per
step (and per micro batch) for dropout or sampling, or None during evaluation. With a
stream carry in the state (TBPTT across steps, see `tbptt.py`) it is
`loss_fn(model, batch, rng, carry)` and `aux["carry"]` is the carry for the next step.

Gradient accumulation is an explicit `lax.scan` over micro batches inside one step (not
`optax.MultiSteps`): one call is one optimizer update, so `state.step`, the learning-rate
schedule, checkpoints and the data position all count updates; no accumulator lives in the
optimizer state; and the averaged gradient equals the big-batch gradient (weighted by
`aux["weight"]`, e.g. a frame count, when the loss is a mean over a varying number of frames).

Mixed precision: parameters and optimizer state stay float32; with
`StepOptions(compute_dtype="bfloat16")` the step casts the parameters (and the batch
entries named in `cast_inputs`) to bfloat16 inside the differentiated function, so the
forward and backward passes run in bfloat16 while gradients arrive in float32. (bfloat16
has float32's exponent range, so no loss scaling is applied; float16 compute would need it.)
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from streamzoo.train.metrics import MetricsLogger, plot_metrics, to_floats

LossFn = Callable[..., tuple[jax.Array, dict]]


# ----------------------------------------------------------------------------- optimizer
def make_optimizer(learning_rate: float, total_steps: int, *, warmup_steps: int = 0,
                   end_lr_ratio: float = 0.1, weight_decay: float = 1e-4, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8, clip_norm: float | None = 1.0):
    """AdamW with linear warm-up then cosine decay, after global-norm clipping.

    Weight decay applies to matrices and kernels only (`ndim >= 2`), not to biases and norm
    scales. Returns `(tx, schedule)`; `schedule(step)` is the learning rate of update `step`.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps: expected a positive int, got {total_steps!r}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps: expected 0 <= warmup_steps < total_steps={total_steps}, "
                         f"got {warmup_steps!r}")
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
        decay_steps=total_steps, end_value=learning_rate * end_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts), schedule


# ---------------------------------------------------------------------------- the state
@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static options of `train_step` (part of the jit cache key).

    accum_steps: micro batches per update; the batch's leading axis must divide by it.
    compute_dtype: None (float32) or e.g. "bfloat16": the dtype of forward and backward.
    cast_inputs: batch entries (dict keys) cast to `compute_dtype` (floating leaves only);
        targets stay in their dtype so that the loss is computed in float32.
    lr_schedule: when given, the step reports `lr`, the learning rate it applied.
    """

    accum_steps: int = 1
    compute_dtype: str | None = None
    cast_inputs: tuple[str, ...] = ("inputs",)
    lr_schedule: Callable | None = None

    def __post_init__(self):
        if not isinstance(self.accum_steps, int) or self.accum_steps < 1:
            raise ValueError(f"accum_steps: expected a positive int, got {self.accum_steps!r}")
        if self.compute_dtype is not None:
            try:
                dtype = jnp.dtype(self.compute_dtype)
            except TypeError:
                dtype = None
            if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(f"compute_dtype: expected None or a floating dtype name such as "
                                 f"'bfloat16', got {self.compute_dtype!r}")
            object.__setattr__(self, "compute_dtype", dtype.name)
        object.__setattr__(self, "cast_inputs", tuple(self.cast_inputs))


@struct.dataclass
class TrainState:
    """Arrays that change during training, plus the static parts that define the step."""

    step: jax.Array            # int32 scalar: optimizer updates done
    params: nnx.State          # the model's nnx.Param variables, float32
    opt_state: Any             # optax state (NamedTuples), float32
    rng: jax.Array             # typed PRNG key, split once per step
    model_state: nnx.State     # non-trainable variables, passed through unchanged
    graphdef: Any = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    loss_fn: LossFn = struct.field(pytree_node=False)
    options: StepOptions = struct.field(pytree_node=False)
    carry: Any = None          # optional live stream carry (TBPTT across steps)

    @classmethod
    def create(cls, model: nnx.Module, tx: optax.GradientTransformation, loss_fn: LossFn, *,
               rng: int | jax.Array = 0, options: StepOptions | None = None,
               carry: Any = None) -> "TrainState":
        """Split `model` into graphdef / params / other state and initialise the optimizer.

        `rng`: an int seed or a typed PRNG key. `carry`: a stream carry (e.g.
        `model.init_carry(batch_size)`) to train with TBPTT across steps.
        """
        if isinstance(rng, int):
            rng = jax.random.key(rng)
        elif not jnp.issubdtype(getattr(rng, "dtype", None), jax.dtypes.prng_key):
            raise ValueError(f"rng: expected an int seed or a typed key from jax.random.key, "
                             f"got {type(rng).__name__} {getattr(rng, 'dtype', '')}")
        options = options or StepOptions()
        if carry is not None and options.accum_steps != 1:
            raise ValueError(f"options.accum_steps: a state with a stream carry needs "
                             f"accum_steps=1 (the carry's rows are the batch), got {options.accum_steps}")
        graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
        bad = [jax.tree_util.keystr(p) for p, a in jax.tree_util.tree_leaves_with_path(params)
               if a.dtype != jnp.float32]
        if bad:
            raise ValueError(f"model: expected float32 parameters (mixed precision keeps the master "
                             f"copy in float32), got other dtypes at {bad[:5]}")
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   rng=rng, model_state=model_state, graphdef=graphdef, tx=tx, loss_fn=loss_fn,
                   options=options, carry=carry)

    def model(self, dtype=None) -> nnx.Module:
        """The module with the current parameters (cast to `dtype` when given)."""
        params = self.params if dtype is None else cast_floating(self.params, dtype)
        return nnx.merge(self.graphdef, params, self.model_state)


def cast_floating(tree, dtype):
    """Every floating leaf of `tree` cast to `dtype`; other leaves (ints, bools, keys) kept."""
    dtype = jnp.dtype(dtype)

    def cast(a):
        if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != dtype:
            return a.astype(dtype)
        return a

    return jax.tree.map(cast, tree)


# --------------------------------------------------------------------------- train step
def _cast_batch(batch, options: StepOptions):
    if options.compute_dtype is None or not options.cast_inputs or not isinstance(batch, Mapping):
        return batch
    return {k: cast_floating(v, options.compute_dtype) if k in options.cast_inputs else v
            for k, v in batch.items()}


def _loss_and_grads(state: TrainState, batch, rng, carry):
    """`((loss, aux), grads)` for one (micro) batch, grads float32 like the params."""
    options = state.options

    def loss_of(params):
        if options.compute_dtype is not None:
            params = cast_floating(params, options.compute_dtype)
        model = nnx.merge(state.graphdef, params, state.model_state)
        inputs = _cast_batch(batch, options)
        out = (state.loss_fn(model, inputs, rng) if carry is None
               else state.loss_fn(model, inputs, rng, carry))
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
            raise ValueError("loss_fn: expected to return (loss, aux) with aux a dict of metrics, "
                             f"got {type(out).__name__}")
        loss, aux = out
        if jnp.shape(loss) != ():
            raise ValueError(f"loss_fn: expected a scalar loss, got shape {jnp.shape(loss)}")
        return loss.astype(jnp.float32), dict(aux)

    return jax.value_and_grad(loss_of, has_aux=True)(state.params)


def _split_micro(batch, k: int):
    def split(path, a):
        a = jnp.asarray(a)
        if a.ndim == 0 or a.shape[0] % k:
            raise ValueError(
                f"batch{jax.tree_util.keystr(path)}: gradient accumulation over accum_steps={k} "
                f"needs a leading batch axis divisible by {k}, got shape {a.shape}")
        return a.reshape(k, a.shape[0] // k, *a.shape[1:])

    return jax.tree_util.tree_map_with_path(split, batch)


def _accumulated(state: TrainState, batch, rng):
    """Mean loss / aux / grads over `accum_steps` micro batches, weighted by aux['weight']."""
    k = state.options.accum_steps
    micro = _split_micro(batch, k)
    keys = jax.random.split(rng, k)
    first = jax.tree.map(lambda a: a[0], micro)
    (_, aux_shape), _ = jax.eval_shape(lambda b: _loss_and_grads(state, b, keys[0], None), first)

    def body(acc, inputs):
        mb, key = inputs
        (loss, aux), grads = _loss_and_grads(state, mb, key, None)
        w = jnp.asarray(aux.get("weight", 1.0), jnp.float32)
        acc_grads, acc_loss, acc_aux, acc_w = acc
        acc_grads = jax.tree.map(lambda a, g: a + w * g, acc_grads, grads)
        acc_aux = {n: acc_aux[n] + w * jnp.asarray(v, jnp.float32) for n, v in aux.items()}
        return (acc_grads, acc_loss + w * loss, acc_aux, acc_w + w), None

    zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32),
             {n: jnp.zeros((), jnp.float32) for n in aux_shape}, jnp.zeros((), jnp.float32))
    (grads, loss, aux, total), _ = jax.lax.scan(body, zeros, (micro, keys))
    grads = jax.tree.map(lambda g: g / total, grads)
    aux = {n: v / total for n, v in aux.items()}
    if "weight" in aux:
        aux["weight"] = total
    return (loss / total, aux), grads


def train_step_fn(state: TrainState, batch) -> tuple[TrainState, dict]:
    rng, step_rng = jax.random.split(state.rng)
    new_carry = state.carry
    if state.options.accum_steps == 1:
        (loss, aux), grads = _loss_and_grads(state, batch, step_rng, state.carry)
        if state.carry is not None:
            if "carry" not in aux:
                raise ValueError("loss_fn: a state with a stream carry expects aux['carry'] "
                                 "(the carry for the next step), got none")
            new_carry = jax.lax.stop_gradient(aux.pop("carry"))
    else:
        (loss, aux), grads = _accumulated(state, batch, step_rng)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    if state.options.lr_schedule is not None:
        metrics["lr"] = state.options.lr_schedule(state.step)
    metrics.update({n: v for n, v in aux.items() if n != "loss"})
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng,
                        carry=new_carry)
    return new, metrics


train_step = jax.jit(train_step_fn)
"""`train_step(state, batch) -> (state, metrics)`: one optimizer update (pure, jitted)."""

train_step_donated = jax.jit(train_step_fn, donate_argnums=0)
"""`train_step` that donates the incoming state's buffers (what `fit` uses)."""


def _eval_step(state: TrainState, batch) -> dict:
    dtype = state.options.compute_dtype
    model = state.model(dtype)
    inputs = _cast_batch(batch, state.options)
    loss, aux = state.loss_fn(model, inputs, None)
    out = {"loss": jnp.asarray(loss, jnp.float32)}
    out.update({n: jnp.asarray(v, jnp.float32) for n, v in aux.items() if n not in ("loss", "carry")})
    return out


eval_step = jax.jit(_eval_step)
"""`eval_step(state, batch) -> metrics`: the loss without gradients, `rng=None`."""


def evaluate(state: TrainState, batches: Iterable) -> dict[str, float]:
    """Mean metrics over `batches` (weighted by `weight` when the loss function reports one)."""
    totals: dict[str, float] = {}
    total_w = 0.0
    for batch in batches:
        m = to_floats(jax.device_get(eval_step(state, batch)))
        w = m.get("weight", 1.0)
        total_w += w
        for n, v in m.items():
            totals[n] = totals.get(n, 0.0) + (v if n == "weight" else w * v)
    if not total_w:
        raise ValueError("batches: expected at least one evaluation batch, got none")
    return {n: (v if n == "weight" else v / total_w) for n, v in totals.items()}


# ----------------------------------------------------------------------------------- fit
Hook = Callable[[int, TrainState, dict], None]


def fit(state: TrainState, train_data, *, num_steps: int, checkpointer=None, save_every: int = 0,
        config: Mapping | None = None, eval_data: Callable[[], Iterable] | Iterable | None = None,
        eval_every: int = 0, hooks: Sequence[Hook] = (), metrics_path: str | None = None,
        plot_path: str | None = None, progress: bool = True, log_every: int = 1,
        donate: bool = True, on_step: Callable[[int], None] | None = None) -> TrainState:
    """Train until `state.step == num_steps`, resuming from `checkpointer` when it holds a step.

    train_data: an iterator of batches; when it has `get_state()` / `set_state(s)` (grain
        style), its position is checkpointed and restored, so a resumed run sees the same
        batches as one that never stopped.
    checkpointer: a `streamzoo.train.checkpoint.Checkpointer`; the latest checkpoint is
        restored against `state` (the abstract target) before training, one is saved every
        `save_every` steps and at the end. `config` (JSON-able) is stored with it and checked
        on restore.
    eval_data: batches for `evaluate` (a zero-argument callable giving a fresh iterable, or
        a re-iterable), run every `eval_every` steps and at the end.
    hooks: `hook(step, state, metrics)` after every step (metrics as floats; the state is
        valid only during the call when `donate`).
    Metrics go to `metrics_path` (JSON lines) and, at the end, curves to `plot_path` (PNG).
    `donate=True` donates the incoming state's buffers: do not use `state` after calling.
    """
    from tqdm.auto import tqdm

    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps: expected a non-negative int, got {num_steps!r}")
    train_iter = train_data if hasattr(train_data, "__next__") else iter(train_data)
    logger = MetricsLogger(metrics_path)
    config = dict(config) if config is not None else None

    if checkpointer is not None and checkpointer.latest_step() is not None:
        state, restored = checkpointer.restore(state, config=config)
        if restored.data_state is not None:
            if not hasattr(train_iter, "set_state"):
                raise ValueError("train_data: the checkpoint holds a data-iterator position but "
                                 f"{type(train_iter).__name__} has no set_state()")
            train_iter.set_state(restored.data_state)
        elif int(state.step):
            warnings.warn("resuming without a data-iterator position (train_data has no "
                          "get_state()): the resumed run sees different batches", stacklevel=2)
        logger.truncate_after(int(state.step))

    def save(step, force=False):
        if checkpointer is None:
            return
        data_state = train_iter.get_state() if hasattr(train_iter, "get_state") else None
        checkpointer.save(state, data_state=data_state, config=config, force=force)

    def run_eval(step):
        batches = eval_data() if callable(eval_data) else eval_data
        m = evaluate(state, batches)
        logger.log(step, m, split="eval")
        return m

    step_fn = train_step_donated if donate else train_step
    start = int(state.step)
    bar = tqdm(total=num_steps, initial=start, disable=not progress, dynamic_ncols=True,
               desc="train")
    last_eval = None
    t_last, step_last = time.perf_counter(), start
    try:
        for step in range(start + 1, num_steps + 1):
            try:
                batch = next(train_iter)
            except StopIteration:
                raise ValueError(f"train_data: ran out of batches at step {step} of "
                                 f"num_steps={num_steps}") from None
            state, metrics = step_fn(state, batch)
            if on_step is not None:
                on_step(step)
            if step % log_every == 0 or step == num_steps or hooks:
                m = to_floats(jax.device_get(metrics))
                now = time.perf_counter()
                m["step_time"] = (now - t_last) / (step - step_last)
                t_last, step_last = now, step
                if step % log_every == 0 or step == num_steps:
                    logger.log(step, m)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in m.items()
                                     if k in ("loss", "grad_norm", "lr")}, refresh=False)
                for hook in hooks:
                    hook(step, state, m)
            if eval_data is not None and eval_every and step % eval_every == 0:
                last_eval = run_eval(step)
            if save_every and step % save_every == 0:
                save(step)
            bar.update(1)
    finally:
        bar.close()
    if eval_data is not None and eval_every and (last_eval is None or num_steps % eval_every):
        if num_steps > start:
            run_eval(num_steps)
    if checkpointer is not None:
        if num_steps > start:
            save(num_steps, force=True)
        checkpointer.wait()
    if plot_path and logger.records:
        plot_metrics(logger.records, plot_path)
    return state


def params_to_numpy(state: TrainState) -> dict[str, np.ndarray]:
    """The parameters as `{path: numpy array}` (for comparing runs or exporting)."""
    return {jax.tree_util.keystr(p): np.asarray(a)
            for p, a in jax.tree_util.tree_leaves_with_path(state.params)}
