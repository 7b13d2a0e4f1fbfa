"""The "chunked" attention kernel against the plain einsum form: values and gradients (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairdiff_jax.nn import attention
from fairdiff_jax.nn.attention import dot_product_attention


def qkv(seed, batch, tq, tk, heads, depth):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(k, (batch, t, heads, depth), jnp.float32) for k, t in zip(keys, (tq, tk, tk)))


def loss_and_grads(implementation, q, k, v, mask, weights):
    def loss(q, k, v):
        return jnp.sum(dot_product_attention(q, k, v, mask, implementation) * weights)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
@pytest.mark.parametrize("mask_kind", ["none", "per_key", "per_query"])
def test_chunked_matches_einsum_values_and_gradients(mask_kind):
    # Tq > QUERY_CHUNK_SIZE and not a multiple of it: the last block is padded.
    batch, tq, tk, heads, depth = 2, 2 * attention.QUERY_CHUNK_SIZE + 276, 77, 2, 8
    q, k, v = qkv(0, batch, tq, tk, heads, depth)
    rng = np.random.default_rng(1)
    mask = {
        "none": None,
        "per_key": jnp.asarray(rng.random((batch, 1, 1, tk)) < 0.7).at[..., 0].set(True),
        "per_query": jnp.asarray(rng.random((batch, 1, tq, tk)) < 0.7).at[..., 0].set(True),
    }[mask_kind]
    weights = jax.random.normal(jax.random.key(2), (batch, tq, heads, depth))

    out_ref = dot_product_attention(q, k, v, mask, "einsum")
    out = dot_product_attention(q, k, v, mask, "chunked")
    assert out.shape == out_ref.shape == (batch, tq, heads, depth)
    np.testing.assert_allclose(out, out_ref, atol=1e-5, rtol=1e-5)

    (loss_ref, grads_ref), (loss, grads) = (loss_and_grads(i, q, k, v, mask, weights) for i in ("einsum", "chunked"))
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        assert float(jnp.max(jnp.abs(g_ref))) > 0
        np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=1e-4)


def test_chunked_blocks_of_any_size_match_einsum():
    q, k, v = qkv(3, 1, 37, 37, 3, 4)
    expected = dot_product_attention(q, k, v, None, "einsum")
    for chunk in (1, 5, 36, 37, 64):
        np.testing.assert_allclose(attention._chunked_attention(q, k, v, None, chunk), expected, atol=1e-6)


def test_chunked_backward_keeps_scores_of_one_block_only():
    """With 4 query blocks the compiled gradient's temporaries are a fraction of the einsum form's.

    Measured on CPU (jax 0.10.2): the einsum form keeps 3 full [B, N, Tq, Tk] float32 arrays, the
    chunked one about 4 arrays of one block's size, i.e. one full score matrix in all."""
    batch, t, heads, depth = 1, 4 * attention.QUERY_CHUNK_SIZE, 2, 8
    shapes = [jax.ShapeDtypeStruct((batch, t, heads, depth), jnp.float32)] * 3
    scores_bytes = batch * heads * t * t * 4

    def temp_bytes(implementation):
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, None, implementation)), (0, 1, 2)))
        return grad.lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    einsum_bytes, chunked_bytes = temp_bytes("einsum"), temp_bytes("chunked")
    assert einsum_bytes >= 2 * scores_bytes
    assert chunked_bytes < einsum_bytes / 2.5


def test_unknown_implementation_is_rejected():
    q, k, v = qkv(4, 1, 4, 4, 1, 4)
    with pytest.raises(ValueError, match="chunked"):
        dot_product_attention(q, k, v, implementation="flash")
