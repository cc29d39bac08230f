"""Silero VAD: the JAX port's cost per 512-sample chunk against onnxruntime, same run, same CPU.

Cases (float32, one 16 kHz stream unless said; one chunk = 32 ms of audio):

* JAX `jit(step)`, one chunk per call (what a live caller sees, dispatch included), with the
  module as an argument and as `pure()` params;
* JAX `jit(step)` on a batch of 32 streams, one chunk each per call (cost per stream-chunk);
* JAX `jit(multistep)` over K chunks in one call (`lax.scan` of a one-chunk step), one
  `jit(step)` call on all K chunks at once, and the offline `jit(model(x))` over them (these
  two run the encoder batched over the chunks and scan only the LSTM);
* onnxruntime running the wheel's `silero_vad.onnx` one chunk per `session.run` (what
  `silero_vad`'s `OnnxWrapper` does; 1 intra-op thread as it sets, and the default threads);
* onnxruntime running the wheel's `silero_vad_16k_sequence.onnx` over the same K chunks in one
  call (the package's batched path: the peer of `multistep`).

The same audio goes through the JAX port and `silero_vad.onnx`; the run records their max
abs difference. Timing: cases are interleaved (each round times every case, rotating the
order) so that they see the same machine load; a figure is the median over rounds of the
per-round median. Load average before/after is recorded (the machine may be shared).

    python benchmarks/vad.py                  # full run; prints markdown, --out FILE writes JSON
    python benchmarks/vad.py --quick          # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

try:
    import streamzoo as sz
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import streamzoo as sz

from streamzoo.eval.machine import (cpu_counters, load_average, machine_info,  # noqa: E402
                                     steal_percent)
from streamzoo.zoo.vad.silero import (CHUNK, CONTEXT, SAMPLE_RATE, SileroVAD,  # noqa: E402
                                      wheel_data_dir)

CHUNK_MS = 1000 * CHUNK / SAMPLE_RATE


def interleaved(cases: dict, rounds: int, calls: int, warmup: int) -> dict:
    """Median seconds per call of each zero-argument case, rounds interleaved."""
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    per_round = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times = []
            for _ in range(calls):
                t0 = time.perf_counter_ns()
                cases[name]()
                times.append(time.perf_counter_ns() - t0)
            per_round[name].append(statistics.median(times) / 1e6)
    return {name: {"median_ms": statistics.median(v), "min_round_ms": min(v),
                   "max_round_ms": max(v)} for name, v in per_round.items()}


def _stepper(call, carry, chunks, calls_per_wait: int = 1):
    """A zero-argument case: `calls_per_wait` step calls on the next chunks, then one wait.
    One call per wait is a blocking call's latency; several let jax's async dispatch overlap
    the Python side of a call with the compute of the previous one (the CPU cost per call)."""
    state = {"carry": carry, "i": 0}

    def run():
        for _ in range(calls_per_wait):
            x = chunks[state["i"] % len(chunks)]
            state["i"] += 1
            state["carry"], y = call(state["carry"], x)
        jax.block_until_ready((state["carry"], y))

    return run


def _ort_stepper(session, chunks):
    state = {"s": np.zeros((2, 1, 128), np.float32), "ctx": np.zeros(CONTEXT, np.float32), "i": 0}
    sr = np.array(SAMPLE_RATE, np.int64)

    def run():
        chunk = chunks[state["i"] % len(chunks)]
        state["i"] += 1
        p, state["s"] = session.run(None, {"input": np.concatenate([state["ctx"], chunk])[None],
                                           "state": state["s"], "sr": sr})
        state["ctx"] = chunk[-CONTEXT:]

    return run


def _load():
    return load_average()


def machine() -> dict:
    info = machine_info("onnxruntime", "silero-vad")
    info["devices"] = [str(d) for d in jax.devices()]
    return info


def run(args) -> dict:
    import onnxruntime as ort

    data = wheel_data_dir()
    if data is None:
        raise SystemExit("silero-vad wheel not installed: pip install --no-deps silero-vad==6.2.3")
    K, batch = args.chunks, args.batch
    model = SileroVAD.from_pretrained()
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(K * CHUNK)).astype(np.float32)
    chunk_list = [audio[i * CHUNK:(i + 1) * CHUNK] for i in range(K)]

    # Same audio through both: parity in this run.
    offline = jax.jit(lambda m, x: m(x))
    x_all = sz.Seq.full(jnp.asarray(audio)[None, :, None])
    probs = np.asarray(offline(model, x_all).values[0, :, 0])
    opts = ort.SessionOptions()
    opts.inter_op_num_threads = opts.intra_op_num_threads = 1
    sess_1t = ort.InferenceSession(f"{data}/silero_vad.onnx", sess_options=opts,
                                   providers=["CPUExecutionProvider"])
    sess_default = ort.InferenceSession(f"{data}/silero_vad.onnx",
                                        providers=["CPUExecutionProvider"])
    sess_seq = ort.InferenceSession(f"{data}/silero_vad_16k_sequence.onnx", sess_options=opts,
                                    providers=["CPUExecutionProvider"])
    state, ctx, ort_probs = np.zeros((2, 1, 128), np.float32), np.zeros(CONTEXT, np.float32), []
    for chunk in chunk_list:
        p, state = sess_1t.run(None, {"input": np.concatenate([ctx, chunk])[None], "state": state,
                                      "sr": np.array(SAMPLE_RATE, np.int64)})
        ort_probs.append(p.reshape(-1)[0])
        ctx = chunk[-CONTEXT:]
    max_diff = float(np.abs(np.array(ort_probs) - probs).max())

    # JAX cases.
    step_arg = jax.jit(lambda m, c, x: m.step(c, x))
    graphdef, params, pure_step = sz.pure(model)
    step_pure = jax.jit(pure_step)
    multistep = jax.jit(lambda m, c, xs: sz.multistep(m, c, xs))
    one = [sz.Seq.full(jnp.asarray(c)[None, :, None]) for c in chunk_list[:64]]
    many = [sz.Seq.full(jnp.asarray(np.stack([c] * batch))[:, :, None]) for c in chunk_list[:64]]
    xs = sz.chunked(x_all, CHUNK)
    blocks = np.stack([np.concatenate([np.zeros(CONTEXT, np.float32) if i == 0 else
                                       chunk_list[i - 1][-CONTEXT:], chunk_list[i]])
                       for i in range(K)])
    h0 = np.zeros((1, 1, 128), np.float32)

    big = x_all  # K chunks in one step call

    def offline_case():
        jax.block_until_ready(offline(model, x_all))

    def sequence_case():
        sess_seq.run(["speech_probs", "hn", "cn"], {"input": blocks, "h": h0, "c": h0})

    per_chunk = {
        "JAX jit(step), module arg, B=1": _stepper(lambda c, x: step_arg(model, c, x),
                                                   model.init_carry(1), one),
        "JAX jit(pure step_fn), B=1": _stepper(lambda c, x: step_pure(params, c, x),
                                               model.init_carry(1), one),
        "JAX sz.jit_step, packed carry, B=1": _stepper(
            sz.jit_step(model), sz.pack_carry(model.init_carry(1)), one),
        f"JAX jit(step), B={batch}": _stepper(lambda c, x: step_arg(model, c, x),
                                              model.init_carry(batch), many),
        "onnxruntime session.run per chunk, 1 thread": _ort_stepper(sess_1t, chunk_list),
        "onnxruntime session.run per chunk, default threads": _ort_stepper(sess_default,
                                                                           chunk_list),
    }
    whole = {
        f"JAX jit(multistep), K={K}": _stepper(lambda c, x: multistep(model, c, x),
                                               model.init_carry(1), [xs]),
        f"JAX jit(step), one call on K={K} chunks": _stepper(
            lambda c, x: step_arg(model, c, x), model.init_carry(1), [big]),
        f"JAX jit(offline model(x)), K={K}": offline_case,
        f"onnxruntime sequence model, K={K}, 1 thread": sequence_case,
    }
    load_before, counters = _load(), cpu_counters()
    t1 = interleaved(per_chunk, args.rounds, args.calls, args.warmup)
    t2 = interleaved(whole, args.rounds, max(3, args.calls // 20), 2)
    results = {}
    for name, v in t1.items():
        streams = batch if f"B={batch}" in name else 1
        results[name] = {"ms_per_call": v["median_ms"], "ms_per_chunk": v["median_ms"] / streams,
                         "rounds_ms": [v["min_round_ms"], v["max_round_ms"]], "streams": streams,
                         "chunks_per_call": 1}
    for name, v in t2.items():
        results[name] = {"ms_per_call": v["median_ms"], "ms_per_chunk": v["median_ms"] / K,
                         "rounds_ms": [v["min_round_ms"], v["max_round_ms"]], "streams": 1,
                         "chunks_per_call": K}
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "python benchmarks/vad.py " + " ".join(sys.argv[1:]),
            "machine": machine(), "load_before": load_before, "load_after": _load(),
            "cpu_steal_percent": steal_percent(counters),
            "config": {"chunks_K": K, "batch": batch, "rounds": args.rounds, "calls": args.calls,
                       "dtype": "float32",
                       "audio": "white noise, std 0.1 (cost is data-independent)"},
            "max_abs_diff_jax_vs_onnx": max_diff, "parity_chunks": K, "results": results}


def percent(value) -> str:
    """A measured percentage for a table title (CPU steal), or why there is none."""
    return "not measured" if value is None else f"{value:g}%"


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"### Silero VAD: ms per 512-sample chunk (32 ms of audio), {res['date']}", "",
             f"`{res['command']}` on {m['cpu']} ({m['nproc']} cores), jax {m['jax']}, "
             f"onnxruntime {m['onnxruntime']}, silero-vad {m['silero-vad']}; load average "
             f"{res['load_before']} -> {res['load_after']}, CPU steal "
             f"{percent(res.get('cpu_steal_percent'))}. Same audio through both: max "
             f"|JAX - ONNX| = {res['max_abs_diff_jax_vs_onnx']:.2e} over {res['parity_chunks']} "
             "chunks.", "",
             "| case | chunks/call | ms/call | ms/chunk | real-time factor "
             "| rounds min-max ms/call |",
             "|---|---|---|---|---|---|"]
    for name, r in res["results"].items():
        per = r["ms_per_chunk"]
        label = str(r["chunks_per_call"])
        if r["streams"] > 1:
            label += f" x {r['streams']} streams"
        lines.append(f"| {name} | {label} | {r['ms_per_call']:.3f} | {per:.4f} | "
                     f"{per / CHUNK_MS:.5f} | {r['rounds_ms'][0]:.3f}-{r['rounds_ms'][1]:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=500,
                        help="K chunks for the whole-audio cases")
    parser.add_argument("--batch", type=int, default=32, help="streams in the batched step case")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200, help="calls per round (per-chunk cases)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--out", default=None, help="write the JSON results here")
    args = parser.parse_args()
    if args.quick:
        args.chunks, args.rounds, args.calls, args.warmup = 50, 2, 20, 3
    res = run(args)
    print(markdown(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
