"""Adjusted direct finetuning: adjusted_dft.sample_images_adjusted's LoRA gradients against the original's
PyTorch computation (tests/dft_torch_reference.py) on the tiny model.

The JAX side runs the trainer's form: text padded to 77 tokens with masks (one compilation for all
prompts), LoRA merged into the params, one jitted grad. The PyTorch side runs the original's: unpadded
text, LoRA added the 0.19 way (tests/lora_torch_reference.py), detached UNet inputs, the scheduler's
step on the undetached latents, c_i hooks on the guided noise predictions, clamp, .backward().
"""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from dft_torch_reference import encode_prompt_pair as torch_encode_prompt_pair
from dft_torch_reference import original_gradient_scales
from dft_torch_reference import sample_images_adjusted as torch_sample_images_adjusted
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from flax import traverse_util
from lora_torch_reference import attach_unet_lora, patch_text_encoder
from transformers import CLIPTextModel

from fairdiff_jax.sd import loader as stable_diffusion
from fairdiff_jax.sd import adjusted_dft, lora, sampler
from fairdiff_jax.sd import tiny as tiny_sd

PROMPT = "a photo of the face of a doctor, a person"
STEPS, GUIDANCE, BATCH, RANK = 5, 7.5, 2, 4
# Gradient agreement, per LoRA tree: ||g_jax - g_torch|| / ||g_torch|| (float32 both sides).
GRAD_RTOL = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tiny_sd.build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"), seed=5)
    sd = stable_diffusion.load_stable_diffusion(folder)
    schedule = sd.schedule(STEPS)
    ids, text_mask, context_mask = stable_diffusion.tokenize_prompt_pair(
        sd.tokenizer, PROMPT, pad_to=sd.tokenizer.model_max_length
    )
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(BATCH, *sd.latent_shape)).astype(np.float32)
    weights = rng.normal(size=(BATCH, sd.image_size, sd.image_size, 3)).astype(np.float32)

    def loss(unet_lora, text_lora, scales):
        hidden = sd.text_encoder.apply({"params": lora.merge(sd.text_encoder_params, text_lora)}, ids, text_mask)
        images = adjusted_dft.sample_images_adjusted(
            sd.unet, lora.merge(sd.unet_params, unet_lora), sd.vae, sd.vae_params, schedule, scales,
            jnp.asarray(noise), hidden[1:], hidden[:1], GUIDANCE, jnp.asarray(context_mask),
        )
        return jnp.sum(images * weights), images

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    processors, _ = attach_unet_lora(unet, RANK)  # values are set per test from the JAX trees
    patch_text_encoder(text_encoder, RANK)
    return SimpleNamespace(
        sd=sd, schedule=schedule, noise=noise, weights=weights, ids=ids, text_mask=text_mask,
        context_mask=context_mask, grad=jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True)),
        unet=unet, text_encoder=text_encoder, vae=vae, processors=processors,
    )


def _lora_tree(params, model, seed, trained):
    """lora.init, with `up` drawn as after some training (trained=True) or left at zero."""
    key = jax.random.key(seed)
    tree = lora.init(key, params, lora.select_targets(params, model), RANK)
    if not trained:
        return tree
    flat = traverse_util.flatten_dict(tree)
    for i, path in enumerate(p for p in flat if p[-1] == "up"):
        flat[path] = 0.05 * jax.random.normal(jax.random.fold_in(key, 1000 + i), flat[path].shape)
    return traverse_util.unflatten_dict(flat)


def _torch_lora_params(s):
    """{original .pth key: the torch LoRA parameter}, for both models."""
    unet_params = {f"{name}.{k}": p for name, m in s.processors.items() for k, p in m.named_parameters()}
    prefix = "" if hasattr(s.text_encoder, "text_model") else "text_model."
    text_params = {prefix + n: p for n, p in s.text_encoder.named_parameters() if "lora_linear_layer" in n}
    return unet_params, text_params


def _torch_grads(s, unet_tree, text_tree, **variant):
    """Loads the LoRA trees into the PyTorch models, runs the original's computation, returns
    (images NHWC, unet grads, text grads) as {original key: array in PyTorch layout}."""
    unet_params, text_params = _torch_lora_params(s)
    with torch.no_grad():
        for params, tree, model in ((unet_params, unet_tree, "unet"), (text_params, text_tree, "text_encoder")):
            values = lora.original_state_dict(tree, model)
            assert values.keys() == params.keys()
            for key, p in params.items():
                p.copy_(torch.from_numpy(values[key]))
                p.grad = None
    scheduler = DPMSolverMultistepScheduler(**tiny_sd.SCHEDULER_CONFIG)
    cond, uncond = torch_encode_prompt_pair(s.sd.tokenizer, s.text_encoder, PROMPT)
    noise = torch.from_numpy(s.noise).permute(0, 3, 1, 2)
    images = torch_sample_images_adjusted(s.unet, s.vae, scheduler, STEPS, noise, cond, uncond, GUIDANCE, **variant)
    (images * torch.from_numpy(s.weights).permute(0, 3, 1, 2)).sum().backward()
    grads = lambda params: {k: p.grad.numpy().copy() for k, p in params.items()}
    return images.detach().permute(0, 2, 3, 1).numpy(), grads(unet_params), grads(text_params)


def _jax_grads(s, unet_tree, text_tree, scales=None):
    scales = adjusted_dft.dft_gradient_scales(s.sd.scheduler_config, s.schedule) if scales is None else scales
    (unet_grad, text_grad), images = s.grad(unet_tree, text_tree, scales)
    return np.asarray(images), lora.original_state_dict(unet_grad, "unet"), lora.original_state_dict(text_grad, "text_encoder")


def _relative_error(got, want):
    """||got - want|| / ||want|| over all tensors of a gradient dict."""
    diff = np.sqrt(sum(np.sum((got[k] - want[k]) ** 2) for k in want))
    return diff / np.sqrt(sum(np.sum(v**2) for v in want.values()))


def test_gradient_scales_match_the_original_formula():
    config = sampler.SchedulerConfig()
    for steps in (5, 19, 23):
        scheduler = DPMSolverMultistepScheduler(**tiny_sd.SCHEDULER_CONFIG)
        scheduler.set_timesteps(steps)
        got = np.asarray(adjusted_dft.dft_gradient_scales(config, sampler.make_schedule(config, steps)))
        # Ours in float64; the original's torch float32 betas give 1 - alpha_t = beta_t ~ 1e-3 near t = 0
        # with ~1e-7 absolute error: measured max relative difference 2.3e-5.
        np.testing.assert_allclose(got, original_gradient_scales(scheduler), rtol=1e-4)
        assert abs(np.log(got).mean()) < 1e-5 and got.max() / got.min() > 2  # normalised, not constant


# Both LoRAs together in the default suite; each alone (a compile each, ~1 min) in the slow one.
@pytest.mark.parametrize("trained", [pytest.param(("unet",), marks=pytest.mark.slow),
                                     pytest.param(("text_encoder",), marks=pytest.mark.slow), ("unet", "text_encoder")],
                         ids="+".join)
def test_lora_gradients_match_the_original(setup, trained):
    s = setup
    unet_tree = _lora_tree(s.sd.unet_params, "unet", 1, "unet" in trained)
    text_tree = _lora_tree(s.sd.text_encoder_params, "text_encoder", 2, "text_encoder" in trained)
    want_images, want_unet, want_text = _torch_grads(s, unet_tree, text_tree)
    images, unet_grad, text_grad = _jax_grads(s, unet_tree, text_tree)

    # Forward: the differentiable sampler's images are sample_images' images and PyTorch's.
    unet_params = lora.merge(s.sd.unet_params, unet_tree)
    hidden = stable_diffusion.encode_text(
        s.sd.text_encoder, lora.merge(s.sd.text_encoder_params, text_tree), jnp.asarray(s.ids), jnp.asarray(s.text_mask)
    )
    plain = sampler.sample_images(
        s.sd.unet, unet_params, s.sd.vae, s.sd.vae_params, s.schedule, jnp.asarray(s.noise), hidden[1:], hidden[:1],
        GUIDANCE, jnp.asarray(s.context_mask),
    )
    np.testing.assert_allclose(images, np.asarray(plain), atol=1e-5, rtol=0)
    assert ((np.abs(want_images) < 0.99).mean()) > 0.9  # few clamped pixels: the gradient is informative
    np.testing.assert_allclose(images, want_images, atol=1e-5, rtol=0)

    errors = {"unet": _relative_error(unet_grad, want_unet), "text_encoder": _relative_error(text_grad, want_text)}
    print(f"LoRA gradient relative error vs PyTorch ({'+'.join(trained)} trained): {errors}")
    for model, error in errors.items():
        assert error < GRAD_RTOL, f"{model} LoRA gradient: relative error {error:.2e}"


def test_the_gradient_check_can_fail(setup):
    """Without the stop-gradient, or without the c_i scaling, the gradient differs far beyond GRAD_RTOL."""
    s = setup
    unet_tree = _lora_tree(s.sd.unet_params, "unet", 3, True)
    text_tree = _lora_tree(s.sd.text_encoder_params, "text_encoder", 4, True)
    _, unet_grad, text_grad = _jax_grads(s, unet_tree, text_tree)
    _, unet_unscaled, text_unscaled = _jax_grads(s, unet_tree, text_tree, scales=jnp.ones(STEPS))
    _, unet_undetached, text_undetached = _torch_grads(s, unet_tree, text_tree, detach_unet_input=False)
    _, unet_unhooked, text_unhooked = _torch_grads(s, unet_tree, text_tree, scale_gradients=False)
    differences = {
        "JAX with all scales 1": (_relative_error(unet_unscaled, unet_grad), _relative_error(text_unscaled, text_grad)),
        "PyTorch without detach": (_relative_error(unet_grad, unet_undetached), _relative_error(text_grad, text_undetached)),
        "PyTorch without hooks": (_relative_error(unet_grad, unet_unhooked), _relative_error(text_grad, text_unhooked)),
    }
    print(f"relative gradient change (unet, text encoder): {differences}")
    for what, (unet_change, text_change) in differences.items():
        assert unet_change > 100 * GRAD_RTOL and text_change > 100 * GRAD_RTOL, what
