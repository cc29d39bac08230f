"""Issue 7's benchmark: the trained codec's step time against its frame budget, and Silero VAD
ms/chunk against onnxruntime, in one run on one machine.

Codec cases (the checked-in `streamzoo/zoo/codec/weights/codec_small.npz`, float32, one
16 kHz stream unless said, all 8 codebooks): a jitted `step` of the whole codec (encoder ->
codes -> decoder) on one 20 ms frame and on an 80 ms chunk, the encoder's and the decoder's
step alone on one frame, `pure()` params or `sz.jit_step` (module split once) instead of the
module as an argument, `jit_step` with the carry packed into one buffer per dtype
(`sz.pack_carry`: 2 arrays cross each call instead of ~70), ten `jit_step` calls back to back
with one wait at the end (per-frame CPU cost, where the other cases measure a blocking call's
latency), a batch of 8 streams,
`multistep` (a `lax.scan` of one-frame steps, K frames per call) and the offline `codec(x)` on
the same K frames. Each figure is compared with its budget, the audio it covers: the
real-time factor is `ms per call / ms of audio per call` (the issue's target: < 0.1 on CPU).

VAD cases: `benchmarks/vad.py`'s, run by its `run()` in the same process (JAX port per
512-sample chunk vs the wheel's ONNX model in onnxruntime; see that file).

Timing: the cases of a table run interleaved (each round times every case, rotating the
order), a figure is the median over rounds of the per-round median; the load average before
and after is recorded (the machine may be shared).

    python benchmarks/codec_vad.py              # full run: markdown; --out FILE writes JSON
    python benchmarks/codec_vad.py --quick      # smoke run
    python benchmarks/codec_vad.py --no-vad     # codec only (no silero-vad wheel needed)

The codec cases run twice: in this process with XLA's default CPU threading, and in a child
process pinned to one core (`os.sched_setaffinity` before jax starts; `--one-core` runs only
that configuration). A codec step is a few hundred small XLA ops; with more than one core XLA
splits loops and convolutions across its thread pool, and each hand-off to a worker thread costs
more than these ops' work (most on a busy VM, where the worker waits for a core). Pinned, XLA
compiles single-threaded code and runs every op on the calling thread: how to deploy one live
stream per core.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--one-core" in sys.argv:  # before jax starts: XLA sizes its thread pool from the affinity
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import streamzoo as sz
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import streamzoo as sz

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import vad as vad_bench  # noqa: E402  (benchmarks/vad.py)
from streamzoo.eval.machine import cpu_counters, machine_info, steal_percent  # noqa: E402
from streamzoo.zoo.codec.pretrained import load_pretrained, read_metadata  # noqa: E402

SAMPLE_RATE = 16_000


def codec_cases(codec, K: int, batch: int) -> tuple[dict, dict, dict]:
    """(per-call cases, whole-audio cases, audio ms covered by one call of each case)."""
    hop = codec.hop
    frame_ms = 1000 * hop / SAMPLE_RATE
    rng = np.random.default_rng(0)
    # Speech-like level; the cost does not depend on the values.
    audio = (0.1 * rng.standard_normal(K * hop)).astype(np.float32)
    enc, dec = codec.encoder(), codec.decoder()

    def chunks(size, rows=1):
        out = []
        for i in range(0, min(len(audio), 64 * size) - size + 1, size):
            piece = np.stack([audio[i:i + size]] * rows)[:, :, None]
            out.append(sz.Seq.full(jnp.asarray(piece)))
        return out

    step = jax.jit(lambda m, c, x: m.step(c, x))
    _, params, pure_step = sz.pure(codec)
    step_pure = jax.jit(pure_step)
    multistep = jax.jit(lambda m, c, xs: sz.multistep(m, c, xs))
    offline = jax.jit(lambda m, x: m(x))
    x_all = sz.Seq.full(jnp.asarray(audio)[None, :, None])
    xs = sz.chunked(x_all, hop)
    frame_codes = [enc.step(enc.init_carry(1), c)[1] for c in chunks(hop)[:8]]

    per_call = {
        "codec jit(step), 20 ms frame": (vad_bench._stepper(
            lambda c, x: step(codec, c, x), codec.init_carry(1), chunks(hop)), frame_ms),
        "codec jit(pure step_fn), 20 ms frame": (vad_bench._stepper(
            lambda c, x: step_pure(params, c, x), codec.init_carry(1), chunks(hop)), frame_ms),
        "codec sz.jit_step(codec), 20 ms frame": (vad_bench._stepper(
            sz.jit_step(codec), codec.init_carry(1), chunks(hop)), frame_ms),
        "codec sz.jit_step(codec), 10 x 20 ms frames back to back, one wait": (vad_bench._stepper(
            sz.jit_step(codec), codec.init_carry(1), chunks(hop), calls_per_wait=10),
            10 * frame_ms),
        "codec sz.jit_step(codec), packed carry, 20 ms frame": (vad_bench._stepper(
            sz.jit_step(codec), sz.pack_carry(codec.init_carry(1)), chunks(hop)), frame_ms),
        "codec sz.jit_step(codec), packed carry, 10 x 20 ms frames back to back, one wait": (
            vad_bench._stepper(sz.jit_step(codec), sz.pack_carry(codec.init_carry(1)),
                               chunks(hop), calls_per_wait=10), 10 * frame_ms),
        "codec jit(step), 80 ms chunk": (vad_bench._stepper(
            lambda c, x: step(codec, c, x), codec.init_carry(1), chunks(4 * hop)), 4 * frame_ms),
        f"codec jit(step), 20 ms frame x {batch} streams": (vad_bench._stepper(
            lambda c, x: step(codec, c, x), codec.init_carry(batch), chunks(hop, batch)),
            frame_ms),
        "encoder jit(step), 20 ms frame": (vad_bench._stepper(
            lambda c, x: step(enc, c, x), enc.init_carry(1), chunks(hop)), frame_ms),
        "decoder jit(step), 1 frame of codes": (vad_bench._stepper(
            lambda c, x: step(dec, c, x), dec.init_carry(1), frame_codes), frame_ms),
    }

    def offline_case():
        jax.block_until_ready(offline(codec, x_all))

    whole = {
        f"codec jit(multistep), K={K} frames": (vad_bench._stepper(
            lambda c, x: multistep(codec, c, x), codec.init_carry(1), [xs]), K * frame_ms),
        f"codec jit(offline codec(x)), K={K} frames": (offline_case, K * frame_ms),
    }
    streams = {name: batch if f"x {batch} streams" in name else 1 for name in per_call}
    return per_call, whole, streams


def run_codec(args) -> dict:
    codec = load_pretrained()
    meta = read_metadata()
    per_call, whole, streams = codec_cases(codec, args.frames, args.batch)
    load_before, counters = vad_bench._load(), cpu_counters()
    t1 = vad_bench.interleaved({k: v[0] for k, v in per_call.items()}, args.rounds, args.calls,
                               args.warmup)
    t2 = vad_bench.interleaved({k: v[0] for k, v in whole.items()}, args.rounds,
                               max(3, args.calls // 20), 2)
    results = {}
    for table, times in ((per_call, t1), (whole, t2)):
        for name, v in times.items():
            audio_ms = table[name][1]
            ms = v["median_ms"]
            results[name] = {"ms_per_call": ms, "audio_ms_per_call": audio_ms,
                             "streams": streams.get(name, 1),
                             "real_time_factor": ms / audio_ms,
                             "real_time_factor_per_stream": ms / audio_ms / streams.get(name, 1),
                             "rounds_ms": [v["min_round_ms"], v["max_round_ms"]]}
    cfg = codec.config
    return {"load_before": load_before, "load_after": vad_bench._load(),
            "cpu_steal_percent": steal_percent(counters),
            "codec": {"params": int(sum(a.size for a in jax.tree_util.tree_leaves(
                sz.pure(codec)[1]))), "hop": codec.hop, "codebooks": cfg.num_quantizers,
                "bitrate": cfg.bitrate(), "trained_steps": meta.get("step")},
            "config": {"frames_K": args.frames, "batch": args.batch, "rounds": args.rounds,
                       "calls": args.calls},
            "results": results}


def codec_table(c: dict, title: str) -> list[str]:
    lines = [f"#### {title} ({len(c.get('cpu_affinity', [])) or '?'} cores usable); load average "
             f"{c['load_before']} -> {c['load_after']}; CPU steal "
             f"{vad_bench.percent(c.get('cpu_steal_percent'))}", "",
             "| case | audio per call | ms/call | real-time factor | per stream | < 0.1? "
             "| rounds min-max ms |",
             "|---|---|---|---|---|---|---|"]
    for name, r in c["results"].items():
        rtf = r["real_time_factor_per_stream"]
        lines.append(f"| {name} | {r['audio_ms_per_call']:g} ms | {r['ms_per_call']:.3f} | "
                     f"{r['real_time_factor']:.4f} | {rtf:.4f} | {'yes' if rtf < 0.1 else 'no'} "
                     f"| {r['rounds_ms'][0]:.3f}-{r['rounds_ms'][1]:.3f} |")
    return lines


def markdown(res: dict) -> str:
    m = res["machine"]
    c = res["codec"]
    info = c["codec"]
    lines = [f"### Codec step time vs frame budget, {res['date']}", "",
             f"`{res['command']}` on {m['cpu']} ({m['nproc']} cores), jax {m['jax']}. "
             f"Checked-in codec: {info['params']:,} parameters, hop {info['hop']} (20 ms), "
             f"{info['codebooks']} codebooks ({info['bitrate'] / 1000:g} kbit/s), float32, "
             "batch 1 unless said. Target: real-time factor < 0.1.", ""]
    lines += codec_table(c, "XLA default threading")
    if res.get("codec_one_core"):
        lines += [""] + codec_table(res["codec_one_core"], "pinned to one core")
    if res.get("vad"):
        lines += ["", vad_bench.markdown({**res["vad"], "machine": {**m, **res["vad"]["machine"]},
                                          "command": res["command"]})]
    return "\n".join(lines)


def _child_codec_run(args) -> dict:
    """The codec cases again in a child process pinned to one core."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "codec.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--one-core", "--codec-only",
               "--frames", str(args.frames), "--batch", str(args.batch), "--rounds",
               str(args.rounds), "--calls", str(args.calls), "--warmup", str(args.warmup),
               "--out", out]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)["codec"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=250,
                        help="K codec frames (20 ms each) for multistep / offline")
    parser.add_argument("--batch", type=int, default=8, help="streams in the batched codec case")
    parser.add_argument("--chunks", type=int, default=500, help="K VAD chunks (vad.py)")
    parser.add_argument("--vad-batch", type=int, default=32, help="VAD batched case (vad.py)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=100, help="calls per round (per-call cases)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--no-vad", action="store_true", help="skip the VAD cases")
    parser.add_argument("--out", default=None, help="write the JSON results here")
    parser.add_argument("--one-core", action="store_true",
                        help="pin this process to one core (before jax starts)")
    parser.add_argument("--codec-only", action="store_true",
                        help="only the codec cases, in this process's configuration")
    args = parser.parse_args()
    if args.quick:
        args.frames, args.chunks, args.rounds, args.calls, args.warmup = 25, 50, 2, 10, 2
    res = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": "python benchmarks/codec_vad.py " + " ".join(sys.argv[1:])}
    res["codec"] = run_codec(args)
    res["codec"]["cpu_affinity"] = sorted(os.sched_getaffinity(0))
    if not args.one_core and not args.codec_only:
        res["codec_one_core"] = _child_codec_run(args)
    if not args.no_vad and not args.codec_only:
        vad_args = argparse.Namespace(chunks=args.chunks, batch=args.vad_batch,
                                      rounds=args.rounds, calls=2 * args.calls,
                                      warmup=args.warmup)
        res["vad"] = vad_bench.run(vad_args)
        res["machine"] = vad_bench.machine()
    else:
        res["machine"] = machine_info()
    print(markdown(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
