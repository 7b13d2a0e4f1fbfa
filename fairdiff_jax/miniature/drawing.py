"""Drawing the miniature world's images (numpy, vectorised over the batch: every layer is a soft mask
[N, S, S] composited at once) from per-image parameters; `world.render_prompts` samples those parameters
from prompts. Also the rendered batch's record (`Renders`) and the face geometry (landmarks, boxes).
"""

import dataclasses
from typing import Sequence

import numpy as np

EYE_COLOR = np.array([0.06, 0.05, 0.08], np.float32)
MOUTH_COLOR = np.array([0.55, 0.12, 0.14], np.float32)

# Landmarks in the face's own frame, in units of its half-width (u, right) and half-height (v, down):
# left eye, right eye, nose, left mouth corner, right mouth corner (proportions of ArcFace's template).
LANDMARK_TEMPLATE = np.array([[-0.40, -0.12], [0.40, -0.12], [0.0, 0.22], [-0.34, 0.52], [0.34, 0.52]], np.float32)



@dataclasses.dataclass(frozen=True)
class Renders:
    """A batch of world images and their ground truth.

    images: [N, S, S, 3] float32 in [-1, 1].
    has_face: [N] bool (False: background-only render).
    gender, race, age: [N] int (-1 where there is no face).
    boxes: [N, 4] float32 (x1, y1, x2, y2): the tight box of the face oval (-1 without a face).
    landmarks: [N, 5, 2] float32 (x, y): left eye, right eye, nose, left and right mouth corner.
    Coordinates are pixel-index coordinates: the centre of pixel (row r, column c) is (c, r).
    """

    images: np.ndarray
    has_face: np.ndarray
    gender: np.ndarray
    race: np.ndarray
    age: np.ndarray
    boxes: np.ndarray
    landmarks: np.ndarray


def concatenate(parts: Sequence[Renders]) -> Renders:
    """The renders of `parts`, one after the other."""
    return Renders(**{f: np.concatenate([getattr(r, f) for r in parts]) for f in Renders.__dataclass_fields__})


def face_landmarks(center: np.ndarray, half_axes: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """[N, 5, 2] landmark positions of faces with centre [N, 2], half-axes (a, b) [N, 2] and roll [N] radians."""
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    u = LANDMARK_TEMPLATE[None, :, 0] * half_axes[:, :1]
    v = LANDMARK_TEMPLATE[None, :, 1] * half_axes[:, 1:]
    return np.stack([center[:, :1] + cos * u - sin * v, center[:, 1:] + sin * u + cos * v], axis=-1).astype(np.float32)


def face_boxes(center: np.ndarray, half_axes: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """[N, 4] tight axis-aligned boxes of the rotated face ovals."""
    a, b = half_axes[:, 0], half_axes[:, 1]
    cos2, sin2 = np.cos(angle) ** 2, np.sin(angle) ** 2
    extent = np.stack([np.sqrt(a * a * cos2 + b * b * sin2), np.sqrt(a * a * sin2 + b * b * cos2)], axis=1)
    return np.concatenate([center - extent, center + extent], axis=1).astype(np.float32)


def _soft(signed_distance: np.ndarray) -> np.ndarray:
    """Coverage of a pixel by a shape from its centre's signed distance (pixels) to the edge."""
    return np.clip(0.5 - signed_distance, 0.0, 1.0)


def _ellipse_distance(u: np.ndarray, v: np.ndarray, a, b) -> np.ndarray:
    """Approximate signed distance (pixels) to an axis-aligned ellipse with half-axes a, b at (u, v) offsets."""
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    gradient = np.sqrt((u / (a * a)) ** 2 + (v / (b * b)) ** 2) / np.maximum(r, 1e-6)
    return (r - 1.0) / np.maximum(gradient, 1e-6)


def _paint(canvas: np.ndarray, alpha: np.ndarray, color: np.ndarray) -> np.ndarray:
    """canvas [N, S, S, 3], alpha [N, S, S], color [N, 3] or [3] -> composited canvas."""
    alpha = alpha[..., None]
    return canvas * (1.0 - alpha) + np.asarray(color, np.float32).reshape(-1, 1, 1, 3) * alpha


def _by_kind(kind: np.ndarray, functions: Sequence, shape: tuple, *args) -> np.ndarray:
    """out[i] = functions[kind[i]](*(a[i] for a in args)), each function run once on its own rows."""
    out = np.zeros(shape, np.float32)
    for k, function in enumerate(functions):
        rows = np.flatnonzero(kind == k)
        if rows.size:
            out[rows] = function(*(a[rows] for a in args))
    return out


def _pattern_mask(kind: np.ndarray, x: np.ndarray, y: np.ndarray, phase: np.ndarray, period: float) -> np.ndarray:
    """[N, S, S] in [0, 1]: where the background's pattern colour shows. kind [N] indexes world.PATTERNS."""
    k = 2 * np.pi / period
    px = x + phase[:, 0, None, None]  # [N, 1, S]
    py = y + phase[:, 1, None, None]  # [N, S, 1]
    sharpen = lambda t: np.clip(0.5 + 2.0 * t, 0.0, 1.0)  # noqa: E731
    patterns = (
        lambda px, py: np.zeros(np.broadcast_shapes(px.shape, py.shape)),
        lambda px, py: sharpen(np.sin(k * py)) + 0 * px,
        lambda px, py: sharpen(np.sin(k * px)) + 0 * py,
        lambda px, py: sharpen(np.sin(k * px) * np.sin(k * py)),
        lambda px, py: sharpen(np.sin(k * (px + py) / np.sqrt(2))),
        lambda px, py: sharpen(np.cos(k * px) * np.cos(k * py) - 0.6),
    )
    return _by_kind(kind, patterns, (len(kind), y.shape[1], x.shape[2]), px, py)


def _blur(images: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur with edge replication; images [N, S, S, 3]."""
    for axis in (1, 2):
        padded = np.concatenate([np.take(images, [0], axis), images, np.take(images, [-1], axis)], axis)
        n = images.shape[axis]
        images = (np.take(padded, range(0, n), axis) + 2 * np.take(padded, range(1, n + 1), axis)
                  + np.take(padded, range(2, n + 2), axis)) / 4
    return images


def _apply_style(images: np.ndarray, style: np.ndarray) -> np.ndarray:
    """Per-image world.STYLES post-process of [N, S, S, 3] images in [0, 1]."""
    grey = lambda im: im.mean(axis=-1, keepdims=True)  # noqa: E731
    styles = (
        lambda im: im,
        lambda im: 0.88 * _blur(im) + 0.12,
        lambda im: np.clip(grey(im) + 1.7 * (im - grey(im)), 0.0, 1.0),
        lambda im: 0.85 * (grey(im) + 0.5 * (im - grey(im))),
    )
    return _by_kind(style, styles, images.shape, images)


NUM_SNOWFLAKES = 14


def draw(p: dict, size: int) -> np.ndarray:
    """Images [N, S, S, 3] in [0, 1] from the per-image parameters `p` (see `world.sample_parameters`)."""
    n = len(p["has_face"])
    grid = np.arange(size, dtype=np.float32)
    x, y = grid[None, None, :], grid[None, :, None]  # pixel-index coordinates, broadcast to [N, S, S]
    col = lambda a: np.asarray(a, np.float32)[:, None, None]  # noqa: E731

    # Scene: background and pattern, context scenery, prop.
    canvas = np.broadcast_to(p["background"][:, None, None, :], (n, size, size, 3)).astype(np.float32)
    # Patterns coarser than the latent grid (8 pixels a latent cell at most) and half-strength.
    pattern = _pattern_mask(p["pattern"], x, y, p["pattern_phase"], size / 3.0)
    canvas = _paint(canvas, 0.6 * pattern, p["pattern_color"])
    context = p["context"]
    sea = _soft(0.72 * size + 0.6 * np.sin(x * 1.3 + col(p["pattern_phase"][:, 0])) - y)
    canvas = _paint(canvas, sea * col(context == 2), [0.10, 0.33, 0.70])
    trunks = _soft(np.minimum(np.abs(x - 0.07 * size), np.abs(x - 0.93 * size)) - 0.06 * size)
    canopy = _soft(y - 0.14 * size + 0.8 * np.cos(x * 0.9))
    canvas = _paint(canvas, trunks * col(context == 3), [0.30, 0.19, 0.09])
    canvas = _paint(canvas, canopy * col(context == 3), [0.10, 0.42, 0.14])
    snowy = np.flatnonzero(context == 4)
    snow = p["snow"][snowy]
    flakes = np.sqrt((x[..., None] - snow[:, None, None, :, 0]) ** 2 + (y[..., None] - snow[:, None, None, :, 1]) ** 2)
    canvas[snowy] = _paint(canvas[snowy], _soft(flakes.min(axis=-1) - 0.045 * size), [0.97, 0.97, 1.0])
    corner_x = np.where(p["prop_corner"] == 0, 0.13 * size, 0.87 * size)
    prop_dx, prop_dy = np.abs(x - col(corner_x)), np.abs(y - 0.13 * size)
    radius = 0.085 * size
    prop = np.where(col(p["prop_shape"] == 1), _soft(np.sqrt(prop_dx ** 2 + prop_dy ** 2) - radius),
                    _soft(np.maximum(prop_dx, prop_dy) - radius)) * col(p["prop_shape"] > 0)
    canvas = _paint(canvas, prop, p["prop_color"])

    # Figure, back to front. Face frame: u along the face's width, v down its height (pixels).
    face = col(p["has_face"])
    cx, cy = col(p["center"][:, 0]), col(p["center"][:, 1])
    a, b = col(p["half_axes"][:, 0]), col(p["half_axes"][:, 1])
    cos, sin = col(np.cos(p["angle"])), col(np.sin(p["angle"]))
    u, v = cos * (x - cx) + sin * (y - cy), -sin * (x - cx) + cos * (y - cy)
    torso = _soft(_ellipse_distance(x - cx, y - (cy + 2.3 * b), 2.3 * a, 1.15 * b))
    canvas = _paint(canvas, torso * face, p["clothing"])
    long_hair = np.minimum(_ellipse_distance(u, v + 0.05 * b, 1.25 * a, 1.2 * b),
                           np.maximum(np.abs(u) - 1.22 * a, np.abs(v - 0.6 * b) - 0.85 * b))
    canvas = _paint(canvas, _soft(long_hair) * face * col(p["gender"] == 0), p["hair"])
    neck = _soft(np.maximum(np.abs(x - cx) - 0.38 * a, np.abs(y - (cy + 1.3 * b)) - 0.6 * b))
    canvas = _paint(canvas, neck * face, 0.85 * p["skin"])
    canvas = _paint(canvas, _soft(_ellipse_distance(u, v, a, b)) * face, p["skin"])
    cap = np.maximum(_ellipse_distance(u, v + 0.06 * b, 1.12 * a, 1.12 * b), v + 0.42 * b)
    canvas = _paint(canvas, _soft(cap) * face, p["hair"])
    marks = p["landmarks"]
    dist = lambda k: np.sqrt((x - col(marks[:, k, 0])) ** 2 + (y - col(marks[:, k, 1])) ** 2)  # noqa: E731
    canvas = _paint(canvas, _soft(dist(2) - np.maximum(0.1 * a, 0.45)) * face, 0.72 * p["skin"])
    eye_radius = np.maximum(0.16 * a, 0.75)
    canvas = _paint(canvas, _soft(np.minimum(dist(0), dist(1)) - eye_radius) * face, EYE_COLOR)
    # Mouth: the segment between the mouth corners.
    left, right = marks[:, 3], marks[:, 4]
    seg = right - left
    t = ((x - col(left[:, 0])) * col(seg[:, 0]) + (y - col(left[:, 1])) * col(seg[:, 1])) / col((seg ** 2).sum(1))
    t = np.clip(t, 0.0, 1.0)
    mouth = np.sqrt((x - col(left[:, 0]) - t * col(seg[:, 0])) ** 2 + (y - col(left[:, 1]) - t * col(seg[:, 1])) ** 2)
    canvas = _paint(canvas, _soft(mouth - np.maximum(0.07 * b, 0.45)) * face, MOUTH_COLOR)

    # Lighting and style.
    night = (context == 1)[:, None, None, None]
    canvas = np.where(night, 0.7 * canvas + np.array([0.0, 0.02, 0.08], np.float32), canvas)
    return np.clip(_apply_style(canvas, p["style"]), 0.0, 1.0)
