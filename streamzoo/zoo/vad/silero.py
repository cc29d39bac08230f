"""Silero VAD v6 (16 kHz), ported to a streaming streamzoo model with its real weights.

The model sees audio in chunks of 512 samples (32 ms) and gives one speech probability per
chunk. Per chunk (the graph of the `silero_vad*.onnx` files, verified node by node):

1. window: the last 64 samples of the previous chunk (zeros before the first), then the chunk:
   576 samples, reflection-padded on the right by 64 to 640;
2. STFT magnitude: a stride-128 convolution with 258 fixed filters of 256 taps (the real and
   imaginary parts of a periodic-Hann-windowed DFT, 129 bins each), then `sqrt(re^2 + im^2)`:
   4 frames x 129 bins;
3. encoder: four convolutions over those 4 frames, kernel 3, zero padding 1, strides 1, 2, 2, 1,
   channels 129 -> 128 -> 64 -> 64 -> 128, each followed by ReLU: one 128-vector per chunk;
4. an LSTM cell (torch layout: gates i, f, g, o; biases b_ih + b_hh) whose state (h, c)
   carries over from chunk to chunk;
5. head: ReLU(h), a 1x1 convolution to one channel, sigmoid.

The streaming carry holds the 64 context samples, the samples of a not yet complete chunk
(with a per-row count) and the LSTM state. A step may give a row any number of valid
samples: they join that row's pending samples, and every time 512 have gathered, the chunk is
committed (one probability out, context and LSTM state advance). So the model consumes whole
512-sample chunks; a partial chunk at the end of a stream gives no probability (`flush` emits
nothing; append zeros to the stream to score it, as Silero's own wrappers do).

Offline `__call__` and `step` run one code path: the per-chunk encoder is applied to all the
chunks of a call at once (it sees only its own 576-sample window) and the LSTM runs over them
with streamzoo's `LSTM` (same gate layout as torch's LSTMCell, so the weights load exactly).
The encoder convolutions are `flax.nnx.Conv` with symmetric zero padding inside each chunk's
4 STFT frames: they are not streaming convolutions across chunks, so streamzoo's causal
`Conv1D` (which carries history between steps) does not fit them.

Weights: `from_pretrained()` reads the wheel's `silero_vad_16k_op15.onnx` (`pip install
--no-deps silero-vad`; located without importing `silero_vad`, which imports torch). Its
tensors are bitwise those of the wheel's TorchScript model (`silero_vad.jit`, "v6") and of
every other ONNX export in it. The wheel's `silero_vad_16k.safetensors` (made for its tinygrad
example) holds a *different* checkpoint: same shapes, other values (up to 0.4 apart in
probability on speech; upstream issue snakers4/silero-vad#768). It loads too
(`from_pretrained(path=".../silero_vad_16k.safetensors")`) but does not match the ONNX model.
All matmuls and convolutions run at `HIGHEST` precision (no TF32 on GPUs). Against
onnxruntime running the wheel's `silero_vad.onnx`, the largest probability difference over
54 streams (50 espeak-ng utterances, silence, noise; 2,399 chunks) is 1.5e-5
(`tests/zoo/test_vad.py`, CPU).
"""

from __future__ import annotations

import importlib.util
import os
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from streamzoo.core.seq import Seq
from streamzoo.core.spec import StreamSpec
from streamzoo.core.streamer import StreamLayer
from streamzoo.layers.recurrent import LSTM, LSTMCarry, check_dtype

SAMPLE_RATE = 16_000
CHUNK = 512  # samples per probability (32 ms)
CONTEXT = 64  # samples of the previous chunk in front of each chunk
WINDOW = CONTEXT + CHUNK  # 576
N_FFT, HOP = 256, 128
BINS = N_FFT // 2 + 1  # 129
HIDDEN = 128
# (in, out, stride) of the encoder convolutions; kernel 3, zero padding 1, ReLU after each.
ENCODER = ((BINS, 128, 1), (128, 64, 2), (64, 64, 2), (64, HIDDEN, 1))

WHEEL_ONNX = "silero_vad_16k_op15.onnx"  # 16 kHz weights as plain named initializers
WHEEL_RUNTIME_ONNX = "silero_vad.onnx"  # what the package's OnnxWrapper runs (parity target)
WHEEL_SAFETENSORS = "silero_vad_16k.safetensors"


class STFTBasis(nnx.Variable):
    """A fixed (not trained) STFT filter bank; kept apart from `nnx.Param` for optimisers."""


@struct.dataclass
class SileroVADCarry:
    context: jax.Array  # [B, 64] float32: the last 64 samples of the last committed chunk
    pending: jax.Array  # [B, 512] float32: samples of the incomplete chunk (first `count`)
    count: jax.Array  # [B] int32: how many pending samples (0..511)
    lstm: LSTMCarry  # h, c [B, 128] float32


def hann_dft_basis() -> np.ndarray:
    """`[256, 258]`: periodic-Hann-windowed DFT, cos filters of bins 0..128 then -sin ones."""
    n = np.arange(N_FFT)
    k = np.arange(BINS)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / N_FFT)
    angle = 2 * np.pi * k * n / N_FFT
    basis = np.concatenate([np.cos(angle) * window, -np.sin(angle) * window])  # [258, 256]
    return basis.T.astype(np.float32)


def wheel_data_dir() -> str | None:
    """The `silero_vad/data` folder of the installed wheel (without importing it), or None."""
    try:
        spec = importlib.util.find_spec("silero_vad")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "data")
    return path if os.path.isdir(path) else None


def _safe_sqrt(x):
    """sqrt with a zero (not NaN) gradient at 0: digital silence has zero STFT magnitude."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


class SileroVAD(StreamLayer):
    """Silero VAD v6, 16 kHz: audio `[B, T, 1]` -> speech probability `[B, T // 512, 1]`.

    `spec`: block_size 512, output_ratio 1/512, no latency, receptive field (-inf, 0) (output
    j depends on every sample up to the last one of chunk j). `dtype` is the compute dtype
    (default: the input's); the carry (audio samples and LSTM state) stays float32.
    Random weights by default (with the real STFT basis); `from_pretrained()` loads Silero's.
    """

    def __init__(self, *, dtype=None, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.in_features = 1
        self.out_features = 1
        self.dtype = check_dtype(dtype)
        self.stft_basis = STFTBasis(jnp.asarray(hann_dft_basis()))
        self.encoder = nnx.List([
            nnx.Conv(c_in, c_out, kernel_size=(3,), strides=(stride,), padding=[(1, 1)],
                     dtype=self.dtype, rngs=rngs)
            for c_in, c_out, stride in ENCODER])
        self.lstm = LSTM(HIDDEN, HIDDEN, dtype=self.dtype, rngs=rngs)
        self.head = nnx.Linear(HIDDEN, 1, dtype=self.dtype, rngs=rngs)

    # ------------------------------------------------------------------------ spec
    @property
    def spec(self) -> StreamSpec:
        return StreamSpec(block_size=CHUNK, output_ratio=Fraction(1, CHUNK),
                          receptive_field=(-float("inf"), 0.0))

    def _init_carry(self, batch_size, dtype):
        return SileroVADCarry(
            context=jnp.zeros((batch_size, CONTEXT), jnp.float32),
            pending=jnp.zeros((batch_size, CHUNK), jnp.float32),
            count=jnp.zeros((batch_size,), jnp.int32),
            lstm=self.lstm.init_carry(batch_size))

    # ---------------------------------------------------------------- per chunk
    def encode(self, windows: jax.Array) -> jax.Array:
        """`[..., 576]` windows (64 context + 512 chunk samples) -> `[..., 128]` features."""
        lead = windows.shape[:-1]
        x = windows.reshape(-1, WINDOW)
        x = jnp.pad(x, [(0, 0), (0, CONTEXT)], mode="reflect")  # [N, 640]
        frames = jnp.stack([x[:, i * HOP:i * HOP + N_FFT] for i in range(4)], axis=1)
        spec = frames @ self.stft_basis[...].astype(x.dtype)  # [N, 4, 258]
        re, im = spec[..., :BINS], spec[..., BINS:]
        y = _safe_sqrt(re * re + im * im)  # [N, 4, 129]
        for conv in self.encoder:
            y = jax.nn.relu(conv(y))
        return y.reshape(*lead, HIDDEN)  # the last conv leaves one frame

    def _probabilities(self, h: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(self.head(jax.nn.relu(h)))

    # ------------------------------------------------------------- chunk assembly
    def _run(self, carry: SileroVADCarry, x: Seq) -> tuple[SileroVADCarry, Seq]:
        """x: compacted, T a multiple of 512. Each row's stream is its pending samples then
        its valid samples; every complete 512-sample chunk of it is committed."""
        dtype = self.dtype or x.dtype
        B, T = x.batch_size, x.length
        K = T // CHUNK
        audio = x.values[..., 0].astype(jnp.float32)
        n = x.lengths()
        # Row stream: context (64) | pending (count) | audio (n) | zeros; length T + 576 so
        # that the window after the last possible chunk can be sliced for the new carry.
        joined = jnp.concatenate([carry.context, carry.pending, audio], axis=1)
        i = jnp.arange(T + WINDOW)[None, :]
        head = CONTEXT + carry.count[:, None]
        src = jnp.where(i < head, i, i - head + WINDOW)
        valid = i < head + n[:, None]
        stream = jnp.where(valid, jnp.take_along_axis(joined, jnp.minimum(src, T + WINDOW - 1),
                                                      axis=1), 0.0)
        # Window j = stream[512 j : 512 j + 576] (static slices).
        contexts = stream[:, :K * CHUNK].reshape(B, K, CHUNK)[..., :CONTEXT]
        body = stream[:, CONTEXT:CONTEXT + K * CHUNK].reshape(B, K, CHUNK)
        windows = jnp.concatenate([contexts, body], axis=-1)
        total = carry.count + n
        chunks = total // CHUNK  # committed chunks per row (<= K)
        mask = jnp.arange(K)[None, :] < chunks[:, None]
        with jax.default_matmul_precision("highest"):
            features = self.encode(windows.astype(dtype))
            lstm_carry, h = self.lstm.step(carry.lstm, Seq(features, mask, compact=True))
            probs = self._probabilities(h.values)
        # New carry: the window that starts where the committed chunks end.
        rest = jnp.take_along_axis(stream, (chunks * CHUNK)[:, None] + jnp.arange(WINDOW)[None],
                                   axis=1)
        new = SileroVADCarry(context=rest[:, :CONTEXT], pending=rest[:, CONTEXT:],
                             count=total - chunks * CHUNK, lstm=lstm_carry)
        return new, Seq(probs.astype(dtype), mask, compact=True).masked()

    def _step(self, carry, x):
        return self._run(carry, x)

    def _forward(self, x: Seq) -> Seq:
        T = x.length
        carry = self._init_carry(x.batch_size, None)
        _, y = self._run(carry, x.pad_to_multiple(CHUNK))
        return y.time_slice(0, T // CHUNK)

    # -------------------------------------------------------------------- weights
    @classmethod
    def from_pretrained(cls, path: str | None = None, *, dtype=None) -> "SileroVAD":
        """Silero's pretrained 16 kHz weights.

        `path`: None (the installed wheel's `silero_vad_16k_op15.onnx`, the v6 model), an
        `.onnx` file with the same named initializers, or a `.safetensors` file with the
        tinygrad names (the wheel's `silero_vad_16k.safetensors`: another checkpoint, see the
        module docstring). Raises FileNotFoundError when no wheel is installed.
        """
        if path is None:
            data = wheel_data_dir()
            if data is None or not os.path.exists(os.path.join(data, WHEEL_ONNX)):
                raise FileNotFoundError(
                    "Silero VAD weights not found: install the wheel without its torch "
                    "dependency with `pip install --no-deps silero-vad==6.2.3`, or pass path=")
            path = os.path.join(data, WHEEL_ONNX)
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no such file {path!r}")
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            tensors = _from_tinygrad_names(load_file(path))
        elif path.endswith(".onnx"):
            from streamzoo.zoo.vad.onnx_weights import read_onnx_initializers

            tensors = read_onnx_initializers(path)
        else:
            raise ValueError(f"path: expected a .onnx or .safetensors file, got {path!r}")
        # Built abstractly (no random initialisation to compute), then filled with the weights.
        model = nnx.eval_shape(lambda: cls(dtype=dtype, rngs=nnx.Rngs(0)))
        return model.load_torch_weights(tensors, source=path)

    def load_torch_weights(self, tensors: dict[str, np.ndarray], *, source: str = "tensors"):
        """Copy Silero's tensors (ONNX/torch names `model.*`, torch layouts) into this model."""
        expected = _expected_shapes()
        missing = [k for k in expected if k not in tensors]
        if missing:
            raise ValueError(f"tensors: expected Silero VAD 16 kHz tensors, {source} lacks "
                             f"{missing} (has {sorted(tensors)[:6]}...)")
        for name, shape in expected.items():
            got = tuple(np.shape(tensors[name]))
            if got != shape:
                raise ValueError(
                    f"tensors[{name!r}]: expected shape {shape}, got {got} in {source}")
        t = {k: np.asarray(tensors[k], np.float32) for k in expected}
        # Layouts converted in numpy (no per-op compiles); set_value (not `[...] =`) also
        # fills an abstract model from `nnx.eval_shape`.

        def put(var, array):
            var.set_value(jnp.asarray(np.ascontiguousarray(array)))

        put(self.stft_basis, t["model.stft.forward_basis_buffer"][:, 0, :].T)
        for i, conv in enumerate(self.encoder):
            w = t[f"model.encoder.{i}.reparam_conv.weight"]  # [out, in, k]
            put(conv.kernel, w.transpose(2, 1, 0))  # [k, in, out]
            put(conv.bias, t[f"model.encoder.{i}.reparam_conv.bias"])
        put(self.lstm.input_proj.kernel, t["model.decoder.rnn.weight_ih"].T)
        put(self.lstm.input_proj.bias,
            t["model.decoder.rnn.bias_ih"] + t["model.decoder.rnn.bias_hh"])
        put(self.lstm.recurrent_kernel, t["model.decoder.rnn.weight_hh"].T)
        put(self.head.kernel, t["model.decoder.decoder.2.weight"][:, :, 0].T)
        put(self.head.bias, t["model.decoder.decoder.2.bias"])
        return self


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"model.stft.forward_basis_buffer": (2 * BINS, 1, N_FFT)}
    for i, (c_in, c_out, _) in enumerate(ENCODER):
        shapes[f"model.encoder.{i}.reparam_conv.weight"] = (c_out, c_in, 3)
        shapes[f"model.encoder.{i}.reparam_conv.bias"] = (c_out,)
    shapes.update({
        "model.decoder.rnn.weight_ih": (4 * HIDDEN, HIDDEN),
        "model.decoder.rnn.weight_hh": (4 * HIDDEN, HIDDEN),
        "model.decoder.rnn.bias_ih": (4 * HIDDEN,),
        "model.decoder.rnn.bias_hh": (4 * HIDDEN,),
        "model.decoder.decoder.2.weight": (1, HIDDEN, 1),
        "model.decoder.decoder.2.bias": (1,),
    })
    return shapes


_TINYGRAD_NAMES = {
    "stft_conv.weight": "model.stft.forward_basis_buffer",
    **{f"conv{i + 1}.{p}": f"model.encoder.{i}.reparam_conv.{p}"
       for i in range(4) for p in ("weight", "bias")},
    **{f"lstm_cell.{p}": f"model.decoder.rnn.{p}"
       for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")},
    "final_conv.weight": "model.decoder.decoder.2.weight",
    "final_conv.bias": "model.decoder.decoder.2.bias",
}


def _from_tinygrad_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {_TINYGRAD_NAMES.get(k, k): v for k, v in tensors.items()}
