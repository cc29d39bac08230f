"""The LM demo: StreamingLLM decoding with the checked-in byte-level model, streamed to stdout.

The model is `lm-small-sink` (4 layers, D=128, trained on the Python documentation with a
context of 128 bytes, every training window starting with a dedicated start token). It runs
under a StreamingLLM `SinksWindow(--sinks, --window)` policy: the first `--sinks` tokens of
the stream (the start token first) stay in the KV cache forever, plus a ring of the newest
`--window` tokens. The stream is `[start token] + --prompt`, committed by chunked prefill;
then `--tokens` new tokens are sampled (`--temperature`, `--top-k`, `--seed`) by the jitted
decode loop (`streamzoo.zoo.lm.decode.generate`, one `lax.while_loop` per slice of 32 tokens)
and printed as they come. With the default 400 tokens the stream runs far past the window,
so the ring evicts old tokens while the carry keeps its size.

At the end the demo prints a table (tokens, tokens/s after compile, compile time, carry bytes
at the start and at the end) and runs two checks against the offline forward pass of the same
model and policy (exit code 1 when one fails):

* greedy decoding (temperature 0) of the first 32 new tokens equals the argmax of the offline
  logits over prompt + those tokens;
* after the whole sampled stream, the decode loop's next-token logits equal the offline
  logits at the last position (`--tolerance`), i.e. the ring carry after all its evictions
  still computes exactly what the offline call computes.
"""

from __future__ import annotations

import argparse
import codecs
import math
import sys
import time

import numpy as np

from streamzoo.demos.options import standalone

DESCRIPTION = ("StreamingLLM decoding (checked-in byte-level LM, sinks + window KV ring) "
               "streamed to stdout, checked against offline")
WEIGHTS = "lm-small-sink"
SLICE = 32  # tokens per `generate` call; also the length of the greedy check
DEFAULT_PROMPT = ("The :mod:`collections` module implements specialized container datatypes "
                  "providing alternatives to Python's general purpose built-in containers,")


# ------------------------------------------------------------------------------ arguments
def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help="text to continue (UTF-8; default: the start of the collections "
                             "module's documentation)")
    parser.add_argument("--tokens", type=_int_at_least(1), default=400,
                        help="new tokens (bytes) to generate (default: 400, past the window)")
    parser.add_argument("--sinks", type=_int_at_least(0), default=4,
                        help="attention-sink tokens kept forever, the start token first "
                             "(default: 4)")
    parser.add_argument("--window", type=_int_at_least(1), default=123,
                        help="newest tokens kept in the KV ring (default: 123, so that sinks + "
                             "window + the query = 128 = the training context)")
    parser.add_argument("--temperature", type=_non_negative_float, default=0.7,
                        help="sampling temperature, 0 = greedy (default: 0.7)")
    parser.add_argument("--top-k", type=_int_at_least(0), default=20,
                        help="sample among the k most likely bytes, 0 = all (default: 20)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--chunk", type=_int_at_least(1), default=32,
                        help="prefill chunk size in tokens (default: 32)")
    parser.add_argument("--tolerance", type=_positive_float, default=1e-3,
                        help="largest accepted |decode logits - offline logits| at the end of "
                             "the stream (default: 1e-3; float32 rounding gives ~1e-5)")


def main(argv: list[str] | None = None) -> int:
    """`streamzoo demo lm [options]` as a function of its arguments; returns the exit code."""
    return standalone(sys.modules[__name__], "lm", argv)


# ------------------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from streamzoo.core.drivers import carry_nbytes
    from streamzoo.core.seq import Seq
    from streamzoo.layers.kv_policies import SinksWindow
    from streamzoo.train.data.tokenizers import ByteTokenizer
    from streamzoo.zoo.lm import decode
    from streamzoo.zoo.lm.training import load_pretrained, pretrained_info

    try:
        info = pretrained_info(WEIGHTS)
        policy = SinksWindow(args.sinks, args.window)
        model = load_pretrained(policy, name=WEIGHTS)
    except (ValueError, OSError) as err:
        print(f"streamzoo demo lm: {err}", file=sys.stderr)
        return 2
    context, start_token = info["context"], info["start_token"]
    prompt = ByteTokenizer().encode(args.prompt)
    ids = np.concatenate([np.asarray([] if start_token is None else [start_token], np.int32),
                          prompt.astype(np.int32)])
    if ids.size == 0:
        print("streamzoo demo lm: --prompt: expected some text (this model has no start "
              "token to begin an empty stream with), got ''", file=sys.stderr)
        return 2
    kept = args.sinks + args.window + 1
    print(f"Model: {WEIGHTS} ({info['num_parameters']:,} parameters, byte-level, trained on "
          f"{info['corpus']['source']} with context {context}, start token {start_token})")
    print(f"Policy: {policy} -> each query attends to at most {kept} tokens (itself included)")
    if kept > context:
        print(f"Note: sinks + window + 1 = {kept} > the training context {context}: cache "
              f"positions past {context - 1} were never trained on; expect worse text.")

    # Prefill once (chunked); the greedy check and the sampled stream both start from it.
    t0 = time.perf_counter()
    carry, logits, _ = decode.prefill(model, model.init_carry(1), Seq.full(jnp.asarray(ids)[None]),
                                      chunk_size=args.chunk)
    jax.block_until_ready(logits)
    prefill_s = time.perf_counter() - t0
    start_bytes = carry_nbytes(carry)

    # Greedy check run; its generate call is the one that compiles the decode loop.
    greedy = decode.new_state(model, carry, logits, keys=args.seed, max_new_tokens=SLICE)
    t0 = time.perf_counter()
    _, greedy_tokens = decode.generate(model, greedy, SLICE)
    greedy_tokens = np.asarray(greedy_tokens.values[0])
    first_call_s = time.perf_counter() - t0

    # The sampled stream, printed slice by slice as it is produced.
    state = decode.new_state(model, carry, logits, keys=args.seed, max_new_tokens=args.tokens,
                             temperature=args.temperature, top_k=args.top_k)
    text = _TextStream(sys.stdout)
    print(f"\n--- prompt + {args.tokens} generated tokens "
          f"(temperature {args.temperature:g}, top-k {args.top_k}, seed {args.seed}) ---")
    text.write(prompt)
    generated, slice_s = [], []
    while len(generated) < args.tokens:
        t0 = time.perf_counter()
        state, out = decode.generate(model, state, SLICE)
        new = np.asarray(out.values[0])[np.asarray(out.mask[0])]
        slice_s.append((time.perf_counter() - t0, len(new)))
        generated.extend(new.tolist())
        text.write(new)
    text.close()
    print("\n--- end ---\n")
    end_bytes = carry_nbytes(state.carry)
    committed = int(model.positions(state.carry)[0])

    # Offline forward of the same model and policy over both token sequences (one batch).
    greedy_ids = np.concatenate([ids, greedy_tokens[:-1]])
    stream_ids = np.concatenate([ids, np.asarray(generated, np.int32)])
    offline = _offline_logits(model, [greedy_ids, stream_ids])
    n = len(ids)
    want = np.argmax(offline[0, n - 1:n - 1 + SLICE], axis=-1)
    greedy_ok = np.array_equal(want, greedy_tokens)
    deviation = float(np.max(np.abs(np.asarray(state.logits[0]) -
                                    offline[1, len(stream_ids) - 1])))

    tokens_timed = sum(k for _, k in slice_s)
    seconds = sum(s for s, _ in slice_s)
    rate = tokens_timed / seconds
    compile_s = first_call_s - SLICE / rate
    rows = [
        ("prompt tokens (start token + bytes)", f"{n}"),
        ("prefill (chunks of {}, incl. compile)".format(args.chunk), f"{prefill_s:.2f} s"),
        ("tokens generated", f"{len(generated)} in {len(slice_s)} generate calls of <= {SLICE}"),
        ("tokens/s (after compile)", f"{rate:.1f} ({1e3 / rate:.2f} ms/token, "
                                     f"{jax.devices()[0].platform})"),
        ("compile of the decode loop", f"{compile_s:.2f} s (first call {first_call_s:.2f} s "
                                       f"minus its {SLICE} tokens)"),
        ("tokens committed to the stream", f"{committed}"),
        ("tokens evicted from the ring", f"{max(0, committed - args.sinks - args.window)}"),
        ("carry bytes at start", f"{start_bytes:,}"),
        ("carry bytes at end", f"{end_bytes:,}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print()

    failed = False
    if end_bytes != start_bytes:
        print(f"FAIL: the carry grew from {start_bytes} to {end_bytes} bytes", file=sys.stderr)
        failed = True
    else:
        print(f"OK: carry bytes at start == at end ({end_bytes:,}): the ring never grows")
    if not greedy_ok:
        where = int(np.argmax(want != greedy_tokens))
        print(f"FAIL: greedy token {where} is {greedy_tokens[where]}, the offline argmax is "
              f"{want[where]}", file=sys.stderr)
        failed = True
    else:
        print(f"OK: greedy decoding of the first {SLICE} tokens == argmax of the offline forward")
    if not deviation <= args.tolerance:
        print(f"FAIL: decode logits after {len(generated)} tokens differ from offline by "
              f"{deviation:.2e} > {args.tolerance:g}", file=sys.stderr)
        failed = True
    else:
        print(f"OK: next-token logits after {len(generated)} tokens == offline (max deviation "
              f"{deviation:.2e} <= {args.tolerance:g})")
    return 1 if failed else 0


def _offline_logits(model, sequences) -> np.ndarray:
    """Logits `[B, T, V]` of one offline call over token sequences of different lengths."""
    import jax
    import jax.numpy as jnp

    from streamzoo.core.seq import Seq

    length = max(len(s) for s in sequences)
    tokens = np.stack([np.pad(s, (0, length - len(s))) for s in sequences])
    x = Seq.from_lengths(jnp.asarray(tokens), jnp.asarray([len(s) for s in sequences]))
    return np.asarray(jax.jit(lambda m, x: m(x).values)(model, x))


class _TextStream:
    """Writes byte ids as UTF-8 text as they arrive (a character split across two slices is
    held back until complete); EOS (a document boundary) shows as `[EOS]`."""

    def __init__(self, out):
        from streamzoo.train.data.tokenizers import ByteTokenizer

        self.out, self.eos = out, ByteTokenizer.EOS
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, ids) -> None:
        parts = []
        for i in map(int, ids):
            if 0 < i < self.eos:
                parts.append(self.decoder.decode(bytes([i - 1])))
            else:
                parts.append(self.decoder.decode(b"", final=True))
                parts.append("\n[EOS]\n" if i == self.eos else f"[id {i}]")
        self._emit("".join(parts))

    def close(self) -> None:
        self._emit(self.decoder.decode(b"", final=True))

    def _emit(self, text: str) -> None:
        # A terminal that cannot show a character gets '?' instead of an exception.
        encoding = getattr(self.out, "encoding", None) or "utf-8"
        self.out.write(text.encode(encoding, "replace").decode(encoding))
        self.out.flush()


if __name__ == "__main__":
    sys.exit(main())
