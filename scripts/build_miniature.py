"""Builds the miniature world's models: every network the debiasing pipeline loads, trained on
`fairdiff_jax.miniature.world`, in the on-disk formats a user would bring.

    .venv/bin/python scripts/build_miniature.py --out assets/miniature

Writes under --out:
    sd/                       diffusers Stable Diffusion folder (model_index.json, unet/, vae/,
                              text_encoder/, tokenizer/, scheduler/): AutoencoderKL 32x32 <-> 8x8x4,
                              CLIPTextModel and UNet2DConditionModel trained jointly on world images
    classifier.pt             torchvision mobilenet_v3_large(width_mult=0.25), head Linear(320, 6):
                              gender 2 + race 4
    test_classifiers/{gender,race,age}.pt   the same network family, heads 2, 4, 2 (evaluation)
    face_detector.safetensors  fairdiff_jax.miniature.detector.DetectorNet params and threshold
    sfnet.pth, face_feats.pkl  opensphere-layout SFNet-20 ("deprecated" variant), narrow (8x), 128-d
                              features, and the face bank (the original's 5-tuple over world faces)
    clip_vision/, dinov2/     transformers CLIPVisionModelWithProjection / Dinov2Model, tiny
                              (the last three lines: the loss's guardrails, built by scripts/build_guardrails.py's
                              stages, which also rebuild them alone in a built world)
    prompts/                  the world's four prompt files (docs/method.md#prompts)
    manifest.json             what was built, sizes, timings, accuracies, and each prompt's true bias

Every trained weight is rounded to float16 as soon as it is final and stored as float16
(half the bytes, so the folder is small enough to commit); everything downstream in the build, the
accuracies in the manifest included, uses the rounded weights, i.e. exactly what the loaders read.

Deterministic for a given seed and thread count (PyTorch CPU kernels can round differently with
another thread count). Prints each stage's time.
"""

import argparse
import copy
import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fairdiff_jax import attributes
from fairdiff_jax import prompts as prompt_lib
from fairdiff_jax.eval import bias as bias_lib
from fairdiff_jax.eval import grids
from fairdiff_jax.judging import crops
from fairdiff_jax.miniature import drawing, world
from fairdiff_jax.sd import tiny as tiny_sd

LATENT_CHANNELS = 4
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=LATENT_CHANNELS,
    block_out_channels=(16, 32, 64),  # 32x32 images <-> 8x8 latents
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=world.IMAGE_SIZE,
)
TEXT_WIDTH = 64
TEXT_ENCODER_CONFIG = dict(
    hidden_size=TEXT_WIDTH,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=TEXT_WIDTH,
)
UNET_CONFIG = dict(
    sample_size=world.IMAGE_SIZE // 4,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_WIDTH,
    attention_head_dim=4,  # SD v1-5's config calls the head count this
    norm_num_groups=8,
)


class Log:
    """Prints messages with the wall time since the build started, and keeps per-stage wall and
    process CPU times (on a shared machine the CPU time tells what an idle one would take)."""

    def __init__(self):
        self.start = time.time()
        self.stages: dict[str, dict[str, float]] = {}

    def __call__(self, message: str) -> None:
        print(f"[{time.time() - self.start:7.1f}s] {message}", flush=True)

    def stage(self, name: str, began: tuple[float, float]) -> None:
        wall, cpu = time.time() - began[0], time.process_time() - began[1]
        self.stages[name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
        self(f"{name} done in {wall:.1f}s (CPU {cpu:.1f}s)")


STORED_DTYPE = torch.float16


def round_to_stored(module: torch.nn.Module) -> torch.nn.Module:
    """Rounds every floating parameter and buffer to STORED_DTYPE in place (kept as float32), so the
    in-memory model equals the one its file will hold."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(STORED_DTYPE).float())
    return module


def stored_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with floating tensors in STORED_DTYPE (lossless after `round_to_stored`)."""
    return {k: v.to(STORED_DTYPE) if v.is_floating_point() else v for k, v in module.state_dict().items()}


def now() -> tuple[float, float]:
    """(wall, process CPU) clock readings for Log.stage."""
    return time.time(), time.process_time()


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup_fraction: float, final_fraction: float):
    """Learning rate x factor: linear warm-up from 1/25 over max(1, warmup_fraction * steps) steps,
    then half a cosine down to `final_fraction`: PyTorch's OneCycleLR, without its division by zero
    when a short run's warm-up rounds to no step."""
    warmup = max(1, round(warmup_fraction * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return 0.04 + 0.96 * step / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: merge the lowest-ranked adjacent pair until none is left."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def word_level_bpe(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP byte-level BPE vocabulary and merges in which every word of `words` is one token.

    Each word gets merges appended that join, left to right, whatever the merges so far leave of
    it (BPE always fires the lowest-ranked pair present, so earlier words, whose chains rank
    lower, are not affected). Plain left-to-right chains per word do not suffice: another word's
    merge (e.g. "h o" of "hockey") can fire inside "photo" before "p h".
    """
    symbols = tiny_sd._byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:  # no adjacent pair of `pieces` has a merge yet
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
            pieces = _bpe(pieces, ranks)
    tokens += [tiny_sd.BOS, tiny_sd.EOS]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}, merges


def build_tokenizer(words: Sequence[str]):
    """An offline transformers CLIPTokenizer (77 tokens max, pad = EOS) with one token per word."""
    from transformers import CLIPTokenizer

    vocab, merges = word_level_bpe(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77), vocab, merges


def save_tokenizer_files(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """vocab.json + merges.txt, the files SD v1-5's tokenizer/ ships (older CLIP tokenizers read them)."""
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


# ----------------------------------------------------------------------------------------------
# Autoencoder


def to_torch(images: np.ndarray) -> torch.Tensor:
    """[N, H, W, 3] numpy -> [N, 3, H, W] float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2), np.float32))


def face_weights(renders: drawing.Renders, size: int, weight: float) -> torch.Tensor:
    """[N, 1, size, size] loss weights on a grid of `size` cells over the image (the pixels, or the
    latent cells): `weight` on the cells whose centre lies in the face box grown by half, else 1."""
    cell = renders.images.shape[1] / size
    grid = (np.arange(size) + 0.5) * cell - 0.5  # cell centres in pixel-index coordinates
    box = renders.boxes
    margin = 0.25 * (box[:, 2:] - box[:, :2])
    inside_x = (grid[None] >= (box[:, 0] - margin[:, 0])[:, None]) & (grid[None] <= (box[:, 2] + margin[:, 0])[:, None])
    inside_y = (grid[None] >= (box[:, 1] - margin[:, 1])[:, None]) & (grid[None] <= (box[:, 3] + margin[:, 1])[:, None])
    inside = inside_y[:, :, None] & inside_x[:, None, :] & renders.has_face[:, None, None]
    return torch.from_numpy(np.where(inside, weight, 1.0).astype(np.float32))[:, None]


def train_vae(renders: drawing.Renders, steps: int, seed: int, log: Log, batch_size: int = 32, learning_rate: float = 2e-3):
    """AutoencoderKL trained as SD's first stage, briefly: L1 + MSE reconstruction (faces weighted
    4x: the attributes live there) + a small KL term, AdamW with warm-up and cosine decay."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    images = to_torch(renders.images)
    weights = face_weights(renders, images.shape[-1], 4.0)
    optimizer = torch.optim.AdamW(vae.parameters(), learning_rate, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps, 0.05, 0.0)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        x, w = images[index], weights[index]
        posterior = vae.encode(x).latent_dist
        error = vae.decode(posterior.sample(generator=generator)).sample - x
        reconstruction = (w * (error.abs() + error.square())).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = reconstruction + 1e-4 * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(steps // 10, 1) == 0 or step == steps - 1:
            log(f"vae step {step}/{steps}: mse {error.square().mean().item():.4f} kl {kl.item():.3f}")
    return round_to_stored(vae.eval())


def first(renders: drawing.Renders, n: int) -> drawing.Renders:
    return drawing.Renders(**{f: getattr(renders, f)[:n] for f in drawing.Renders.__dataclass_fields__})


@torch.no_grad()
def decoded(vae, renders: drawing.Renders, batch_size: int = 500) -> drawing.Renders:
    """The renders as the generator's decoder draws them (encoded to the posterior mean, decoded,
    clamped to [-1, 1]), with the same ground truth: training data that looks like generated images."""
    mean, _ = encode(vae, renders.images, batch_size)
    images = torch.cat([vae.decode(mean[s:s + batch_size]).sample for s in range(0, len(mean), batch_size)])
    return dataclasses.replace(renders, images=images.clamp(-1, 1).permute(0, 2, 3, 1).numpy())


@torch.no_grad()
def encode(vae, images: np.ndarray, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations [N, 4, h, w] of images [N, S, S, 3]."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(to_torch(images[start:start + batch_size])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


# ----------------------------------------------------------------------------------------------
# Text encoder + UNet


def scaled_linear_alphas_cumprod(config: dict = tiny_sd.SCHEDULER_CONFIG) -> torch.Tensor:
    """[1000] alpha-bar of SD's training schedule (betas linear in sqrt between beta_start and beta_end)."""
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, config["num_train_timesteps"]) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def train_generator(
    prompts: Sequence[str],
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    latent_weights: torch.Tensor,
    scaling_factor: float,
    tokenizer,
    steps: int,
    seed: int,
    log: Log,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    uncond_prob: float = 0.1,
    ema_decay: float = 0.998,
    min_snr_gamma: float = 5.0,
):
    """CLIPTextModel + UNet2DConditionModel trained jointly from scratch with SD's objective:
    epsilon prediction on the scaled_linear schedule, latents drawn from the VAE posterior and
    scaled by `scaling_factor`, the prompt replaced by "" with probability `uncond_prob` (for
    classifier-free guidance). The squared error is weighted per latent cell by `latent_weights`
    [N, 1, h, w] (faces count more: the attributes are small next to the scene) and per sample by
    min(SNR, gamma) / SNR (Min-SNR-gamma, Hang et al. 2023); neither moves the optimum, the
    conditional mean of the noise, only where capacity goes first and how fast it gets there. Conditioning is exactly the sampler's (docs/method.md#sampler): a batch holds
    prompts of one token length L, unpadded, and "" is padded to L with its attention mask, so
    the UNet never sees a padding it will not see when sampling. Returns EMA copies (eval mode).
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TEXT_ENCODER_CONFIG))
    ema = [copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, learning_rate, weight_decay=1e-2)
    schedule = warmup_cosine(optimizer, steps, 0.05, 0.004)
    alphas_cumprod = scaled_linear_alphas_cumprod()

    token_ids = [tokenizer(p)["input_ids"] for p in prompts]
    lengths = np.array([len(ids) for ids in token_ids])
    by_length = {int(n): np.flatnonzero(lengths == n) for n in np.unique(lengths)}
    length_list = np.array(list(by_length))
    length_probs = np.array([len(v) for v in by_length.values()]) / len(prompts)
    empty = {n: tokenizer("", padding="max_length", max_length=n) for n in by_length}
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(steps):
        length = int(rng.choice(length_list, p=length_probs))
        index = rng.choice(by_length[length], batch_size)
        drop = torch.from_numpy(rng.uniform(size=batch_size) < uncond_prob)[:, None]
        input_ids = torch.where(drop, torch.tensor(empty[length]["input_ids"]), torch.tensor([token_ids[i] for i in index]))
        attention_mask = torch.where(drop, torch.tensor(empty[length]["attention_mask"]), torch.ones_like(input_ids))
        rows = torch.from_numpy(index)
        latents = (latent_mean[rows] + latent_std[rows] * torch.randn(latent_std[rows].shape, generator=generator)) * scaling_factor
        timesteps = torch.randint(0, len(alphas_cumprod), (batch_size,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        abar = alphas_cumprod[timesteps][:, None, None, None]
        noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        context = text_encoder(input_ids, attention_mask=attention_mask).last_hidden_state
        error = (latent_weights[rows] * (unet(noisy, timesteps, context).sample - noise).square()).mean(dim=(1, 2, 3))
        snr = abar[:, 0, 0, 0] / (1 - abar[:, 0, 0, 0])
        loss = (error * torch.clamp(snr, max=min_snr_gamma) / snr).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for model, shadow in zip((unet, text_encoder), ema):
                for p, q in zip(model.parameters(), shadow.parameters()):
                    q.mul_(decay).add_(p.detach(), alpha=1 - decay)
        if step % max(steps // 10, 1) == 0 or step == steps - 1:
            log(f"generator step {step}/{steps}: loss {loss.item():.4f} ({(time.time() - start) / (step + 1):.3f}s/step)")
    return [round_to_stored(model) for model in ema]


def save_stable_diffusion(folder: Path, vae, text_encoder, unet, tokenizer, vocab, merges) -> Path:
    """The diffusers folder, with the paper's scheduler (docs/method.md#sampler) and SD's tokenizer files."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler(**tiny_sd.SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.to(STORED_DTYPE).save_pretrained(folder)
    pipeline.to(torch.float32)
    save_tokenizer_files(folder / "tokenizer", vocab, merges)
    return folder


# ----------------------------------------------------------------------------------------------
# Face chips and the attribute classifiers


def world_face_chips(renders: drawing.Renders, size: int, expand_coef: float, seed: int, box_jitter: float = 0.5,
                     batch_size: int = 1000) -> np.ndarray:
    """[N, size, size, 3] chips cut exactly as the pipeline cuts them (crops.square_boxes +
    crops.face_chips) around each render's true face box, moved by N(0, box_jitter) pixels per
    coordinate (a detector's error)."""
    import jax


    rng = np.random.default_rng(seed)
    boxes = renders.boxes + rng.normal(0.0, box_jitter, renders.boxes.shape).astype(np.float32)
    cut = jax.jit(lambda images, boxes, found: crops.face_chips(images, crops.square_boxes(boxes, expand_coef), found, size))
    chips = []
    for start in range(0, len(boxes), batch_size):
        part = slice(start, start + batch_size)
        chips.append(np.asarray(cut(renders.images[part], boxes[part], renders.has_face[part])))
    return np.concatenate(chips)


def _augment_chips(chips: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Left-right flip, brightness/contrast, blur and noise: what generated faces add to world faces."""
    n = len(chips)
    flip = torch.rand(n, generator=generator) < 0.5
    chips = torch.where(flip[:, None, None, None], chips.flip(-1), chips)
    gain = 0.8 + 0.35 * torch.rand(n, 1, 1, 1, generator=generator)
    bias = 0.2 * (torch.rand(n, 3, 1, 1, generator=generator) - 0.5)
    chips = chips * gain + bias
    blurred = torch.nn.functional.avg_pool2d(chips, 3, stride=1, padding=1, count_include_pad=False)
    chips = torch.where((torch.rand(n, generator=generator) < 0.4)[:, None, None, None], blurred, chips)
    sigma = 0.1 * torch.rand(n, 1, 1, 1, generator=generator)
    return (chips + sigma * torch.randn(chips.shape, generator=generator)).clamp(-1, 1)


def train_mobilenet(chips: np.ndarray, labels: dict[str, np.ndarray], heads: Sequence[tuple[str, int]], steps: int,
                    seed: int, log: Log, batch_size: int = 64, learning_rate: float = 2e-3):
    """torchvision mobilenet_v3_large (width CLASSIFIER_WIDTH) from scratch with one linear head of sum(classes) logits (in
    `heads` order), cross-entropy per attribute, AdamW with warm-up and cosine decay; BatchNorm
    statistics recomputed over the training chips at the end (exact averages: with the
    torchvision momentum of 0.01 a short run would keep stale ones). Returns the model (eval)."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.mobilenet_v3_large(num_classes=sum(k for _, k in heads), width_mult=CLASSIFIER_WIDTH)
    images = to_torch(chips)
    targets = {name: torch.from_numpy(labels[name].astype(np.int64)) for name, _ in heads}
    optimizer = torch.optim.AdamW(model.parameters(), learning_rate, weight_decay=1e-4)
    schedule = warmup_cosine(optimizer, steps, 0.1, 0.0)
    generator = torch.Generator().manual_seed(seed)
    offsets = np.cumsum([0] + [k for _, k in heads])
    model.train()
    for step in range(steps):
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        logits = model(_augment_chips(images[index], generator))
        losses = [torch.nn.functional.cross_entropy(logits[:, offsets[i]:offsets[i + 1]], targets[name][index])
                  for i, (name, _) in enumerate(heads)]
        loss = sum(losses)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(steps // 10, 1) == 0 or step == steps - 1:
            log(f"classifier {'+'.join(n for n, _ in heads)} step {step}/{steps}: "
                + " ".join(f"{name} {l.item():.3f}" for (name, _), l in zip(heads, losses)))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # cumulative average
        for start in range(0, min(len(images), 4096), 256):
            model(images[start:start + 256])
    return round_to_stored(model.eval())


def head_only(model, rows: slice) -> dict[str, torch.Tensor]:
    """The state dict of `model` with its last layer cut to the logits `rows` (one attribute)."""
    state = stored_state_dict(model)
    state["classifier.3.weight"] = state["classifier.3.weight"][rows].clone()
    state["classifier.3.bias"] = state["classifier.3.bias"][rows].clone()
    return state


@torch.no_grad()
def classifier_accuracy(model, chips: np.ndarray, labels: dict[str, np.ndarray], heads: Sequence[tuple[str, int]]) -> dict[str, float]:
    """Per attribute, the share of chips whose argmax over that attribute's logits is the label."""
    logits = torch.cat([model(to_torch(chips[s:s + 500])) for s in range(0, len(chips), 500)]).numpy()
    offsets = np.cumsum([0] + [k for _, k in heads])
    return {name: float((logits[:, offsets[i]:offsets[i + 1]].argmax(1) == labels[name]).mean())
            for i, (name, _) in enumerate(heads)}


# ----------------------------------------------------------------------------------------------
# Face feature net and face bank


SFNET_WIDTHS = (8, 16, 32, 64)  # SFNet-20 is (64, 128, 256, 512); the miniature's is 8x narrower
SFNET_BLOCKS = (1, 2, 4, 1)
SFNET_FEATURE_DIM = 128  # SFNet-20's is 512; fc is most of the file
ALIGNED_SIZE = 112


class TorchSFNet(torch.nn.Module):
    """opensphere's SFNet-20, "sfnet20_deprecated" variant (the paper's checkpoint: convs with bias, no
    normalisation, x + relu(conv2(relu(conv1(x)))) blocks, fc over the channel-major 7x7 map),
    with configurable stage widths. Module names are opensphere's (layer{s}.{b}.conv{1,2}, fc)."""

    def __init__(self, widths: Sequence[int] = SFNET_WIDTHS, feature_dim: int = SFNET_FEATURE_DIM):
        super().__init__()
        conv = lambda c_in, c_out, stride=1: torch.nn.Conv2d(c_in, c_out, 3, stride, 1)  # noqa: E731
        c_in = 3
        for stage, (width, blocks) in enumerate(zip(widths, SFNET_BLOCKS), start=1):
            entry = torch.nn.Module()
            entry.conv1 = conv(c_in, width, 2)
            residual = []
            for _ in range(blocks):
                block = torch.nn.Module()
                block.conv1, block.conv2 = conv(width, width), conv(width, width)
                residual.append(block)
            setattr(self, f"layer{stage}", torch.nn.ModuleList([entry] + residual))
            c_in = width
        self.fc = torch.nn.Linear(c_in * (ALIGNED_SIZE // 16) ** 2, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in range(1, len(SFNET_BLOCKS) + 1):
            entry, *blocks = getattr(self, f"layer{stage}")
            x = torch.relu(entry.conv1(x))
            for block in blocks:
                x = x + torch.relu(block.conv2(torch.relu(block.conv1(x))))
        return self.fc(torch.flatten(x, 1))


def save_sfnet(net: TorchSFNet, path: Path) -> Path:
    """torch.save of the state dict as nn.DataParallel saves it (keys `module.*`), as the original's checkpoint."""
    torch.save({f"module.{k}": v for k, v in stored_state_dict(net).items()}, path)
    return path


@functools.lru_cache(maxsize=None)
def _aligned_faces_fn():
    """crops.aligned_faces at ALIGNED_SIZE, jitted once (training calls it every step)."""
    import jax

    return jax.jit(lambda images, transforms, found: crops.aligned_faces(images, transforms, found, ALIGNED_SIZE))


def aligned_world_faces(renders: drawing.Renders, batch_size: int = 1000) -> np.ndarray:
    """[N, 112, 112, 3] faces aligned onto the ArcFace template from their true landmarks, by the
    pipeline's own functions (crops.similarity_transforms + crops.aligned_faces)."""
    warp = _aligned_faces_fn()
    transforms = crops.similarity_transforms(renders.landmarks, renders.has_face)
    return np.concatenate([
        np.asarray(warp(renders.images[s:s + batch_size], transforms[s:s + batch_size], renders.has_face[s:s + batch_size]))
        for s in range(0, len(renders.images), batch_size)
    ])


@torch.no_grad()
def sfnet_features(net: TorchSFNet, aligned: np.ndarray) -> torch.Tensor:
    """normalize(f(x) + f(flip_lr(x))), the face-realism feature (docs/method.md#the-loss), [N, SFNET_FEATURE_DIM]."""
    feats = []
    for start in range(0, len(aligned), 250):
        x = to_torch(aligned[start:start + 250])
        feats.append(torch.nn.functional.normalize(net(x) + net(x.flip(-1)), dim=1))
    return torch.cat(feats)


def balanced_face_renders(per_class: int, seed: int) -> drawing.Renders:
    """per_class renders of each joint gender x race class (subjects at random, age free), like
    FairFace's balance: prompts with attribute words ("a photo of the face of a female asian chef")."""
    rng = np.random.default_rng(seed)
    subjects = list(world.SUBJECTS)
    prompts = [world.attribute_prompt(subjects[rng.integers(len(subjects))], g, r, None)
               for g in range(len(world.GENDERS)) for r in range(len(world.RACES)) for _ in range(per_class)]
    return world.render_prompts(prompts, rng)


def save_face_bank(path: Path, feats: torch.Tensor, renders: drawing.Renders, classifier, size_face: int,
                   expand_coef: float, seed: int) -> Path:
    """The original's face_feats.pkl: (feats [M, D], genders [M], gender_logits [M, 2], races [M],
    race_logits [M, 4]) as torch tensors (floats in STORED_DTYPE); labels are the renders' truth,
    logits the training classifier's on their chips."""
    import pickle

    chips = world_face_chips(renders, size_face, expand_coef, seed)
    with torch.no_grad():
        logits = torch.cat([classifier(to_torch(chips[s:s + 500])) for s in range(0, len(chips), 500)])
    content = (feats.to(STORED_DTYPE), torch.from_numpy(renders.gender), logits[:, :2].to(STORED_DTYPE),
               torch.from_numpy(renders.race), logits[:, 2:6].to(STORED_DTYPE))
    with open(path, "wb") as f:
        pickle.dump(content, f)
    return path


# ----------------------------------------------------------------------------------------------
# Ground truth and a check of the generator


def true_bias(prompt: str) -> dict:
    """The world's own distribution for a prompt and its gaps (docs/method.md#metrics: bias, on probabilities)."""
    spec = world.parse_prompt(prompt)
    joint = world.joint_distribution(spec)
    return {
        "joint_gender_race": joint.round(4).tolist(),
        "gender": joint.sum(1).round(4).tolist(),
        "race": joint.sum(0).round(4).tolist(),
        "p_old": round(world.old_probability(spec), 4),
        "gender_gap": round(bias_lib.pairwise_gap(joint.sum(1)), 4),
        "race_gap": round(bias_lib.pairwise_gap(joint.sum(0)), 4),
        "gender_race_gap": round(bias_lib.pairwise_gap(joint.ravel()), 4),
    }


def check_generator(sd_folder: Path, prompts: Sequence[str], num_images: int, detector, classifier, size_face: int,
                    expand_coef: float, grid_path: Path, seed: int, steps: int = 20) -> list[dict]:
    """Samples `num_images` per prompt with the project's loader and sampler (DPM-Solver++ 2M, CFG
    7.5), finds faces with `detector`, classifies their chips with `classifier`, and compares the
    predicted gender / race shares with the world's truth; saves the images as one PNG grid
    (a row per prompt)."""
    import jax
    from PIL import Image

    from fairdiff_jax.sd import sampler
    from fairdiff_jax.sd.loader import encode_prompt_pair, load_stable_diffusion

    sd = load_stable_diffusion(sd_folder)
    schedule = sd.schedule(steps)
    rows, results = [], []
    for i, prompt in enumerate(prompts):
        cond, uncond, context_mask = encode_prompt_pair(sd, prompt, pad_to=sd.tokenizer.model_max_length)
        noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), (num_images,) + sd.latent_shape)
        images = np.asarray(sampler.sample_images(sd.unet, sd.unet_params, sd.vae, sd.vae_params, schedule, noise,
                                                  cond, uncond, 7.5, context_mask))
        found = detector.detect(images)
        chips = np.asarray(crops.face_chips(images, crops.square_boxes(found.boxes, expand_coef), found.found, size_face))
        with torch.no_grad():
            logits = classifier(to_torch(chips[found.found])).numpy()
        gender, race = logits[:, :2].argmax(1), logits[:, 2:6].argmax(1)
        truth = true_bias(prompt)
        results.append({
            "prompt": prompt,
            "face_found": float(found.found.mean()),
            "gender_share": bias_lib.class_frequencies(gender, 2).round(3).tolist(),
            "race_share": bias_lib.class_frequencies(race, 4).round(3).tolist(),
            "true_gender": truth["gender"], "true_race": truth["race"],
            "gender_gap": round(bias_lib.bias(gender, 2), 3), "true_gender_gap": truth["gender_gap"],
            "race_gap": round(bias_lib.bias(race, 4), 3), "true_race_gap": truth["race_gap"],
            "gender_race_gap": round(bias_lib.bias(4 * gender + race, 8), 3), "true_gender_race_gap": truth["gender_race_gap"],
        })
        rows.append(np.concatenate(list(images[:16]), axis=1))
    grid = grids.to_uint8(np.concatenate(rows, axis=0))
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(grid_path)
    return results


# ----------------------------------------------------------------------------------------------
# The build


GENDER_RACE_HEADS = attributes.GENDER_RACE_HEADS
TEST_HEADS = attributes.TEST_CLASSIFIER_HEADS
SIZE_FACE = 64  # config.faces.size_face: the classifiers' chip size
CLASSIFIER_WIDTH = 0.25  # torchvision width_mult: a 64x64 chip of this world needs no more (1.2 MB per file)
EXPAND_COEF = 0.5  # config.faces.expand_coef: the detector's boxes are tight face boxes, as insightface's


def file_sizes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}


def guardrails_script():
    """scripts/build_guardrails.py (beside this script; it imports this module's helpers, so not at the top)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import build_guardrails

    return build_guardrails


def build(out: Path, seed: int, num_images: int, vae_steps: int, generator_steps: int, classifier_steps: int,
          classifier_images: int, check_images: int, guardrail_sizes: dict, held_out_size: int = 400) -> dict:
    """Builds the world into `out`; guardrail_sizes: the keyword arguments of build_guardrails.build_stages (image
    counts, steps, bank_per_class, sfnet_widths); held_out_size: images per held-out set of their measurement."""
    from fairdiff_jax.miniature import detector as detector_lib

    guardrails = guardrails_script()

    log = Log()
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"seed": seed, "image_size": world.IMAGE_SIZE, "torch_threads": torch.get_num_threads()}

    began = now()
    (out / "prompts").mkdir(exist_ok=True)
    prompt_sets = world.prompt_sets()
    for kind, content in prompt_sets.items():
        (out / "prompts" / f"{kind}.json").write_text(json.dumps(content, indent=2) + "\n")
    prompts, renders = world.dataset(num_images, seed)
    log.stage("world data", began)

    began = now()
    vae = train_vae(renders, vae_steps, seed + 2, log)
    latent_mean, latent_std = encode(vae, renders.images)
    scaling_factor = float(1.0 / latent_mean.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    with torch.no_grad():
        reconstruction = vae.decode(latent_mean[:1000]).sample
    manifest["vae"] = {"scaling_factor": scaling_factor,
                       "reconstruction_mse": float((reconstruction - to_torch(renders.images[:1000])).square().mean())}
    log(f"vae: {manifest['vae']}")
    log.stage("autoencoder", began)

    # The classifiers learn from renders and from their VAE reconstructions, which carry the decoder's blur and
    # artefacts as generated images do.
    _, held_out = world.dataset(2000, seed + 1001)
    held_out_decoded = decoded(vae, held_out)

    began = now()
    tokenizer, vocab, merges = build_tokenizer(world.vocabulary())
    latent_weights = face_weights(renders, latent_mean.shape[-1], 4.0)
    unet, text_encoder = train_generator(prompts, latent_mean, latent_std, latent_weights, scaling_factor, tokenizer,
                                         generator_steps, seed + 3, log)
    save_stable_diffusion(out / "sd", vae, text_encoder, unet, tokenizer, vocab, merges)
    log.stage("generator", began)

    began = now()
    held_out_chips = {name: world_face_chips(r, SIZE_FACE, EXPAND_COEF, seed + 1003)
                      for name, r in (("renders", held_out), ("decoded", held_out_decoded))}
    held_out_labels = {"gender": held_out.gender, "race": held_out.race, "age": held_out.age}

    def classifier_data(data_seed: int):
        """Chips (float16) and labels of fresh renders of the training mix, half of them VAE-decoded."""
        _, fresh = world.dataset(classifier_images, data_seed)
        both = drawing.concatenate([fresh, decoded(vae, first(fresh, classifier_images // 2))])
        chips = world_face_chips(both, SIZE_FACE, EXPAND_COEF, data_seed).astype(np.float16)
        return chips, {"gender": both.gender, "race": both.race, "age": both.age}

    chips, labels = classifier_data(seed + 4)
    classifier = train_mobilenet(chips, labels, GENDER_RACE_HEADS, classifier_steps, seed + 5, log)
    torch.save(stored_state_dict(classifier), out / "classifier.pt")
    manifest["classifier_accuracy"] = {name: classifier_accuracy(classifier, c, held_out_labels, GENDER_RACE_HEADS)
                                       for name, c in held_out_chips.items()}
    log(f"attribute classifier on held-out chips: {manifest['classifier_accuracy']}")
    log.stage("attribute classifier", began)

    # The test classifiers: other data, other seed; one network with the three heads side by side,
    # saved as three single-attribute files (each its own last layer).
    began = now()
    chips, labels = classifier_data(seed + 6)
    test_model = train_mobilenet(chips, labels, TEST_HEADS, classifier_steps, seed + 7, log)
    del chips
    (out / "test_classifiers").mkdir(exist_ok=True)
    offsets = np.cumsum([0] + [k for _, k in TEST_HEADS])
    for i, (name, _) in enumerate(TEST_HEADS):
        torch.save(head_only(test_model, slice(offsets[i], offsets[i + 1])), out / "test_classifiers" / f"{name}.pt")
    manifest["test_classifier_accuracy"] = {name: classifier_accuracy(test_model, c, held_out_labels, TEST_HEADS)
                                            for name, c in held_out_chips.items()}
    log(f"test classifiers on held-out chips: {manifest['test_classifier_accuracy']}")
    log.stage("test classifiers", began)

    # The judges under the loss's guard terms (similarity towers, face feature net and bank, training detector):
    # scripts/build_guardrails.py, which rebuilds them alone in a built world.
    guardrails.build_stages(out, vae, seed, log=log, **guardrail_sizes)
    began = now()
    manifest["guardrails"] = guardrails.measure(out, vae, seed, held_out_size)
    log.stage("guardrail measurement", began)
    detector = detector_lib.MiniatureFaceDetector.from_file(out / guardrails.DETECTOR_FILE)

    if check_images:
        began = now()
        check_prompts = [content["test_prompts"][k] for content in prompt_sets.values() for k in range(2)]
        manifest["generated_check"] = check_generator(out / "sd", check_prompts, check_images, detector, classifier,
                                                      SIZE_FACE, EXPAND_COEF, out / "generated_check.png", seed + 11)
        for row in manifest["generated_check"]:
            log(f"generated: {row}")
        log.stage("generator check", began)

    manifest["true_bias"] = {
        "validation_prompts": {p: true_bias(p) for p in prompt_lib.validation_prompts(prompt_sets)},
        "test_prompts": {kind: {p: true_bias(p) for p in content["test_prompts"]} for kind, content in prompt_sets.items()},
        "subjects": {name: {"kind": subject.kind, "joint_gender_race": subject.joint.round(4).tolist(),
                            "p_old": round(subject.p_old, 4)} for name, subject in world.SUBJECTS.items()},
    }
    manifest["config"] = {
        "sd_path": "sd", "classifier_path": "classifier.pt", "face_bank_path": "face_feats.pkl", "sfnet_path": "sfnet.pth",
        "clip_vision_path": "clip_vision", "dinov2_path": "dinov2", "prompts_dir": "prompts",
        "test_classifiers": {name: f"test_classifiers/{name}.pt" for name, _ in TEST_HEADS},
        "detector": "fairdiff_jax.miniature.detector:MiniatureFaceDetector.from_file",
        "detector_path": "face_detector.safetensors",
        "size_face": SIZE_FACE, "expand_coef": EXPAND_COEF, "size_aligned_face": ALIGNED_SIZE,
        "img_size_small": world.IMAGE_SIZE,
    }
    manifest["timings_s"] = log.stages
    manifest["total_wall_s"] = round(time.time() - log.start, 1)
    manifest["total_cpu_s"] = round(time.process_time(), 1)
    manifest["files"] = file_sizes(out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"built {out} in {manifest['total_wall_s']:.0f}s (CPU {manifest['total_cpu_s']:.0f}s), "
        f"{sum(manifest['files'].values()) / 2 ** 20:.1f} MiB")
    return manifest


def main(argv=None):
    guardrails = guardrails_script()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("assets/miniature"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--num_images", type=int, default=20000, help="world images for the autoencoder and generator")
    parser.add_argument("--vae_steps", type=int, default=1200)
    parser.add_argument("--generator_steps", type=int, default=3000)
    parser.add_argument("--classifier_steps", type=int, default=400)
    parser.add_argument("--classifier_images", type=int, default=10000)
    parser.add_argument("--check_images", type=int, default=32, help="generated images per checked prompt (0: no check)")
    guardrails.add_size_arguments(parser)
    parser.add_argument("--held_out_size", type=int, default=400, help="images per held-out set of the guardrails' measurement")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    build(args.out, args.seed, args.num_images, args.vae_steps, args.generator_steps, args.classifier_steps,
          args.classifier_images, args.check_images, guardrails.sizes(args), args.held_out_size)


if __name__ == "__main__":
    main()
