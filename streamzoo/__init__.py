"""streamzoo: a JAX/Flax zoo of streaming models with one offline == streaming contract."""

from streamzoo.core import (NoCarry, PackedCarry, Repeat, Residual, Seq, Serial, StreamLayer,
                            StreamSpec, Streamer, carry_nbytes, chunked, jit_flush, jit_step,
                            jitted_apply, jitted_flush, jitted_step, multistep, pack_carry, pure,
                            reset_rows, stream, unchunked)

__version__ = "0.1.0"

__all__ = [
    "NoCarry", "PackedCarry", "Repeat", "Residual", "Seq", "Serial", "StreamLayer", "StreamSpec",
    "Streamer",
    "carry_nbytes", "chunked", "jit_flush", "jit_step", "jitted_apply", "jitted_flush",
    "jitted_step", "multistep", "pack_carry", "pure", "reset_rows", "stream", "unchunked",
]
