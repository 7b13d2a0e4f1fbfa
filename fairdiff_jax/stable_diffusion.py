"""A diffusers-format Stable Diffusion folder -> Flax modules + params, and the original's text conditioning.

Folder layout (as `StableDiffusionPipeline.save_pretrained` writes it; model_index.json optional):
unet/, vae/, text_encoder/, tokenizer/, scheduler/scheduler_config.json.

Text conditioning (SPEC 1b, differs from the stock pipeline): the prompt is tokenized WITHOUT
padding (its own length L, BOS and EOS included, truncated at the tokenizer's maximum length), the
negative prompt "" is padded to the same L, and both run through the text encoder WITH their
attention masks. The UNet then cross-attends to L tokens.
"""

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax import sampler
from fairdiff_jax.models.attention import AttentionImpl
from fairdiff_jax.models.clip import CLIPTextTransformer, load_clip_text
from fairdiff_jax.models.unet import UNet2DConditionModel, load_unet
from fairdiff_jax.models.vae import AutoencoderKLDecoder, load_vae_decoder

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusion:
    """The frozen generator: Flax modules, their params (jax arrays), the tokenizer and the noise schedule."""

    unet: UNet2DConditionModel
    unet_params: Any
    vae: AutoencoderKLDecoder
    vae_params: Any
    text_encoder: CLIPTextTransformer
    text_encoder_params: Any
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler_config: sampler.SchedulerConfig

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(h, w, C) of one image's latents, from the UNet's sample_size."""
        size = self.unet.config.sample_size
        if size is None:
            raise ValueError("the UNet config has no sample_size: the image size is unknown")
        return (size, size, self.unet.config.in_channels)

    @property
    def image_size(self) -> int:
        return self.latent_shape[0] * self.vae.config.upsampling_factor

    def schedule(self, num_steps: int) -> sampler.Schedule:
        return sampler.make_schedule(self.scheduler_config, num_steps)


def load_stable_diffusion(
    folder: str | Path,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    attention_impl: AttentionImpl = "xla",
) -> StableDiffusion:
    """Loads every part of an SD folder. `param_dtype` defaults to `dtype` (the frozen model's
    weights are stored in the compute dtype, e.g. bf16). Raises FileNotFoundError for a missing
    folder or subfolder, ValueError (WeightLoadError included) naming the file and key that does
    not fit."""
    folder = Path(folder)
    param_dtype = dtype if param_dtype is None else param_dtype
    if not folder.is_dir():
        raise FileNotFoundError(f"Stable Diffusion model folder not found: {folder}")
    for sub in SUBFOLDERS:
        if not (folder / sub).is_dir():
            raise FileNotFoundError(
                f"{folder} has no {sub}/ subfolder (a diffusers-format Stable Diffusion folder has {', '.join(SUBFOLDERS)})"
            )
    scheduler_config = sampler.SchedulerConfig.from_json(folder / "scheduler" / "scheduler_config.json")
    tokenizer = load_tokenizer(folder / "tokenizer")
    unet, unet_params = load_unet(folder / "unet", dtype, param_dtype, attention_impl)
    vae, vae_params = load_vae_decoder(folder / "vae", dtype, param_dtype, attention_impl)
    text_encoder, text_encoder_params = load_clip_text(folder / "text_encoder", dtype, param_dtype, attention_impl)
    as_jax = lambda tree: jax.tree.map(jnp.asarray, tree)
    return StableDiffusion(
        unet, as_jax(unet_params), vae, as_jax(vae_params), text_encoder, as_jax(text_encoder_params), tokenizer, scheduler_config
    )


def load_tokenizer(folder: Path):
    """transformers' CLIPTokenizer from a local folder (never downloads)."""
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"cannot load the CLIP tokenizer from {folder}: {e}") from e


def tokenize_prompt_pair(tokenizer, prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """The original's tokenization of (negative prompt "", prompt).

    Returns:
      input_ids, attention_mask: int32 [2, L]; row 0 is "" (BOS, EOS, then padding to L, mask 0 on
      the padding), row 1 the prompt (L tokens incl. BOS/EOS, truncated at model_max_length, mask 1).
    """
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    empty = tokenizer("", padding="max_length", max_length=len(ids), truncation=True)
    input_ids = np.array([empty["input_ids"], ids], np.int32)
    attention_mask = np.array([empty["attention_mask"], [1] * len(ids)], np.int32)
    return input_ids, attention_mask


@functools.partial(jax.jit, static_argnames="text_encoder")
def encode_text(text_encoder, text_encoder_params, input_ids, attention_mask) -> jax.Array:
    """Text-encoder last hidden states [B, L, D] float32 for input_ids / attention_mask [B, L]."""
    hidden = text_encoder.apply({"params": text_encoder_params}, input_ids, attention_mask)
    return hidden.astype(jnp.float32)


def encode_prompt_pair(sd: StableDiffusion, prompt: str, text_encoder_params=None) -> tuple[jax.Array, jax.Array]:
    """(cond, uncond), each [1, L, D] float32: the prompt's and the empty negative prompt's embeddings.

    `text_encoder_params` overrides the loaded ones (e.g. with LoRA merged in). Compiles once per L.
    """
    params = sd.text_encoder_params if text_encoder_params is None else text_encoder_params
    input_ids, attention_mask = tokenize_prompt_pair(sd.tokenizer, prompt)
    hidden = encode_text(sd.text_encoder, params, jnp.asarray(input_ids), jnp.asarray(attention_mask))
    return hidden[1:], hidden[:1]
