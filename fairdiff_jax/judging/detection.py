"""Face detection on the host (detection is not differentiable): the detector interface and the
largest-face rule every detector's output goes through.

    detector = make_detector("mtcnn")                         # any `FaceDetector`
    found_faces = detector.detect(np.asarray(images))         # FaceDetections of the largest faces

Images are [N, H, W, 3] float in [-1, 1]. Landmarks are in pixel-index coordinates (the centre of pixel
(row r, column c) is (x, y) = (c, r)). judging/crops.py cuts the chips the judges see from these detections.
"""

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class FaceDetections:
    """The largest face of each image (host numpy arrays); -1 fills rows where no face was found.

    found: [N] bool.
    boxes: [N, 4] float32 (x1, y1, x2, y2) in pixels; may reach past the image border.
    landmarks: [N, 5, 2] float32 (x, y): left eye, right eye, nose, left mouth corner, right mouth
      corner ("left" = smaller x in the image).
    confidence: [N] float32.
    """

    found: np.ndarray
    boxes: np.ndarray
    landmarks: np.ndarray
    confidence: np.ndarray


class FaceDetector(Protocol):
    def detect(self, images: np.ndarray) -> FaceDetections:
        """images: [N, H, W, 3] float32 in [-1, 1] -> the largest face of each image."""
        ...


def largest_faces(image_index: np.ndarray, boxes: np.ndarray, landmarks: np.ndarray, confidence: np.ndarray,
                  num_images: int, image_size: tuple[int, int]) -> FaceDetections:
    """Picks each image's face of largest area inside the image (ties: the first) from all faces found.

    image_index: [M] int, which image each face is in; boxes [M, 4]; landmarks [M, 5, 2];
    confidence [M]; image_size: (height, width).
    """
    height, width = image_size
    clipped_w = np.minimum(boxes[:, 2], width) - np.maximum(boxes[:, 0], 0)
    clipped_h = np.minimum(boxes[:, 3], height) - np.maximum(boxes[:, 1], 0)
    area = clipped_w * clipped_h
    found = np.zeros(num_images, bool)
    out_boxes = np.full((num_images, 4), -1, np.float32)
    out_landmarks = np.full((num_images, 5, 2), -1, np.float32)
    out_confidence = np.full(num_images, -1, np.float32)
    order = np.lexsort((-area, image_index))  # by image, then largest first (stable: ties keep order)
    starts_image = np.ones(len(order), bool)
    starts_image[1:] = image_index[order][1:] != image_index[order][:-1]
    first = order[starts_image]
    picked_images = image_index[first]
    found[picked_images] = True
    out_boxes[picked_images] = boxes[first]
    out_landmarks[picked_images] = landmarks[first]
    out_confidence[picked_images] = confidence[first]
    return FaceDetections(found, out_boxes, out_landmarks, out_confidence)


# Detectors by name. Any other detector is named 'package.module:callable' (a callable returning a
# FaceDetector, e.g. 'fairdiff_jax.miniature.detector:MiniatureFaceDetector.from_file'), so that a new
# detector needs no edit here. Training (config.faces.detector) and evaluation (--detector) both use this.
DETECTORS: dict[str, str] = {"mtcnn": "fairdiff_jax.judging.mtcnn:MTCNNDetector"}


def detector_factory(spec: str) -> Callable[..., Any]:
    """The callable a detector spec names (imported, not called); ValueError naming the spec otherwise."""
    spec = DETECTORS.get(spec, spec)
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"unknown detector {spec!r}: use one of {', '.join(sorted(DETECTORS))} or 'module:callable'")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load detector {spec!r}: {e}") from e
    return target


def make_detector(spec: str, path: Optional[str | Path] = None) -> FaceDetector:
    """The detector `spec` names, called with `path` (e.g. its weights file) when given."""
    factory = detector_factory(spec)
    return factory(path) if path is not None else factory()
