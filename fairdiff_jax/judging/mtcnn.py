"""MTCNN face detection with the weights of the `mtcnn` pip package (host-side geometry in numpy; the
three networks of judging/mtcnn_nets.py jitted on fixed, bucketed batch shapes).

Run exactly as facenet-pytorch's `detect_face` runs it: same pyramid, area resampling, thresholds
0.6/0.7/0.7, NMS rules and box regression. Any detector with the `FaceDetector` interface
(judging/detection.py) can replace it.
"""

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.judging import mtcnn_nets
from fairdiff_jax.judging.detection import FaceDetections, largest_faces


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
        outputs.append(mtcnn_nets.PNet().apply({"params": params}, _normalise_for_mtcnn(resized)))
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
      params: {'pnet', 'rnet', 'onet'} Flax params (default: `mtcnn_nets.load_mtcnn_params()`).
      min_face_size: smallest face side, in pixels, searched for.
      scale_factor: ratio between successive pyramid levels.
      thresholds: face-probability thresholds of P-Net, R-Net and O-Net.
    """

    def __init__(self, params: Optional[dict] = None, *, min_face_size: float = 20.0, scale_factor: float = 0.709,
                 thresholds: Sequence[float] = (0.6, 0.7, 0.7)):
        self.params = params if params is not None else mtcnn_nets.load_mtcnn_params()
        self.min_face_size = min_face_size
        self.scale_factor = scale_factor
        self.thresholds = tuple(thresholds)
        self._pnet = jax.jit(_pnet_on_pyramid, static_argnames="sizes")
        self._rnet = jax.jit(lambda p, x: mtcnn_nets.RNet().apply({"params": p}, x))
        self._onet = jax.jit(lambda p, x: mtcnn_nets.ONet().apply({"params": p}, x))

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

