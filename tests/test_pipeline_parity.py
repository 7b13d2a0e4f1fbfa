"""End to end: the project's loader + text conditioning + jitted sampler + VAE reproduce diffusers'
PyTorch StableDiffusionPipeline (DPMSolverMultistepScheduler with final_sigmas_type="sigma_min", the
original's sampler) fed the same initial latents and the original's text conditioning, both in its
unpadded form and in the fixed-length form (padded to 77 tokens, text and context masks)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

from fairdiff_jax.sd import loader as stable_diffusion
from fairdiff_jax.sd import sampler
from fairdiff_jax.sd import tiny as tiny_sd

PROMPT = "a photo of the face of a doctor, a person"
STEPS, GUIDANCE, BATCH = 6, 7.5, 2


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return tiny_sd.build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"), seed=3)


@pytest.fixture(scope="module")
def torch_pipeline(model_folder):
    pipe = StableDiffusionPipeline.from_pretrained(model_folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, final_sigmas_type="sigma_min")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd(model_folder):
    return stable_diffusion.load_stable_diffusion(model_folder)


def _torch_prompt_pair(pipe, prompt):
    """The original's conditioning in PyTorch: unpadded prompt, "" padded to its length, attention masks."""
    tok = pipe.tokenizer
    cond_in = tok(prompt, truncation=True, max_length=tok.model_max_length, return_tensors="pt")
    length = cond_in.input_ids.shape[1]
    uncond_in = tok("", padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        cond = pipe.text_encoder(cond_in.input_ids, attention_mask=cond_in.attention_mask)[0]
        uncond = pipe.text_encoder(uncond_in.input_ids, attention_mask=uncond_in.attention_mask)[0]
    return cond, uncond


def test_text_conditioning_matches(sd, torch_pipeline):
    cond, uncond, context_mask = stable_diffusion.encode_prompt_pair(sd, PROMPT)
    want_cond, want_uncond = _torch_prompt_pair(torch_pipeline, PROMPT)
    assert cond.shape == want_cond.shape == (1, 13, tiny_sd.TEXT_WIDTH)
    assert context_mask.shape == (1, 13) and np.asarray(context_mask).all()
    # Measured max abs diff ~1e-6.
    np.testing.assert_allclose(np.asarray(cond), want_cond.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(uncond), want_uncond.numpy(), atol=1e-5)
    # The negative prompt's padding is masked: its states differ from an unmasked run's.
    ids, mask, _ = stable_diffusion.tokenize_prompt_pair(sd.tokenizer, PROMPT)
    assert mask[0].sum() == 2 and mask[1].all() and (ids[0, 2:] == sd.tokenizer.pad_token_id).all()
    unmasked = stable_diffusion.encode_text(sd.text_encoder, sd.text_encoder_params, jnp.asarray(ids), jnp.ones_like(mask))
    assert np.abs(np.asarray(unmasked[0, 2:]) - np.asarray(uncond[0, 2:])).max() > 1e-3

    # Fixed length: the first L states are the unpadded ones (the text encoder is causal).
    padded_cond, padded_uncond, padded_context_mask = stable_diffusion.encode_prompt_pair(sd, PROMPT, pad_to=77)
    assert padded_cond.shape == (1, 77, tiny_sd.TEXT_WIDTH)
    np.testing.assert_array_equal(np.asarray(padded_context_mask)[0], np.arange(77) < 13)
    np.testing.assert_allclose(np.asarray(padded_cond[:, :13]), want_cond.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(padded_uncond[:, :13]), want_uncond.numpy(), atol=1e-5)
    ids, mask, context_mask = stable_diffusion.tokenize_prompt_pair(sd.tokenizer, PROMPT, pad_to=77)
    assert mask.sum(1).tolist() == [2, 13] and context_mask.sum() == 13
    assert (ids[1, 13:] == sd.tokenizer.pad_token_id).all()
    with pytest.raises(ValueError, match="has 13 tokens, more than pad_to=12"):
        stable_diffusion.tokenize_prompt_pair(sd.tokenizer, PROMPT, pad_to=12)


@pytest.mark.parametrize("pad_to", [None, 77], ids=["unpadded", "padded_to_77"])
def test_images_match_diffusers_pipeline(sd, torch_pipeline, pad_to):
    """Unpadded (the original's form) and padded to 77 with masks (one compilation for all prompts) both
    give the original's images."""
    h, w, c = sd.latent_shape
    noise = np.random.default_rng(0).normal(size=(BATCH, h, w, c)).astype(np.float32)

    cond, uncond, context_mask = stable_diffusion.encode_prompt_pair(sd, PROMPT, pad_to=pad_to)
    images = sampler.sample_images(
        sd.unet, sd.unet_params, sd.vae, sd.vae_params, sd.schedule(STEPS), jnp.asarray(noise), cond, uncond, GUIDANCE,
        context_mask,
    )
    got = (np.asarray(images) + 1) / 2

    want_cond, want_uncond = _torch_prompt_pair(torch_pipeline, PROMPT)
    want = torch_pipeline(
        prompt_embeds=want_cond,
        negative_prompt_embeds=want_uncond,
        num_images_per_prompt=BATCH,
        latents=torch.from_numpy(noise).permute(0, 3, 1, 2),
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        height=sd.image_size,
        width=sd.image_size,
        output_type="np",
    ).images
    assert got.shape == want.shape == (BATCH, tiny_sd.IMAGE_SIZE, tiny_sd.IMAGE_SIZE, 3)
    # Images in [0, 1]; most pixels are not clamped, so the comparison is informative.
    assert ((want > 0.01) & (want < 0.99)).mean() > 0.9
    # float32 on both sides; measured max abs diff 1.4e-6 unpadded (6 steps; 1.0e-6 with 20 steps).
    print(f"images ({pad_to=}) max abs diff to diffusers: {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    if pad_to is not None:  # without the context mask the padded tokens change the images: the mask matters
        unmasked = sampler.sample_images(
            sd.unet, sd.unet_params, sd.vae, sd.vae_params, sd.schedule(STEPS), jnp.asarray(noise), cond, uncond, GUIDANCE,
            jnp.ones_like(context_mask),
        )
        assert np.abs((np.asarray(unmasked) + 1) / 2 - want).max() > 1e-3
