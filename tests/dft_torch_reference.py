"""The original's adjusted direct finetuning in PyTorch, as its training script computes it.

For the gradient tests and scripts/benchmark_dft.py. The prompt is tokenized without padding (L
tokens), "" padded to L, both encoded with their attention masks (docs/method.md#sampler); then, at every step, the
UNet sees `latents.detach()` while DPMSolverMultistepScheduler.step (final_sigmas_type="sigma_min",
the original's sampler) updates the undetached latents; a backward hook multiplies the gradient of
the guided noise prediction by c_i; the VAE decode is differentiated and the images clamped.
"""

import math

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler


def original_gradient_scales(scheduler: DPMSolverMultistepScheduler) -> np.ndarray:
    """c_i = sqrt(abar_t) sqrt(1 - abar_t) / (1 - alpha_t) over the scheduler's timesteps, / their geometric mean."""
    coefs = np.array(
        [
            scheduler.alphas_cumprod[t].sqrt().item() * (1 - scheduler.alphas_cumprod[t]).sqrt().item()
            / (1 - scheduler.alphas[t].item())
            for t in scheduler.timesteps
        ]
    )
    return coefs / math.prod(coefs) ** (1 / len(coefs))


def encode_prompt_pair(tokenizer, text_encoder, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) [1, L, D]: the original's unpadded prompt and "" padded to its length, with masks."""
    cond_in = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt")
    length = cond_in.input_ids.shape[1]
    uncond_in = tokenizer("", padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    cond = text_encoder(cond_in.input_ids, attention_mask=cond_in.attention_mask)[0]
    uncond = text_encoder(uncond_in.input_ids, attention_mask=uncond_in.attention_mask)[0]
    return cond, uncond


def sample_images_adjusted(
    unet,
    vae,
    scheduler: DPMSolverMultistepScheduler,
    num_steps: int,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
    detach_unet_input: bool = True,
    scale_gradients: bool = True,
) -> torch.Tensor:
    """noise [B, 4, h, w] -> images [B, 3, H, W] in [-1, 1], with the original's gradient paths.

    detach_unet_input / scale_gradients = False give the variants without the stop-gradient or the
    hooks (to show the tests can tell them apart).
    """
    scheduler.set_timesteps(num_steps)
    scales = original_gradient_scales(scheduler)
    b = noise.shape[0]
    context = torch.cat([uncond.expand(b, -1, -1), cond.expand(b, -1, -1)])
    latents = noise
    for i, t in enumerate(scheduler.timesteps):
        unet_input = latents.detach() if detach_unet_input else latents
        eps_uncond, eps_text = unet(torch.cat([unet_input] * 2), t, encoder_hidden_states=context).sample.chunk(2)
        eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
        if scale_gradients and eps.requires_grad:
            eps.register_hook(lambda grad, c=float(scales[i]): c * grad)
        latents = scheduler.step(eps, t, latents).prev_sample
    return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
