"""Adjusted direct finetuning (docs/method.md#adjusted-direct-finetuning): the sampler's images, differentiable the
way the method differentiates them. The gradient reaches every step's noise prediction only through the
solver's linear update chain (the UNet sees a stop-gradient copy of its input), and the cotangent of step i's
guided noise prediction is scaled by c_i (`dft_gradient_scales`). Two ways to compute it, same gradients:
`sample_images_adjusted` regenerates the images under remat; `images_from_trajectory` starts from the latents a
no-gradient run stored (`sampler.sample_images_and_trajectory`) and takes one VJP of the UNet call per step.
"""

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.sd.sampler import (
    Schedule,
    SchedulerConfig,
    training_betas,
    guided_eps,
    solver_step,
    decode_latents,
    unet_eps_fn,
)

def dft_gradient_scales(scheduler_config: SchedulerConfig, schedule: Schedule) -> jax.Array:
    """Per-step factors [n] float32 for the cotangent of each step's guided noise prediction.

    c_i = sqrt(abar_t) sqrt(1 - abar_t) / (1 - alpha_t) at t = schedule.timesteps[i], with
    alpha_t = 1 - beta_t, divided by the geometric mean of c over the n steps (the original's hooks).
    Works on a traced schedule too.
    """
    betas = training_betas(scheduler_config)
    abar = np.cumprod(1.0 - betas)
    coef_table = jnp.asarray(np.sqrt(abar) * np.sqrt(1.0 - abar) / betas, jnp.float32)  # [T]: every timestep
    log_c = jnp.log(coef_table[schedule.timesteps])
    return jnp.exp(log_c - jnp.mean(log_c))


@jax.custom_vjp
def _scale_cotangent(x: jax.Array, scale: jax.Array) -> jax.Array:
    """Identity in the forward pass; the backward pass multiplies x's cotangent by `scale`."""
    return x


def _scale_cotangent_fwd(x, scale):
    return x, scale


def _scale_cotangent_bwd(scale, cotangent):
    return cotangent * scale, jnp.zeros_like(scale)


_scale_cotangent.defvjp(_scale_cotangent_fwd, _scale_cotangent_bwd)


def sample_images_adjusted(
    unet, unet_params, vae, vae_params, schedule, gradient_scales, noise, cond, uncond, guidance_scale, context_mask=None
) -> jax.Array:
    """The images of `sample_images`, differentiable the way of "adjusted direct finetuning".

    Gradients w.r.t. unet_params (LoRA merged in by the caller) and cond / uncond (a text-encoder LoRA
    reaches them) flow only through the solver's linear update chain and each step's noise prediction:
      - the UNet sees stop_gradient(x_i), while the solver update uses x_i itself;
      - the cotangent of step i's guided noise prediction is multiplied by gradient_scales[i]
        (`dft_gradient_scales`);
      - the VAE decode is differentiated; the images are clamped to [-1, 1] (zero gradient outside).
    Memory: the per-step UNet call and the VAE decode sit under jax.checkpoint, so the backward pass
    keeps the latents of each step (and the decode's input), not UNet or VAE activations; it
    recomputes one UNet call per step and the decode.

    Not jitted: call it inside the caller's jitted (and differentiated) loss. Arguments as in
    `sample_images`; gradient_scales: [n] float32. No gradient flows to `noise`.

    Returns:
      images [B, H, W, 3] float32 in [-1, 1].
    """

    @jax.checkpoint
    def step_eps(params, latents, timestep, cond, uncond, guidance_scale, context_mask):
        return guided_eps(unet_eps_fn(unet, params), latents, timestep, cond, uncond, guidance_scale, context_mask)

    def body(carry, step):
        latents, prev_x0 = carry
        eps = step_eps(
            unet_params, jax.lax.stop_gradient(latents), schedule.timesteps[step], cond, uncond, guidance_scale, context_mask
        )
        eps = _scale_cotangent(eps, gradient_scales[step])
        return solver_step(schedule, step, latents, eps, prev_x0), None

    noise = jax.lax.stop_gradient(noise.astype(jnp.float32))
    (latents, _), _ = jax.lax.scan(body, (noise, jnp.zeros_like(noise)), jnp.arange(schedule.num_steps))
    return jax.checkpoint(lambda p, x: decode_latents(vae, p, x))(vae_params, latents)


def images_from_trajectory(
    unet, unet_params_of, trainable, vae, vae_params, schedule, gradient_scales, trajectory, final_latents, cond, uncond,
    guidance_scale, context_mask=None,
) -> jax.Array:
    """The images of a stored sampling run, with the gradients of `sample_images_adjusted` w.r.t. `trainable`,
    `cond` and `uncond`, computed without running the denoising chain forward again.

    Adjusted DFT detaches every UNet input, so step i's noise prediction depends on the trained weights only
    through the UNet call at x_i, and x_i is already known: the no-gradient pass that made the images with the
    same weights stored it (`sample_images_and_trajectory`). The forward pass is the decode of the stored final
    latents; the backward pass decodes again under jax.vjp, image by image, for dL/dx_n, then walks the steps from
    last to first: the cotangent chain through the solver's linear updates as in `sample_images_adjusted`, and one VJP of the
    guided UNet call at the stored x_i per step, its cotangent scaled by gradient_scales[i]. A step's UNet
    activations live only during its own VJP; the reverse scan carries the latent cotangents and the gradient of
    `trainable` (e.g. a LoRA tree), not one of the merged params.

    Args:
      unet, vae: the Flax modules.
      unet_params_of: trainable -> the UNet's params (e.g. `lambda lora: lora_lib.merge(frozen, lora)`); the
        trajectory must come from these same params, or the gradient is that of another run.
      trainable: a pytree ({} when the UNet is not trained).
      vae_params, schedule, guidance_scale, context_mask: as in `sample_images`; no gradient flows to them.
      gradient_scales: [n] float32 (`dft_gradient_scales`).
      trajectory: [B, n, h, w, 4] float32, step i's input latents; final_latents: [B, h, w, 4] float32.
      cond, uncond: [1 or B, T, D] embeddings (a text-encoder LoRA reaches them).

    Returns:
      images [B, H, W, 3] float32 in [-1, 1] (the clamp's zero gradient outside, as the decode's).
    """
    guidance_scale = jnp.asarray(guidance_scale, jnp.float32)
    fixed = (vae_params, schedule, gradient_scales, trajectory, final_latents, guidance_scale, context_mask)

    def decode(vae_params, latents):
        return decode_latents(vae, vae_params, latents)

    @jax.custom_vjp
    def images_of(trainable, cond, uncond, fixed):
        vae_params, _, _, _, final_latents, _, _ = fixed
        return decode(vae_params, final_latents)

    def forward(trainable, cond, uncond, fixed):
        return images_of(trainable, cond, uncond, fixed), (trainable, cond, uncond, fixed)

    def backward(residuals, image_cotangent):
        trainable, cond, uncond, fixed = residuals
        vae_params, schedule, gradient_scales, trajectory, final_latents, guidance_scale, context_mask = fixed

        # One image at a time: the decoder's 512 px activations dominate the backward pass's memory
        # (docs/method.md#adjusted-direct-finetuning).
        def decode_cotangent(latents_and_cotangent):
            latents, cotangent = latents_and_cotangent
            _, decode_vjp = jax.vjp(lambda x: decode(vae_params, x[None])[0], latents)
            return decode_vjp(cotangent)[0]

        latent_cotangent = jax.lax.map(decode_cotangent, (final_latents, image_cotangent))

        def step_eps(trainable, cond, uncond, latents, timestep):
            eps_fn = unet_eps_fn(unet, unet_params_of(trainable))
            return guided_eps(eps_fn, latents, timestep, cond, uncond, guidance_scale, context_mask)

        def body(carry, xs):
            # carry: dL/dx_{i+1}, dL/dx0_i through step i+1's second-order term, gradients so far.
            next_cotangent, x0_cotangent_from_next, grads = carry
            step, latents = xs
            c = jax.tree.map(lambda a: a[step], schedule)
            x0_cotangent = c.x0_coef * next_cotangent + x0_cotangent_from_next
            eps_cotangent = -(c.sigma / c.alpha) * x0_cotangent * gradient_scales[step]
            _, eps_vjp = jax.vjp(lambda t, cd, ud: step_eps(t, cd, ud, latents, schedule.timesteps[step]), trainable, cond, uncond)
            grads = jax.tree.map(jnp.add, grads, eps_vjp(eps_cotangent))
            cotangent = c.latent_coef * next_cotangent + x0_cotangent / c.alpha
            return (cotangent, c.prev_x0_coef * next_cotangent, grads), None

        zeros = jax.tree.map(jnp.zeros_like, (trainable, cond, uncond))
        steps = jnp.arange(schedule.num_steps)
        (_, _, grads), _ = jax.lax.scan(
            body, (latent_cotangent, jnp.zeros_like(latent_cotangent), zeros), (steps, jnp.moveaxis(trajectory, 1, 0)), reverse=True
        )
        return (*grads, None)

    images_of.defvjp(forward, backward)
    return images_of(trainable, cond, uncond, fixed)
