"""Generate image sets: for every prompt i of a prompt file's `test_prompts`, images
`save_dir/prompt_i/img_j.jpg`, j = 0 .. num_imgs_per_prompt - 1.

    python -m fairdiff_jax.generate --model path/to/stable-diffusion-v1-5 \\
        --prompts fairdiff_jax/data/prompts/occupation.json --save_dir out/sd15 --num_imgs_per_prompt 160
    python -m fairdiff_jax.generate --demo --save_dir /tmp/demo_images --dtype float32   # tiny random model, CPU
    python -m fairdiff_jax.generate --model path/to/stable-diffusion-v1-5 --prompts ... --save_dir out/debiased \\
        --text_encoder_lora checkpoint-12600_exported/text_encoder_lora_EMA.pth       # a debiased model

The initial noise of image j of a prompt depends only on (seed, prompt text, j): a larger
--num_imgs_per_prompt keeps the first images, the batch size changes nothing, and images already on
disk are skipped, so an interrupted run resumes where it stopped (each image is written to a
temporary file and renamed, so a crash never leaves a truncated one). save_dir/generation.json records what
made the images (model and LoRA files by hash, seed, guidance, steps, size; sd/manifest.py): a folder made
otherwise is refused unless --overwrite. A non-finite or one-colour image (NaN weights) stops the run, exit 1. Sampling: DPM-Solver++(2M),
classifier-free guidance with the empty negative prompt, the paper's text conditioning (docs/method.md#sampler) in
its fixed-length form (padded to the tokenizer's 77 tokens with masks: same images, one compilation).
LoRA files are the original's `.pth` format (`text_encoder_lora[_EMA].pth`, `unet_lora[_EMA].pth`, as
the original releases them and as `fairdiff_jax.sd.lora.save_original` writes them).
"""

import argparse
import functools
import hashlib
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from fairdiff_jax import prompts as prompt_files
from fairdiff_jax.eval import face_analysis
from fairdiff_jax.nn.attention import ATTENTION_IMPLS
from fairdiff_jax.sd import lora, manifest, sampler
from fairdiff_jax.sd.loader import (
    StableDiffusion,
    encode_prompt_pair,
    load_stable_diffusion,
    with_lora,
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# --demo without --prompts: words the tiny model's tokenizer knows whole.
DEMO_PROMPTS = ("a photo of the face of a doctor, a person", "a photo of the face of a nurse, a person")


def image_path(save_dir: Path, prompt_index: int, image_index: int) -> Path:
    return save_dir / f"prompt_{prompt_index}" / f"img_{image_index}.jpg"


def prompt_key(seed: int, prompt: str) -> jax.Array:
    """The PRNG key of a prompt's images: the seed folded with a stable 31-bit hash of the prompt text."""
    digest = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:4], "little") & 0x7FFFFFFF
    return jax.random.fold_in(jax.random.key(seed), digest)


@functools.partial(jax.jit, static_argnums=2)
def _noise_for_indices(key: jax.Array, indices: jax.Array, latent_shape: tuple[int, ...]) -> jax.Array:
    return jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(key, j), latent_shape, jnp.float32))(indices)


def initial_noise(seed: int, prompt: str, indices: Sequence[int], latent_shape: tuple[int, ...]) -> jax.Array:
    """Initial latents [len(indices), *latent_shape] float32; row k depends only on (seed, prompt, indices[k])."""
    return _noise_for_indices(prompt_key(seed, prompt), jnp.asarray(indices, jnp.int32), tuple(latent_shape))


def save_jpeg(image: np.ndarray, path: Path) -> None:
    """image [H, W, 3] float in [-1, 1] -> JPEG (PIL's default quality), via a temporary file and a rename."""
    pixels = np.round((np.clip(image, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(pixels).save(tmp, format="JPEG")
    os.replace(tmp, path)


class GenerationError(RuntimeError):
    """The model drew images that are not pictures (non-finite or of one colour); the message names them."""


def check_images(images: np.ndarray, save_dir: Path, prompt_index: int, indices: Sequence[int]) -> None:
    """Raises GenerationError when any of images [N, H, W, 3] is not finite or of one colour."""
    bad = face_analysis.degenerate_images(images)
    if bad.any():
        names = [image_path(save_dir, prompt_index, j).name for j, b in zip(indices, bad) if b]
        finite = bool(np.isfinite(images[bad]).all())
        raise GenerationError(
            f"{save_dir / f'prompt_{prompt_index}'}: {len(names)} of {len(indices)} images "
            f"{'of one colour' if finite else 'not finite'} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}): "
            "the model or LoRA weights are broken (NaN?); nothing was written for them")


def generate_images(
    sd: StableDiffusion,
    prompts: Sequence[str],
    save_dir: str | Path,
    num_imgs_per_prompt: int,
    batch_size: int,
    num_steps: int = 30,
    guidance_scale: float = 7.5,
    seed: int = 0,
    *,
    model_files: manifest.ModelFiles,
    overwrite: bool = False,
) -> int:
    """Writes every missing `save_dir/prompt_i/img_j.jpg`; returns how many images it generated.

    `model_files` (the files `sd` was loaded from) go into save_dir's manifest (sd/manifest.py): images already
    there are reused only when the manifest says the same files and settings made them (StaleImagesError
    otherwise, unless `overwrite`). A batch with a non-finite or one-colour image raises GenerationError: NaN
    weights draw black images that would otherwise be evaluated as if they were pictures.

    Every sampling call has the same batch size (the last batch of a prompt is filled up with the
    noise of further indices, whose images are discarded) and the same text length (the tokenizer's
    maximum, with masks), so the sampler compiles once.
    """
    save_dir = Path(save_dir)
    made_by = manifest.recipe(model_files, seed=seed, guidance=guidance_scale, steps=num_steps, latent_shape=sd.latent_shape)
    manifest.claim_folder(save_dir, made_by, prompts, overwrite)
    batch_size = min(batch_size, num_imgs_per_prompt)
    schedule = sd.schedule(num_steps)
    todo = {
        i: [j for j in range(num_imgs_per_prompt) if not image_path(save_dir, i, j).exists()] for i in range(len(prompts))
    }
    total = len(prompts) * num_imgs_per_prompt
    generated = 0
    with tqdm(total=total, initial=total - sum(map(len, todo.values())), unit="img", desc="generating") as progress:
        for i, prompt in enumerate(prompts):
            if not todo[i]:
                continue
            image_path(save_dir, i, 0).parent.mkdir(parents=True, exist_ok=True)
            cond, uncond, context_mask = encode_prompt_pair(sd, prompt, pad_to=sd.tokenizer.model_max_length)
            for start in range(0, len(todo[i]), batch_size):
                indices = todo[i][start : start + batch_size]
                filled = indices + list(range(num_imgs_per_prompt, num_imgs_per_prompt + batch_size - len(indices)))
                noise = initial_noise(seed, prompt, filled, sd.latent_shape)
                images = sampler.sample_images(
                    sd.unet, sd.unet_params, sd.vae, sd.vae_params, schedule, noise, cond, uncond, guidance_scale, context_mask
                )
                images = np.asarray(images)[: len(indices)]
                check_images(images, save_dir, i, indices)
                for j, image in zip(indices, images):
                    save_jpeg(image, image_path(save_dir, i, j))
                generated += len(indices)
                progress.update(len(indices))
    return generated


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fairdiff_jax.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", type=Path, help="diffusers-format Stable Diffusion folder (e.g. SD v1-5)")
    model.add_argument("--demo", action="store_true", help="build a tiny random-weight model in a temporary folder and use it")
    parser.add_argument("--prompts", type=Path, help="JSON prompt file; its `test_prompts` are generated (optional with --demo)")
    parser.add_argument("--save_dir", type=Path, required=True)
    parser.add_argument("--num_imgs_per_prompt", type=int, default=160)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="DPM-Solver++(2M) steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true",
                        help="delete images in --save_dir that another model, LoRA or setting made (default: refuse)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16", help="frozen model weights and compute")
    parser.add_argument("--attention_impl", choices=ATTENTION_IMPLS, default="xla")
    lora_help = (
        "LoRA file in the original's .pth format (the original's release or lora.save_original); "
        "diffusers/PEFT .safetensors files are not read"
    )
    parser.add_argument("--text_encoder_lora", type=Path, help=f"text-encoder {lora_help} (the text encoder then runs in float32)")
    parser.add_argument(
        "--unet_lora", type=Path, help=f"UNet {lora_help} (merged into the --dtype kernels: use float32 to keep it exact)"
    )
    return parser


def load_lora_files(sd: StableDiffusion, text_encoder_lora: Path | None, unet_lora: Path | None) -> StableDiffusion:
    """`sd` with the given .pth LoRA files merged in. Raises ValueError (WeightLoadError included) or
    FileNotFoundError naming the file and what does not fit."""
    trees = {}
    for model, path, params in (
        ("text_encoder", text_encoder_lora, sd.text_encoder_params),
        ("unet", unet_lora, sd.unet_params),
    ):
        if path is None:
            continue
        if path.suffix == ".safetensors":
            raise ValueError(
                f"{path}: diffusers/PEFT .safetensors LoRA files are not supported; pass the .pth file "
                "(the original's format, written by fairdiff_jax.sd.lora.save_original)"
            )
        trees[model] = lora.load_original(path, params, model)
    return with_lora(sd, trees.get("text_encoder"), trees.get("unet"))


@contextmanager
def model_folder(args: argparse.Namespace) -> Iterator[Path]:
    """--model as given, or with --demo a freshly built tiny model (deterministic: seed 0) deleted afterwards."""
    if not args.demo:
        yield args.model
        return
    from fairdiff_jax.sd.tiny import build_tiny_sd

    with tempfile.TemporaryDirectory(prefix="fairdiff_tiny_sd_") as tmp:
        yield build_tiny_sd(Path(tmp) / "model")


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Inputs are read and checked before anything compiles; their errors are one line, no traceback.
    if args.prompts is None and not args.demo:
        parser.error("--prompts is required (unless --demo)")
    for name in ("num_imgs_per_prompt", "batch_size", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    try:
        prompts = DEMO_PROMPTS if args.prompts is None else prompt_files.load_test_prompts(args.prompts)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    with model_folder(args) as folder:
        try:
            sd = load_stable_diffusion(folder, DTYPES[args.dtype], attention_impl=args.attention_impl)
            sd = load_lora_files(sd, args.text_encoder_lora, args.unet_lora)
        except (OSError, ValueError) as e:
            parser.error(str(e))
        files = manifest.ModelFiles(folder, args.dtype, {"text_encoder": args.text_encoder_lora, "unet": args.unet_lora})
        try:
            n = generate_images(sd, prompts, args.save_dir, args.num_imgs_per_prompt, args.batch_size, args.steps,
                                args.guidance, args.seed, model_files=files, overwrite=args.overwrite)
        except manifest.StaleImagesError as e:
            parser.error(str(e))
        except GenerationError as e:
            parser.exit(1, f"error: {e}\n")
    print(f"{n} images generated, {len(prompts) * args.num_imgs_per_prompt - n} already there, in {args.save_dir}", file=sys.stderr)
