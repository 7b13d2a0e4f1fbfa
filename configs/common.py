"""The shared base of every experiment config: experiment 5's values (docs/method.md#hyper-parameters-experiment-5) in one place.

Each configs/<name>.py calls `get_base_config()` and changes only what makes it that experiment.
Groups:
  model   the frozen networks: files, compute dtype, attention kernel, remat, CFG scale
  lora    what is trained (rank, text encoder and/or UNet)
  optim   AdamW and the EMA
  train   steps, images per prompt (global batch), micro-batches, denoising steps, logging cadence
  loss    distributional alignment: weights, factors, thresholds, OT samples
  faces   face chip sizes
  target  the debiased attributes and their target marginals
  data    prompt files and how the kinds are mixed
  ckpt    checkpoint cadence and retention
  eval    in-training evaluation (current and EMA weights)
  test_classifiers  the evaluation's gender / race / age classifiers
  generate  defaults for generating evaluation images (`python -m fairdiff_jax.before_after`)

Asset paths are under `assets_dir` (default ./assets, laid out like the original release's data/
folder), so one override moves them all: `--config.assets_dir=/mnt/assets`. `workdir` follows `name`.
"""

import ml_collections
from ml_collections import config_dict

from fairdiff_jax import attributes, prompts



def get_base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "debias"
    config.workdir = config_dict.FieldReference("workdirs/") + config.get_ref("name")
    config.seed = 5991
    config.assets_dir = "assets"
    assets = config.get_ref("assets_dir")

    config.model = ml_collections.ConfigDict()
    config.model.sd_path = assets + "/stable-diffusion-v1-5"  # diffusers folder (unet/, vae/, text_encoder/, ...)
    config.model.dtype = "bfloat16"  # compute/storage dtype of the frozen networks; LoRA, EMA, losses stay float32
    # 'xla' | 'cudnn' | 'einsum' | 'chunked' (models/attention.py). For training at 512x512: 'cudnn' (flash
    # attention) on a GPU; elsewhere 'chunked', which keeps the gradient stage's 4096x4096 attention
    # scores one block of queries at a time (scripts/benchmark_train_step.py --sd15-shapes: 29 GiB
    # per device with it and remat, 84 GiB with 'xla').
    config.model.attention_impl = "xla"
    config.model.remat = True  # rematerialise UNet / VAE blocks in the backward pass (the original's grad checkpointing)
    config.model.guidance_scale = 7.5
    config.model.classifier_path = (
        assets + "/2-trained-classifiers/fairface_MobileNetLarge_GenderRace4_09041216/epoch=9-step=3380_MobileNetLarge.pt"
    )
    config.model.classifier_heads = attributes.GENDER_RACE_HEADS  # (attribute, classes) in logit order
    config.model.face_bank_path = assets + "/3-face-features/FairFace_MobileNetLarge_GenderRace4_09041634/face_feats.pkl"
    config.model.sfnet_path = (
        assets + "/4-opensphere_checkpoints/opensphere_checkpoints/20220424_210641/models/backbone_100000.pth"
    )
    config.model.sfnet_variant = "sfnet20_deprecated"  # the paper's checkpoint; 'sfnet20' adds BatchNorm
    config.model.clip_vision_path = assets + "/CLIP-ViT-H-14-laion2B-s32B-b79K"  # transformers folder
    config.model.dinov2_path = assets + "/dinov2-base"  # transformers folder (DINOv2 ViT-B/14)

    config.lora = ml_collections.ConfigDict()
    config.lora.rank = 50
    config.lora.train_text_encoder = True
    config.lora.train_unet = False

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 5e-5  # constant, no warm-up
    config.optim.decay_steps = 0  # 0: constant (the original); N: a half cosine from learning_rate to 0 over N updates
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.weight_decay = 1e-2
    config.optim.ema_decay = 0.996  # maximum decay of the diffusers-0.19 EMA rule (optim.py)

    config.train = ml_collections.ConfigDict()
    config.train.max_steps = 15000
    config.train.images_per_prompt = 40  # per step, over ALL devices (the original: 20 per GPU x 2 GPUs)
    config.train.micro_batch_size = 4  # images per backward pass per device (memory); 3 when the UNet trains
    config.train.generation_batch_size = 8  # images per no-gradient sampling call per device
    config.train.min_denoising_steps = 19  # each step draws its number of denoising steps
    config.train.max_denoising_steps = 23  # uniformly from [min, max], the same on all devices
    # The adjusted-DFT gradient from the no-gradient pass's stored latents ("stored_trajectory"), or by
    # regenerating the images under remat ("rerun", the original's way): the same gradients, one UNet forward
    # per image and denoising step fewer (docs/method.md#adjusted-direct-finetuning).
    config.train.dft_gradient = "stored_trajectory"
    config.train.log_every_steps = 1
    config.train.plot_every_steps = 20  # annotated image grids of the training batch
    # A run stops (exit 1) after this many consecutive steps whose loss was not finite or whose update was skipped
    # for non-finite gradients: weights that turned NaN would otherwise train on, and export, silently.
    config.train.max_bad_steps = 5

    config.loss = ml_collections.ConfigDict()
    config.loss.weight_img = 8.0  # image-semantics (CLIP + DINOv2) loss
    config.loss.weight_face = 0.1  # face-realism loss
    # factor1: image-semantics weight when the target differs from the original image's prediction;
    # factor2: face-region gradient scale of the image-semantics loss (docs/method.md#dynamic-weights). Per attribute.
    config.loss.factor1 = ml_collections.ConfigDict({"gender": 0.2, "race": 0.6})
    config.loss.factor2 = ml_collections.ConfigDict({"gender": 0.2, "race": 0.3})
    config.loss.uncertainty_threshold = 0.2
    config.loss.confidence_level = 0.8  # original-face feature as target only if every attribute prob >= this
    config.loss.img_size_small = 224  # CLIP / DINOv2 input size
    # Sampled target-count vectors for the OT targets, over the gathered batch: the original drew 100
    # per GPU on 2 GPUs and summed the plans, i.e. 200 (ot_targets.optimal_transport_targets).
    config.loss.ot_num_samples = 200

    config.faces = ml_collections.ConfigDict()
    config.faces.size_face = 224  # square face chip for the classifier
    config.faces.size_aligned_face = 112  # ArcFace-aligned chip for SFNet
    config.faces.detector = "mtcnn"  # or 'package.module:callable' returning a faces.FaceDetector
    config.faces.detector_path = ""  # passed to that callable when set (e.g. its weights file)
    config.faces.expand_coef = 0.5  # square face-box expansion before the chip crop (docs/method.md#one-training-step)

    config.target = ml_collections.ConfigDict()
    config.target.attributes = ("gender", "race")  # order = joint class order (j = 4 * g + r)
    config.target.marginals = ml_collections.ConfigDict({a: attributes.uniform(a) for a in config.target.attributes})

    config.data = ml_collections.ConfigDict()
    config.data.prompts_dir = "fairdiff_jax/data/prompts"
    config.data.prompt_repeats = ml_collections.ConfigDict(prompts.TRAIN_REPEATS)  # <data.prompts_dir>/<kind>.json, each kind's train prompts repeated
    config.data.shuffle_seed = config.get_ref("seed") + 1  # the original shuffled epochs with seed + 1

    config.ckpt = ml_collections.ConfigDict()
    config.ckpt.every_steps = 20  # temporary checkpoints ...
    config.ckpt.keep = 2  # ... of which the newest 2 are kept
    config.ckpt.permanent_every_steps = 200  # never deleted

    # The evaluation (fairdiff_jax/eval): training's periodic evaluation and `python -m fairdiff_jax.before_after`
    # measure with the same judges: bias by the test classifiers on the evaluation detector's faces, beside the
    # face share, fidelity and prompt consistency that a destroyed image cannot pass.
    config.eval = ml_collections.ConfigDict()
    config.eval.every_steps = 200
    config.eval.at_start = True  # also at step 0 (the unmodified model)
    config.eval.ema = True  # evaluate the EMA weights too
    config.eval.images_per_prompt = 48  # over all devices (the original: 24 per GPU x 2)
    config.eval.batch_size = 8  # per device
    config.eval.num_denoising_steps = 25
    config.eval.prompts_per_kind = 5  # validation prompts: the first N of each kind's
    config.eval.detector = "mtcnn"  # the evaluation detector (face share, chips); it must reject non-faces
    config.eval.detector_path = ""  # passed to a 'module:callable' detector when set
    # Fidelity: improved precision / recall (k-NN radii) against a reference set, in a content feature space:
    # 'dinov2' / 'clip' (model.dinov2_path / model.clip_vision_path) or 'scene_classifier'.
    config.eval.fidelity_features = "dinov2"
    config.eval.fidelity_k = 3
    # 'original': the original model's images from the same seeds; 'miniature_world': the world's own renders of
    # the prompt, every gender x race class equally often (reference_images_per_prompt of them).
    config.eval.fidelity_reference = "original"
    config.eval.reference_images_per_prompt = 64
    # Prompt consistency: 'clip_t' (CLIP-T with clip_model_path, a transformers CLIPModel folder: both towers and
    # the tokenizer of the CLIP release of CLIP-I), 'scene_classifier' (scene_classifier_path), or '' (none).
    config.eval.consistency = "clip_t"
    config.eval.clip_model_path = assets + "/CLIP-ViT-H-14-laion2B-s32B-b79K"  # a CLIPModel folder, as model.clip_vision_path
    config.eval.scene_classifier_path = ""  # torchvision mobilenet_v3_large .pt, its heads in a .json beside it

    # The evaluation's three test classifiers (torchvision mobilenet_v3_large state dicts; heads 2, 4, 2), read by
    # training's periodic evaluation and `python -m fairdiff_jax.before_after`.
    config.test_classifiers = ml_collections.ConfigDict()
    config.test_classifiers.gender = assets + "/test-classifiers/gender.pt"
    config.test_classifiers.race = assets + "/test-classifiers/race.pt"
    config.test_classifiers.age = assets + "/test-classifiers/age.pt"

    config.generate = ml_collections.ConfigDict()
    config.generate.num_denoising_steps = 30
    config.generate.images_per_prompt = 160
    config.generate.batch_size = 10
    return config


def occupation_prompts_only(config: ml_collections.ConfigDict) -> None:
    """The single-concept experiments (original exp 1, 3, 4, 6) train on occupation prompts only. They
    validated on all 28 occupation validation prompts; here validation keeps exp 5's first 5 of each kind
    (occupations plus three kinds never trained on: a view of how far the debiasing carries)."""
    config.data.prompt_repeats = ml_collections.ConfigDict({kind: 0 for kind in prompts.PROMPT_KINDS})
    config.data.prompt_repeats.occupation = 1


def flat_asset_layout(config: ml_collections.ConfigDict) -> None:
    """Points every model file at the flat layout that `fairdiff_jax.judging.tiny` and
    `scripts/build_miniature.py` write under `assets_dir`: sd/, classifier.pt, face_feats.pkl, sfnet.pth,
    clip_vision/, dinov2/, test_classifiers/{gender,race,age}.pt, clip/ (a CLIPModel for CLIP-T) (the original
    release nests them in numbered folders instead)."""
    assets = config.get_ref("assets_dir")
    config.model.sd_path = assets + "/sd"
    config.model.classifier_path = assets + "/classifier.pt"
    config.model.face_bank_path = assets + "/face_feats.pkl"
    config.model.sfnet_path = assets + "/sfnet.pth"
    config.model.clip_vision_path = assets + "/clip_vision"
    config.model.dinov2_path = assets + "/dinov2"
    config.test_classifiers.gender = assets + "/test_classifiers/gender.pt"
    config.test_classifiers.race = assets + "/test_classifiers/race.pt"
    config.test_classifiers.age = assets + "/test_classifiers/age.pt"
    config.eval.clip_model_path = assets + "/clip"
