"""Core of streamzoo: sequences, stream specs, the Streamer protocol, combinators, drivers."""

from streamzoo.core.combinators import Repeat, Residual, Serial
from streamzoo.core.drivers import (carry_nbytes, chunked, jit_flush, jit_step, jitted_apply,
                                    jitted_flush, jitted_step, multistep, pure, reset_rows, stream,
                                    unchunked)
from streamzoo.core.packed import PackedCarry, pack_carry
from streamzoo.core.seq import Seq
from streamzoo.core.spec import StreamSpec, compose
from streamzoo.core.streamer import NoCarry, StreamLayer, Streamer, batch_size_of, where_rows

__all__ = [
    "NoCarry", "PackedCarry", "Repeat", "Residual", "Seq", "Serial", "StreamLayer", "StreamSpec",
    "Streamer",
    "batch_size_of", "carry_nbytes", "chunked", "compose", "jitted_apply", "jitted_flush",
    "jitted_step", "jit_flush", "jit_step", "multistep", "pack_carry", "pure", "reset_rows",
    "stream", "unchunked", "where_rows",
]
