"""Streaming neural audio codec: SEANet encoder/decoder, RVQ or FSQ, optional causal
transformer bottleneck (`model`), reconstruction and adversarial losses with a loss balancer
(`losses`), codebook interleaving patterns (`patterns`) and the streaming conversion of
non-causal convolution stacks (`noncausal`). Training on espeak-ng speech (`training`, imported
on demand by `streamzoo train codec`), the checked-in trained weights (`pretrained`:
`load_pretrained()`), quality metrics (`quality`) and `streamzoo demo codec` (`demo`)."""

from streamzoo.zoo.codec.model import (Activation, Codec, CodecConfig, CodecDecoder,
                                       CodecEncoder, CodecOutput, TailPaddedSpec)
from streamzoo.zoo.codec.pretrained import load_pretrained

__all__ = ["Activation", "Codec", "CodecConfig", "CodecDecoder", "CodecEncoder", "CodecOutput",
           "TailPaddedSpec", "load_pretrained"]
