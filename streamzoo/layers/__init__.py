"""Streaming layers, one concept per file; each passes `streamzoo.testing.assert_stream_contract`."""

from streamzoo.layers.attention import StreamingAttention, attention_reference
from streamzoo.layers.conv import Conv1D
from streamzoo.layers.conv_transpose import ConvTranspose1D
from streamzoo.layers.feedforward import FeedForward
from streamzoo.layers.linear_recurrence import LinearRecurrence, linear_scan
from streamzoo.layers.norm import LayerNorm, RMSNorm
from streamzoo.layers.pooling import CumulativeMean
from streamzoo.layers.positional import apply_rope
from streamzoo.layers.recurrent import GRU, LSTM

__all__ = [
    "Conv1D", "ConvTranspose1D", "CumulativeMean", "FeedForward", "GRU", "LSTM", "LayerNorm",
    "LinearRecurrence", "RMSNorm", "StreamingAttention", "apply_rope", "attention_reference",
    "linear_scan",
]
