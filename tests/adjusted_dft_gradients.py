"""Test helpers: the adjusted-DFT gradient of a fixed linear function of the images, by both gradient paths
(docs/method.md#adjusted-direct-finetuning), for any model set (tiny, or SD v1-5 shapes with random weights)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fairdiff_jax.sd import adjusted_dft, lora, sampler


def trained_lora(params, model: str, rank: int, seed: int):
    """lora.init with `up` drawn as after some training (at init `up` = 0 and the LoRA does nothing, so the
    gradient of `down` would be zero)."""
    key = jax.random.key(seed)
    flat = traverse_util.flatten_dict(lora.init(key, params, lora.select_targets(params, model), rank))
    for i, path in enumerate(p for p in flat if p[-1] == "up"):
        flat[path] = 0.05 * jax.random.normal(jax.random.fold_in(key, 1000 + i), flat[path].shape)
    return traverse_util.unflatten_dict(flat)


def relative_error(got, want) -> float:
    """||got - want|| / ||want|| over all leaves of two pytrees of the same structure."""
    got, want = (flat_vector(t) for t in (got, want))
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def flat_vector(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def gradient_functions(sd, schedule, ids, text_mask, context_mask, noise, weights, guidance):
    """(stored, rerun): jitted `(params, unet_lora, text_lora, scales) -> ((unet_lora grads, text_lora grads), images)`
    of loss = sum(images * weights), images [B, H, W, 3] float32 of `noise` [B, h, w, 4].

    params: {'unet', 'vae', 'text_encoder'} frozen weights (arguments, not constants baked into the program);
    {} for a LoRA that is not trained. `stored` runs the no-gradient sampler that keeps the trajectory with the
    same weights, as the training step does, then differentiates adjusted_dft.images_from_trajectory; `rerun`
    differentiates adjusted_dft.sample_images_adjusted. scales: [n] the per-step c_i (dft_gradient_scales).
    """

    def embeddings(text_encoder_params, text_lora):
        hidden = sd.text_encoder.apply({"params": lora.merge(text_encoder_params, text_lora)}, ids, text_mask)
        return hidden[1:], hidden[:1]

    @jax.jit
    def stored(params, unet_lora, text_lora, scales):
        unet_params_of = lambda t: lora.merge(params["unet"], t)  # noqa: E731
        cond, uncond = embeddings(params["text_encoder"], text_lora)
        _, final, trajectory = sampler.sample_images_and_trajectory(
            sd.unet, unet_params_of(unet_lora), sd.vae, params["vae"], schedule, noise, cond, uncond, guidance, context_mask
        )

        def loss(unet_lora, text_lora):
            cond, uncond = embeddings(params["text_encoder"], text_lora)
            images = adjusted_dft.images_from_trajectory(
                sd.unet, unet_params_of, unet_lora, sd.vae, params["vae"], schedule, scales, trajectory, final, cond, uncond,
                guidance, context_mask,
            )
            return jnp.sum(images * weights), images

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(unet_lora, text_lora)

    @jax.jit
    def rerun(params, unet_lora, text_lora, scales):
        def loss(unet_lora, text_lora):
            cond, uncond = embeddings(params["text_encoder"], text_lora)
            images = adjusted_dft.sample_images_adjusted(
                sd.unet, lora.merge(params["unet"], unet_lora), sd.vae, params["vae"], schedule, scales, noise, cond, uncond,
                guidance, context_mask,
            )
            return jnp.sum(images * weights), images

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(unet_lora, text_lora)

    return stored, rerun
