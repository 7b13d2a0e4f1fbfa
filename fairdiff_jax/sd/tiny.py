"""A tiny random-weight Stable Diffusion folder in diffusers format, for demos, tests and benchmarks.

Built with the PyTorch classes (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer,
DPMSolverMultistepScheduler) and `save_pretrained`, so the folder has exactly the layout of a real
SD v1-5 checkpoint and every block type of its UNet (cross-attention down/up blocks, plain
down/up blocks, cross-attention mid block). 16x16x4 latents decode to 32x32 images. Deterministic
given the seed; no download: the tokenizer's vocabulary is written here (byte-level BPE as CLIP's,
with merges for a few prompt words).

    python -m fairdiff_jax.sd.tiny /tmp/tiny_sd      # builds the folder
"""

import argparse
import json
from pathlib import Path

LATENT_SIZE = 16
IMAGE_SIZE = 32
TEXT_WIDTH = 32

UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_WIDTH,
    attention_head_dim=4,  # as in SD v1-5's config, this is the number of heads
    norm_num_groups=8,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
    scaling_factor=0.18215,
)
TEXT_ENCODER_CONFIG = dict(
    hidden_size=TEXT_WIDTH,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=TEXT_WIDTH,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    final_sigmas_type="sigma_min",  # the paper's sampler (docs/method.md#sampler)
)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Words that get whole-word tokens; anything else falls back to letters.
_VOCAB_WORDS = (
    "a", "an", "of", "the", "photo", "face", "person", "portrait", "doctor", "nurse", "teacher",
    "chef", "pilot", "engineer", "ceo", "smiling", "playing", "sport", "tennis", "with", "in",
)


def _byte_symbols() -> list[str]:
    """Byte-level BPE's printable stand-in for each byte 0..255 (printable Latin-1 bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def tokenizer_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style byte-level BPE vocabulary: 256 byte symbols, their word-final '</w>' forms,
    left-to-right merges that assemble each word of `_VOCAB_WORDS`, then BOS and EOS."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in _VOCAB_WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        merged = parts[0]
        for part in parts[1:]:
            if (merged, part) not in merges:
                merges.append((merged, part))
                tokens.append(merged + part)
            merged += part
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}, merges


def build_tokenizer():
    """An offline transformers CLIPTokenizer over `tokenizer_vocab_and_merges()` (77 tokens max, pad = EOS)."""
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_torch_pipeline(
    seed: int = 0,
    unet_config: dict = UNET_CONFIG,
    vae_config: dict = VAE_CONFIG,
    text_encoder_config: dict = TEXT_ENCODER_CONFIG,
):
    """A random-weight diffusers StableDiffusionPipeline (PyTorch, float32, no safety checker) of the
    given architecture, with the offline tokenizer and the original's scheduler. Same seed, same weights."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**vae_config)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            **{"vocab_size": len(tokenizer), **text_encoder_config},
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=DPMSolverMultistepScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sd(folder: str | Path, seed: int = 0) -> Path:
    """Writes the tiny random-weight SD folder (model_index.json, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/) to `folder` and returns its path. Same seed, same weights."""
    folder = Path(folder)
    build_torch_pipeline(seed).save_pretrained(folder)
    # tokenizer.json is all transformers 5 needs; vocab.json + merges.txt are what SD v1-5 ships and
    # what older (slow) CLIP tokenizers read.
    vocab, merges = tokenizer_vocab_and_merges()
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where to write the model folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_sd(args.folder, args.seed))


if __name__ == "__main__":
    main()
