"""Faces in generated images: detection on the host, differentiable crops on the device (SPEC step 3).

Host side (numpy; detection is not differentiable):
  detector = MTCNNDetector()                                  # any `FaceDetector`
  found_faces = detector.detect(np.asarray(images))           # FaceDetections of the largest faces
  chip_from_image = similarity_transforms(found_faces.landmarks, found_faces.found)    # [N, 2, 3]
Device side (jittable, differentiable w.r.t. the pixels, fixed shapes):
  crop_boxes = square_boxes(found_faces.boxes, expand_coef=0.5)    # [N, 4], the original's face_bboxs
  chips = face_chips(images, crop_boxes, found_faces.found)        # [N, 224, 224, 3]
  aligned = aligned_faces(images, chip_from_image, found_faces.found)   # [N, 112, 112, 3]

Images are [N, H, W, 3] float in [-1, 1] throughout. Landmarks are in pixel-index coordinates (the
centre of pixel (row r, column c) is (x, y) = (c, r)), as in the original's insightface landmarks
and kornia warp; crop boxes are integer pixel ranges [x1, x2) x [y1, y2).

The detector here is MTCNN (weights from the `mtcnn` pip package), run exactly as facenet-pytorch's
`detect_face` runs it (same pyramid, area resampling, thresholds 0.6/0.7/0.7, NMS rules and box
regression), with the networks jitted on fixed, bucketed batch shapes. The original used insightface's
SCRFD (not redistributable) with face_recognition as fallback; any detector with the same interface
can replace MTCNN.
"""

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.models import mtcnn

# ArcFace's 5-point template for 112x112 chips: left eye, right eye, nose, left and right mouth corners.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


# ----------------------------------------------------------------------------------------------
# The detector interface.


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


# ----------------------------------------------------------------------------------------------
# MTCNN detection (host-side geometry in numpy; the three networks jitted).


@dataclasses.dataclass(frozen=True)
class AllFaces:
    """Every face MTCNN keeps in a batch, flat: image_index [M] int, boxes [M, 4], landmarks [M, 5, 2],
    confidence [M] (float32 arrays; the order within an image is the final NMS order)."""

    image_index: np.ndarray
    boxes: np.ndarray
    landmarks: np.ndarray
    confidence: np.ndarray


def pyramid_scales(height: int, width: int, min_face_size: float, scale_factor: float) -> list[float]:
    """Scales at which P-Net's 12-pixel window sees faces from `min_face_size` up to the whole image."""
    scale = 12.0 / min_face_size
    side = min(height, width) * scale
    scales = []
    while side >= 12:
        scales.append(scale)
        scale *= scale_factor
        side *= scale_factor
    return scales


def area_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] averaging matrix of PyTorch's 'area' interpolation (adaptive average pooling):
    output i is the mean of inputs floor(i * in / out) ... ceil((i + 1) * in / out) - 1."""
    i = np.arange(out_size)
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    columns = np.arange(in_size)
    inside = (columns >= start[:, None]) & (columns < end[:, None])
    return inside / (end - start)[:, None]


def _normalise_for_mtcnn(pixels_0_255):
    return (pixels_0_255 - 127.5) * 0.0078125


def _pnet_on_pyramid(params, images, sizes):
    """images [N, H, W, 3] in [-1, 1]; sizes: static ((h, w), ...) per scale.
    -> per scale (box_offsets [N, h', w', 4], face_prob [N, h', w'])."""
    pixels = (images.astype(jnp.float32) + 1.0) * 127.5
    outputs = []
    for h, w in sizes:
        rows = jnp.asarray(area_resize_matrix(images.shape[1], h), jnp.float32)
        cols = jnp.asarray(area_resize_matrix(images.shape[2], w), jnp.float32)
        hi = jax.lax.Precision.HIGHEST
        resized = jnp.einsum("nhwc,jw->nhjc", pixels, cols, precision=hi)
        resized = jnp.einsum("ih,nhjc->nijc", rows, resized, precision=hi)
        outputs.append(mtcnn.PNet().apply({"params": params}, _normalise_for_mtcnn(resized)))
    return tuple(outputs)


def nms(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, threshold: float, *,
        overlap: str = "union", inclusive: bool = False) -> np.ndarray:
    """Greedy non-maximum suppression within each group; returns kept indices, best first.

    overlap: "union" (IoU) or "min" (intersection over the smaller box). inclusive: boxes cover
    x1..x2 inclusive (width x2 - x1 + 1, MTCNN's last stage) instead of x2 - x1 (torchvision).
    """
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    # An offset per group keeps boxes of different groups from ever overlapping (one pass for all).
    span = boxes[:, :4].max() - boxes[:, :4].min() + 2
    shifted = boxes[:, :4] + (groups.astype(np.float64) * span)[:, None]
    x1, y1, x2, y2 = shifted.T
    plus = 1.0 if inclusive else 0.0
    area = (x2 - x1 + plus) * (y2 - y1 + plus)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        inter = (np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + plus)
                 * np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + plus))
        if overlap == "min":
            ratio = inter / np.minimum(area[best], area[rest])
        else:
            ratio = inter / (area[best] + area[rest] - inter)
        order = rest[ratio <= threshold]
    return np.asarray(keep, np.int64)


def _to_square(boxes: np.ndarray) -> np.ndarray:
    """Grows the shorter side about the centre so that every box is square."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    x1 = boxes[:, 0] + 0.5 * (w - side)
    y1 = boxes[:, 1] + 0.5 * (h - side)
    return np.stack([x1, y1, x1 + side, y1 + side], axis=1)


def _apply_offsets(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """R-Net / O-Net box regression: offsets are fractions of the inclusive width/height."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    return boxes[:, :4] + offsets * np.stack([w, h, w, h], axis=1)


def _pixel_windows(boxes: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer pixel ranges [y0, y1) x [x0, x1) each box covers inside the image (MTCNN reads box
    corners as 1-based inclusive pixel numbers, truncated), and whether the range is non-empty."""
    b = np.trunc(boxes[:, :4]).astype(np.int64)
    x0 = np.maximum(b[:, 0], 1) - 1
    y0 = np.maximum(b[:, 1], 1) - 1
    x1 = np.minimum(b[:, 2], width)
    y1 = np.minimum(b[:, 3], height)
    valid = (x1 > x0) & (y1 > y0)
    windows = np.stack([y0, y1, x0, x1], axis=1)
    windows[~valid] = [0, 1, 0, 1]
    return windows, valid


def _area_crops(integral: np.ndarray, image_index: np.ndarray, windows: np.ndarray, size: int) -> np.ndarray:
    """Each window of its image, area-resampled to size x size: [K, size, size, 3] float32 in MTCNN's
    input scale. integral: [N, H + 1, W + 1, 3] float64 summed-area tables of the 0..255 images."""
    y0, y1, x0, x1 = (windows[:, k:k + 1] for k in range(4))
    i = np.arange(size)
    row_start = y0 + (i * (y1 - y0)) // size
    row_end = y0 - ((-(i + 1) * (y1 - y0)) // size)
    col_start = x0 + (i * (x1 - x0)) // size
    col_end = x0 - ((-(i + 1) * (x1 - x0)) // size)
    n = image_index[:, None, None]
    rs, re = row_start[:, :, None], row_end[:, :, None]
    cs, ce = col_start[:, None, :], col_end[:, None, :]
    sums = integral[n, re, ce] - integral[n, rs, ce] - integral[n, re, cs] + integral[n, rs, cs]
    counts = ((re - rs) * (ce - cs))[..., None]
    return _normalise_for_mtcnn(sums / counts).astype(np.float32)


def _padded_batch(crops: np.ndarray, minimum: int = 64) -> np.ndarray:
    """Zero-pads the crop count up to a power of two (at least `minimum`): few shapes, few compiles."""
    bucket = max(minimum, 1 << max(len(crops) - 1, 0).bit_length())
    return np.concatenate([crops, np.zeros((bucket - len(crops),) + crops.shape[1:], crops.dtype)])


class MTCNNDetector:
    """MTCNN face detector with the `mtcnn` package's weights; implements `FaceDetector`.

    Args:
      params: {'pnet', 'rnet', 'onet'} Flax params (default: `mtcnn.load_mtcnn_params()`).
      min_face_size: smallest face side, in pixels, searched for.
      scale_factor: ratio between successive pyramid levels.
      thresholds: face-probability thresholds of P-Net, R-Net and O-Net.
    """

    def __init__(self, params: Optional[dict] = None, *, min_face_size: float = 20.0, scale_factor: float = 0.709,
                 thresholds: Sequence[float] = (0.6, 0.7, 0.7)):
        self.params = params if params is not None else mtcnn.load_mtcnn_params()
        self.min_face_size = min_face_size
        self.scale_factor = scale_factor
        self.thresholds = tuple(thresholds)
        self._pnet = jax.jit(_pnet_on_pyramid, static_argnames="sizes")
        self._rnet = jax.jit(lambda p, x: mtcnn.RNet().apply({"params": p}, x))
        self._onet = jax.jit(lambda p, x: mtcnn.ONet().apply({"params": p}, x))

    def detect(self, images: np.ndarray) -> FaceDetections:
        """images: [N, H, W, 3] float in [-1, 1] -> the largest face of each image."""
        images = np.asarray(images, np.float32)
        every_face = self.detect_all(images)
        return largest_faces(every_face.image_index, every_face.boxes, every_face.landmarks, every_face.confidence,
                             num_images=len(images), image_size=images.shape[1:3])

    def detect_all(self, images: np.ndarray) -> AllFaces:
        """images: [N, H, W, 3] float in [-1, 1] -> every face found."""
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [N, H, W, 3], got shape {images.shape}")
        height, width = images.shape[1:3]
        index, boxes = self._proposals(images)
        integral = None
        if len(boxes):
            pixels = (images.astype(np.float64) + 1.0) * 127.5
            integral = np.zeros((len(images), height + 1, width + 1, 3))
            integral[:, 1:, 1:] = pixels.cumsum(axis=1).cumsum(axis=2)
            index, boxes = self._refine(integral, index, boxes)
        if len(boxes) == 0:
            return AllFaces(np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32),
                            np.zeros(0, np.float32))
        return self._output(integral, index, boxes)

    def _proposals(self, images):
        """Stage 1: P-Net over the pyramid -> (image index [K], square boxes [K, 4])."""
        height, width = images.shape[1:3]
        scales = pyramid_scales(height, width, self.min_face_size, self.scale_factor)
        sizes = tuple((int(height * s + 1), int(width * s + 1)) for s in scales)
        outputs = jax.device_get(self._pnet(self.params["pnet"], jnp.asarray(images), sizes=sizes))
        per_scale = []
        for scale, (offsets, prob) in zip(scales, outputs):
            image, y, x = np.nonzero(prob >= self.thresholds[0])
            cells = np.stack([x, y], axis=1).astype(np.float64)
            corners = np.concatenate([np.floor((2 * cells + 1) / scale), np.floor((2 * cells + 12) / scale)], axis=1)
            found = (image, corners, prob[image, y, x], offsets[image, y, x])
            keep = nms(corners, found[2], image, 0.5)
            per_scale.append([a[keep] for a in found])
        image, corners, score, offsets = (np.concatenate(parts) for parts in zip(*per_scale))
        keep = nms(corners, score, image, 0.7)
        image, corners, offsets = image[keep], corners[keep], offsets[keep]
        # P-Net regresses relative to the exclusive window size.
        size = np.concatenate([corners[:, 2:] - corners[:, :2]] * 2, axis=1)
        return image, _to_square(corners + offsets * size)

    def _refine(self, integral, index, boxes):
        """Stage 2: R-Net on 24x24 crops -> (image index, square boxes) that pass."""
        height, width = integral.shape[1] - 1, integral.shape[2] - 1
        windows, valid = _pixel_windows(boxes, height, width)
        crops = _area_crops(integral, index, windows, 24)
        offsets, prob = jax.device_get(self._rnet(self.params["rnet"], _padded_batch(crops)))
        offsets, prob = offsets[: len(boxes)], prob[: len(boxes)]
        passed = (prob > self.thresholds[1]) & valid
        index, boxes, offsets, prob = index[passed], boxes[passed], offsets[passed], prob[passed]
        keep = nms(boxes, prob, index, 0.7)
        return index[keep], _to_square(_apply_offsets(boxes[keep], offsets[keep]))

    def _output(self, integral, index, boxes):
        """Stage 3: O-Net on 48x48 crops -> final boxes, landmarks, confidences."""
        height, width = integral.shape[1] - 1, integral.shape[2] - 1
        windows, valid = _pixel_windows(boxes, height, width)
        crops = _area_crops(integral, index, windows, 48)
        offsets, points, prob = jax.device_get(self._onet(self.params["onet"], _padded_batch(crops)))
        offsets, points, prob = offsets[: len(boxes)], points[: len(boxes)], prob[: len(boxes)]
        passed = (prob > self.thresholds[2]) & valid
        index, boxes, offsets, points, prob = (a[passed] for a in (index, boxes, offsets, points, prob))
        w = boxes[:, 2:3] - boxes[:, 0:1] + 1
        h = boxes[:, 3:4] - boxes[:, 1:2] + 1
        landmarks = np.stack([w * points[:, :5] + boxes[:, 0:1] - 1, h * points[:, 5:] + boxes[:, 1:2] - 1], axis=2)
        boxes = _apply_offsets(boxes, offsets)
        keep = nms(boxes, prob, index, 0.7, overlap="min", inclusive=True)
        return AllFaces(index[keep], boxes[keep].astype(np.float32), landmarks[keep].astype(np.float32),
                        prob[keep].astype(np.float32))


# ----------------------------------------------------------------------------------------------
# Similarity transform onto the ArcFace template (host, closed form).


def similarity_transforms(landmarks: np.ndarray, found: Optional[np.ndarray] = None,
                          template: np.ndarray = ARCFACE_TEMPLATE_112) -> np.ndarray:
    """Least-squares similarity transforms (Umeyama 1991) taking each image's landmarks onto `template`.

    landmarks: [N, K, 2] (x, y) points; found: optional [N] bool; template: [K, 2].
    Returns chip_from_image: [N, 2, 3] float32, chip = A @ (x, y) + t. Rows without a face (or
    with coincident landmarks) get the identity, which `aligned_faces` masks out anyway.
    """
    src = np.asarray(landmarks, np.float64)
    dst = np.asarray(template, np.float64)
    src_mean = src.mean(axis=1)
    dst_mean = dst.mean(axis=0)
    src_c = src - src_mean[:, None]
    dst_c = dst - dst_mean
    covariance = np.einsum("kd,nke->nde", dst_c, src_c) / src.shape[1]
    u, s, vt = np.linalg.svd(covariance)
    # Flip the weakest axis where the best orthogonal map would be a reflection.
    d = np.ones_like(s)
    d[np.linalg.det(covariance) < 0, -1] = -1.0
    rotation = u @ (d[:, :, None] * vt)
    src_var = (src_c ** 2).sum(axis=(1, 2)) / src.shape[1]
    usable = src_var > 1e-12
    if found is not None:
        usable &= np.asarray(found, bool)
    scale = (s * d).sum(axis=1) / np.where(usable, src_var, 1.0)
    linear = scale[:, None, None] * rotation
    shift = dst_mean - np.einsum("nde,ne->nd", linear, src_mean)
    out = np.concatenate([linear, shift[:, :, None]], axis=2)
    out[~usable] = np.eye(2, 3)
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Device side: differentiable, fixed-shape face crops.


def _sample_bilinear(image: jax.Array, x: jax.Array, y: jax.Array, fill: float) -> jax.Array:
    """Bilinear samples of image [H, W, C] at pixel-index coordinates x, y (broadcastable shapes;
    pixel (r, c) sits at x = c, y = r); neighbours outside the image read `fill`. -> [..., C]."""
    height, width = image.shape[:2]
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    wx = (x - x0)[..., None]
    wy = (y - y0)[..., None]
    x0 = x0.astype(jnp.int32)
    y0 = y0.astype(jnp.int32)

    def read(yi, xi):
        inside = ((xi >= 0) & (xi < width) & (yi >= 0) & (yi < height))[..., None]
        value = image[jnp.clip(yi, 0, height - 1), jnp.clip(xi, 0, width - 1)]
        return jnp.where(inside, value, jnp.asarray(fill, image.dtype))

    top = (1 - wx) * read(y0, x0) + wx * read(y0, x0 + 1)
    bottom = (1 - wx) * read(y0 + 1, x0) + wx * read(y0 + 1, x0 + 1)
    return (1 - wy) * top + wy * bottom


def square_boxes(boxes, expand_coef=0.5):
    """The original's `expand_bbox(..., target_ratio=1)`: grows each box by `expand_coef` of its longer
    side, then makes it square about the centre, corners rounded to integers (half to even).

    boxes: [N, 4] (x1, y1, x2, y2), numpy or traced; expand_coef: scalar or [N] (per detector).
    Returns [N, 4] float32 integer-valued crop boxes, x2/y2 exclusive. A -1 filled box stays -1.
    """
    boxes = jnp.asarray(boxes, jnp.float32)
    x1, y1, x2, y2 = (boxes[..., k] for k in range(4))
    w, h = x2 - x1, y2 - y1
    expand_coef = jnp.asarray(expand_coef, jnp.float32)
    taller = h > w
    more_w = jnp.where(taller, h * (1 + expand_coef) - w, w * expand_coef)
    more_h = jnp.where(taller, h * expand_coef, w * (1 + expand_coef) - h)
    return jnp.round(jnp.stack([x1 - 0.5 * more_w, y1 - 0.5 * more_h, x2 + 0.5 * more_w, y2 + 0.5 * more_h], -1))


def face_chips(images, crop_boxes, found, size: int = 224, fill: float = -1.0):
    """Crops each image's box (pixels outside the image = `fill`) and resizes it bilinearly to
    size x size, as the original's pad-then-`Resize` (torchvision 0.16, tensors: no antialiasing).

    images: [N, H, W, 3] in [-1, 1]; crop_boxes: [N, 4] integer-valued (x1, y1, x2, y2), x2/y2
    exclusive (`square_boxes`); found: [N] bool. Returns [N, size, size, 3] in the images' dtype;
    rows without a face are all `fill`. Differentiable w.r.t. images; boxes may be traced.
    """
    def one(image, box):
        x1, y1, x2, y2 = box[0], box[1], box[2], box[3]
        centres = jnp.arange(size, dtype=jnp.float32) + 0.5
        # PyTorch's align_corners=False source index, clamped to the crop (edge pixels repeat).
        cols = x1 + jnp.clip(centres * (x2 - x1) / size - 0.5, 0.0, x2 - x1 - 1)
        rows = y1 + jnp.clip(centres * (y2 - y1) / size - 0.5, 0.0, y2 - y1 - 1)
        return _sample_bilinear(image, cols[None, :], rows[:, None], fill)

    images = jnp.asarray(images)
    chips = jax.vmap(one)(images.astype(jnp.float32), jnp.asarray(crop_boxes, jnp.float32))
    chips = jnp.where(jnp.asarray(found)[:, None, None, None], chips, fill)
    return chips.astype(images.dtype)


def aligned_faces(images, chip_from_image, found, size: int = 112, fill: float = -1.0):
    """Warps each image with its similarity transform into a size x size aligned face chip.

    Follows the original's `kornia.geometry.transform.warp_affine(img_0_255, M, (112, 112),
    'bilinear', padding_mode='zeros', align_corners=False)` (kornia 0.7.1) exactly: kornia maps
    pixel coordinates to [-1, 1] with (size - 1) but samples with align_corners=False, so output pixel
    j reads chip coordinate (j + 0.5)(size - 1)/size and the source point p is read at
    p * W/(W - 1) - 0.5. Its zero padding of 0..255 pixels is `fill` = -1 here.

    images: [N, H, W, 3] in [-1, 1]; chip_from_image: [N, 2, 3] (`similarity_transforms`);
    found: [N] bool. Returns [N, size, size, 3]; rows without a face are all `fill`.
    """
    images = jnp.asarray(images)
    height, width = images.shape[1:3]
    chip_from_image = jnp.asarray(chip_from_image, jnp.float32)
    image_from_chip = jnp.linalg.inv(chip_from_image[:, :, :2])
    shift = chip_from_image[:, :, 2]
    grid = (jnp.arange(size, dtype=jnp.float32) + 0.5) * (size - 1) / size
    chip_points = jnp.stack(jnp.meshgrid(grid, grid, indexing="xy"), axis=-1)  # [size, size, (x, y)]

    def one(image, inverse, t):
        # Written out rather than as a matmul: TPUs would run a float32 matmul at bfloat16 precision.
        cx, cy = chip_points[..., 0] - t[0], chip_points[..., 1] - t[1]
        x = (inverse[0, 0] * cx + inverse[0, 1] * cy) * width / (width - 1) - 0.5
        y = (inverse[1, 0] * cx + inverse[1, 1] * cy) * height / (height - 1) - 0.5
        return _sample_bilinear(image, x, y, fill)

    chips = jax.vmap(one)(images.astype(jnp.float32), image_from_chip, shift)
    chips = jnp.where(jnp.asarray(found)[:, None, None, None], chips, fill)
    return chips.astype(images.dtype)


# Detectors by name. Any other detector is named 'package.module:callable' (a callable returning a
# FaceDetector, e.g. 'fairdiff_jax.miniature.detector:MiniatureFaceDetector.from_file'), so that a new
# detector needs no edit here. Training (config.faces.detector) and evaluation (--detector) both use this.
DETECTORS: dict[str, Callable[..., FaceDetector]] = {"mtcnn": MTCNNDetector}


def detector_factory(spec: str) -> Callable[..., Any]:
    """The callable a detector spec names (imported, not called); ValueError naming the spec otherwise."""
    if spec in DETECTORS:
        return DETECTORS[spec]
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
