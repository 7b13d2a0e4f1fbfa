"""Multi-head scaled dot-product attention shared by every transformer in the project.

One place decides which kernel runs: XLA's fused attention, cuDNN's flash attention (GPU, bf16/fp16
only), or a plain einsum form that any backend runs and that is easiest to read in a profile.
"""

from typing import Literal, Optional

import jax
import jax.numpy as jnp

AttentionImpl = Literal["xla", "cudnn", "einsum"]
ATTENTION_IMPLS = ("xla", "cudnn", "einsum")


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: Optional[jax.Array] = None,
    implementation: AttentionImpl = "xla",
) -> jax.Array:
    """softmax(q k^T / sqrt(d) + mask) v, per head.

    Args:
      query: [B, Tq, N, D] (batch, query tokens, heads, head dim).
      key, value: [B, Tk, N, D].
      mask: optional boolean, broadcastable to [B, N, Tq, Tk]; True = may attend.
      implementation: "xla" / "cudnn" select `jax.nn.dot_product_attention`'s kernel; "einsum" is
        the explicit form (softmax in float32 whatever the input dtype).

    Returns:
      [B, Tq, N, D] in the query's dtype.
    """
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {ATTENTION_IMPLS}")
    if implementation == "einsum":
        scale = query.shape[-1] ** -0.5
        logits = jnp.einsum("bqnd,bknd->bnqk", query, key).astype(jnp.float32) * scale
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
        return jnp.einsum("bnqk,bknd->bqnd", weights, value)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (query.shape[0], query.shape[2], query.shape[1], key.shape[1]))
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation=implementation)
