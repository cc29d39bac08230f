"""Training throughput of a mid-size streamzoo transformer with the library's train loop,
and its MFU against the matmul peak measured on the same device in the same run (issue 4).

The model is a pre-norm stack built from streamzoo layers,

    Repeat(lambda rngs: Serial(Residual(Serial(RMSNorm, StreamingAttention(max_past=W))),
                               Residual(Serial(RMSNorm, FeedForward(gated=True)))), L)

trained on **next-frame regression**: input frames `x[0..T-1]` (D features each, every frame
valid), targets `x[1..T]`, loss the masked mean squared error (`streamzoo.train.configs.
predictor_loss`). The frames are a fresh random mixture of sinusoids plus noise per run, so
the task is learnable and the loss is reported before and after the timed steps. The step
is `streamzoo.train.loop.train_step_donated` (what `fit` uses: AdamW with warm-up + cosine,
global-norm clipping) on a `TrainState` from `TrainState.create`, compiled ahead of time
once; `--dtype bf16` sets `StepOptions(compute_dtype="bfloat16")` (float32 master params and
optimizer state). Batches are generated once and live on the device: the input pipeline is
not measured.

**FLOPs** are counted analytically, matmuls only (2 FLOPs per multiply-add): per layer and
frame the fused QKV projection, the output projection, the attention scores and the
attention-weighted values, and the gated feed-forward's up and down projections. Attention is
counted as it executes offline: a dense `T x T` score matrix per head (the window and the
causal rule are a mask on it, so they save no work; `attention_reference` computes scores and
weights in float32 whatever the compute dtype). Norms, RoPE, softmax and the optimizer are not
counted. A training step is 3x the forward (backward = 2x forward), the convention of
PaLM-style MFU. As a cross-check the run asks XLA's cost analysis for the FLOPs of the same
compiled step on a 1-layer model (XLA counts a loop body once, and a 1-layer layer scan has
one trip) and reports its ratio to the analytic count: about 1.01 at the default sizes, XLA
also counting elementwise work and the optimizer.

**MFU** = (FLOPs per step / median step time) / peak, where peak is the median rate of a
large `jnp.matmul` chain on the same device in the same run, measured before and after the
training steps; the higher of the two is used, so load during one of them cannot inflate the
MFU. float32 2048^3 on CPU, bfloat16 8192^3 on GPU/TPU (`--peak-size`, `--peak-dtype`).

**Timing**: each step is one dispatch of the compiled step plus `block_until_ready` on the
new state and metrics; the figure is the median over `--steps` steps after `--warmup` steps
(compile time is reported separately). The device is chosen by JAX (GPU when one is visible,
else CPU; `JAX_PLATFORMS` overrides), and one device is used.

    python benchmarks/train_throughput.py                       # CPU defaults: D=256 L=4 H=4 T=256 B=8
    python benchmarks/train_throughput.py --dtype bf16
    python benchmarks/train_throughput.py --dtype bf16 --batch 32 --length 1024 --features 1024 \\
        --layers 8 --heads 8                                    # a GPU-sized run
    python benchmarks/train_throughput.py --quick               # smoke run, writes no JSON

A full run writes `benchmarks/results/train_throughput-<device>-<dtype>-<date>[-tag].json`
(`--out FILE` to choose, `--no-json` for none) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

try:
    import streamzoo as sz
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import streamzoo as sz

from streamzoo.eval.machine import load_average  # noqa: E402
from streamzoo.eval.machine import machine_info as shared_machine_info  # noqa: E402
from streamzoo.layers.attention import StreamingAttention  # noqa: E402
from streamzoo.layers.feedforward import FeedForward  # noqa: E402
from streamzoo.layers.norm import RMSNorm  # noqa: E402
from streamzoo.train.configs import predictor_loss  # noqa: E402
from streamzoo.train.loop import (StepOptions, TrainState, make_optimizer,  # noqa: E402
                                  train_step_donated)

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = {"f32": "float32", "bf16": "bfloat16"}


# ------------------------------------------------------------------------------ settings
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=int, default=256, help="model width D (default 256)")
    p.add_argument("--layers", type=int, default=4, help="layers L (default 4)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: heads)")
    p.add_argument("--ffn-hidden", type=int, default=None,
                   help="gated feed-forward hidden width (default 4*D)")
    p.add_argument("--max-past", type=int, default=None,
                   help="attention window in frames (default T: full causal context)")
    p.add_argument("--length", type=int, default=256, help="frames per example T (default 256)")
    p.add_argument("--batch", type=int, default=8, help="examples per step B (default 8)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="f32",
                   help="compute dtype of forward and backward (params stay float32)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--peak-size", type=int, default=None,
                   help="N of the N^3 peak matmul (default 2048 on CPU, 8192 elsewhere)")
    p.add_argument("--peak-dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the peak matmul (default f32 on CPU, bf16 elsewhere)")
    p.add_argument("--peak-rounds", type=int, default=None,
                   help="timed calls of the peak matmul chain, each time (default 10 CPU, 20 else)")
    p.add_argument("--no-flops-check", action="store_true",
                   help="skip XLA's FLOP count of a 1-layer step (a cross-check of the analytic one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: D=64 L=2 H=2 T=64 B=2, 3 steps, small peak matmul, no JSON")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--tag", default="", help="suffix of the default JSON file name")
    p.add_argument("--no-json", action="store_true", help="write no JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.features, args.layers, args.heads, args.length, args.batch = 64, 2, 2, 64, 2
        args.steps, args.warmup = 3, 1
        args.peak_size = args.peak_size or 512
        args.peak_rounds = args.peak_rounds or 3
    for name in ("features", "layers", "heads", "length", "batch", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: expected a positive int, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup: expected an int >= 0, got {args.warmup}")
    if args.features % args.heads:
        raise ValueError(f"--heads: expected a divisor of --features={args.features}, "
                         f"got {args.heads}")
    args.kv_heads = args.kv_heads or args.heads
    args.ffn_hidden = args.ffn_hidden or 4 * args.features
    args.max_past = args.length if args.max_past is None else args.max_past
    return args


# ---------------------------------------------------------------------------------- model
def build_model(args, rngs: nnx.Rngs) -> sz.Repeat:
    """The pre-norm stack: L x [x + Attn(RMSNorm(x)), x + SwiGLU(RMSNorm(x))]."""
    d = args.features

    def block(r):
        return sz.Serial(
            sz.Residual(sz.Serial(RMSNorm(d), StreamingAttention(
                d, args.heads, num_kv_heads=args.kv_heads, max_past=args.max_past, rngs=r))),
            sz.Residual(sz.Serial(RMSNorm(d), FeedForward(d, args.ffn_hidden, gated=True,
                                                          rngs=r))))

    return sz.Repeat(block, args.layers, rngs=rngs)


def model_flops(args) -> dict:
    """Analytic matmul FLOPs (2 per multiply-add) of one step: forward, and train = 3x forward."""
    d, t, b, layers = args.features, args.length, args.batch, args.layers
    dh = d // args.heads
    h, hkv, f = args.heads, args.kv_heads, args.ffn_hidden
    per_frame = {  # one layer, one frame, forward
        "qkv_projection": 2 * d * (h + 2 * hkv) * dh,
        "attention_scores": 2 * t * h * dh,      # q . k over all T keys (dense, masked)
        "attention_values": 2 * t * h * dh,      # weights @ v
        "output_projection": 2 * h * dh * d,
        "ffn_up": 2 * d * 2 * f,                  # gated: value and gate halves
        "ffn_down": 2 * f * d,
    }
    frames = b * t
    forward = layers * frames * sum(per_frame.values())
    attention = layers * frames * (per_frame["attention_scores"] + per_frame["attention_values"])
    return {"per_layer_per_frame_forward": per_frame, "forward_per_step": forward,
            "train_per_step": 3 * forward, "attention_share": attention / forward}


def xla_flops_check(args, tx, options, batch) -> dict:
    """XLA's FLOP count of the same train step for a 1-layer model against the analytic count
    (XLA counts a loop body once, so only a 1-layer scan is counted in full)."""
    one = argparse.Namespace(**{**vars(args), "layers": 1})
    model = build_model(one, nnx.Rngs(params=0))
    state = TrainState.create(model, tx, predictor_loss, rng=0, options=options)
    cost = train_step_donated.lower(state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla = float((cost or {}).get("flops", float("nan")))
    analytic = model_flops(one)["train_per_step"]
    return {"layers": 1, "xla_train_step_flops": xla, "analytic_train_step_flops": analytic,
            "ratio": xla / analytic}


def make_batches(args, count: int, key) -> list[dict]:
    """`count` batches of next-frame regression on random sinusoid mixtures plus noise."""
    batches = []
    t = jnp.arange(args.length + 1, dtype=jnp.float32)[None, :, None]
    for k in jax.random.split(key, count):
        kf, kp, ka, kn = jax.random.split(k, 4)
        shape = (args.batch, 1, args.features)
        freq = jax.random.uniform(kf, shape, minval=0.02, maxval=0.5)
        phase = jax.random.uniform(kp, shape, maxval=2 * np.pi)
        amp = jax.random.uniform(ka, shape, minval=0.5, maxval=1.5)
        frames = amp * jnp.sin(freq * t + phase)
        frames = frames + 0.05 * jax.random.normal(kn, frames.shape)
        batches.append({"inputs": sz.Seq.full(frames[:, :-1]), "targets": frames[:, 1:]})
    return jax.device_put(batches)


# ---------------------------------------------------------------------------- measuring
def _block(tree):
    jax.block_until_ready(tree)


def measure_peak(size: int, dtype: str, rounds: int, key) -> dict:
    """Median FLOP/s of a chain of `size^3` matmuls `c <- c @ w` in one compiled call.

    Each product depends on the previous one (no hoisting), `w ~ N(0, 1/size)` keeps the
    magnitudes steady; on CPU one product per call, elsewhere 10 (dispatch amortised).
    """
    chain = 1 if jax.default_backend() == "cpu" else 10
    ka, kb = jax.random.split(key)
    a = jax.random.normal(ka, (size, size), jnp.float32).astype(dtype)
    w = (jax.random.normal(kb, (size, size), jnp.float32) / np.sqrt(size)).astype(dtype)

    def run(c, w):
        return jax.lax.fori_loop(0, chain, lambda i, c: jnp.matmul(c, w), c)

    t0 = time.perf_counter()
    compiled = jax.jit(run).lower(a, w).compile()
    compile_s = time.perf_counter() - t0
    _block(compiled(a, w))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        _block(compiled(a, w))
        times.append(time.perf_counter() - t0)
    flops = 2 * size ** 3 * chain
    med = statistics.median(times)
    return {"size": size, "dtype": dtype, "chain": chain, "rounds": rounds,
            "median_s": med, "min_s": min(times), "compile_s": compile_s,
            "flops_per_s": flops / med, "best_flops_per_s": flops / min(times)}


def _load() -> list[float]:
    return load_average()


def machine_info() -> dict:
    return {**shared_machine_info("optax"), "streamzoo": sz.__version__}


def device_slug() -> str:
    kind = jax.devices()[0].device_kind
    slug = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "device"
    return "cpu" if jax.default_backend() == "cpu" else slug


# ------------------------------------------------------------------------------------ run
def run(args) -> dict:
    backend = jax.default_backend()
    peak_size = args.peak_size or (2048 if backend == "cpu" else 8192)
    peak_dtype = DTYPES[args.peak_dtype or ("f32" if backend == "cpu" else "bf16")]
    peak_rounds = args.peak_rounds or (10 if backend == "cpu" else 20)
    compute_dtype = DTYPES[args.dtype]
    key = jax.random.key(args.seed)
    k_model, k_data, k_peak = jax.random.split(key, 3)
    load_before = _load()

    peak_before = measure_peak(peak_size, peak_dtype, peak_rounds, k_peak)

    model = build_model(args, nnx.Rngs(params=k_model))
    params = nnx.state(model, nnx.Param)
    num_params = int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))
    total = args.warmup + args.steps
    tx, schedule = make_optimizer(3e-4, max(total, 2), warmup_steps=min(2, max(total, 2) - 1))
    options = StepOptions(compute_dtype=None if compute_dtype == "float32" else compute_dtype,
                          lr_schedule=schedule)
    state = TrainState.create(model, tx, predictor_loss, rng=args.seed, options=options)
    batches = make_batches(args, 4, k_data)

    t0 = time.perf_counter()
    step = train_step_donated.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0

    losses, times = [], []
    for i in range(total):
        t0 = time.perf_counter()
        state, metrics = step(state, batches[i % len(batches)])
        _block((state, metrics))
        times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    timed = times[args.warmup:]
    if not all(np.isfinite(losses)):
        raise RuntimeError(f"training diverged: losses {losses}")

    peak_after = measure_peak(peak_size, peak_dtype, peak_rounds, k_peak)
    load_after = _load()
    flops_check = None if args.no_flops_check else xla_flops_check(args, tx, options, batches[0])

    flops = model_flops(args)
    step_s = statistics.median(timed)
    peak = max(peak_before["flops_per_s"], peak_after["flops_per_s"])
    achieved = flops["train_per_step"] / step_s
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_before": load_before, "load_after": load_after,
        "model": {"stack": "Repeat(Serial(Residual(Serial(RMSNorm, StreamingAttention)), "
                           "Residual(Serial(RMSNorm, FeedForward(gated)))))",
                  "features": args.features, "layers": args.layers, "heads": args.heads,
                  "kv_heads": args.kv_heads, "head_dim": args.features // args.heads,
                  "ffn_hidden": args.ffn_hidden, "max_past": args.max_past, "rope": True,
                  "params": num_params,
                  "loss": "next-frame regression, masked MSE (configs.predictor_loss)"},
        "batch": args.batch, "length": args.length, "compute_dtype": compute_dtype,
        "step": "train_step_donated (AOT compiled), AdamW + clip, device-resident batches",
        "warmup_steps": args.warmup, "timed_steps": args.steps,
        "compile_s": compile_s,
        "step_s": {"median": step_s, "min": min(timed), "max": max(timed), "all": timed},
        "examples_per_s": args.batch / step_s,
        "frames_per_s": args.batch * args.length / step_s,
        "flops": flops, "flops_check": flops_check,
        "achieved_flops_per_s": achieved,
        "peak": {"before": peak_before, "after": peak_after, "used_flops_per_s": peak},
        "mfu": achieved / peak,
        "loss_first": losses[0], "loss_last": losses[-1],
    }


def markdown(r: dict) -> str:
    m, mod = r["machine"], r["model"]
    p = r["peak"]
    dev = m["device_kind"] if m["backend"] != "cpu" else f"CPU ({m['cpu']}, {m['nproc']} cores)"
    rows = [
        ("device", f"{dev}, jax {m['jax']}"),
        ("model", f"D={mod['features']} L={mod['layers']} H={mod['heads']} "
                  f"(kv {mod['kv_heads']}) FFN={mod['ffn_hidden']} window={mod['max_past']}, "
                  f"{mod['params'] / 1e6:.2f} M params"),
        ("batch x frames", f"{r['batch']} x {r['length']}, compute {r['compute_dtype']}"),
        ("step time (median of %d)" % r["timed_steps"],
         f"{r['step_s']['median'] * 1e3:.1f} ms (min {r['step_s']['min'] * 1e3:.1f}, "
         f"max {r['step_s']['max'] * 1e3:.1f}); compile {r['compile_s']:.1f} s"),
        ("examples/s", f"{r['examples_per_s']:.2f}"),
        ("frames/s", f"{r['frames_per_s']:.0f}"),
        ("model FLOPs/step (3x fwd)", f"{r['flops']['train_per_step'] / 1e9:.2f} G "
                                      f"(attention {100 * r['flops']['attention_share']:.0f}%)"),
        ("XLA / analytic FLOPs (1-layer step)",
         "skipped" if not r["flops_check"] else f"{r['flops_check']['ratio']:.3f}"),
        ("achieved", f"{r['achieved_flops_per_s'] / 1e12:.4g} TFLOP/s"),
        ("peak matmul (same run)",
         f"{p['used_flops_per_s'] / 1e12:.4g} TFLOP/s ({p['before']['dtype']} "
         f"{p['before']['size']}^3; before {p['before']['flops_per_s'] / 1e12:.4g}, "
         f"after {p['after']['flops_per_s'] / 1e12:.4g})"),
        ("MFU", f"{100 * r['mfu']:.1f}%"),
        ("loss first -> last", f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}"),
        ("load average before / after", f"{r['load_before']} / {r['load_after']}"),
    ]
    lines = ["| quantity | value |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def default_path(r: dict, dtype: str, tag: str = "") -> str:
    name = f"train_throughput-{device_slug()}-{dtype}-{r['date'][:10]}" + (f"-{tag}" if tag else "")
    return os.path.join(HERE, "results", name + ".json")


def main(argv=None) -> dict:
    """Run the benchmark with command-line `argv`; print the table, write the JSON; return it."""
    args = parse_args(argv)
    dev = jax.devices()[0]
    print(f"device: {dev} ({dev.device_kind}), backend {jax.default_backend()}, "
          f"{jax.device_count()} device(s) visible, using 1; jax {jax.__version__}", flush=True)
    result = {"command": "python benchmarks/train_throughput.py "
                         + " ".join(sys.argv[1:] if argv is None else argv)}
    result.update(run(args))
    print(markdown(result), flush=True)
    if not args.no_json and (args.out or not args.quick):
        path = args.out or default_path(result, args.dtype, args.tag)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {os.path.relpath(path)}")
        result["json_path"] = path
    return result


if __name__ == "__main__":
    main()
