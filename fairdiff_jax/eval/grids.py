"""Annotated image grids (host side: numpy + PIL): each image with one confidence bar per attribute in
the class's colour and its face box, images ordered by predicted class.

Per-attribute arrays come in the attribute order of the config (gender, race, ...); boxes are
[x_min, y_min, x_max, y_max] pixels (-1 fill without a face).
"""

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image, ImageColor, ImageDraw, ImageFont

from fairdiff_jax import attributes
from fairdiff_jax.eval.bias import joint_predictions

DEFAULT_ATTRIBUTE_COLORS = tuple(attributes.colors(("gender", "race")))


def to_uint8(images: ArrayLike) -> np.ndarray:
    """[..., H, W, 3] float in [-1, 1] -> uint8 in [0, 255] (rounded, clipped)."""
    images = np.asarray(images, dtype=np.float32)
    return np.clip(np.round((images * 0.5 + 0.5) * 255.0), 0, 255).astype(np.uint8)


def grid_order(
    preds_per_attribute: Sequence[ArrayLike],
    confidences_per_attribute: Sequence[ArrayLike],
    face_found: ArrayLike,
    num_classes: Sequence[int],
) -> np.ndarray:
    """[N] display order: images with a face by ascending joint class (female before male, then
    race 0..3 within), within a class by descending confidence of the last attribute; then the
    images without a face in their original order. (The original listed male classes first.)"""
    face_found = np.asarray(face_found, dtype=bool)
    preds = [np.where(face_found, np.asarray(p, np.int64), 0) for p in preds_per_attribute]
    joint = np.where(face_found, joint_predictions(preds, num_classes), int(np.prod(num_classes)))
    confidence = np.where(face_found, np.asarray(confidences_per_attribute[-1], np.float64), 0.0)
    # lexsort: last key is primary.
    return np.lexsort((np.arange(face_found.size), -confidence, joint))


def _confidence_bar(
    height: int, width: int, color: tuple[int, int, int] | None, confidence: float
) -> np.ndarray:
    """[H, width, 3] uint8: white above, `color` in the bottom round(confidence * H) rows."""
    bar = np.full((height, width, 3), 255, np.uint8)
    if color is not None:
        filled = int(round(float(np.clip(confidence, 0.0, 1.0)) * height))
        if filled > 0:
            bar[height - filled:] = color
    return bar


def annotate_image(
    image: np.ndarray,
    box: ArrayLike | None,
    preds: Sequence[int],
    confidences: Sequence[float],
    attribute_colors: Sequence[Sequence[str]] = DEFAULT_ATTRIBUTE_COLORS,
    bar_width: int | None = None,
    border: int | None = None,
    label: str | None = None,
) -> np.ndarray:
    """One grid tile, uint8 [H + 2 border, W + A bar_width + 2 border, 3].

    image: [H, W, 3] uint8. box: [4] face box drawn in black (None or empty: none drawn). preds / confidences:
    per attribute; a pred of -1 gives an all-white bar. Bars sit left of the image, the first
    attribute outermost (gender, then race next to the image), coloured from the bottom up to
    confidence * H. label: optional text in the image's bottom-left corner.
    Defaults scale the original's 512-pixel layout: bar H * 50/512, border H * 10/512.
    """
    height, width = image.shape[:2]
    bar_width = bar_width if bar_width is not None else max(2, round(height * 50 / 512))
    border = border if border is not None else max(1, round(height * 10 / 512))
    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    x0, y0, x1, y1 = (int(round(float(v))) for v in box) if box is not None else (0, 0, 0, 0)
    if x1 > x0 and y1 > y0:
        # The box's max corner is exclusive; PIL's rectangle includes both corners.
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(0, 0, 0), width=max(1, round(height * 4 / 512)))
    if label:
        draw.text((2, height - 12), label, fill=(255, 255, 255), font=ImageFont.load_default())
    bars = [
        _confidence_bar(height, bar_width, ImageColor.getrgb(colors[pred]) if pred >= 0 else None, conf)
        for colors, pred, conf in zip(attribute_colors, preds, confidences)
    ]
    tile = np.concatenate([*bars, np.asarray(pil)], axis=1)
    return np.pad(tile, ((border, border), (border, border), (0, 0)))


def annotated_grid(
    images: ArrayLike,
    face_found: ArrayLike,
    boxes: ArrayLike,
    probs_per_attribute: Sequence[ArrayLike],
    attribute_colors: Sequence[Sequence[str]] = DEFAULT_ATTRIBUTE_COLORS,
    bar_width: int | None = None,
    border: int | None = None,
    label_indices: bool = True,
) -> np.ndarray:
    """A grid of annotated images, uint8 [rows * tile_H, cols * tile_W, 3] (docs/method.md#metrics).

    Every image gets per-attribute colour bars (class colour, height = max probability), its face
    box and (label_indices) its index in the batch; images are ordered by class (`grid_order`);
    rows = floor(sqrt(N)), cols = ceil(N / rows), empty cells white.

    Args:
        images: [N, H, W, 3] float in [-1, 1].
        face_found: [N] bool. boxes: [N, 4] face boxes. probs_per_attribute: per attribute [N, K_a].
    """
    images = to_uint8(images)
    num_images = images.shape[0]
    if num_images == 0:
        raise ValueError("annotated_grid needs at least one image")
    face_found = np.asarray(face_found, dtype=bool)
    boxes = np.asarray(boxes)
    probs = [np.asarray(p, dtype=np.float64) for p in probs_per_attribute]
    preds = [np.where(face_found, p.argmax(-1), -1) for p in probs]
    confidences = [np.where(face_found, p.max(-1), 0.0) for p in probs]
    order = grid_order(preds, confidences, face_found, [p.shape[-1] for p in probs])
    tiles = [
        annotate_image(
            images[i],
            boxes[i] if face_found[i] else None,
            [int(p[i]) for p in preds],
            [float(c[i]) for c in confidences],
            attribute_colors,
            bar_width,
            border,
            label=str(i) if label_indices else None,
        )
        for i in order
    ]
    rows = int(math.sqrt(num_images))
    cols = math.ceil(num_images / rows)
    tiles += [np.full_like(tiles[0], 255)] * (rows * cols - num_images)
    return np.concatenate(
        [np.concatenate(tiles[r * cols:(r + 1) * cols], axis=1) for r in range(rows)], axis=0
    )


def save_image(image: np.ndarray, path: str | Path, quality: int = 75) -> Path:
    """Writes a uint8 [H, W, 3] array (e.g. an `annotated_grid`) as JPEG/PNG by suffix; makes parents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=quality)
    return path


def side_by_side_grid(left: ArrayLike, right: ArrayLike, labels: tuple[str, str] = ("original", "debiased"),
                      tile: int = 64, gap: int = 12) -> np.ndarray:
    """Two image sets from the same seeds, row by row: uint8 [header + P * tile, 2 * n * tile + gap, 3].

    left, right: [P, n, H, W, 3] uint8 (P rows, e.g. prompts; n images each), every image scaled to `tile`
    pixels (nearest neighbour, so that small images stay sharp); a white gap between the halves and the two
    labels above them.
    """
    left, right = np.asarray(left, np.uint8), np.asarray(right, np.uint8)
    if left.shape != right.shape or left.ndim != 5:
        raise ValueError(f"side_by_side_grid needs two [P, n, H, W, 3] sets of one shape, got {left.shape} and {right.shape}")

    def half(images):
        rows = [np.concatenate([np.asarray(Image.fromarray(im).resize((tile, tile), Image.NEAREST)) for im in row], axis=1)
                for row in images]
        return np.concatenate(rows, axis=0)

    body = np.concatenate([half(left), np.full((left.shape[0] * tile, gap, 3), 255, np.uint8), half(right)], axis=1)
    header = Image.new("RGB", (body.shape[1], 16), (255, 255, 255))
    draw = ImageDraw.Draw(header)
    for x, text in zip((2, body.shape[1] // 2 + gap // 2 + 2), labels):
        draw.text((x, 2), text, fill=(0, 0, 0), font=ImageFont.load_default())
    return np.concatenate([np.asarray(header), body], axis=0)
