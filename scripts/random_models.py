"""Every network of a debiasing step at SD v1-5 or tiny shapes, without files: abstract (shapes only, for XLA's
compile-time analyses) or with random weights (for timing on a device). Used by scripts/benchmark_train_step.py,
scripts/benchmark_sampling.py and scripts/device_check.py.

SD v1-5 shapes: the UNet, VAE decoder and CLIP text encoder of SD v1-5 (their diffusers config.json), CLIP ViT-H/14,
DINOv2 ViT-B/14 at 224 px, mobilenet_v3_large with 6 logits, SFNet-20 (512-d features), a 10000-face bank.
Tiny shapes: the networks of fairdiff_jax.sd.tiny and fairdiff_jax.judging.tiny (32x32 images).
Random weights make random images: good for time, memory and FLOPs, meaningless for anything else.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.judging import clip_vision, dinov2, mobilenet_v3, sfnet
from fairdiff_jax.judging import judges as judges_lib
from fairdiff_jax.judging import tiny as tiny_judges
from fairdiff_jax.sd import clip_text, sampler
from fairdiff_jax.sd import tiny as tiny_sd
from fairdiff_jax.sd.loader import StableDiffusion
from fairdiff_jax.sd.unet import UNet2DConditionModel, UNetConfig
from fairdiff_jax.sd.vae import AutoencoderKLDecoder, VAEDecoderConfig

# SD v1-5's architecture (its unet/, vae/, text_encoder/ config.json, diffusers / transformers keys).
SD15_UNET = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
# The original's judges: CLIP ViT-H/14 (laion2B), DINOv2 ViT-B/14, mobilenet_v3_large (gender 2 + race 4 logits).
CLIP_VIT_H14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
                    patch_size=14, projection_dim=1024, hidden_act="gelu")


@dataclasses.dataclass(frozen=True)
class ModelShapes:
    """The architecture of every network of a step, and the sizes the step's config must agree with."""

    unet: dict  # diffusers config keys
    vae: dict
    text_encoder: dict  # transformers CLIPTextConfig keys
    clip_vision: dict
    dino: dict  # transformers Dinov2Config keys
    classifier_width_mult: float
    sfnet_channels: tuple[int, ...]
    face_feature_dim: int
    face_bank_size: int
    img_size_small: int  # config.loss.img_size_small: CLIP / DINOv2 input size
    size_face: int  # config.faces.size_face: the classifier's chip size


SHAPES = {
    "sd15": ModelShapes(SD15_UNET, SD15_VAE, SD15_TEXT, CLIP_VIT_H14, {}, 1.0, sfnet.STAGE_CHANNELS, sfnet.FEATURE_DIM,
                        10000, 224, 224),
    "tiny": ModelShapes(tiny_sd.UNET_CONFIG, tiny_sd.VAE_CONFIG, tiny_sd.TEXT_ENCODER_CONFIG, tiny_judges.CLIP_VISION_CONFIG,
                        tiny_judges.DINOV2_CONFIG, tiny_judges.CLASSIFIER_WIDTH_MULT, tiny_judges.SFNET_WIDTHS,
                        tiny_judges.FEATURE_DIM, tiny_judges.FACE_BANK_SIZE, 28, 32),
}
CLASSIFIER_HEADS = (("gender", 2), ("race", 4))


def abstract_models(shapes: ModelShapes, dtype, attention_impl: str = "xla", remat: bool = True):
    """(StableDiffusion, Judges, judge variables) with jax.ShapeDtypeStruct leaves (nothing allocated).

    As training loads them (training/loop.py load_models): frozen networks in `dtype`, the text encoder in
    float32. The UNet and the VAE decoder (the networks differentiated at the image resolution) use
    `attention_impl` and `remat`; the judges keep the default kernel and use remat.
    """
    unet = UNet2DConditionModel(UNetConfig.from_diffusers(shapes.unet), dtype, dtype, attention_impl, remat=remat)
    vae = AutoencoderKLDecoder(VAEDecoderConfig.from_dict(shapes.vae), dtype, dtype, attention_impl, remat=remat)
    text_encoder = clip_text.CLIPTextTransformer(clip_text.CLIPTextConfig.from_dict(shapes.text_encoder), jnp.float32, jnp.float32)
    h = unet.config.sample_size
    latents = jax.ShapeDtypeStruct((1, h, h, unet.config.in_channels), jnp.float32)
    context = jax.ShapeDtypeStruct((1, 77, unet.config.cross_attention_dim), jnp.float32)
    unet_params = jax.eval_shape(unet.init, jax.random.key(0), latents, jnp.zeros((1,), jnp.int32), context)["params"]
    vae_params = jax.eval_shape(vae.init, jax.random.key(0), latents)["params"]
    sd = StableDiffusion(unet, unet_params, vae, vae_params, text_encoder, text_encoder.param_shapes(), tiny_sd.build_tokenizer(),
                         sampler.SchedulerConfig())
    clip = clip_vision.CLIPVisionWithProjection(clip_vision.CLIPVisionConfig.from_dict(shapes.clip_vision), dtype, dtype, remat=True)
    dino = dinov2.Dinov2Model(dinov2.Dinov2Config.from_dict(shapes.dino), shapes.img_size_small, dtype, dtype, remat=True)
    classifier = mobilenet_v3.MobileNetV3Large(sum(k for _, k in CLASSIFIER_HEADS), shapes.classifier_width_mult, dtype=dtype,
                                               param_dtype=dtype)
    face_net = sfnet.SFNet20(False, tuple(shapes.sfnet_channels), shapes.face_feature_dim, dtype, dtype)
    judges = judges_lib.Judges(classifier, face_net, clip, dino, CLASSIFIER_HEADS, ("gender", "race"))
    aligned = jax.ShapeDtypeStruct((1, 112, 112, 3), jnp.float32)
    judge_variables = dict(
        classifier=mobilenet_v3.variable_shapes(classifier, shapes.size_face),
        sfnet=jax.eval_shape(face_net.init, jax.random.key(0), aligned),
        clip=clip.param_shapes(),
        dino=dino.param_shapes(),
        face_bank=jax.ShapeDtypeStruct((shapes.face_bank_size, shapes.face_feature_dim), jnp.float32),
    )
    return sd, judges, judge_variables


def random_weights(abstract, seed: int):
    """Arrays for a tree of ShapeDtypeStructs: normalisation scales and BatchNorm variances 1, biases and means 0,
    every other array normal with std 1/sqrt(fan-in) (a kernel's fan-in: all but its last axis), so that
    activations keep their scale through deep random networks. Drawn with numpy on the host (jax.random would
    compile one program per leaf shape, minutes for these trees on a CPU), then put on the default device."""
    rng = np.random.default_rng(seed)

    def one(path, leaf):
        name = str(getattr(path[-1], "key", path[-1])) if path else ""
        if name in ("scale", "var"):
            value = np.ones(leaf.shape, np.float32)
        elif name in ("bias", "mean") or leaf.ndim == 0:
            value = np.zeros(leaf.shape, np.float32)
        else:
            fan_in = math.prod(leaf.shape[:-1]) if leaf.ndim > 1 else 1
            value = rng.standard_normal(leaf.shape, np.float32) / np.float32(math.sqrt(fan_in))
        return jax.device_put(value.astype(leaf.dtype))

    return jax.tree_util.tree_map_with_path(one, abstract)


def random_models(shapes: ModelShapes, dtype, attention_impl: str = "xla", remat: bool = True, seed: int = 0,
                  with_judges: bool = True):
    """`abstract_models` with `random_weights` (on the default device); without judges their variables stay abstract
    (sampling needs none, and SD v1-5's judges are 750M parameters to draw)."""
    sd, judges, judge_variables = abstract_models(shapes, dtype, attention_impl, remat)
    sd = dataclasses.replace(
        sd,
        unet_params=random_weights(sd.unet_params, seed),
        vae_params=random_weights(sd.vae_params, seed + 1),
        text_encoder_params=random_weights(sd.text_encoder_params, seed + 2),
    )
    if not with_judges:
        return sd, judges, judge_variables
    bank = np.random.default_rng(seed + 3).standard_normal(judge_variables["face_bank"].shape, np.float32)
    judge_variables = dict(random_weights(judge_variables, seed + 4),  # the loss compares unit features with the bank
                           face_bank=jax.device_put(bank / np.linalg.norm(bank, axis=-1, keepdims=True)))
    return sd, judges, judge_variables
