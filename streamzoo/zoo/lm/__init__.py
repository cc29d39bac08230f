"""Streaming decoder-only language model with pluggable KV-cache policies.

* `model`: `StreamingLM` (RoPE, GQA, RMSNorm, SwiGLU, tied embeddings optional; the full
  streaming contract), `with_policy`, `permute_kv_heads`.
* `decode`: chunked `prefill`, the jitted `generate` loop (`lax.while_loop`), per-row stop
  tokens, `refill` (row reuse), `fork`.
* `sampling`: greedy / temperature / top-k / top-p with explicit per-row keys.
* `speculative`: speculative decoding with a draft model (`DraftModel`) or draft-free n-gram
  prompt lookup (`NGramDraft`), verified in one target step and un-committed by KV rollback.
* `paged`: the paged KV layout (page pool, page tables, copy-on-write prefix sharing) that the
  decode loop uses when given a `paged.PagedCache` as the carry.

Cache policies live with the attention layer: `streamzoo.layers.kv_policies`.
"""

from streamzoo.layers.kv_policies import (FullCache, KVPolicy, PerHead, SinksWindow,
                                          SlidingWindow, duo_attention)
from streamzoo.zoo.lm import decode, paged, sampling, speculative
from streamzoo.zoo.lm.decode import DecodeState, fork, generate, new_state, prefill, refill, start
from streamzoo.zoo.lm.model import DecoderBlock, StreamingLM, permute_kv_heads, with_policy
from streamzoo.zoo.lm.sampling import SamplingParams
from streamzoo.zoo.lm.speculative import DraftModel, NGramDraft, SpecState

__all__ = [
    "DecodeState", "DecoderBlock", "DraftModel", "FullCache", "KVPolicy", "NGramDraft", "PerHead", "SamplingParams",
    "SinksWindow", "SlidingWindow", "SpecState", "StreamingLM", "decode", "duo_attention", "fork", "generate",
    "new_state", "paged", "permute_kv_heads", "prefill", "refill", "sampling", "speculative", "start",
    "with_policy",
]
