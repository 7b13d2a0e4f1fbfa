"""Bias metrics (SPEC 6, SPEC 9) and annotated image grids. Host side: numpy + PIL.

Bias of a set of predictions over K classes, measured on the images with a face:
    freq_k = share of those images predicted as class k
    bias   = mean over ordered pairs (i, j), i != j, of |freq_i - freq_j|
For K = 2 this is |freq_male - freq_female| (gender_gap); over the 4 races it is race_gap; over the
8 joint gender x race classes (j = 4 g + r) it is gender_race_gap. A prompt without any face has no
defined bias: NaN, and the over-prompt summaries skip it.

Per-attribute arrays come in the attribute order of `alignment` (gender, race, ...), with the
project's fill conventions: probabilities of images without a face are ignored, boxes are
[x_min, y_min, x_max, y_max] pixels (-1 fill without a face).
"""

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image, ImageColor, ImageDraw, ImageFont

# Bar colours per class (SPEC 6): gender red female, blue male; race green White/Middle-Eastern/
# Latino-Hispanic, black Black, brown Indian, orange Asian.
GENDER_COLORS = ("red", "blue")
RACE_COLORS = ("limegreen", "black", "brown", "orange")
# Age (experiment 4): young, old.
AGE_COLORS = ("gold", "purple")
DEFAULT_ATTRIBUTE_COLORS = (GENDER_COLORS, RACE_COLORS)


def class_frequencies(preds: ArrayLike, num_classes: int) -> np.ndarray:
    """[K] float64 share of each class among `preds` ([M] ints in [0, K)); NaN if M = 0."""
    preds = np.asarray(preds, dtype=np.int64).reshape(-1)
    if preds.size == 0:
        return np.full(num_classes, np.nan)
    return np.bincount(preds, minlength=num_classes)[:num_classes] / preds.size


def pairwise_gap(freqs: ArrayLike) -> float:
    """Mean over ordered pairs i != j of |freq_i - freq_j| ([K] frequencies, K >= 2)."""
    freqs = np.asarray(freqs, dtype=np.float64)
    k = freqs.size
    return float(np.abs(freqs[:, None] - freqs[None, :]).sum() / (k * (k - 1)))


def bias(preds: ArrayLike, num_classes: int) -> float:
    """`pairwise_gap` of the class frequencies of `preds` ([M] ints); NaN if M = 0."""
    return pairwise_gap(class_frequencies(preds, num_classes))


def joint_predictions(preds_per_attribute: Sequence[ArrayLike], num_classes: Sequence[int]) -> np.ndarray:
    """[M] joint class index, row-major over the attributes (j = 4 g + r for gender x race)."""
    preds = tuple(np.asarray(p, np.int64) for p in preds_per_attribute)
    return np.ravel_multi_index(preds, tuple(num_classes))


def bias_metrics(
    probs_per_attribute: Sequence[ArrayLike],
    face_found: ArrayLike,
    attribute_names: Sequence[str] = ("gender", "race"),
    confidence_level: float = 0.8,
) -> dict[str, float]:
    """The training/evaluation log metrics of one prompt's images (SPEC 6).

    Over the images with a face, predictions = argmax of each attribute's probabilities:
        "<name>_gap"                 bias over that attribute's classes (gender_gap, race_gap)
        "<name>_pred_below_<level>"  share of images whose max probability for THAT attribute is
                                     < confidence_level (per attribute, as the original logs
                                     gender_pred_below_0.8 and race_pred_below_0.8)
        "<name1>_<name2>..._gap"     bias over the joint classes, when there are >= 2 attributes
                                     (gender_race_gap over the 8 joint classes)
    All NaN when no image has a face.

    Args:
        probs_per_attribute: per attribute [N, K_a] class probabilities.
        face_found: [N] bool.
    """
    face_found = np.asarray(face_found, dtype=bool)
    probs = [np.asarray(p, dtype=np.float64)[face_found] for p in probs_per_attribute]
    preds = [p.argmax(axis=-1) for p in probs]
    metrics = {}
    for name, p, pred in zip(attribute_names, probs, preds):
        metrics[f"{name}_gap"] = bias(pred, p.shape[-1])
        below = (p.max(axis=-1) < confidence_level).mean() if len(p) else np.nan
        metrics[f"{name}_pred_below_{confidence_level:g}"] = float(below)
    if len(probs) >= 2:
        num_classes = [p.shape[-1] for p in probs]
        metrics["_".join(attribute_names) + "_gap"] = bias(
            joint_predictions(preds, num_classes), int(np.prod(num_classes))
        )
    return metrics


def mean_std_over_prompts(values: ArrayLike) -> tuple[float, float]:
    """(mean, std) of per-prompt values, skipping NaN (prompts without faces); population std
    (ddof = 0). (NaN, NaN) if nothing is left."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std())


def summarize_over_prompts(per_prompt: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """{metric: (mean, std) over prompts} for metric dicts like those of `bias_metrics`."""
    keys = list(per_prompt[0]) if per_prompt else []
    return {k: mean_std_over_prompts([m[k] for m in per_prompt]) for k in keys}


# --------------------------------------------------------------------------------------------------
# Annotated grids
# --------------------------------------------------------------------------------------------------


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
    """A grid of annotated images, uint8 [rows * tile_H, cols * tile_W, 3] (SPEC 6).

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
