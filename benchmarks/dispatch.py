"""Dispatch overhead of streamzoo's jitted step functions, and a per-step race against
google's `sequence-layers` on the same 3-layer stack (issue 3, "What it must show").

All in one run, CPU:

1. **Per-call overhead.** Two 12-layer `Repeat` stacks with trivial compute and a real carry
   per layer (`CumulativeMean`: running sum + count; and `Serial(CumulativeMean,
   Residual(FeedForward))`, which adds 4 parameter leaves), D=8, B=1, T=1, stepped by
   `jax.jit(model.step)`, by `jax.jit(lambda m, c, x: m.step(c, x))` (module as an argument),
   by `jax.jit` of `pure(model)`'s step and by `sz.jit_step(model)` (module split into
   parameter leaves once), against a bare jitted identity over the same
   carry and x pytrees. Target: <= 2x the identity. Host-side flatten costs are reported too.
2. **multistep.** Per-chunk cost of `jax.jit(multistep)` over K=64 chunks against one jitted
   `step` call per chunk. Target: <= 1/10.
   Plus a probe of the XLA:CPU floor per call against the number of array leaves.
3. **Peers.** Causal conv (kernel 5) -> local self-attention (max_past 64, causal, 4 heads x 16,
   no RoPE) -> feed-forward (64 -> 128 -> 64, silu), D=64, B=4, float32, built with streamzoo
   and with `sequence-layers` 0.2 holding the *same* parameters (the script checks that both
   stream the same outputs), stepped at block 1 and 4 by jitted per-call step functions (with
   a jitted identity over each library's (carry, x) as the floor), and with the steps inside
   one jitted `lax.scan`. Target: streamzoo >= 2x faster per step.
   Skipped with a message when `sequence_layers` is not importable (it pins old deps; see
   benchmarks/requirements-peers.txt for its separate venv).

Timing: every case is a callable that dispatches once and blocks on its outputs. Cases of one
section are interleaved (round r runs every case, in rotated order) so that they see the same
machine load; a case's figure is the median over rounds of its per-round median call time.
Nothing is donated (in neither library); params are plain float32 arrays.

    python benchmarks/dispatch.py                  # writes benchmarks/results/dispatch-cpu-<date>.json
    python benchmarks/dispatch.py --sync-dispatch  # jax_cpu_enable_async_dispatch=False (-sync.json)
    python benchmarks/dispatch.py --quick          # smoke run (few calls, no JSON unless --out)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

try:
    import streamzoo as sz
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import streamzoo as sz

from streamzoo.layers.attention import StreamingAttention  # noqa: E402
from streamzoo.layers.conv import Conv1D  # noqa: E402
from streamzoo.layers.feedforward import FeedForward  # noqa: E402
from streamzoo.layers.pooling import CumulativeMean  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------ timing
def _block(tree):
    jax.block_until_ready(tree)


def interleaved(cases: dict, rounds: int, calls: int, warmup: int) -> dict:
    """Median per-call seconds of each `cases[name]()` (one dispatch + block per call).

    Every case is warmed up, then each round times `calls` calls of every case (rotating the
    order per round). Returns `{name: {"median_us", "min_round_us", "max_round_us"}}`.
    """
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    per_round = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn = cases[name]
            times = []
            for _ in range(calls):
                t0 = time.perf_counter_ns()
                fn()
                times.append(time.perf_counter_ns() - t0)
            per_round[name].append(statistics.median(times) / 1e3)
    return {name: {"median_us": statistics.median(v), "min_round_us": min(v),
                   "max_round_us": max(v)} for name, v in per_round.items()}


def _stepper(step, carry, chunks, call):
    """A zero-argument case that feeds the next chunk to `step`, threading the carry."""
    state = {"carry": carry, "i": 0}

    def run():
        x = chunks[state["i"] % len(chunks)]
        state["i"] += 1
        state["carry"], y = call(step, state["carry"], x)
        _block((state["carry"], y))

    return run


def _async_dispatch() -> bool:
    return bool(jax.config.values["jax_cpu_enable_async_dispatch"])


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# ------------------------------------------------------------------- 1 + 2: dispatch
STACKS = {
    # A real carry per layer (running sum + count), no parameters: near-zero compute.
    "Repeat(CumulativeMean)": lambda features: (lambda rngs: CumulativeMean(features, rngs=rngs)),
    # The same carry plus a tiny feed-forward: 4 parameter leaves, two 8x16 matmuls per layer.
    "Repeat(Serial(CumulativeMean, Residual(FeedForward)))": lambda features: (
        lambda rngs: sz.Serial(CumulativeMean(features, rngs=rngs),
                               sz.Residual(FeedForward(features, 2 * features, rngs=rngs)))),
}


def tiny_stack(name: str, num_layers: int, features: int) -> sz.Repeat:
    return sz.Repeat(STACKS[name](features), num_layers, rngs=nnx.Rngs(0))


def bench_dispatch(args, name: str) -> dict:
    layers, features, batch, length, k = 12, 8, 1, 1, 64
    model = tiny_stack(name, layers, features)
    carry = model.init_carry(batch)
    keys = jax.random.split(jax.random.key(1), k)
    chunks = [sz.Seq.full(jax.random.normal(key, (batch, length, features))) for key in keys]
    xs = sz.chunked(sz.Seq.full(jax.random.normal(jax.random.key(2), (batch, k * length, features))),
                    length)
    graphdef, params, pure_step = sz.pure(model)

    identity = jax.jit(lambda c, x: (c, x))
    identity_module = jax.jit(lambda m, c, x: (c, x))
    step_bound = jax.jit(model.step)
    step_arg = jax.jit(lambda m, c, x: m.step(c, x))
    step_pure = jax.jit(pure_step)
    multi_bound = jax.jit(lambda c, xs: sz.multistep(model, c, xs))
    multi_arg = jax.jit(lambda m, c, xs: sz.multistep(m, c, xs))

    cases = {
        "identity(carry, x)": _stepper(identity, carry, chunks, lambda f, c, x: f(c, x)),
        "identity(module, carry, x)": _stepper(identity_module, carry, chunks,
                                               lambda f, c, x: f(model, c, x)),
        "jit(model.step)": _stepper(step_bound, carry, chunks, lambda f, c, x: f(c, x)),
        "jit(lambda m, c, x: m.step(c, x))": _stepper(step_arg, carry, chunks,
                                                      lambda f, c, x: f(model, c, x)),
        "jit(pure(model) step_fn)": _stepper(step_pure, carry, chunks,
                                             lambda f, c, x: f(params, c, x)),
        "sz.jit_step(model)": _stepper(sz.jit_step(model), carry, chunks,
                                       lambda f, c, x: f(c, x)),
        "jit(multistep) bound, K=64": _stepper(multi_bound, carry, [xs], lambda f, c, x: f(c, x)),
        "jit(multistep) module arg, K=64": _stepper(multi_arg, carry, [xs],
                                                    lambda f, c, x: f(model, c, x)),
    }
    # What the module-as-argument form pays on the host: NNX flattens the module every call.
    host_cases = {
        "tree_flatten(module)": lambda: jax.tree_util.tree_flatten(model),
        "tree_flatten(pure params)": lambda: jax.tree_util.tree_flatten(params),
        "tree_flatten((carry, x))": lambda: jax.tree_util.tree_flatten((carry, chunks[0])),
    }
    load_before = _load()
    t = interleaved(cases, args.rounds, args.calls, args.warmup)
    host = interleaved(host_cases, args.rounds, args.calls, args.warmup)
    base = t["identity(carry, x)"]["median_us"]
    per_chunk_bound = t["jit(multistep) bound, K=64"]["median_us"] / k
    per_chunk_arg = t["jit(multistep) module arg, K=64"]["median_us"] / k
    return {
        "config": {"num_layers": layers, "features": features, "batch": batch, "length": length,
                   "chunks_K": k, "stack": name,
                   "carry_leaves": len(jax.tree_util.tree_leaves(carry)),
                   "param_leaves": len(jax.tree_util.tree_leaves(params)),
                   "x_leaves": len(jax.tree_util.tree_leaves(chunks[0]))},
        "load_before": load_before, "load_after": _load(),
        "times_us": t, "host_us": host,
        "step_over_identity": {
            "jit(model.step)": t["jit(model.step)"]["median_us"] / base,
            "jit(lambda m, c, x: m.step(c, x))":
                t["jit(lambda m, c, x: m.step(c, x))"]["median_us"] / base,
            "jit(pure(model) step_fn)": t["jit(pure(model) step_fn)"]["median_us"] / base,
            "sz.jit_step(model)": t["sz.jit_step(model)"]["median_us"] / base,
        },
        "multistep_per_chunk_us": {"bound": per_chunk_bound, "module arg": per_chunk_arg},
        "multistep_per_chunk_over_step": {
            "bound": per_chunk_bound / t["jit(model.step)"]["median_us"],
            "module arg": per_chunk_arg / t["jit(lambda m, c, x: m.step(c, x))"]["median_us"],
        },
    }


def bench_leaves(args) -> dict:
    """Per-call cost of a jitted function of n small [4, 64] arrays: returning them unchanged
    (`identity`) and returning `a + 1` for each (`touch`: n kernels, n fresh output buffers).
    This is the XLA:CPU floor that every carry leaf adds to a step call, in either library."""
    cases = {}
    for n in (1, 2, 4, 8, 16):
        leaves = tuple(jax.random.normal(jax.random.key(i), (4, 64)) for i in range(n))
        ident = jax.jit(lambda t: t)
        touch = jax.jit(lambda t: tuple(a + 1 for a in t))
        cases[f"identity {n}"] = lambda f=ident, t=leaves: _block(f(t))
        cases[f"touch {n}"] = lambda f=touch, t=leaves: _block(f(t))
    load_before = _load()
    t = interleaved(cases, args.rounds, args.calls, args.warmup)
    return {"load_before": load_before, "load_after": _load(), "times_us": t}


# ------------------------------------------------------------------------ 3: peers
D, B, HEADS, HEAD_DIM, MAX_PAST, KERNEL, HIDDEN = 64, 4, 4, 16, 64, 5, 128


def streamzoo_peer_stack() -> sz.Serial:
    rngs = nnx.Rngs(0)
    return sz.Serial(
        Conv1D(D, D, KERNEL, rngs=rngs),
        StreamingAttention(D, HEADS, head_dim=HEAD_DIM, max_past=MAX_PAST, rope=False, rngs=rngs),
        FeedForward(D, HIDDEN, activation=jax.nn.silu, rngs=rngs))


def sequence_layers_stack(sl):
    return sl.Serial.Config([
        sl.Conv1D.Config(D, kernel_size=KERNEL, padding="causal", name="conv"),
        sl.LocalDotProductSelfAttention.Config(
            num_heads=HEADS, units_per_head=HEAD_DIM, block_size=16, max_past_horizon=MAX_PAST,
            max_future_horizon=0, name="lsa"),
        sl.EinsumDense.Config("...nh,nhd->...d", output_shape=[D], name="proj"),
        sl.Dense.Config(HIDDEN, activation=jax.nn.silu, name="ff_up"),
        sl.Dense.Config(D, name="ff_down"),
    ]).make()


def copy_params(sl_params, model: sz.Serial) -> None:
    """Give the streamzoo stack sequence-layers' parameters (same layouts up to reshapes)."""
    p = sl_params["params"]
    conv, attn, ff = model.layers
    conv.kernel.value = p["conv"]["kernel"]
    conv.bias.value = p["conv"]["bias"]
    qkv = p["lsa"]["query_key_value_projection"]["kernel"]  # [D, 3, H, Dh]
    attn.qkv.kernel.value = qkv.reshape(D, 3 * HEADS * HEAD_DIM)
    attn.out.kernel.value = p["proj"]["kernel"].reshape(HEADS * HEAD_DIM, D)
    ff.up.kernel.value = p["ff_up"]["kernel"]
    ff.up.bias.value = p["ff_up"]["bias"]
    ff.down.kernel.value = p["ff_down"]["kernel"]
    ff.down.bias.value = p["ff_down"]["bias"]


def bench_peers(args, sl, blocks=(1, 4)) -> dict:
    from flax.linen import meta

    model_sl = sequence_layers_stack(sl)
    key = jax.random.key(3)
    frames = args.peer_frames
    x_all = jax.random.normal(key, (B, frames, D), jnp.float32)
    params_sl = meta.unbox(model_sl.init(jax.random.key(4),
                                         sl.Sequence.from_values(x_all[:, :4]), training=False))
    model = streamzoo_peer_stack()
    copy_params(params_sl, model)
    graphdef, params_sz, pure_step = sz.pure(model)

    def sl_init():
        state = model_sl.apply(params_sl, B, jax.ShapeDtypeStruct((D,), jnp.float32),
                               training=False, method=model_sl.get_initial_state)
        return jax.tree.map(lambda a: jnp.array(a, copy=True), state)  # un-alias K and V

    def sl_step_fn(p, x, s):
        return model_sl.apply(p, x, s, training=False, method=model_sl.step)

    sl_step_arg = jax.jit(lambda p, x, s: sl_step_fn(p, x, s))
    sl_step_closed = jax.jit(lambda x, s: sl_step_fn(params_sl, x, s))
    sz_step_arg = jax.jit(lambda m, c, x: m.step(c, x))
    sz_step_pure = jax.jit(pure_step)
    sz_step_bound = jax.jit(model.step)

    def sz_scan(m, c, xs):
        return sz.multistep(m, c, xs)

    def sl_scan(p, s, values, mask):
        def body(s, vm):
            y, s = sl_step_fn(p, sl.Sequence(vm[0], vm[1]), s)
            return s, (y.values, y.mask)
        return jax.lax.scan(body, s, (values, mask))

    sz_scan_arg = jax.jit(sz_scan)
    sl_scan_arg = jax.jit(sl_scan)

    out = {"config": {"D": D, "B": B, "heads": HEADS, "head_dim": HEAD_DIM, "max_past": MAX_PAST,
                      "conv_kernel": KERNEL, "ff_hidden": HIDDEN, "dtype": "float32",
                      "rope": False, "frames_per_round": frames, "donated": False},
           "load_before": _load(), "blocks": {}}

    # Same parameters, same inputs: both libraries must stream the same outputs.
    n_check = min(frames, 2 * MAX_PAST + 8)
    c_sz, s_sl, dev = model.init_carry(B), sl_init(), 0.0
    for t in range(n_check):
        xv = x_all[:, t:t + 1]
        c_sz, y_sz = sz_step_arg(model, c_sz, sz.Seq.full(xv))
        y_sl, s_sl = sl_step_arg(params_sl, sl.Sequence.from_values(xv), s_sl)
        dev = max(dev, float(jnp.max(jnp.abs(y_sz.values - y_sl.values))))
    out["max_abs_diff_streamzoo_vs_sequence_layers"] = dev
    out["checked_frames"] = n_check

    for block in blocks:
        n = frames // block
        sz_chunks = [sz.Seq.full(x_all[:, i * block:(i + 1) * block]) for i in range(n)]
        sl_chunks = [sl.Sequence.from_values(x_all[:, i * block:(i + 1) * block]) for i in range(n)]
        xs_sz = sz.chunked(sz.Seq.full(x_all[:, :n * block]), block)
        xs_vals, xs_mask = xs_sz.values, xs_sz.mask
        sz_ident = jax.jit(lambda c, x: (c, x))
        sl_ident = jax.jit(lambda x, s: (x, s))
        cases = {
            "streamzoo identity(carry, x)": _stepper(
                sz_ident, model.init_carry(B), sz_chunks, lambda f, c, x: f(c, x)),
            "sequence-layers identity(x, state)": _stepper(
                sl_ident, sl_init(), sl_chunks, lambda f, s, x: f(x, s)[::-1]),
            "streamzoo jit(lambda m, c, x: m.step(c, x))": _stepper(
                sz_step_arg, model.init_carry(B), sz_chunks, lambda f, c, x: f(model, c, x)),
            "streamzoo jit(pure step_fn)(params, c, x)": _stepper(
                sz_step_pure, model.init_carry(B), sz_chunks, lambda f, c, x: f(params_sz, c, x)),
            "streamzoo sz.jit_step(model)(c, x)": _stepper(
                sz.jit_step(model), model.init_carry(B), sz_chunks, lambda f, c, x: f(c, x)),
            "streamzoo jit(model.step) (params closed over)": _stepper(
                sz_step_bound, model.init_carry(B), sz_chunks, lambda f, c, x: f(c, x)),
            "sequence-layers jit(apply step)(params, x, s)": _stepper(
                sl_step_arg, sl_init(), sl_chunks, lambda f, s, x: f(params_sl, x, s)[::-1]),
            "sequence-layers jit(apply step) (params closed over)": _stepper(
                sl_step_closed, sl_init(), sl_chunks, lambda f, s, x: f(x, s)[::-1]),
        }
        scan_cases = {
            f"streamzoo jit(multistep) K={n}": _stepper(
                sz_scan_arg, model.init_carry(B), [xs_sz], lambda f, c, x: f(model, c, x)),
            f"streamzoo jit(multistep) K={n}, chunks marked compact": _stepper(
                sz_scan_arg, model.init_carry(B), [xs_sz.replace(compact=True)],
                lambda f, c, x: f(model, c, x)),
            f"sequence-layers jit(lax.scan(step)) K={n}": _stepper(
                sl_scan_arg, sl_init(), [(xs_vals, xs_mask)],
                lambda f, s, x: f(params_sl, s, *x)),
        }
        t = interleaved(cases, args.rounds, n, args.warmup)
        ts = interleaved(scan_cases, args.rounds, max(3, args.calls // 50), max(2, args.warmup // 20))
        per_step_scan = {name: v["median_us"] / n for name, v in ts.items()}
        sz_arg = t["streamzoo jit(lambda m, c, x: m.step(c, x))"]["median_us"]
        sz_pure = t["streamzoo jit(pure step_fn)(params, c, x)"]["median_us"]
        sz_bound = t["streamzoo jit(model.step) (params closed over)"]["median_us"]
        sz_jit_step = t["streamzoo sz.jit_step(model)(c, x)"]["median_us"]
        sl_arg = t["sequence-layers jit(apply step)(params, x, s)"]["median_us"]
        sl_closed = t["sequence-layers jit(apply step) (params closed over)"]["median_us"]
        sz_scan_us = per_step_scan[f"streamzoo jit(multistep) K={n}"]
        sl_scan_us = per_step_scan[f"sequence-layers jit(lax.scan(step)) K={n}"]
        out["blocks"][str(block)] = {
            "steps_per_round": n, "per_call_us": t, "scan_per_call_us": ts,
            "scan_per_step_us": per_step_scan,
            "speedup_sequence_layers_over_streamzoo": {
                "params as argument (module arg)": sl_arg / sz_arg,
                "params as argument (pure)": sl_arg / sz_pure,
                "params as argument (jit_step)": sl_arg / sz_jit_step,
                "params closed over": sl_closed / sz_bound,
                "inside lax.scan": sl_scan_us / sz_scan_us,
                "inside lax.scan, sz chunks compact": sl_scan_us / per_step_scan[
                    f"streamzoo jit(multistep) K={n}, chunks marked compact"],
            },
        }
    out["load_after"] = _load()
    return out


# ----------------------------------------------------------------------------- report
def machine() -> dict:
    model_name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model_name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"nproc": os.cpu_count(), "cpu": model_name, "python": platform.python_version(),
            "jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
            "flax": __import__("flax").__version__, "devices": [str(d) for d in jax.devices()],
            "streamzoo": getattr(sz, "__version__", None)}
    try:
        from importlib.metadata import version
        info["jaxlib"] = version("jaxlib")
        info["sequence_layers"] = version("sequence-layers")
    except Exception:  # noqa: BLE001 - optional peer
        pass
    return info


def markdown(res: dict) -> str:
    st = res["settings"]
    lines = [f"Run {res['date']}: `{res['command']}`; {st['rounds']} rounds x {st['calls']} calls "
             f"after {st['warmup']} warm-up calls; jax_cpu_enable_async_dispatch="
             f"{st['jax_cpu_enable_async_dispatch']}.", ""]
    for d in res.get("dispatch", {}).values():
        cfg = d["config"]
        lines += [
            f"#### 1-2. Dispatch: 12 x `{cfg['stack']}`, D=8, B=1, T=1 "
            f"(carry leaves {cfg['carry_leaves']}, param leaves {cfg['param_leaves']}, x leaves "
            f"{cfg['x_leaves']}); load {d['load_before']} -> {d['load_after']}", "",
            "| call | µs/call (median) | rounds min-max | × identity |", "|---|---|---|---|"]
        base = d["times_us"]["identity(carry, x)"]["median_us"]
        for name, v in d["times_us"].items():
            if "multistep" in name:
                continue
            lines.append(f"| `{name}` | {v['median_us']:.1f} | {v['min_round_us']:.1f}-"
                         f"{v['max_round_us']:.1f} | {v['median_us'] / base:.2f} |")
        lines += ["", "| multistep, K=64 chunks of T=1 | µs/call | µs/chunk | "
                  "chunk ÷ per-call step (same form) |", "|---|---|---|---|"]
        for name, key in (("jit(multistep) bound, K=64", "bound"),
                          ("jit(multistep) module arg, K=64", "module arg")):
            v = d["times_us"][name]
            lines.append(f"| `{name}` | {v['median_us']:.1f} | "
                         f"{d['multistep_per_chunk_us'][key]:.2f} | "
                         f"{d['multistep_per_chunk_over_step'][key]:.3f} |")
        lines += ["", "| host side only (no dispatch) | µs |", "|---|---|"]
        for name, v in d["host_us"].items():
            lines.append(f"| `{name}` | {v['median_us']:.1f} |")
        lines.append("")
    lv = res.get("leaves")
    if lv:
        lines += [f"#### XLA:CPU floor per call vs number of [4, 64] f32 leaves; load "
                  f"{lv['load_before']} -> {lv['load_after']}", "",
                  "| leaves | identity µs | touch (a + 1 each) µs |", "|---|---|---|"]
        for n in (1, 2, 4, 8, 16):
            lines.append(f"| {n} | {lv['times_us'][f'identity {n}']['median_us']:.1f} | "
                         f"{lv['times_us'][f'touch {n}']['median_us']:.1f} |")
        lines.append("")
    p = res.get("peers")
    if p and "skipped" not in p:
        lines += [f"#### 3. streamzoo vs sequence-layers {res['machine'].get('sequence_layers')}: "
                  "conv(k5) -> local attention (past 64, 4x16) -> FF(128), D=64, B=4, fp32; "
                  f"load {p['load_before']} -> {p['load_after']}", "",
                  f"Same parameters in both; max |streamzoo - sequence-layers| over "
                  f"{p['checked_frames']} streamed frames: {p['max_abs_diff_streamzoo_vs_sequence_layers']:.2e}", "",
                  "| block | call | streamzoo µs/step | sequence-layers µs/step | sl ÷ sz |",
                  "|---|---|---|---|---|"]
        for block, b in p["blocks"].items():
            t, n = b["per_call_us"], b["steps_per_round"]
            rows = [
                ("jit, params as argument (sz: module arg)",
                 t["streamzoo jit(lambda m, c, x: m.step(c, x))"]["median_us"],
                 t["sequence-layers jit(apply step)(params, x, s)"]["median_us"]),
                ("jit, params as argument (sz: `pure`)",
                 t["streamzoo jit(pure step_fn)(params, c, x)"]["median_us"],
                 t["sequence-layers jit(apply step)(params, x, s)"]["median_us"]),
                ("jit, params as argument (sz: `jit_step`, leaves split once)",
                 t["streamzoo sz.jit_step(model)(c, x)"]["median_us"],
                 t["sequence-layers jit(apply step)(params, x, s)"]["median_us"]),
                ("jit, params closed over",
                 t["streamzoo jit(model.step) (params closed over)"]["median_us"],
                 t["sequence-layers jit(apply step) (params closed over)"]["median_us"]),
                (f"one jitted lax.scan over K={n} steps (sz: `multistep(chunked(x))`)",
                 b["scan_per_step_us"][f"streamzoo jit(multistep) K={n}"],
                 b["scan_per_step_us"][f"sequence-layers jit(lax.scan(step)) K={n}"]),
                ("same, sz chunks marked `compact=True` (no per-layer argsort)",
                 b["scan_per_step_us"][f"streamzoo jit(multistep) K={n}, chunks marked compact"],
                 b["scan_per_step_us"][f"sequence-layers jit(lax.scan(step)) K={n}"]),
            ]
            rows.insert(0, ("floor: jitted identity over (carry, x) / (x, state)",
                            t["streamzoo identity(carry, x)"]["median_us"],
                            t["sequence-layers identity(x, state)"]["median_us"]))
            for name, a, c in rows:
                lines.append(f"| {block} | {name} | {a:.1f} | {c:.1f} | {c / a:.2f}× |")
        lines.append("")
    elif p:
        lines += [f"#### 3. sequence-layers: skipped ({p['skipped']})", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few rounds and calls")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per case")
    parser.add_argument("--calls", type=int, default=None, help="timed calls per case per round")
    parser.add_argument("--out", default=None, help="JSON path (default: results/dispatch-cpu-<date>.json)")
    parser.add_argument("--no-peers", action="store_true", help="skip the sequence-layers section")
    parser.add_argument("--sync-dispatch", action="store_true",
                        help="jax_cpu_enable_async_dispatch=False: run each executable on the "
                             "calling thread (no hand-off to a worker thread)")
    args = parser.parse_args(argv)
    if args.sync_dispatch:  # must precede the CPU client's creation (the first computation)
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    args.rounds = args.rounds or (2 if args.quick else 9)
    args.calls = args.calls or (30 if args.quick else 400)
    args.warmup = 5 if args.quick else 100
    args.peer_frames = 32 if args.quick else 128

    started = datetime.datetime.now().astimezone()
    res = {"date": started.isoformat(timespec="seconds"), "machine": machine(),
           "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
           "settings": {"rounds": args.rounds, "calls": args.calls, "warmup": args.warmup,
                        "peer_frames": args.peer_frames,
                        "jax_cpu_enable_async_dispatch": _async_dispatch()}}
    print(f"streamzoo dispatch benchmark, {res['date']}, load {_load()}, "
          f"async dispatch {_async_dispatch()}", flush=True)
    res["dispatch"] = {name: bench_dispatch(args, name) for name in STACKS}
    res["leaves"] = bench_leaves(args)
    if args.no_peers:
        res["peers"] = {"skipped": "--no-peers"}
    else:
        try:
            import sequence_layers.jax as sl
        except ImportError as e:
            print(f"sequence-layers not importable ({e}); skipping the peer section. "
                  "Install it in a separate venv: see benchmarks/requirements-peers.txt",
                  flush=True)
            res["peers"] = {"skipped": f"sequence_layers not importable: {e}"}
        else:
            res["peers"] = bench_peers(args, sl)
    res["seconds"] = round(time.time() - started.timestamp(), 1)
    table = markdown(res)
    print(table)
    out = args.out
    if out is None and not args.quick:
        suffix = "-sync" if args.sync_dispatch else ""
        out = os.path.join(HERE, "results",
                           f"dispatch-cpu-{started.date().isoformat()}{suffix}.json")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
