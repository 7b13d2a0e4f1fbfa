"""Sampling throughput: fairdiff_jax's jitted sampler vs diffusers' PyTorch StableDiffusionPipeline.

Both run the same random-weight model (the JAX params are converted from the PyTorch modules), the
same scheduler (DPM-Solver++(2M), final sigma as the original), the same text conditioning (one
prompt, the original's unpadded form), guidance 7.5, batch and step count, and return host arrays.
Timings exclude the first call (JAX compilation, PyTorch warm-up), which is reported separately.

    .venv/bin/python scripts/benchmark_sampling.py          # tiny model, CPU is fine
    taskset -c 0 .venv/bin/python scripts/benchmark_sampling.py --torch_threads 1   # one core each, fair on a busy CPU
    .venv/bin/python scripts/benchmark_sampling.py --sd15-shapes --dtype bfloat16 --batch_size 8   # GPU/TPU
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from fairdiff_jax.nn import weights
from fairdiff_jax.sd import sampler
from fairdiff_jax.sd import tiny as tiny_sd
from fairdiff_jax.sd.clip_text import (
    CLIPTextConfig,
    CLIPTextTransformer,
    clip_text_params,
)
from fairdiff_jax.sd.loader import StableDiffusion, encode_prompt_pair
from fairdiff_jax.sd.unet import UNet2DConditionModel, UNetConfig, unet_param_shapes
from fairdiff_jax.sd.vae import (
    AutoencoderKLDecoder,
    VAEDecoderConfig,
    vae_decoder_params,
)
from random_models import SD15_TEXT, SD15_UNET, SD15_VAE  # scripts/ is on sys.path when a script runs

PROMPT = "a photo of the face of a doctor, a person"
DTYPES = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16), "float16": (jnp.float16, torch.float16)}

def jax_model_from_torch(pipe, dtype, attention_impl: str) -> StableDiffusion:
    """The project's StableDiffusion bundle with the PyTorch pipeline's weights (no folder on disk)."""
    state = lambda m: {k: v.detach().float().cpu().numpy() for k, v in m.state_dict().items()}
    as_jax = lambda tree: jax.tree.map(jnp.asarray, tree)
    unet = UNet2DConditionModel(UNetConfig.from_diffusers(dict(pipe.unet.config)), dtype, dtype, attention_impl)
    unet_params = weights.convert_state_dict(state(pipe.unet), unet_param_shapes(unet), source="torch UNet")
    vae = AutoencoderKLDecoder(VAEDecoderConfig.from_dict(dict(pipe.vae.config)), dtype, dtype, attention_impl)
    vae_params = vae_decoder_params(vae, state(pipe.vae), "torch VAE")
    text = CLIPTextTransformer(CLIPTextConfig.from_dict(pipe.text_encoder.config.to_dict()), dtype, dtype, attention_impl)
    text_params = clip_text_params(text, state(pipe.text_encoder), "torch text encoder")
    return StableDiffusion(
        unet, as_jax(unet_params), vae, as_jax(vae_params), text, as_jax(text_params), pipe.tokenizer, sampler.SchedulerConfig()
    )


def torch_prompt_pair(pipe, prompt: str, device):
    """The original's conditioning: unpadded prompt, "" padded to its length, attention masks."""
    tok = pipe.tokenizer
    cond_in = tok(prompt, truncation=True, max_length=tok.model_max_length, return_tensors="pt").to(device)
    uncond_in = tok("", padding="max_length", max_length=cond_in.input_ids.shape[1], return_tensors="pt").to(device)
    with torch.no_grad():
        cond = pipe.text_encoder(cond_in.input_ids, attention_mask=cond_in.attention_mask)[0]
        uncond = pipe.text_encoder(uncond_in.input_ids, attention_mask=uncond_in.attention_mask)[0]
    return cond, uncond


def timed(fn, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, mean seconds of the next `repeats` calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return first, (time.perf_counter() - start) / repeats


def random_pipeline(sd15_shapes: bool):
    """diffusers' StableDiffusionPipeline with random weights (seed 0, float32, on the CPU): SD v1-5's
    architecture or the tiny one (fairdiff_jax.sd.tiny). Same call, same weights, in every process."""
    configs = dict(unet_config=SD15_UNET, vae_config=SD15_VAE, text_encoder_config=SD15_TEXT) if sd15_shapes else {}
    pipe = tiny_sd.build_torch_pipeline(seed=0, **configs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def jax_sampler(sd: StableDiffusion, batch_size: int, steps: int, guidance_scale: float = 7.5):
    """(sample: () -> images [b, H, W, 3] float32 numpy in [-1, 1], lowered: its jax.stages.Lowered).

    The project's jitted sampler on PROMPT with fixed noise (key 0)."""
    cond, uncond, context_mask = encode_prompt_pair(sd, PROMPT)
    schedule = sd.schedule(steps)
    h, w, c = sd.latent_shape
    noise = jax.random.normal(jax.random.key(0), (batch_size, h, w, c))
    args = (sd.unet, sd.unet_params, sd.vae, sd.vae_params, schedule, noise, cond, uncond, guidance_scale, context_mask)
    return (lambda: np.asarray(sampler.sample_images(*args))), sampler.sample_images.lower(*args)


def torch_sampler(pipe, batch_size: int, steps: int, guidance_scale: float = 7.5):
    """() -> images [b, H, W, 3] numpy: the diffusers pipeline (on its device and dtype) with PROMPT's conditioning
    as the original builds it and the noise of `jax_sampler` (key 0)."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    cond, uncond = torch_prompt_pair(pipe, PROMPT, device)
    shape = (batch_size, pipe.unet.config.sample_size, pipe.unet.config.sample_size, pipe.unet.config.in_channels)
    noise = np.asarray(jax.random.normal(jax.random.key(0), shape))
    latents = torch.from_numpy(noise).permute(0, 3, 1, 2).to(device, dtype)
    return lambda: pipe(
        prompt_embeds=cond, negative_prompt_embeds=uncond, num_images_per_prompt=batch_size, latents=latents,
        num_inference_steps=steps, guidance_scale=guidance_scale, height=size, width=size, output_type="np",
    ).images


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd15-shapes", action="store_true", help="SD v1-5-sized random model instead of the tiny one")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="both frameworks' model dtype")
    parser.add_argument("--attention_impl", default="xla", help="the JAX side's attention kernel")
    parser.add_argument(
        "--torch_threads", type=int, help="PyTorch CPU threads (on a shared CPU, pin the run with taskset and set this to match)"
    )
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    jax_dtype, torch_dtype = DTYPES[args.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"

    pipe = random_pipeline(args.sd15_shapes)
    sd = jax_model_from_torch(pipe, jax_dtype, args.attention_impl)
    pipe = pipe.to(device, torch_dtype)
    b = args.batch_size
    print(f"model: {'SD v1-5 shapes' if args.sd15_shapes else 'tiny'}, {sd.image_size}x{sd.image_size} images, "
          f"batch {b}, {args.steps} steps, {args.dtype}; JAX on {jax.devices()[0].platform}, PyTorch on {device}")

    jax_first, jax_time = timed(jax_sampler(sd, b, args.steps)[0], args.repeats)
    torch_first, torch_time = timed(torch_sampler(pipe, b, args.steps), args.repeats)

    print(f"fairdiff_jax: {b / jax_time:8.2f} images/s ({jax_time:.3f} s/batch; first call incl. compile {jax_first:.1f} s)")
    print(f"diffusers:    {b / torch_time:8.2f} images/s ({torch_time:.3f} s/batch; first call {torch_first:.1f} s)")
    print(f"speed ratio fairdiff_jax / diffusers: {torch_time / jax_time:.2f}")


if __name__ == "__main__":
    main()
