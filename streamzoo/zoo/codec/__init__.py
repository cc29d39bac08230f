"""Streaming neural audio codec: SEANet encoder/decoder, RVQ or FSQ, optional causal
transformer bottleneck (`model`), reconstruction and adversarial losses with a loss balancer
(`losses`), codebook interleaving patterns (`patterns`) and the streaming conversion of
non-causal convolution stacks (`noncausal`)."""

from streamzoo.zoo.codec.model import (Activation, Codec, CodecConfig, CodecDecoder,
                                       CodecEncoder, CodecOutput, TailPaddedSpec)

__all__ = ["Activation", "Codec", "CodecConfig", "CodecDecoder", "CodecEncoder", "CodecOutput",
           "TailPaddedSpec"]
