"""Faces and their attributes, per image: the evaluation detector's largest face, a square chip around it, and
the attribute classifiers' logits; plus the check that an image has any content at all.

    classifiers = load_test_classifiers(gender_pt, race_pt, age_pt)
    faces = analyze_faces(images, detector, classifiers)   # {found, boxes, degenerate, <attr>_logits}

An image that is not finite or of one colour ("degenerate": what NaN weights or a collapsed model draw) counts
as having no face whatever the detector says, and the judges see it as a black image: such a set gets a face
share of 0 and no bias, never a plausible row of a table.
"""

import functools
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from fairdiff_jax import attributes
from fairdiff_jax.judging import crops, detection
from fairdiff_jax.judging.mobilenet_v3 import MobileNetV3Large, load_mobilenet_v3
from fairdiff_jax.nn.weights import WeightLoadError

# Below this pixel standard deviation (in [-1, 1] units, about one 8-bit level) an image is one colour.
CONSTANT_IMAGE_STD = 0.01


class AttributeClassifier(NamedTuple):
    """A face-chip classifier whose logits are the heads ((attribute, classes), ...) concatenated in order."""

    module: MobileNetV3Large
    variables: Any  # {'params', 'batch_stats'}, on device
    heads: tuple[tuple[str, int], ...]


def load_test_classifiers(gender: str | Path, race: str | Path, age: str | Path) -> tuple[AttributeClassifier, ...]:
    """The evaluation's three torchvision mobilenet_v3_large state dicts (heads 2, 4, 2); a wrong head size raises
    WeightLoadError naming the classifier and the file."""
    loaded = []
    for (role, num_classes), path in zip(attributes.TEST_CLASSIFIER_HEADS, (gender, race, age)):
        try:
            module, variables = load_mobilenet_v3(path, num_classes=num_classes)
        except WeightLoadError as e:
            raise WeightLoadError(f"{role} classifier: {e}") from e
        loaded.append(AttributeClassifier(module, jax.device_put(variables), ((role, num_classes),)))
    return tuple(loaded)


def classifier_heads(classifiers: Sequence[AttributeClassifier]) -> tuple[tuple[str, int], ...]:
    """Every (attribute, classes) the classifiers give, in order."""
    return tuple(head for c in classifiers for head in c.heads)


def degenerate_images(images: np.ndarray) -> np.ndarray:
    """[N] bool: images [N, H, W, C] with a non-finite pixel or of (nearly) one colour (every channel's spatial
    standard deviation below CONSTANT_IMAGE_STD)."""
    images = np.asarray(images, np.float32)
    finite = np.isfinite(images).all(axis=(1, 2, 3))
    spread = np.nan_to_num(images).std(axis=(1, 2)).max(axis=-1)
    return ~finite | (spread < CONSTANT_IMAGE_STD)


def blacken(images: np.ndarray, degenerate: np.ndarray) -> np.ndarray:
    """images with every degenerate one replaced by black (-1): no judge ever sees a NaN."""
    return np.where(degenerate[:, None, None, None], np.float32(-1.0), np.asarray(images, np.float32))


# Cropping and classifying compile separately: the classifiers then compile once per chip batch shape,
# whatever the image size.
@functools.partial(jax.jit, static_argnames="face_size")
def _crop_faces(images, boxes, found, expand_coef, *, face_size):
    """-> square crop boxes [N, 4], face chips [N, face_size, face_size, 3]."""
    crop_boxes = crops.square_boxes(boxes, expand_coef)
    return crop_boxes, crops.face_chips(images, crop_boxes, found, size=face_size)


@functools.partial(jax.jit, static_argnames="modules")
def _classify(variables, chips, *, modules):
    return tuple(module.apply(v, chips) for module, v in zip(modules, variables))


def analyze_faces(images: np.ndarray, detector: detection.FaceDetector, classifiers: Sequence[AttributeClassifier],
                  expand_coef: float = 0.5, face_size: int = 224) -> dict[str, np.ndarray]:
    """images [N, H, W, 3] float32 in [-1, 1] (non-finite values allowed) -> {found [N] bool, boxes [N, 4] int64
    square crop boxes (-1 without a face), degenerate [N] bool, <attribute>_logits [N, K] float32 per head
    (meaningless without a face)}."""
    degenerate = degenerate_images(images)
    images = blacken(images, degenerate)
    detections = detector.detect(images)
    found = np.asarray(detections.found, bool) & ~degenerate
    crop_boxes, chips = _crop_faces(images, np.asarray(detections.boxes, np.float32), found, np.float32(expand_coef),
                                    face_size=face_size)
    logits = _classify(tuple(c.variables for c in classifiers), chips, modules=tuple(c.module for c in classifiers))
    out = {"found": found, "boxes": np.where(found[:, None], np.asarray(crop_boxes), -1).astype(np.int64),
           "degenerate": degenerate}
    for classifier, classifier_logits in zip(classifiers, logits):
        start = 0
        for name, k in classifier.heads:
            out[f"{name}_logits"] = np.asarray(classifier_logits[:, start:start + k], np.float32)
            start += k
    return out
