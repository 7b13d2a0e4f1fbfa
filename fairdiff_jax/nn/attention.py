"""Multi-head scaled dot-product attention shared by every transformer in the project.

One place decides which kernel runs: XLA's fused attention, cuDNN's flash attention (GPU, bf16/fp16
only), a plain einsum form that any backend runs and that is easiest to read in a profile, or that
einsum form over blocks of queries ("chunked"), which bounds the memory of the score matrices.
"""

from typing import Literal, Optional

import jax
import jax.numpy as jnp

AttentionImpl = Literal["xla", "cudnn", "einsum", "chunked"]
ATTENTION_IMPLS = ("xla", "cudnn", "einsum", "chunked")

# Queries per block of the "chunked" kernel. SD-1.5's 64x64-latent self-attention at batch 8 and 8
# heads then holds 8 * 8 * 512 * 4096 float32 scores (0.5 GiB) per block instead of 4 GiB per layer;
# a block's backward keeps about four arrays of that size.
QUERY_CHUNK_SIZE = 512


def _einsum_attention(query, key, value, mask):
    scale = query.shape[-1] ** -0.5
    logits = jnp.einsum("bqnd,bknd->bnqk", query, key).astype(jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    return jnp.einsum("bnqk,bknd->bqnd", weights, value)


def _chunked_attention(query, key, value, mask, chunk_size):
    """The einsum form, `chunk_size` queries at a time under jax.checkpoint.

    Each query row's softmax runs over all keys, so the rows of one block need nothing from the other
    blocks: the result is the einsum form's, with no online softmax. The scan makes the blocks run
    one after another, and the checkpoint makes the backward pass recompute a block's scores from its
    queries rather than keep every block's [B, N, chunk, Tk] weights.
    """
    batch, tq, heads, depth = query.shape
    if tq <= chunk_size:
        return _einsum_attention(query, key, value, mask)
    num_chunks = -(-tq // chunk_size)
    pad = num_chunks * chunk_size - tq  # padded query rows attend like any other and are dropped after

    def blocks(x, axis):  # [..., Tq, ...] -> [num_chunks, ..., chunk_size, ...]
        x = jnp.pad(x, [(0, pad if a == axis else 0) for a in range(x.ndim)])
        x = x.reshape(x.shape[:axis] + (num_chunks, chunk_size) + x.shape[axis + 1:])
        return jnp.moveaxis(x, axis, 0)

    query_blocks = blocks(query, 1)
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    per_query_mask = mask is not None and mask.shape[2] != 1
    if per_query_mask:
        mask = jnp.broadcast_to(mask, mask.shape[:2] + (tq, mask.shape[3]))
        xs = (query_blocks, blocks(mask, 2))
    else:
        xs = (query_blocks, None)

    @jax.checkpoint
    def attend(q_and_mask):
        q, block_mask = q_and_mask
        return _einsum_attention(q, key, value, block_mask if per_query_mask else mask)

    out = jax.lax.map(attend, xs)  # [num_chunks, B, chunk_size, N, D]
    out = jnp.moveaxis(out, 0, 1).reshape(batch, num_chunks * chunk_size, heads, depth)
    return out[:, :tq]


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
        the explicit form (softmax in float32 whatever the input dtype); "chunked" is the einsum
        form over blocks of QUERY_CHUNK_SIZE queries, recomputed per block in the backward pass, so
        the [B, N, Tq, Tk] scores never exist at once (same values to float rounding). For
        differentiating through SD at 512x512 on a GPU, "cudnn" (flash attention) is the fast
        memory-saving kernel; "chunked" is the portable one (CPU, TPU, fp32, any GPU).

    Returns:
      [B, Tq, N, D] in the query's dtype.
    """
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {ATTENTION_IMPLS}")
    if implementation == "einsum":
        return _einsum_attention(query, key, value, mask)
    if implementation == "chunked":
        return _chunked_attention(query, key, value, mask, QUERY_CHUNK_SIZE)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (query.shape[0], query.shape[2], query.shape[1], key.shape[1]))
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation=implementation)
