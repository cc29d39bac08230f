"""streamzoo.pallas_kernels: Pallas kernels for the streaming paths, one family per module.

Each kernel has a jnp reference ("xla", also the CPU path) and Pallas implementations chosen
with `impl=` ("auto" picks the backend's native one; see `dispatch`):

* `attention.attention`: masked prefill/training attention (causal, window, sinks, chunks).
* `ring_decode_attention.ring_decode_attention`: queries over a ring-buffer KV cache.
* `causal_depthwise_conv.causal_depthwise_conv`: fused depthwise causal conv with its state.
* `linear_scan.linear_scan` (diagonal recurrence) and `linear_scan.linear_attention`
  (linear attention with an `(S, z)` state).

Import the functions from their modules (`from streamzoo.pallas_kernels.linear_scan import
linear_scan`): the package does not re-export them, so that a module and its function of
the same name never shadow each other.
"""
