"""Streaming decoder-only language model with pluggable KV-cache policies.

* `model`: `StreamingLM` (RoPE, GQA, RMSNorm, SwiGLU, tied embeddings optional; the full
  streaming contract), `with_policy`, `permute_kv_heads`.
* `decode`: chunked `prefill`, the jitted `generate` loop (`lax.while_loop`), per-row stop
  tokens, `refill` (row reuse), `fork`.
* `sampling`: greedy / temperature / top-k / top-p with explicit per-row keys.
* `speculative`: speculative decoding with a draft model (`DraftModel`) or draft-free n-gram
  prompt lookup (`NGramDraft`), verified in one target step and un-committed by KV rollback.
* `training`: the `lm` model of `streamzoo train` (byte-level text), `load_pretrained` /
  `pretrained_info` for the checked-in small models.
* `perplexity`: streamed negative log-likelihood under a KV policy (`stream_nll`) against
  the recompute-over-the-kept-window baseline (`recompute_nll`).
* `paged`: the paged KV layout (page pool, page tables, copy-on-write prefix sharing) that the
  decode loop uses when given a `paged.PagedCache` as the carry.

Cache policies live with the attention layer: `streamzoo.layers.kv_policies`.
"""

from streamzoo.layers.kv_policies import (FullCache, KVPolicy, PerHead, SinksWindow,
                                          SlidingWindow, duo_attention)
from streamzoo.zoo.lm import decode, paged, perplexity, sampling, speculative, training
from streamzoo.zoo.lm.decode import DecodeState, fork, generate, new_state, prefill, refill, start
from streamzoo.zoo.lm.model import DecoderBlock, StreamingLM, permute_kv_heads, with_policy
from streamzoo.zoo.lm.perplexity import recompute_nll, stream_nll
from streamzoo.zoo.lm.sampling import SamplingParams
from streamzoo.zoo.lm.speculative import DraftModel, NGramDraft, SpecState
from streamzoo.zoo.lm.training import load_pretrained, pretrained_info

__all__ = [
    "DecodeState", "DecoderBlock", "DraftModel", "FullCache", "KVPolicy", "NGramDraft", "PerHead", "SamplingParams",
    "SinksWindow", "SlidingWindow", "SpecState", "StreamingLM", "decode", "duo_attention", "fork", "generate",
    "load_pretrained", "new_state", "paged", "permute_kv_heads", "perplexity", "prefill", "pretrained_info",
    "recompute_nll", "refill", "sampling", "speculative", "start", "stream_nll", "training", "with_policy",
]
