"""A diffusers-format Stable Diffusion folder -> Flax modules + params, and the original's text conditioning.

Folder layout (as `StableDiffusionPipeline.save_pretrained` writes it; model_index.json optional):
unet/, vae/, text_encoder/, tokenizer/, scheduler/scheduler_config.json.

Text conditioning (docs/method.md#sampler, differs from the stock pipeline): the prompt is tokenized WITHOUT
padding (its own length L, BOS and EOS included, truncated at the tokenizer's maximum length), the
negative prompt "" is padded to the same L, and both run through the text encoder WITH their
attention masks. The UNet then cross-attends to L tokens.

Fixed-length form (`pad_to=T`, e.g. the tokenizer's 77): both rows are padded to T, with text masks
(prompt: L ones; "": 2 ones), and the UNet gets a context mask that lets BOTH rows attend to their
first L positions. The text encoder is causal, so its first L states do not depend on what follows;
hence the images equal those of the unpadded form, and one compilation serves every prompt.
"""

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.nn.attention import AttentionImpl
from fairdiff_jax.sd import lora, sampler
from fairdiff_jax.sd.clip_text import CLIPTextTransformer, load_clip_text
from fairdiff_jax.sd.unet import UNet2DConditionModel, load_unet
from fairdiff_jax.sd.vae import AutoencoderKLDecoder, load_vae_decoder

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


def with_lora(sd: StableDiffusion, text_encoder_lora=None, unet_lora=None) -> StableDiffusion:
    """The generator with LoRA trees (`fairdiff_jax.sd.lora`) merged into its params; None leaves a part as is.

    With a text-encoder LoRA the text encoder computes in float32 (cheap: once per prompt), so that a
    small LoRA update is not lost to the rounding of the merged kernels in bf16/fp16 (see lora.py). The
    UNet keeps its compute dtype: in bf16 the merged kernels round as a whole; load the model in float32
    to keep a UNet LoRA exact.
    """
    if text_encoder_lora is not None:
        sd = dataclasses.replace(
            sd,
            text_encoder=sd.text_encoder.clone(dtype=jnp.float32),
            text_encoder_params=lora.merge(sd.text_encoder_params, text_encoder_lora),
        )
    if unet_lora is not None:
        sd = dataclasses.replace(sd, unet_params=lora.merge(sd.unet_params, unet_lora))
    return sd


def load_tokenizer(folder: Path):
    """transformers' CLIPTokenizer from a local folder (never downloads)."""
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"cannot load the CLIP tokenizer from {folder}: {e}") from e


def tokenize_prompt_pair(
    tokenizer, prompt: str, pad_to: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The original's tokenization of (negative prompt "", prompt), optionally padded to a fixed length.

    The prompt has L tokens (BOS and EOS included, truncated at model_max_length); T = pad_to, or L
    when pad_to is None.

    Returns:
      input_ids: int32 [2, T]; row 0 is "" (BOS, EOS, padding), row 1 the prompt (then padding).
      attention_mask: int32 [2, T], the text encoder's mask: 1 on ""'s first 2 and the prompt's L tokens.
      context_mask: int32 [1, T], the UNet's cross-attention mask for both rows: 1 on the first L.
    Raises ValueError when the prompt's L tokens do not fit in pad_to.
    """
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    length = len(ids)
    total = length if pad_to is None else pad_to
    if total < length:
        raise ValueError(f"prompt {prompt!r} has {length} tokens, more than pad_to={pad_to}")
    pad = tokenizer.pad_token_id
    empty = tokenizer("", padding="max_length", max_length=total, truncation=True)
    input_ids = np.array([empty["input_ids"], ids + [pad] * (total - length)], np.int32)
    attention_mask = np.array([empty["attention_mask"], [1] * length + [0] * (total - length)], np.int32)
    context_mask = (np.arange(total) < length).astype(np.int32)[None]
    return input_ids, attention_mask, context_mask


@functools.partial(jax.jit, static_argnames="text_encoder")
def encode_text(text_encoder, text_encoder_params, input_ids, attention_mask) -> jax.Array:
    """Text-encoder last hidden states [B, L, D] float32 for input_ids / attention_mask [B, L]."""
    hidden = text_encoder.apply({"params": text_encoder_params}, input_ids, attention_mask)
    return hidden.astype(jnp.float32)


def encode_prompt_pair(
    sd: StableDiffusion, prompt: str, text_encoder_params=None, pad_to: int | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(cond, uncond, context_mask): the prompt's and the empty negative prompt's embeddings, each
    [1, T, D] float32, and the UNet's context mask [1, T] int32 for both (pass all three to the sampler).

    T = pad_to (e.g. sd.tokenizer.model_max_length: one compilation for all prompts) or the prompt's
    own token count L. `text_encoder_params` overrides the loaded ones (e.g. with LoRA merged in).
    """
    params = sd.text_encoder_params if text_encoder_params is None else text_encoder_params
    input_ids, attention_mask, context_mask = tokenize_prompt_pair(sd.tokenizer, prompt, pad_to)
    hidden = encode_text(sd.text_encoder, params, jnp.asarray(input_ids), jnp.asarray(attention_mask))
    return hidden[1:], hidden[:1], jnp.asarray(context_mask)
