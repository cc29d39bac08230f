"""Decode speed of StreamingLLM (sinks + window, cached) against sliding-window decoding with
recomputation, at windows W = 1024 and 2048 (issue 5; the StreamingLLM paper reports up to
22.2x on an A6000), and on a GPU the cached decode step time against KV bytes / measured HBM
bandwidth.

Both ways use the same `StreamingLM` parameters, batch B, greedy decoding and a window of W
tokens, so every generated token attends to W + 1 tokens (itself included):

* **cached** (`sinks + window`): `with_policy(model, SinksWindow(4, W - 4))`, a prompt of W
  random tokens prefilled (`decode.start`, chunks of 256) so the cache is full and its ring
  wraps during the timed part, then `decode.generate` (one jitted `lax.while_loop`, one
  `model.step` of T=1 per token) called again and again on its own state.
* **recompute**: per token the model runs offline (full causal attention, positions 0..W)
  over the last W + 1 tokens and takes the last position's logits; the token buffer shifts by
  one. `--recompute-tokens` tokens run inside one jitted `lax.scan`.

Timing: per case, one untimed call (compilation), then `--rounds` rounds, interleaved between
the cases of a window so they see the same load; a figure is the median over rounds of
tokens/s = B x tokens per call / seconds per call (`block_until_ready` on the outputs).

**Roofline** (default on GPU, `--roofline` elsewhere): for each batch size of
`--roofline-batches`, the cached decode step time (median over rounds of a `generate` call of
`--cached-tokens` steps / steps) against the bytes one step must read: the KV cache (`k`, `v`
of every layer at its full size W) plus the parameters. The bandwidth is measured in the same
run: a jitted `x + 1` over a `--copy-mib` MiB float32 array reads and writes it once (2 x size
bytes per call); the rate of the fastest of 20 calls, before and after the steps, the higher
of the two. Bound = bytes / bandwidth; "of bound" = bound / measured.

    python benchmarks/lm_decode.py                     # CPU: the checked-in model, B=1
    python benchmarks/lm_decode.py --device gpu        # H200: GPU preset (bf16), + roofline
    python benchmarks/lm_decode.py --quick             # smoke run (W=64/128, few tokens)

Writes `benchmarks/results/lm_decode-<device>-<date>[-tag].json` (not with --quick unless --out).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="cpu (JAX_PLATFORMS=cpu) or gpu (must see a GPU)")
    parser.add_argument("--model", default=None,
                        help="'pretrained' (the checked-in byte LM, D=128 L=4: CPU default) or "
                             "'gpu' (random D=1024 L=12 H=16 KV=4 SwiGLU 2816: GPU default) or "
                             "D,L,H,KV,HIDDEN (random weights)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute and cache dtype (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--windows", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--cached-tokens", type=int, default=None,
                        help="tokens per timed generate call (default 256 CPU, 512 GPU)")
    parser.add_argument("--recompute-tokens", type=int, default=None,
                        help="tokens per timed recompute call (default 4 CPU, 32 GPU)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5)")
    parser.add_argument("--roofline", action="store_true",
                        help="also the step time vs KV bytes / bandwidth (default on GPU)")
    parser.add_argument("--roofline-batches", type=int, nargs="+", default=None,
                        help="batch sizes of the roofline (default: 1 16 64 on GPU, 1 8 on CPU)")
    parser.add_argument("--copy-mib", type=int, default=None,
                        help="bandwidth probe size (default 4096 GPU, 256 CPU)")
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--tag", default="", help="suffix of the JSON name")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args(argv)
    gpu = args.device == "gpu"
    args.model = args.model or ("gpu" if gpu else "pretrained")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if args.quick:
        args.windows = [64, 128]
    args.cached_tokens = args.cached_tokens or (32 if args.quick else 512 if gpu else 256)
    args.recompute_tokens = args.recompute_tokens or (2 if args.quick else 32 if gpu else 4)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.roofline = args.roofline or gpu
    args.roofline_batches = args.roofline_batches or ([1, 16, 64] if gpu else [1, 8])
    args.copy_mib = args.copy_mib or (16 if args.quick else 4096 if gpu else 256)
    return args


ARGS = _parse_args(sys.argv[1:] if __name__ == "__main__" else [])
os.environ["JAX_PLATFORMS"] = "cuda" if ARGS.device == "gpu" else "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

try:
    import streamzoo as sz
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import streamzoo as sz

from streamzoo.eval.machine import load_average, machine_info  # noqa: E402
from streamzoo.layers.kv_policies import FullCache, SinksWindow  # noqa: E402
from streamzoo.zoo.lm import decode  # noqa: E402
from streamzoo.zoo.lm.model import with_policy  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GPU_PRESET = {"vocab_size": 258, "features": 1024, "num_layers": 12, "num_heads": 16,
              "num_kv_heads": 4, "hidden": 2816, "tie_embeddings": True, "rope_base": 10000.0}


def _load():
    return load_average()


def machine() -> dict:
    return machine_info()


# ---------------------------------------------------------------------------------- model
def build_model(spec: str, dtype):
    from streamzoo.zoo.lm import training

    dtype = jnp.dtype(dtype)
    if spec == "pretrained":
        model = training.load_pretrained(dtype=dtype)
        return model, {"kind": "pretrained", **training.pretrained_info()["architecture"]}
    if spec == "gpu":
        arch = dict(GPU_PRESET)
    else:
        try:
            d, l, h, kv, hidden = (int(v) for v in spec.split(","))
        except ValueError:
            raise SystemExit(f"--model: expected 'pretrained', 'gpu' or D,L,H,KV,HIDDEN, got "
                             f"{spec!r}") from None
        arch = {**GPU_PRESET, "features": d, "num_layers": l, "num_heads": h,
                "num_kv_heads": kv, "hidden": hidden}
    return training.build_lm(arch, FullCache(8), seed=0, dtype=dtype), {"kind": "random", **arch}


def param_bytes(model) -> int:
    from flax import nnx

    return sz.carry_nbytes(nnx.state(model, nnx.Param))


# ---------------------------------------------------------------------------------- cases
def cached_case(model, window, batch, sinks, tokens, dtype, key):
    """A zero-argument callable: one `generate` call of `tokens` steps continuing the state."""
    m = with_policy(model, SinksWindow(sinks, window - sinks))
    prompt = sz.Seq.full(jax.random.randint(key, (batch, window), 1, m.vocab_size, jnp.int32))
    state = decode.start(m, prompt, keys=jax.random.fold_in(key, 1), max_new_tokens=1 << 30,
                         chunk_size=min(256, window), cache_dtype=dtype)
    holder = {"state": state}
    kv = sum(a.nbytes for a in (state.carry.layers.k, state.carry.layers.v))

    def run():
        holder["state"], out = decode.generate(m, holder["state"], tokens)
        jax.block_until_ready((holder["state"], out))

    return run, {"carry_bytes": sz.carry_nbytes(state.carry), "kv_bytes": int(kv)}


@functools.partial(jax.jit, static_argnames=("num_steps",))
def recompute_generate(model, buffer, num_steps):
    """Greedy decode of `num_steps` tokens, each from an offline run over `buffer [B, W+1]`
    (positions 0..W), which then shifts by one token."""

    def body(buf, _):
        h = model.hidden(sz.Seq.full(buf)).values[:, -1]
        token = jnp.argmax(model.logits_from_hidden(h), axis=-1).astype(jnp.int32)
        return jnp.concatenate([buf[:, 1:], token[:, None]], axis=1), token

    return jax.lax.scan(body, buffer, None, length=num_steps)


def recompute_case(model, window, batch, tokens, key):
    m = with_policy(model, FullCache(window + 1))
    holder = {"buf": jax.random.randint(key, (batch, window + 1), 1, m.vocab_size, jnp.int32)}

    def run():
        holder["buf"], out = recompute_generate(m, holder["buf"], tokens)
        jax.block_until_ready((holder["buf"], out))

    return run


def interleaved(cases: dict, rounds: int) -> dict:
    """Median seconds per call of each case over `rounds` rounds (after one untimed call)."""
    compile_s = {}
    for name, fn in cases.items():
        t0 = time.perf_counter()
        fn()
        compile_s[name] = time.perf_counter() - t0
    times = {name: [] for name in cases}
    names = list(cases)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v),
                   "first_call_s": compile_s[name]} for name, v in times.items()}


def bandwidth(mib: int, calls: int = 20) -> dict:
    """GB/s of a jitted `x + 1` over `mib` MiB of float32 (reads and writes it once): the best
call (`gb_per_s`, the attainable rate, robust to load) and the median call."""
    n = mib * 2 ** 20 // 4
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    jax.block_until_ready(f(x))
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t0)
    t, best = statistics.median(times), min(times)
    return {"array_mib": mib, "bytes_per_call": 2 * 4 * n, "median_s": t, "min_s": best,
            "gb_per_s_median": 2 * 4 * n / t / 1e9, "gb_per_s": 2 * 4 * n / best / 1e9}


# ---------------------------------------------------------------------------------- main
def main(args) -> dict:
    dtype = jnp.dtype(args.dtype)
    if args.device == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit(f"--device gpu: JAX sees no GPU (backend {jax.default_backend()})")
    model, arch = build_model(args.model, dtype)
    started = datetime.datetime.now().astimezone()
    res = {"date": started.isoformat(timespec="seconds"), "machine": machine(),
           "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
           "settings": {k: v for k, v in vars(args).items()},
           "model": {**arch, "parameters": int(param_bytes(model) // 4),
                     "param_bytes_compute_dtype": int(param_bytes(model) // 4 * dtype.itemsize)},
           "windows": {}}
    print(f"lm_decode: {res['date']}, {res['machine']['device']}, load {_load()}, model {arch}",
          flush=True)
    key = jax.random.key(0)
    for w in args.windows:
        load_before = _load()
        run_c, sizes = cached_case(model, w, args.batch, args.sinks, args.cached_tokens, dtype,
                                   jax.random.fold_in(key, w))
        run_r = recompute_case(model, w, args.batch, args.recompute_tokens,
                               jax.random.fold_in(key, w + 1))
        t = interleaved({"cached": run_c, "recompute": run_r}, args.rounds)
        cached = args.batch * args.cached_tokens / t["cached"]["median_s"]
        recompute = args.batch * args.recompute_tokens / t["recompute"]["median_s"]
        res["windows"][str(w)] = {
            "policy": f"SinksWindow({args.sinks}, {w - args.sinks})", **sizes,
            "times": t, "load_before": load_before, "load_after": _load(),
            "cached_tokens_per_s": cached, "recompute_tokens_per_s": recompute,
            "speedup": cached / recompute,
            "cached_ms_per_step": 1e3 * t["cached"]["median_s"] / args.cached_tokens}
        print(f"W={w}: cached {cached:.1f} tok/s, recompute {recompute:.2f} tok/s, "
              f"speedup {cached / recompute:.1f}x (load {load_before} -> {_load()})", flush=True)
    if args.roofline:
        res["bandwidth_before"] = bandwidth(args.copy_mib)
        rows = []
        for w in args.windows:
            for b in args.roofline_batches:
                run_c, sizes = cached_case(model, w, b, args.sinks, args.cached_tokens, dtype,
                                           jax.random.fold_in(key, 7 * w + b))
                t = interleaved({"cached": run_c}, args.rounds)["cached"]
                rows.append({"window": w, "batch": b, **sizes,
                             "step_ms": 1e3 * t["median_s"] / args.cached_tokens})
        res["bandwidth_after"] = bandwidth(args.copy_mib)
        bw = max(res["bandwidth_before"]["gb_per_s"], res["bandwidth_after"]["gb_per_s"])
        pbytes = res["model"]["param_bytes_compute_dtype"]
        for row in rows:
            row["bytes_per_step"] = row["kv_bytes"] + pbytes
            row["bound_ms"] = 1e3 * row["bytes_per_step"] / (bw * 1e9)
            row["of_bound"] = row["bound_ms"] / row["step_ms"]
        res["roofline"] = {"bandwidth_gb_per_s": bw, "rows": rows}
        print(f"bandwidth {bw:.1f} GB/s", flush=True)
    res["seconds"] = round(time.time() - started.timestamp(), 1)
    print(markdown(res))
    return res


def markdown(res) -> str:
    s = res["settings"]
    lines = [f"W = window (each token attends to W + 1 tokens), B = {s['batch']}, "
             f"{s['dtype']}, greedy; cached: {s['cached_tokens']} tokens per call, recompute: "
             f"{s['recompute_tokens']}; median of {s['rounds']} rounds", "",
             "| W | sinks + window cached, tok/s | recompute, tok/s | speedup | cached ms/token "
             "| KV cache bytes | load before → after |", "|---|---|---|---|---|---|---|"]
    for w, r in res["windows"].items():
        lines.append(f"| {w} | {r['cached_tokens_per_s']:.1f} | {r['recompute_tokens_per_s']:.2f}"
                     f" | **{r['speedup']:.1f}×** | {r['cached_ms_per_step']:.3f} | "
                     f"{r['kv_bytes']:,} | {r['load_before']} → {r['load_after']} |")
    if "roofline" in res:
        rf = res["roofline"]
        lines += ["", f"Roofline: measured copy bandwidth {rf['bandwidth_gb_per_s']:.1f} GB/s; "
                      f"parameters {res['model']['param_bytes_compute_dtype']:,} bytes per step", "",
                  "| W | B | KV bytes | bytes/step (KV + params) | step ms | bound ms | of bound |",
                  "|---|---|---|---|---|---|---|"]
        for r in rf["rows"]:
            lines.append(f"| {r['window']} | {r['batch']} | {r['kv_bytes']:,} | "
                         f"{r['bytes_per_step']:,} | {r['step_ms']:.3f} | {r['bound_ms']:.4f} | "
                         f"{100 * r['of_bound']:.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    result = main(ARGS)
    out = ARGS.out
    if out is None and not ARGS.quick:
        day = datetime.date.today().isoformat()
        out = os.path.join(HERE, "results", f"lm_decode-{ARGS.device}-{day}"
                                            f"{'-' + ARGS.tag if ARGS.tag else ''}.json")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out}")
