"""The evaluator a config describes (`config.eval`, `config.test_classifiers`), its asset check, and the
fidelity reference sets it names.

    check_eval_assets(config)                  # every file the evaluation reads exists; bad values named
    evaluator = load_evaluator(config)         # eval/evaluator.py's Evaluator
    features = world_reference_features(evaluator, prompt, 64)   # the miniature world's reference set

config.eval keys (configs/common.py documents the defaults):
  detector, detector_path       the evaluation detector ('mtcnn' or 'module:callable' with its file)
  fidelity_features             'dinov2' | 'clip' (model.dinov2_path / model.clip_vision_path) | 'scene_classifier'
  fidelity_k                    k of the k-NN radii
  fidelity_reference            'original' (the original model's images, same seeds) | 'miniature_world'
                                (`miniature.reference.balanced_renders`, reference_images_per_prompt of them)
  consistency                   'clip_t' (clip_model_path: a CLIPModel folder) | 'scene_classifier' | '' (none)
  scene_classifier_path         the scene classifier's .pt (its .json beside it)
"""

from pathlib import Path
from typing import Optional

import ml_collections
import numpy as np

from fairdiff_jax import attributes
from fairdiff_jax.eval import face_analysis
from fairdiff_jax.eval.consistency import ClipTextConsistency, SceneConsistency
from fairdiff_jax.eval.evaluator import Evaluator
from fairdiff_jax.eval.folders import file_signature
from fairdiff_jax.eval.similarity import SimilarityNets, clip_tower, dino_tower, scene_tower
from fairdiff_jax.judging import detection
from fairdiff_jax.judging import scene_classifier as scene_lib
from fairdiff_jax.miniature import reference as world_reference

FIDELITY_FEATURES = ("dinov2", "clip", "scene_classifier")
FIDELITY_REFERENCES = ("original", "miniature_world")
CONSISTENCY_JUDGES = ("clip_t", "scene_classifier", "")


class EvalAssetError(FileNotFoundError):
    """A file or folder config.eval / config.test_classifiers names is missing; the message names the key."""


def _require(path: str, key: str, folder: bool = False) -> Path:
    path = Path(path)
    if not (path.is_dir() if folder else path.is_file()):
        raise EvalAssetError(f"config.{key}: {'folder' if folder else 'file'} not found: {path} (set --config.{key}=)")
    return path


def _uses_scene_classifier(e: ml_collections.ConfigDict) -> bool:
    return "scene_classifier" in (e.fidelity_features, e.consistency)


def check_eval_assets(config: ml_collections.ConfigDict) -> None:
    """Raises EvalAssetError naming the first missing file, or ValueError naming a bad config.eval value; reads
    no weights."""
    e = config.eval
    for key, value, choices in (("fidelity_features", e.fidelity_features, FIDELITY_FEATURES),
                                ("fidelity_reference", e.fidelity_reference, FIDELITY_REFERENCES),
                                ("consistency", e.consistency, CONSISTENCY_JUDGES)):
        if value not in choices:
            raise ValueError(f"config.eval.{key} = {value!r}: use one of {choices}")
    if not 1 <= e.fidelity_k < e.images_per_prompt:
        raise ValueError(f"config.eval.fidelity_k = {e.fidelity_k}: must be >= 1 and below config.eval.images_per_prompt "
                         f"= {e.images_per_prompt} (the k-th nearest neighbour of each image)")
    if e.fidelity_reference == "miniature_world" and e.reference_images_per_prompt <= e.fidelity_k:
        raise ValueError(f"config.eval.reference_images_per_prompt = {e.reference_images_per_prompt}: must exceed "
                         f"config.eval.fidelity_k = {e.fidelity_k}")
    for name in ("gender", "race", "age"):
        _require(config.test_classifiers[name], f"test_classifiers.{name}")
    if e.detector_path:
        _require(e.detector_path, "eval.detector_path")
    try:
        detection.detector_factory(e.detector)
    except ValueError as error:
        raise ValueError(f"config.eval.detector: {error}") from error
    if _uses_scene_classifier(e):
        _require(e.scene_classifier_path, "eval.scene_classifier_path")
        _require(str(scene_lib.heads_file(e.scene_classifier_path)), "eval.scene_classifier_path (its .json)")
    if e.consistency == "clip_t":
        _require(e.clip_model_path, "eval.clip_model_path", folder=True)
    if e.fidelity_features == "clip":
        _require(config.model.clip_vision_path, "model.clip_vision_path", folder=True)
    if e.fidelity_features == "dinov2":
        _require(config.model.dinov2_path, "model.dinov2_path", folder=Path(config.model.dinov2_path).is_dir())


def detector_id(name: str, path: Optional[str]) -> str:
    """A detector's cache key: its name and, when it reads a file, which file in which version."""
    return name if not path else f"{name} {Path(path).resolve()} {file_signature(Path(path))}"


def load_evaluator(config: ml_collections.ConfigDict, similarity: bool = False) -> Evaluator:
    """The Evaluator of `config` (run `check_eval_assets` first for one-line errors): it reports the bias of the
    attributes the config debiases (config.target.attributes), each and jointly. similarity: also load the
    CLIP-I / DINO towers (model.clip_vision_path, model.dinov2_path at loss.img_size_small)."""
    e = config.eval
    tests = config.test_classifiers
    classifiers = face_analysis.load_test_classifiers(tests.gender, tests.race, tests.age)
    path = e.detector_path or None
    detector = detection.make_detector(e.detector, path)
    dino_size = int(config.loss.img_size_small)
    scene = scene_lib.load_scene_classifier(e.scene_classifier_path) if _uses_scene_classifier(e) else None
    nets = SimilarityNets()
    if similarity:
        nets = SimilarityNets(clip_tower(config.model.clip_vision_path), dino_tower(config.model.dinov2_path, dino_size))
    fidelity_tower = {
        "scene_classifier": lambda: scene_tower(*scene),
        "dinov2": lambda: nets.dino or dino_tower(config.model.dinov2_path, dino_size),
        "clip": lambda: nets.clip or clip_tower(config.model.clip_vision_path),
    }[e.fidelity_features]()
    consistency = {
        "clip_t": lambda: ClipTextConsistency(e.clip_model_path),
        "scene_classifier": lambda: SceneConsistency(*scene),
        "": lambda: None,
    }[e.consistency]()
    return Evaluator(
        detector, detector_id(e.detector, path), classifiers, float(config.faces.expand_coef), int(config.faces.size_face),
        fidelity_tower, int(e.fidelity_k), consistency, nets, float(config.loss.confidence_level),
        tuple(config.target.attributes),
    )


def world_reference_features(evaluator: Evaluator, prompt: str, num_images: int, seed: int = 0) -> np.ndarray:
    """[num_images, D] fidelity features of the miniature world's balanced renders of `prompt` (balanced in age
    too when the evaluator reports age's bias: a model debiased towards it must not be penalised for old faces)."""
    balance_age = attributes.AGE.name in evaluator.bias_attributes
    return evaluator.features(world_reference.balanced_renders(prompt, num_images, seed, balance_age).images)
