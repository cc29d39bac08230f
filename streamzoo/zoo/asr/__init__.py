"""streamzoo.zoo.asr: cache-aware streaming Conformer ASR (issue 6).

Encoder: `ConformerEncoder(ConformerConfig(...), rngs=...)` maps audio `[B, S, 1]` (16 kHz by
default) to encoder frames `[B, S // 640, d_model]` (40 ms); `encoder.with_latency(chunk,
left, lookahead)` gives the same weights at another streaming setting, `forward_dynamic` trains
several settings with one compiled program.

Heads and decoding: `CTCHead`/`ctc_loss` (optional delay penalty), `Transducer`/`rnnt_loss`,
streaming greedy decoders with the decoder state in the carry (`CTCGreedyDecoder`,
`RNNTGreedyDecoder`), CTC prefix beam search (`CTCPrefixBeamSearch`, `ctc_beam_search`).

Whole model: `ASRModel(ASRConfig(...))`, `transcribe` (offline, batched),
`StreamingRecognizer` (partial transcripts as audio arrives), `load_pretrained()` (the
checked-in CTC model trained on espeak-ng speech; `training` trains it, `evaluate` scores it).
"""

from streamzoo.zoo.asr.beam_search import CTCPrefixBeamSearch, ctc_beam_search
from streamzoo.zoo.asr.chunked_attention import ChunkedSelfAttention
from streamzoo.zoo.asr.conformer import (AtLatency, ChunkedSpec, ConformerLayer, ConformerStack,
                                         Latency, StackCarry)
from streamzoo.zoo.asr.ctc import CTCGreedyDecoder, CTCHead, ctc_loss
from streamzoo.zoo.asr.encoder import ConformerConfig, ConformerEncoder, EncoderCarry, count_params
from streamzoo.zoo.asr.model import (ASRConfig, ASRModel, StreamingRecognizer, stream_transcribe,
                                     transcribe)
from streamzoo.zoo.asr.pretrained import load_pretrained, pretrained_info
from streamzoo.zoo.asr.subsampling import ConvSubsampling
from streamzoo.zoo.asr.transducer import RNNTGreedyDecoder, Transducer, rnnt_loss

__all__ = [
    "ASRConfig", "ASRModel", "AtLatency", "CTCGreedyDecoder", "CTCHead", "CTCPrefixBeamSearch",
    "ChunkedSelfAttention", "ChunkedSpec", "ConformerConfig", "ConformerEncoder",
    "ConformerLayer", "ConformerStack", "ConvSubsampling", "EncoderCarry", "Latency",
    "RNNTGreedyDecoder", "StackCarry", "StreamingRecognizer", "Transducer", "count_params",
    "ctc_beam_search", "ctc_loss", "load_pretrained", "pretrained_info", "rnnt_loss",
    "stream_transcribe", "transcribe",
]
