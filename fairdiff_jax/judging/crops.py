"""Face crops the judges see: closed-form alignment transforms on the host, and differentiable, fixed-shape
crops on the device.

    chip_from_image = similarity_transforms(found_faces.landmarks, found_faces.found)    # [N, 2, 3] (host)
    crop_boxes = square_boxes(found_faces.boxes, expand_coef=0.5)    # [N, 4]
    chips = face_chips(images, crop_boxes, found_faces.found)        # [N, 224, 224, 3]
    aligned = aligned_faces(images, chip_from_image, found_faces.found)   # [N, 112, 112, 3]

Images are [N, H, W, 3] float in [-1, 1]; crop boxes are integer pixel ranges [x1, x2) x [y1, y2); landmarks
in pixel-index coordinates, as judging/detection.py gives them.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

# ArcFace's 5-point template for 112x112 chips: left eye, right eye, nose, left and right mouth corners.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


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

