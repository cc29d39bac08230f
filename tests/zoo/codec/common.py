"""Tiny codec configurations and random inputs shared by the codec tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import streamzoo as sz
from streamzoo.zoo.codec import Codec, CodecConfig

# hop 4; one residual unit per resolution; 3 x 16-code RVQ in a 4-dim cosine lookup.
TINY = CodecConfig(channels=4, strides=(2, 2), latent_dim=8, dilations=(1,), num_quantizers=3,
                   codebook_size=16, codebook_dim=4, quantizer_dropout=0.5)
# The same without residual units (a shallower graph for the whole-codec contract run).
SHALLOW = CodecConfig(channels=4, strides=(2, 2), latent_dim=8, dilations=(), num_quantizers=3,
                      codebook_size=16, codebook_dim=4)
LENGTHS = (24, 17, 7)  # 17 and 7 end inside a frame (hop 4)


def make_codec(config=TINY, key=0) -> Codec:
    return Codec(config, rngs=nnx.Rngs(params=key))


def audio(key, lengths=LENGTHS, length=None) -> sz.Seq:
    length = length or max(lengths)
    values = jax.random.normal(key, (len(lengths), length, 1)) * 0.5
    return sz.Seq.from_lengths(values, jnp.asarray(lengths))


def codes(key, num_quantizers=3, codebook_size=16, lengths=(8, 5, 2)) -> sz.Seq:
    values = jax.random.randint(key, (len(lengths), max(lengths), num_quantizers), 0,
                                codebook_size, jnp.int32)
    return sz.Seq.from_lengths(values, jnp.asarray(lengths))
