"""streamzoo's Pallas kernels against cuDNN and XLA on one GPU, every peer timed in the same run
(issue 8, "What it must show").

Items (the issue's benchmark list; shapes bf16 unless said):

| item | ours | peers | target |
|---|---|---|---|
| `prefill_causal` B4 T4096 H16 D128 | `attention` causal | cuDNN causal, XLA | >= 540 TFLOP/s |
| `window_sinks` B1 T16384 H16 D128, window 1024 + 4 sinks | `attention(max_past=1023, num_sinks=4)` | cuDNN sink-free window (`local_window_size`, the bar), cuDNN + explicit mask, XLA + explicit mask | <= 1.2x the bar |
| `chunk_causal` same shape, chunk 64, 4 left chunks | `attention(chunk_size=64, left_chunks=4)` | the same bar, cuDNN window 320, cuDNN / XLA + explicit mask | <= 1.2x the bar |
| `ring_decode` B16 cache 4096 H32 D128, Tq 1 | `ring_decode_attention` over a wrapped ring | cuDNN plain decode, XLA | >= 4.0 TB/s of K+V read |
| `causal_conv` B8 T4096 C2048 K4 (+ a streaming step B64 T16) | `causal_depthwise_conv` | XLA reference, `lax.conv_general_dilated` depthwise (Conv1D's XLA path) | >= 70% of measured HBM |
| `linear_scan` B8 T4096 N2048 fp32 | `linear_scan` | XLA `associative_scan` | >= 70% of measured HBM |
| `linear_attention` B8 T4096 H16 D64, chunk 64 | `linear_attention` | XLA chunked reference | (reported) |
| `model_step` | LM and ASR streaming steps (`multistep`) traced under `default_impl("auto")` | the same under `default_impl("xla")` | (reported, with the kernels found in the trace) |

Ceilings measured in the same run: HBM bandwidth (read+write of a 4 GiB buffer, and a read-only
reduction) and bf16 matmul 8192^3. Useful attention FLOPs count only the visible (query, key)
pairs: 4 * B * H * D * pairs. Conv/scan bytes: every input read once + every output written once.

Timing: each case runs `--inner` times inside one jitted `fori_loop` whose carry feeds one
element of the output back into the first input (so nothing is hoisted or dead-code
eliminated, and host dispatch is paid once per call); a figure is the median over `--rounds`
rounds (cases interleaved within a round) of the per-iteration time. The empty loop's cost is
reported as `loop_overhead_us`. Each of our kernels is also checked once against the XLA
reference on the same inputs (`max_abs_err`, relative to the reference's max). A case that
fails (import, lowering, runtime) is recorded with its error instead of stopping the run.

    python benchmarks/kernels_gpu.py --out benchmarks/results/kernels-h200-<date>.json
    python benchmarks/kernels_gpu.py --only prefill_causal,ring_decode --out $OUT/k.json
    python benchmarks/kernels_gpu.py --smoke --out /tmp/k.json   # CPU, tiny shapes, impl="interpret"

Writes the JSON to `--out` and a markdown table next to it (`.md`).
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
import traceback

import jax
import jax.numpy as jnp
import numpy as np

try:
    import streamzoo as sz
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import streamzoo as sz

from streamzoo.pallas_kernels import causal_depthwise_conv as dwconv  # noqa: E402
from streamzoo.pallas_kernels import linear_scan as scans  # noqa: E402
from streamzoo.pallas_kernels.dispatch import default_impl  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ITEMS = ("prefill_causal", "window_sinks", "chunk_causal", "ring_decode", "causal_conv",
         "linear_scan", "linear_attention", "model_step")

# Full-size shapes (the issue's); --smoke replaces them with tiny ones.
FULL = dict(
    prefill=dict(batch=4, length=4096, heads=16, dim=128),
    window=dict(batch=1, length=16384, heads=16, dim=128, window=1024, sinks=4, chunk=64,
                left_chunks=4),
    decode=dict(batch=16, cache=4096, heads=32, dim=128),
    conv=dict(batch=8, length=4096, channels=2048, taps=4, step_batch=64, step_length=16),
    scan=dict(batch=8, length=4096, features=2048),
    linear_attention=dict(batch=8, length=4096, heads=16, dim=64, chunk=64),
    ceilings=dict(hbm_bytes=4 << 30, matmul=8192),
    models=dict(lm=dict(vocab=32000, features=1024, layers=8, heads=16, kv_heads=4,
                        hidden=2816, window=1024, sinks=4, batch=16, chunk=1, chunks=64),
                asr=dict(batch=16, chunks=16)),
)
SMOKE = dict(
    prefill=dict(batch=1, length=32, heads=2, dim=16),
    window=dict(batch=1, length=64, heads=2, dim=16, window=16, sinks=2, chunk=8,
                left_chunks=1),
    decode=dict(batch=2, cache=32, heads=2, dim=16),
    conv=dict(batch=2, length=16, channels=16, taps=3, step_batch=2, step_length=8),
    scan=dict(batch=2, length=16, features=16),
    linear_attention=dict(batch=1, length=16, heads=2, dim=8, chunk=8),
    ceilings=dict(hbm_bytes=1 << 20, matmul=64),
    models=dict(lm=dict(vocab=64, features=16, layers=1, heads=2, kv_heads=1, hidden=32,
                        window=8, sinks=2, batch=2, chunk=1, chunks=4),
                asr=None),
)


# ----------------------------------------------------------------------------- timing
def _block(tree):
    jax.block_until_ready(tree)


def looped(fn, args, inner: int):
    """A jitted `run(*args)` that calls `fn(*args)` `inner` times in one `fori_loop`; one
    element of each output feeds back into `args[0]`, so every iteration is real work."""
    args = tuple(args)
    if inner == 1:  # (--smoke) no loop: the cheapest program to compile
        return jax.jit(fn)
    out_shapes = jax.eval_shape(fn, *args)

    def body(_, carry):
        current, _ = carry
        outs = fn(*current)
        leaf = jax.tree.leaves(outs)[0]
        first = current[0]
        eps = (leaf.reshape(-1)[0].astype(jnp.float32) * 0).astype(first.dtype)
        first = first.at[(0,) * first.ndim].add(eps)
        return (first,) + current[1:], outs

    def run(*a):
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shapes)
        return jax.lax.fori_loop(0, inner, body, (tuple(a), zeros))[1]

    return jax.jit(run)


def time_cases(cases: dict, args: argparse.Namespace, check: tuple | None = None) -> dict:
    """`cases[name] = (fn, call_args)`. Compiles each, then runs `rounds` interleaved rounds.
    Returns per case `{"median_s", "min_s", "max_s", "compile_s"}` or `{"error": ...}`.

    `check = (ours, reference)`: case names whose outputs (from the first call; the loop's
    feedback adds exactly 0) are compared, stored under "check" in ours' entry."""
    results, runners, outputs = {}, {}, {}
    for name, (fn, call_args) in cases.items():
        try:
            run = looped(fn, call_args, args.inner)
            t0 = time.perf_counter()
            out = run(*call_args)
            _block(out)
            results[name] = {"compile_s": round(time.perf_counter() - t0, 3)}
            if check is not None and name in check:
                outputs[name] = out
            for _ in range(args.warmup):
                _block(run(*call_args))
            runners[name] = (run, call_args)
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            results[name] = {"error": _error(e)}
    per_round = {name: [] for name in runners}
    names = list(runners)
    for r in range(args.rounds):
        order = names[r % max(len(names), 1):] + names[:r % max(len(names), 1)]
        for name in order:
            run, call_args = runners[name]
            t0 = time.perf_counter()
            _block(run(*call_args))
            per_round[name].append((time.perf_counter() - t0) / args.inner)
    for name, times in per_round.items():
        results[name].update(median_s=statistics.median(times), min_s=min(times),
                             max_s=max(times))
    if check is not None and all(name in outputs for name in check):
        results[check[0]]["check_vs_" + check[1]] = _check(outputs[check[0]], outputs[check[1]])
    return results


def _error(e: BaseException) -> str:
    lines = traceback.format_exception_only(type(e), e)
    return "".join(lines).strip()[-1500:]


def _check(ours, reference) -> dict:
    """Max |ours - reference| over all outputs, absolute and relative to the reference's max."""
    errs, scale = [], 0.0
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        errs.append(float(np.max(np.abs(a - b))) if a.size else 0.0)
        scale = max(scale, float(np.max(np.abs(b))) if b.size else 0.0)
    err = max(errs) if errs else 0.0
    return {"max_abs_err": err, "rel_err": err / max(scale, 1e-30),
            "finite": all(bool(np.isfinite(np.asarray(a, np.float32)).all())
                          for a in jax.tree.leaves(ours))}


# --------------------------------------------------------------------------- ceilings
def bench_ceilings(args, shapes) -> dict:
    n = shapes["ceilings"]["hbm_bytes"] // 2
    x = jax.random.normal(jax.random.key(0), (n // 1024, 1024), jnp.bfloat16)
    size = shapes["ceilings"]["matmul"]
    a = jax.random.normal(jax.random.key(1), (size, size), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (size, size), jnp.bfloat16)
    cases = {
        "hbm_read_write": (lambda x: x * 2, (x,)),
        "hbm_read": (lambda x: jnp.sum(x, axis=0, dtype=jnp.float32), (x,)),
        "matmul_bf16": (lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32
                                             ).astype(jnp.bfloat16), (a, b)),
        "loop_overhead": (lambda x: x[:1, :8] + 1, (x,)),
    }
    res = time_cases(cases, args)
    nbytes = x.size * x.dtype.itemsize
    out = {"cases": res, "bytes": nbytes, "matmul_size": size}
    if "median_s" in res["hbm_read_write"]:
        out["hbm_read_write_tbps"] = 2 * nbytes / res["hbm_read_write"]["median_s"] / 1e12
    if "median_s" in res["hbm_read"]:
        out["hbm_read_tbps"] = nbytes / res["hbm_read"]["median_s"] / 1e12
    if "median_s" in res["matmul_bf16"]:
        out["matmul_tflops"] = 2 * size ** 3 / res["matmul_bf16"]["median_s"] / 1e12
    if "median_s" in res["loop_overhead"]:
        out["loop_overhead_us"] = res["loop_overhead"]["median_s"] * 1e6
    return out


# -------------------------------------------------------------------------- attention
def _visible(q_pos, k_pos, *, max_past=None, max_future=0, sinks=0, chunk=None, left=None):
    """The streaming mask rule (pallas_kernels/masks.py), on broadcastable int arrays."""
    p, k = q_pos, k_pos
    ok = k <= p + max_future if max_future is not None else jnp.ones_like(k <= p)
    recent = jnp.ones_like(ok)
    if max_past is not None:
        recent = recent & (k >= p - max_past)
    if chunk is not None:
        ok = ok & (k // chunk <= p // chunk)
        if left is not None:
            recent = recent & (k // chunk >= p // chunk - left)
    return ok & ((k < sinks) | recent)


def _qkv(shape, key, kv_heads=None):
    batch, length, heads, dim = shape
    k = jax.random.split(key, 3)
    q = jax.random.normal(k[0], (batch, length, heads, dim), jnp.bfloat16)
    kk = jax.random.normal(k[1], (batch, length, kv_heads or heads, dim), jnp.bfloat16)
    v = jax.random.normal(k[2], (batch, length, kv_heads or heads, dim), jnp.bfloat16)
    return q, kk, v


def _attention_fn():
    from streamzoo.pallas_kernels.attention import attention
    return attention


def _dpa(implementation, **kw):
    return lambda q, k, v, *rest: jax.nn.dot_product_attention(
        q, k, v, *rest, implementation=implementation, **kw)


def _attention_item(name, args, shapes, ours_kwargs, peers, target_note, mask_kwargs,
                    check_case):
    s = shapes["prefill"] if name == "prefill_causal" else shapes["window"]
    q, k, v = _qkv((s["batch"], s["length"], s["heads"], s["dim"]), jax.random.key(10))
    pos = jnp.arange(s["length"])
    mask = _visible(pos[:, None], pos[None, :], **mask_kwargs)
    pairs = int(jnp.sum(mask))
    item = {"shape": dict(s), "visible_pairs_per_head": pairs,
            "useful_flops": 4 * s["batch"] * s["heads"] * s["dim"] * pairs, "target": target_note}
    cases, refs = {}, {}
    try:
        attention = _attention_fn()
        ours = lambda q, k, v: attention(q, k, v, impl=args.impl, **ours_kwargs)
        cases["ours"] = (ours, (q, k, v))
    except Exception as e:  # noqa: BLE001
        item["ours_error"] = _error(e)
    mask4 = mask[None, None]
    for case, (impl, kw, with_mask) in peers.items():
        if impl == "cudnn" and args.smoke:
            refs[case] = "skipped: cuDNN needs a GPU (--smoke runs on the CPU)"
            continue
        fn = _dpa(impl, **kw)
        cases[case] = ((lambda q, k, v, m, fn=fn: fn(q, k, v, None, m)), (q, k, v, mask4)) \
            if with_mask else (fn, (q, k, v))
    item["cases"] = time_cases(cases, args, check=("ours", check_case))
    item["cases"].update({c: {"skipped": r} for c, r in refs.items()})
    for case in item["cases"].values():
        if "median_s" in case:
            case["useful_tflops"] = item["useful_flops"] / case["median_s"] / 1e12
    return item


def bench_prefill(args, shapes):
    item = _attention_item(
        "prefill_causal", args, shapes, dict(), {
            "cudnn_causal": ("cudnn", dict(is_causal=True), False),
            "xla_causal": ("xla", dict(is_causal=True), False)},
        ">= 540 TFLOP/s (cuDNN 538, JAX's Mosaic GPU example 546 on the H200)",
        mask_kwargs=dict(), check_case="xla_causal")
    ours = item["cases"].get("ours", {})
    if "useful_tflops" in ours:
        item["ratio_to_target"] = ours["useful_tflops"] / 540.0
    return item


def _bar_ratio(item, bar_case):
    ours, bar = item["cases"].get("ours", {}), item["cases"].get(bar_case, {})
    if "median_s" in ours and "median_s" in bar:
        item["time_vs_bar"] = ours["median_s"] / bar["median_s"]
        item["meets_target"] = item["time_vs_bar"] <= 1.2


def bench_window(args, shapes):
    s = shapes["window"]
    w, sinks = s["window"], s["sinks"]
    item = _attention_item(
        "window_sinks", args, shapes, dict(max_past=w - 1, num_sinks=sinks), {
            "cudnn_window_no_sinks": ("cudnn", dict(is_causal=True,
                                                    local_window_size=(w - 1, 0)), False),
            "cudnn_explicit_mask": ("cudnn", dict(), True),
            "xla_explicit_mask": ("xla", dict(), True)},
        "time <= 1.2x cuDNN's sink-free window (local_window_size) in the same run",
        mask_kwargs=dict(max_past=w - 1, sinks=sinks), check_case="xla_explicit_mask")
    _bar_ratio(item, "cudnn_window_no_sinks")
    return item


def bench_chunk(args, shapes):
    s = shapes["window"]
    c, left, w = s["chunk"], s["left_chunks"], s["window"]
    span = c * (left + 1) - 1  # the narrowest sliding window that covers the chunk mask
    item = _attention_item(
        "chunk_causal", args, shapes, dict(chunk_size=c, left_chunks=left, max_future=None), {
            "cudnn_window_no_sinks": ("cudnn", dict(is_causal=True,
                                                    local_window_size=(w - 1, 0)), False),
            f"cudnn_window_{span + 1}": ("cudnn", dict(is_causal=True,
                                                       local_window_size=(span, 0)), False),
            "cudnn_explicit_mask": ("cudnn", dict(), True),
            "xla_explicit_mask": ("xla", dict(), True)},
        "time <= 1.2x cuDNN's sink-free window time (window of bench window_sinks)",
        mask_kwargs=dict(max_future=None, chunk=c, left=left), check_case="xla_explicit_mask")
    _bar_ratio(item, "cudnn_window_no_sinks")
    return item


def bench_decode(args, shapes):
    s = shapes["decode"]
    batch, cache, heads, dim = s["batch"], s["cache"], s["heads"], s["dim"]
    k = jax.random.split(jax.random.key(20), 4)
    q = jax.random.normal(k[0], (batch, 1, heads, dim), jnp.bfloat16)
    kc = jax.random.normal(k[1], (batch, cache, heads, dim), jnp.bfloat16)
    vc = jax.random.normal(k[2], (batch, cache, heads, dim), jnp.bfloat16)
    # A full, wrapped ring: slot s of row b holds position (s - head_b) mod cache.
    heads_at = jax.random.randint(k[3], (batch, 1), 0, cache)
    slot_pos = jnp.mod(jnp.arange(cache)[None, :] - heads_at, cache).astype(jnp.int32)
    q_pos = jnp.full((batch, 1), cache - 1, jnp.int32)
    kv_bytes = 2 * kc.size * kc.dtype.itemsize
    item = {"shape": dict(s), "kv_bytes": kv_bytes,
            "target": ">= 4.0 TB/s of K+V read (cuDNN plain decode 4.23 TB/s on the H200)"}
    cases = {}
    try:
        from streamzoo.pallas_kernels.ring_decode_attention import ring_decode_attention
        ours = lambda q, kc, vc, sp, qp: ring_decode_attention(q, kc, vc, sp, qp, impl=args.impl)
        cases["ours"] = (ours, (q, kc, vc, slot_pos, q_pos))
    except Exception as e:  # noqa: BLE001
        item["ours_error"] = _error(e)
    if not args.smoke:
        cases["cudnn_plain_decode"] = (_dpa("cudnn"), (q, kc, vc))
    cases["xla_plain_decode"] = (_dpa("xla"), (q, kc, vc))
    item["cases"] = time_cases(cases, args, check=("ours", "xla_plain_decode"))
    if args.smoke:
        item["cases"]["cudnn_plain_decode"] = {
            "skipped": "skipped: cuDNN needs a GPU (--smoke runs on the CPU)"}
    for case in item["cases"].values():
        if "median_s" in case:
            case["kv_tbps"] = kv_bytes / case["median_s"] / 1e12
    if "kv_tbps" in item["cases"].get("ours", {}):
        item["ratio_to_target"] = item["cases"]["ours"]["kv_tbps"] / 4.0
    return item


# ------------------------------------------------------------------ conv and scans
def _bandwidth(item, nbytes, hbm_tbps):
    for case in item["cases"].values():
        if "median_s" in case:
            case["tbps"] = nbytes / case["median_s"] / 1e12
            if hbm_tbps:
                case["fraction_of_hbm"] = case["tbps"] / hbm_tbps
    ours = item["cases"].get("ours", {})
    if "fraction_of_hbm" in ours:
        item["meets_target"] = ours["fraction_of_hbm"] >= 0.7


def bench_conv(args, shapes, hbm_tbps):
    s = shapes["conv"]
    k = jax.random.split(jax.random.key(30), 5)
    x = jax.random.normal(k[0], (s["batch"], s["length"], s["channels"]), jnp.bfloat16)
    w = jax.random.normal(k[1], (s["taps"], s["channels"]), jnp.float32)
    bias = jax.random.normal(k[2], (s["channels"],), jnp.float32)
    span = s["taps"] - 1
    ours = lambda x, w, b: dwconv.causal_depthwise_conv(x, None, w, b, impl=args.impl)
    ref = lambda x, w, b: dwconv.causal_depthwise_conv(x, None, w, b, impl="xla")

    def lax_conv(x, w, b):  # Conv1D's XLA path: a grouped conv
        v = jnp.pad(x, ((0, 0), (span, 0), (0, 0)))
        y = jax.lax.conv_general_dilated(v, w.astype(x.dtype)[:, None, :], (1,), "VALID",
                                         dimension_numbers=("NWC", "WIO", "NWC"),
                                         feature_group_count=x.shape[-1])
        return y + b.astype(y.dtype)

    nbytes = 2 * x.size * x.dtype.itemsize
    item = {"shape": dict(s), "bytes": nbytes, "target": ">= 70% of the measured HBM "
            "read+write bandwidth"}
    item["cases"] = time_cases({"ours": (ours, (x, w, bias)), "xla_reference": (ref, (x, w, bias)),
                                "xla_lax_conv": (lax_conv, (x, w, bias))}, args,
                               check=("ours", "xla_reference"))
    _bandwidth(item, nbytes, hbm_tbps)
    # The streaming step: a short chunk with a carried state and per-row lengths.
    xs = jax.random.normal(k[3], (s["step_batch"], s["step_length"], s["channels"]), jnp.bfloat16)
    state = jax.random.normal(k[4], (s["step_batch"], span, s["channels"]), jnp.bfloat16)
    lengths = jnp.arange(s["step_batch"], dtype=jnp.int32) % (s["step_length"] + 1)
    step = lambda xs, st, n: dwconv.causal_depthwise_conv(xs, st, w, bias, lengths=n,
                                                          impl=args.impl)
    step_ref = lambda xs, st, n: dwconv.causal_depthwise_conv(xs, st, w, bias, lengths=n,
                                                              impl="xla")
    item["step"] = {"shape": {"batch": s["step_batch"], "length": s["step_length"],
                              "lengths": "b mod (T+1)"},
                    "cases": time_cases({"ours": (step, (xs, state, lengths)),
                                         "xla_reference": (step_ref, (xs, state, lengths))},
                                        args, check=("ours", "xla_reference"))}
    return item


def bench_scan(args, shapes, hbm_tbps):
    s = shapes["scan"]
    k = jax.random.split(jax.random.key(40), 3)
    shape = (s["batch"], s["length"], s["features"])
    a = jax.random.uniform(k[0], shape, jnp.float32, 0.8, 1.0)
    b = jax.random.normal(k[1], shape, jnp.float32)
    h0 = jax.random.normal(k[2], (s["batch"], s["features"]), jnp.float32)
    ours = lambda a, b, h0: scans.linear_scan(a, b, h0, impl=args.impl)
    ref = lambda a, b, h0: scans.linear_scan(a, b, h0, impl="xla")
    nbytes = 3 * a.size * 4
    item = {"shape": dict(s), "bytes": nbytes, "target": ">= 70% of the measured HBM "
            "read+write bandwidth"}
    item["cases"] = time_cases({"ours": (ours, (a, b, h0)), "xla_reference": (ref, (a, b, h0))},
                               args, check=("ours", "xla_reference"))
    _bandwidth(item, nbytes, hbm_tbps)
    return item


def bench_linear_attention(args, shapes, hbm_tbps):
    s = shapes["linear_attention"]
    shape = (s["batch"], s["length"], s["heads"], s["dim"])
    q, k, v = (jax.nn.relu(u) for u in _qkv(shape, jax.random.key(50)))
    ld = -jax.nn.softplus(jax.random.normal(jax.random.key(51), shape[:3]))
    c = s["chunk"]
    ours = lambda q, k, v, ld: scans.linear_attention(q, k, v, ld, impl=args.la_impl, chunk=c)
    ref = lambda q, k, v, ld: scans.linear_attention(q, k, v, ld, impl="xla", chunk=c)
    n, d = s["batch"] * s["heads"] * s["length"], s["dim"]
    flops = n * (2 * c * d + 2 * c * d + 2 * d * d + 2 * d * d)  # qkᵀ, (A)v, q S, kᵀ v
    nbytes = 3 * q.size * 2 + q.size // d * 4 + n * (d + 1) * 4  # q,k,v + decay in, o,n out
    item = {"shape": dict(s), "flops": flops, "bytes": nbytes, "target": "(reported)"}
    item["cases"] = time_cases({"ours": (ours, (q, k, v, ld)),
                                "xla_reference": (ref, (q, k, v, ld))}, args,
                               check=("ours", "xla_reference"))
    for case in item["cases"].values():
        if "median_s" in case:
            case["tflops"] = flops / case["median_s"] / 1e12
    _bandwidth(item, nbytes, hbm_tbps)
    item.pop("meets_target", None)
    return item


# ---------------------------------------------------------------------- whole models
def _primitives(jaxpr) -> set:
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        if eqn.primitive.name == "pallas_call":
            info = getattr(eqn.params.get("jaxpr"), "debug_info", None)
            names.add("pallas_call:" + str(eqn.params.get("name")
                                           or getattr(info, "func_name", "?")))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    names |= _primitives(sub)
    return names


def _model_cases(model, xs, carry, args):
    """multistep over the chunks, traced once per kernel mode; the Pallas calls it contains."""
    out, cases = {}, {}
    for mode in ("auto", "xla"):
        with default_impl(args.impl if mode == "auto" and args.smoke else mode):
            fn = lambda c, xs, model=model: sz.multistep(model, c, xs)
            try:  # trace and compile inside the mode (the choice is made at trace time)
                traced = jax.jit(fn).trace(carry, xs)
                prims = _primitives(traced.jaxpr)
                kernels = sorted(p for p in prims if p.startswith("pallas_call:"))
                jitted = traced.lower().compile()
                _block(jitted(carry, xs))
            except Exception as e:  # noqa: BLE001
                out[mode] = {"error": _error(e)}
                continue
        out[mode] = {"kernels": kernels}
        cases[mode] = jitted
    timed = {}
    for mode, jitted in cases.items():
        times = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            _block(jitted(carry, xs))
            times.append(time.perf_counter() - t0)
        timed[mode] = statistics.median(times) / jax.tree.leaves(xs)[0].shape[0]
    for mode, t in timed.items():
        out[mode]["per_chunk_s"] = t
    if "auto" in timed and "xla" in timed:
        out["speedup_with_kernels"] = timed["xla"] / timed["auto"]
    return out


def bench_models(args, shapes):
    from flax import nnx

    item = {"target": "(reported) streaming step with kernels vs without"}
    cfg = shapes["models"]["lm"]
    try:
        from streamzoo.layers.kv_policies import SinksWindow
        from streamzoo.zoo.lm.model import StreamingLM

        model = StreamingLM(cfg["vocab"], cfg["features"], cfg["layers"], cfg["heads"],
                            cfg["kv_heads"], cfg["hidden"],
                            policy=SinksWindow(cfg["sinks"], cfg["window"]),
                            dtype=None if args.smoke else jnp.bfloat16, rngs=nnx.Rngs(0))
        batch, chunk, chunks = cfg["batch"], cfg["chunk"], cfg["chunks"]
        tokens = jax.random.randint(jax.random.key(60), (batch, chunks * chunk), 0, cfg["vocab"])
        xs = sz.chunked(sz.Seq.full(tokens), chunk)
        carry = model.init_carry(batch)
        item["lm"] = {"config": cfg, **_model_cases(model, xs, carry, args)}
    except Exception as e:  # noqa: BLE001
        item["lm"] = {"error": _error(e)}
    asr = shapes["models"]["asr"]
    if asr is None:
        item["asr"] = {"skipped": "not in --smoke (model build too slow for the smoke budget)"}
        return item
    try:
        from streamzoo.zoo.asr.encoder import ConformerConfig, ConformerEncoder

        model = ConformerEncoder(ConformerConfig(), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        block = model.spec.block_size
        audio = jax.random.normal(jax.random.key(61), (asr["batch"], asr["chunks"] * block, 1))
        xs = sz.chunked(sz.Seq.full(audio), block)
        carry = model.init_carry(asr["batch"])
        item["asr"] = {"config": {"default ConformerConfig": True, **asr, "block": block},
                       **_model_cases(model, xs, carry, args)}
    except Exception as e:  # noqa: BLE001
        item["asr"] = {"error": _error(e)}
    return item


# ------------------------------------------------------------------------------ report
def _fmt(v, digits=3):
    return "-" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else str(v))


def markdown(result: dict) -> str:
    lines = [f"# kernels_gpu — {result['date']} on {result['device']}", "",
             f"`{result['command']}` (jax {result['jax']}, jaxlib {result['jaxlib']})", ""]
    c = result.get("ceilings", {})
    lines += ["| ceiling | value |", "|---|---|",
              f"| HBM read+write (x*2) | {_fmt(c.get('hbm_read_write_tbps'))} TB/s |",
              f"| HBM read (sum) | {_fmt(c.get('hbm_read_tbps'))} TB/s |",
              f"| bf16 matmul {c.get('matmul_size')}^3 | {_fmt(c.get('matmul_tflops'))} TFLOP/s |",
              f"| fori_loop overhead | {_fmt(c.get('loop_overhead_us'))} µs/iter |", ""]
    lines += ["| item | case | µs | metric | vs target / bar | check (rel err) |",
              "|---|---|---|---|---|---|"]
    for name, item in result["items"].items():
        if "error" in item and "cases" not in item:
            lines.append(f"| {name} | - | - | - | error: {item['error'][:120]} | - |")
            continue
        groups = [("", item.get("cases", {}), item)]
        if "step" in item:
            groups.append((" (step)", item["step"]["cases"], item["step"]))
        for suffix, cases, holder in groups:
            for case, r in cases.items():
                if "median_s" not in r:
                    why = r.get("error") or r.get("skipped") or ""
                    lines.append(f"| {name}{suffix} | {case} | - | - | {why[:150]} | - |")
                    continue
                metric = next((f"{_fmt(r[k])} {unit}" for k, unit in (
                    ("useful_tflops", "TFLOP/s"), ("kv_tbps", "TB/s KV"), ("tflops", "TFLOP/s"),
                    ("tbps", "TB/s")) if k in r), "-")
                if "fraction_of_hbm" in r:
                    metric += f" ({100 * r['fraction_of_hbm']:.0f}% HBM)"
                verdict = ""
                if case == "ours":
                    for key in ("ratio_to_target", "time_vs_bar", "meets_target"):
                        if key in holder:
                            verdict += f"{key}={_fmt(holder[key])} "
                chk = next((f"{_fmt(v.get('rel_err'))} vs {k[9:]}" for k, v in r.items()
                            if k.startswith("check_vs_")), "")
                lines.append(f"| {name}{suffix} | {case} | {r['median_s'] * 1e6:.1f} | {metric} "
                             f"| {verdict.strip()} | {chk} |")
        if "ours_error" in item:
            lines.append(f"| {name} | ours | - | - | error: {item['ours_error'][:150]} | - |")
        for model in ("lm", "asr"):
            if model in item:
                m = item[model]
                for mode in ("auto", "xla"):
                    r = m.get(mode, {})
                    lines.append(f"| {name} {model} | {mode} | "
                                 f"{_fmt(r.get('per_chunk_s', 0) * 1e6 if 'per_chunk_s' in r else None)}"
                                 f" | kernels: {', '.join(r.get('kernels', [])) or 'none'} | "
                                 f"{_fmt(m.get('speedup_with_kernels'))} | "
                                 f"{(r.get('error') or m.get('error') or m.get('skipped') or '')[:120]} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="JSON path (markdown next to it, .md)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU, our kernels with impl='interpret'")
    p.add_argument("--only", default=",".join(ITEMS), help="comma-separated items")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--inner", type=int, default=None, help="iterations per timed call")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls after compiling")
    p.add_argument("--impl", default=None,
                   help="implementation of our kernels (default: auto; interpret with --smoke)")
    args = p.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(ITEMS)
    if unknown:
        raise ValueError(f"--only: expected items from {ITEMS}, got {sorted(unknown)}")
    args.only = only
    args.rounds = (1 if args.smoke else 5) if args.rounds is None else args.rounds
    args.inner = (1 if args.smoke else 10) if args.inner is None else args.inner
    args.warmup = (0 if args.smoke else 1) if args.warmup is None else args.warmup
    if args.rounds < 1 or args.inner < 1:
        raise ValueError(f"--rounds, --inner: expected >= 1, got {args.rounds}, {args.inner}")
    args.impl = args.impl or ("interpret" if args.smoke else "auto")
    # Linear attention has no Mosaic GPU kernel (Triton serves it on GPU).
    args.la_impl = "auto" if args.impl == "mosaic_gpu" else args.impl
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    shapes = SMOKE if args.smoke else FULL
    now = datetime.datetime.now(datetime.timezone.utc)
    device = jax.devices()[0]
    result = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/kernels_gpu.py " + " ".join(argv if argv is not None
                                                                   else sys.argv[1:]),
        "device": f"{device.platform}: {device.device_kind}",
        "jax": jax.__version__, "jaxlib": __import__("jaxlib").__version__,
        "python": platform.python_version(), "smoke": args.smoke, "impl": args.impl,
        "rounds": args.rounds, "inner": args.inner, "items": {},
    }
    t_start = time.perf_counter()
    result["ceilings"] = bench_ceilings(args, shapes)
    hbm = result["ceilings"].get("hbm_read_write_tbps")
    runners = {
        "prefill_causal": lambda: bench_prefill(args, shapes),
        "window_sinks": lambda: bench_window(args, shapes),
        "chunk_causal": lambda: bench_chunk(args, shapes),
        "ring_decode": lambda: bench_decode(args, shapes),
        "causal_conv": lambda: bench_conv(args, shapes, hbm),
        "linear_scan": lambda: bench_scan(args, shapes, hbm),
        "linear_attention": lambda: bench_linear_attention(args, shapes, hbm),
        "model_step": lambda: bench_models(args, shapes),
    }
    for name in args.only:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            result["items"][name] = runners[name]()
        except Exception as e:  # noqa: BLE001
            result["items"][name] = {"error": _error(e)}
        result["items"][name]["wall_s"] = round(time.perf_counter() - t0, 2)
        result["items"][name]["cpu_s"] = round(time.process_time() - c0, 2)
        print(f"[kernels_gpu] {name}: {result['items'][name]['wall_s']} s "
              f"(cpu {result['items'][name]['cpu_s']} s)", flush=True)
        jax.clear_caches()
    result["wall_s"] = round(time.perf_counter() - t_start, 2)
    out = args.out or os.path.join(HERE, "results", f"kernels-{device.platform}-"
                                   f"{now.strftime('%Y-%m-%d')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    table = markdown(result)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
