"""The frozen networks that judge generated images during training: the attribute classifier, the face
feature net with its face bank, CLIP and DINOv2 image features, and the face detector; loaded from a config.

    check_asset_files(config)          # every file / folder the config names exists (no model is read)
    judges = load_judges(config)       # the networks, their params as jax arrays
    detector = make_detector(config)   # detection.FaceDetector

Feature functions (device side, jittable, differentiable w.r.t. the images; images [N, H, W, 3] in [-1, 1]):
    attribute_logits(judges, chips)         -> per attribute [N, K_a] float32 (chips [N, S, S, 3])
    face_features(judges, aligned)          -> [N, 512] unit-norm SFNet features (aligned [N, 112, 112, 3])
    clip_features(judges, images)           -> [N, Dc] unit-norm CLIP image_embeds
    dino_features(judges, images)           -> [N, Dd] unit-norm DINOv2 CLS embeddings

Detector choice (`config.faces.detector`): 'mtcnn' (judging/mtcnn.py's MTCNNDetector, the default) or 'module:callable',
a callable returning a `detection.FaceDetector`, called with `config.faces.detector_path` when that is set
(e.g. 'fairdiff_jax.miniature.detector:MiniatureFaceDetector.from_file' with the detector file) and with no
argument otherwise. `config.faces.expand_coef` is the detector's box expansion for the face chips
(docs/method.md#one-training-step: 0.5 for insightface-like boxes).
"""

import dataclasses
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from fairdiff_jax.judging import clip_vision as clip_vision_lib
from fairdiff_jax.judging import detection, dinov2, mobilenet_v3, sfnet
from fairdiff_jax.judging import face_bank as face_bank_lib
from fairdiff_jax.sd.loader import SUBFOLDERS as SD_SUBFOLDERS

# Torch hub's position-embedding resampling offset: the DINOv2 features the original computed (dinov2.py).
DINO_INTERPOLATE_OFFSET = 0.1


class AssetError(FileNotFoundError):
    """A file or folder the config names is missing; the message names the config key and the path."""


def detector_spec(config: ml_collections.ConfigDict) -> tuple[str, str | None, float]:
    """(detector name, detector_path or None, expand_coef) from `config.faces`."""
    return config.faces.detector, config.faces.detector_path or None, float(config.faces.expand_coef)


def check_asset_files(config: ml_collections.ConfigDict) -> None:
    """Raises AssetError naming the first config key whose file or folder is missing (nothing is loaded), or
    ValueError for a detector that cannot be imported.

    Checked: model.sd_path (folder with unet/, vae/, text_encoder/, tokenizer/, scheduler/), model.classifier_path, model.face_bank_path, model.sfnet_path (files),
    model.clip_vision_path, model.dinov2_path (folders with config.json), faces.detector_path (if set).
    """
    folders = ("sd_path", "clip_vision_path", "dinov2_path")
    files = ("classifier_path", "face_bank_path", "sfnet_path")
    for key in folders + files:
        path = Path(config.model[key])
        exists = path.is_dir() if key in folders else path.is_file()
        if not exists:
            kind = "folder" if key in folders else "file"
            raise AssetError(f"config.model.{key}: {kind} not found: {path} (set --config.model.{key}= or --config.assets_dir=)")
    for key in ("clip_vision_path", "dinov2_path"):
        if not (Path(config.model[key]) / "config.json").is_file():
            raise AssetError(f"config.model.{key}: {config.model[key]} has no config.json (a transformers model folder)")
    missing = [sub for sub in SD_SUBFOLDERS if not (Path(config.model.sd_path) / sub).is_dir()]
    if missing:
        raise AssetError(f"config.model.sd_path: {config.model.sd_path} lacks {', '.join(missing)} (a diffusers Stable Diffusion folder)")
    name, path, _ = detector_spec(config)
    if path is not None and not Path(path).exists():
        raise AssetError(f"config.faces.detector_path: not found: {path}")
    try:
        detection.detector_factory(name)
    except ValueError as e:
        raise ValueError(f"config.faces.detector: {e}") from e


def make_detector(config: ml_collections.ConfigDict) -> detection.FaceDetector:
    """The face detector `config.faces.detector` names (see the module docstring)."""
    name, path, _ = detector_spec(config)
    return detection.make_detector(name, path)


@dataclasses.dataclass(frozen=True, eq=False)
class Judges:
    """Frozen judge networks (Flax modules, static) and their variables (jax arrays).

    classifier_heads: ((attribute, classes), ...) in logit order; attributes: the debiased ones (a subset,
    in target order). face_bank: [M, 512] L2-normalised.
    """

    classifier: mobilenet_v3.MobileNetV3Large
    sfnet: sfnet.SFNet20
    clip_vision: clip_vision_lib.CLIPVisionWithProjection
    dino: dinov2.Dinov2Model
    classifier_heads: tuple[tuple[str, int], ...]
    attributes: tuple[str, ...]


def load_judges(config: ml_collections.ConfigDict) -> tuple[Judges, dict]:
    """(Judges, variables) from the config's files; variables = {classifier, sfnet, clip, dino, face_bank},
    host-loaded then put on the default device as jax arrays (replicate them onto a mesh yourself).

    Judges compute in `config.model.dtype` (features and logits come back float32); the classifier's head
    layout must match `config.model.classifier_heads`.
    """
    dtype = jnp.dtype(config.model.dtype)
    heads = tuple((str(name), int(k)) for name, k in config.model.classifier_heads)
    attributes = tuple(config.target.attributes)
    unknown = [a for a in attributes if a not in dict(heads)]
    if unknown:
        raise ValueError(f"config.target.attributes {unknown} are not classifier heads {heads}")
    classifier, classifier_vars = mobilenet_v3.load_mobilenet_v3(
        config.model.classifier_path, sum(k for _, k in heads), dtype=dtype, param_dtype=dtype
    )
    sfnet_module, sfnet_vars = sfnet.load_sfnet(config.model.sfnet_path, dtype=dtype, param_dtype=dtype)
    impl = config.model.attention_impl
    clip_module, clip_params = clip_vision_lib.load_clip_vision(config.model.clip_vision_path, dtype, dtype, impl)
    dino_module, dino_params = dinov2.load_dinov2(
        config.model.dinov2_path, config.loss.img_size_small, DINO_INTERPOLATE_OFFSET, dtype, dtype, impl
    )
    bank = face_bank_lib.load_face_bank(config.model.face_bank_path)
    judges = Judges(classifier, sfnet_module, clip_module, dino_module, heads, attributes)
    as_jax = lambda tree: jax.tree.map(jnp.asarray, tree)  # noqa: E731
    variables = dict(
        classifier=as_jax(classifier_vars), sfnet=as_jax(sfnet_vars), clip=as_jax(clip_params), dino=as_jax(dino_params),
        face_bank=bank,
    )
    return judges, variables


def attribute_logits(judges: Judges, variables: dict, chips: jax.Array) -> list[jax.Array]:
    """Face chips [N, S, S, 3] in [-1, 1] -> one [N, K_a] float32 logits array per debiased attribute."""
    logits = judges.classifier.apply(variables["classifier"], chips)
    per_head, start = {}, 0
    for name, k in judges.classifier_heads:
        per_head[name] = logits[:, start : start + k]
        start += k
    return [per_head[a] for a in judges.attributes]


def attribute_probs(judges: Judges, variables: dict, chips: jax.Array) -> list[jax.Array]:
    """Softmax of `attribute_logits`, per attribute [N, K_a]."""
    return [jax.nn.softmax(l, axis=-1) for l in attribute_logits(judges, variables, chips)]


def face_features(judges: Judges, variables: dict, aligned: jax.Array) -> jax.Array:
    return sfnet.face_features(judges.sfnet, variables["sfnet"], aligned)


def clip_features(judges: Judges, variables: dict, images: jax.Array) -> jax.Array:
    return clip_vision_lib.clip_image_embeds(judges.clip_vision, variables["clip"], images)


def dino_features(judges: Judges, variables: dict, images: jax.Array) -> jax.Array:
    return dinov2.dino_image_embeds(judges.dino, variables["dino"], images)


def num_classes(judges: Judges) -> Sequence[int]:
    heads = dict(judges.classifier_heads)
    return [heads[a] for a in judges.attributes]
