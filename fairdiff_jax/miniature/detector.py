"""The miniature world's face detector: a small Flax CNN implementing `faces.FaceDetector`.

The production detector (MTCNN) was trained on photographs; the miniature's 32-pixel cartoon
faces are outside what it sees. This net finds the one figure a world image can hold:

    images [N, S, S, 3] in [-1, 1] -> encoder (S -> S/8) -> decoder (S/8 -> S/2) -> 9 heatmaps
      face probability:  sigmoid(Dense(mean of the S/8 features))
      5 landmarks:       soft-argmax (expected position) of maps 0-4
      box (x1, y1, x2, y2): x of the face oval's leftmost point (map 5), y of its topmost (6),
                         x of its rightmost (7), y of its bottommost (8)

Soft-argmax over heatmaps (integral regression) is translation-equivariant and reaches sub-pixel
precision in a few hundred steps, where a dense regression head needs thousands. It is trained
(`train_detector`) on world renders with and without a figure, under noise, blur,
brightness/contrast and left-right flip augmentation, so that it also finds the blurrier, noisier
faces a small diffusion model draws. Weights: a safetensors file of the Flax params (keys
"conv0/kernel", ..., "maps/bias", float32 or float16; the training image size and, optionally, the
face-probability threshold chosen for it in its metadata), `save_detector` / `load_detector`.

    detector = MiniatureFaceDetector.from_file("assets/miniature/face_detector.safetensors")
    found_faces = detector.detect(images)      # faces.FaceDetections
"""

import time
from pathlib import Path
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from fairdiff_jax.judging.detection import FaceDetections
from fairdiff_jax.miniature import drawing, world
from fairdiff_jax.nn import weights

# Landmark order under a left-right flip: the eyes and the mouth corners swap.
FLIP_ORDER = np.array([1, 0, 2, 4, 3])
NUM_MAPS = 5 + 4  # landmarks, then the face's leftmost, topmost, rightmost, bottommost points
DEFAULT_THRESHOLD = 0.5  # for files that store no threshold of their own


class DetectorNet(nn.Module):
    """images [N, S, S, 3] in [-1, 1] (S divisible by 8) -> (face logit [N], heatmap logits
    [N, S/2, S/2, 9]): a small encoder-decoder (S -> S/8 -> S/2) whose maps locate the 5
    landmarks and the 4 extreme points of the face oval (their x or y gives the box)."""

    width: int = 32

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        w = self.width
        conv = lambda x, features, name, stride=1: nn.relu(  # noqa: E731
            nn.Conv(features, (3, 3), strides=stride, name=name)(x))
        x = conv(images.astype(jnp.float32), w, "conv0")
        half = conv(conv(x, w, "down1", 2), w, "conv1")                 # S/2
        quarter = conv(conv(half, 2 * w, "down2", 2), 2 * w, "conv2")  # S/4
        eighth = conv(conv(quarter, 2 * w, "down3", 2), 2 * w, "conv3")  # S/8
        up = jax.image.resize(eighth, quarter.shape, "nearest")
        quarter = conv(jnp.concatenate([up, quarter], -1), 2 * w, "up2")
        up = jax.image.resize(quarter, half.shape[:3] + (quarter.shape[-1],), "nearest")
        half = conv(jnp.concatenate([up, half], -1), w, "up1")
        maps = nn.Conv(NUM_MAPS, (1, 1), name="maps")(half)
        face_logit = nn.Dense(1, name="face")(jnp.mean(eighth, axis=(1, 2)))[:, 0]
        return face_logit, maps


def soft_argmax(maps: jax.Array, image_size: int) -> jax.Array:
    """Heatmap logits [N, h, w, K] -> expected (x, y) [N, K, 2] in image pixel-index coordinates."""
    n, h, w, k = maps.shape
    probs = jax.nn.softmax(maps.reshape(n, h * w, k), axis=1).reshape(n, h, w, k)
    cell = image_size / w
    xs = (jnp.arange(w) + 0.5) * cell - 0.5  # centre of each map cell, in image pixels
    ys = (jnp.arange(h) + 0.5) * cell - 0.5
    return jnp.stack([jnp.einsum("nhwk,w->nk", probs, xs), jnp.einsum("nhwk,h->nk", probs, ys)], axis=-1)


def decode_outputs(outputs: tuple[jax.Array, jax.Array], image_size: int):
    """Net outputs -> (face probability [N], boxes [N, 4], landmarks [N, 5, 2]) in pixels."""
    face_logit, maps = outputs
    points = soft_argmax(maps, image_size)
    boxes = jnp.stack([points[:, 5, 0], points[:, 6, 1], points[:, 7, 0], points[:, 8, 1]], axis=1)
    return jax.nn.sigmoid(face_logit), boxes, points[:, :5]


class MiniatureFaceDetector:
    """`faces.FaceDetector` for the miniature world's images.

    Args:
      params: DetectorNet params (`load_detector`).
      image_size: side S of the images it reads (the training size).
      threshold: face probability above which a face counts as found (DEFAULT_THRESHOLD when None).
      batch_size: most images per jitted call; a smaller call is zero-padded to the next power of
        two (at least 8), so a few shapes are compiled, whatever the batch sizes seen.
    """

    def __init__(self, params: dict, image_size: int, threshold: Optional[float] = None, batch_size: int = 256):
        self.net = DetectorNet(params["conv0"]["kernel"].shape[-1])
        self.params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
        self.image_size = image_size
        self.threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
        self.batch_size = batch_size
        self._apply = jax.jit(lambda p, x: decode_outputs(self.net.apply({"params": p}, x), image_size))

    @classmethod
    def from_file(cls, path: str | Path, threshold: Optional[float] = None, batch_size: int = 256) -> "MiniatureFaceDetector":
        """threshold None: the one stored in the file (`save_detector`), else DEFAULT_THRESHOLD."""
        params, image_size = load_detector(path)
        if threshold is None:
            threshold = stored_threshold(path)
        return cls(params, image_size, threshold, batch_size)

    def face_probability(self, images: np.ndarray) -> np.ndarray:
        """images: [N, S, S, 3] float in [-1, 1] -> [N] float32 face probability in [0, 1] (before the threshold)."""
        return self._run(images)[0]

    def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """images [N, S, S, 3] -> (face probability [N], boxes [N, 4], landmarks [N, 5, 2]) as numpy."""
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"the miniature detector reads [N, {self.image_size}, {self.image_size}, 3] images, "
                             f"got shape {images.shape}")
        n = len(images)
        if n == 0:
            return np.zeros(0, np.float32), np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32)
        chunk = min(self.batch_size, max(8, 1 << max(n - 1, 0).bit_length()))
        padded = np.concatenate([images, np.zeros((-n % chunk,) + images.shape[1:], np.float32)])
        parts = [jax.device_get(self._apply(self.params, padded[s:s + chunk])) for s in range(0, len(padded), chunk)]
        return tuple(np.concatenate(p)[:n] for p in zip(*parts))

    def detect(self, images: np.ndarray) -> FaceDetections:
        """images: [N, S, S, 3] float in [-1, 1] -> the face of each image (-1 fills where none)."""
        prob, boxes, landmarks = self._run(images)
        found = prob > self.threshold
        return FaceDetections(
            found=found,
            boxes=np.where(found[:, None], boxes, -1).astype(np.float32),
            landmarks=np.where(found[:, None, None], landmarks, -1).astype(np.float32),
            confidence=np.where(found, prob, -1).astype(np.float32),
        )


def save_detector(params: dict, image_size: int, path: str | Path, threshold: Optional[float] = None,
                  dtype: type = np.float32) -> Path:
    """Writes the params as safetensors (keys "conv0/kernel", ...) in `dtype`, the image size and, when given, the
    face-probability threshold as metadata."""
    from safetensors.numpy import save_file

    path = Path(path)
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    metadata = {"image_size": str(image_size)}
    if threshold is not None:
        metadata["threshold"] = repr(float(threshold))
    save_file({k: np.asarray(v, dtype) for k, v in flat.items()}, str(path), metadata=metadata)
    return path


def _metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "numpy") as f:
        return f.metadata() or {}


def stored_threshold(path: str | Path) -> Optional[float]:
    """The face-probability threshold a `save_detector` file holds (None for files written without one)."""
    value = _metadata(path).get("threshold")
    try:
        return None if value is None else float(value)
    except ValueError as e:
        raise weights.WeightLoadError(f"{path}: metadata threshold {value!r} is not a number") from e


def load_detector(path: str | Path) -> tuple[dict, int]:
    """A `save_detector` file -> (params as float32 numpy arrays, the image size it was trained on)."""
    flat_file = {k: np.asarray(v, np.float32) for k, v in weights.read_state_dict(path).items()}
    params = traverse_util.unflatten_dict(flat_file, sep="/")
    width = params.get("conv0", {}).get("kernel")
    if width is None or "maps" not in params:
        raise weights.WeightLoadError(f"{path} is not a miniature face detector file (no conv0/kernel or maps/*)")
    expected = jax.eval_shape(DetectorNet(width.shape[-1]).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    flat_expected = traverse_util.flatten_dict(expected, sep="/")
    flat = traverse_util.flatten_dict(params, sep="/")
    wrong = sorted(k for k in flat_expected.keys() | flat.keys()
                   if k not in flat or k not in flat_expected or flat[k].shape != flat_expected[k].shape)
    if wrong:
        raise weights.WeightLoadError(f"{path}: keys missing, unexpected or of the wrong shape: {wrong}")
    image_size = int(_metadata(path).get("image_size", 0))
    if not image_size:
        raise weights.WeightLoadError(f"{path} has no image_size in its metadata")
    return params, image_size


# ----------------------------------------------------------------------------------------------
# Training


def detection_targets(renders: drawing.Renders) -> np.ndarray:
    """[N, 15] float32 training targets: has-face, box (4), landmarks (10) in pixels (zeros where no face)."""
    coords = np.concatenate([renders.boxes, renders.landmarks.reshape(-1, 10)], axis=1)
    coords = np.where(renders.has_face[:, None], coords, 0.0)
    return np.concatenate([renders.has_face[:, None].astype(np.float32), coords], axis=1).astype(np.float32)


def _augment(key: jax.Array, images: jax.Array, targets: jax.Array):
    """Random left-right flip, brightness/contrast, blur and Gaussian noise (per image)."""
    n, size = images.shape[0], images.shape[2]
    k_flip, k_gain, k_bias, k_blur, k_sigma, k_noise = jax.random.split(key, 6)
    flip = jax.random.bernoulli(k_flip, 0.5, (n,))
    images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
    coords = targets[:, 1:].reshape(n, 7, 2)  # box corners (2) then 5 landmarks, as (x, y) pairs
    flipped_x = size - 1.0 - coords[..., 0]  # pixel column c -> S - 1 - c
    box = jnp.stack([flipped_x[:, 1], coords[:, 0, 1], flipped_x[:, 0], coords[:, 1, 1]], axis=1)
    marks = jnp.stack([flipped_x[:, 2:], coords[:, 2:, 1]], axis=-1)[:, FLIP_ORDER].reshape(n, 10)
    flipped = jnp.concatenate([box, marks], axis=1) * targets[:, :1]
    targets = jnp.where(flip[:, None], jnp.concatenate([targets[:, :1], flipped], axis=1), targets)
    gain = jax.random.uniform(k_gain, (n, 1, 1, 1), minval=0.7, maxval=1.2)
    bias = jax.random.uniform(k_bias, (n, 1, 1, 3), minval=-0.15, maxval=0.15)
    images = images * gain + bias
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    rows = 0.25 * padded[:, :-2] + 0.5 * padded[:, 1:-1] + 0.25 * padded[:, 2:]
    blurred = 0.25 * rows[:, :, :-2] + 0.5 * rows[:, :, 1:-1] + 0.25 * rows[:, :, 2:]
    images = jnp.where(jax.random.bernoulli(k_blur, 0.4, (n, 1, 1, 1)), blurred, images)
    sigma = jax.random.uniform(k_sigma, (n, 1, 1, 1), maxval=0.12)
    images = images + sigma * jax.random.normal(k_noise, images.shape)
    return jnp.clip(images, -1.0, 1.0), targets


def detection_loss(outputs, targets: jax.Array, image_size: int) -> jax.Array:
    """Face/no-face cross-entropy + mean Huber error (pixels, delta 0.2: nearly L1, which keeps pulling
    sub-pixel errors down) of box and landmarks on faces."""
    face_logit, _ = outputs
    _, boxes, landmarks = decode_outputs(outputs, image_size)
    has_face = targets[:, 0]
    classification = optax.sigmoid_binary_cross_entropy(face_logit, has_face).mean()
    predicted = jnp.concatenate([boxes, landmarks.reshape(-1, 10)], axis=1)
    regression = optax.huber_loss(predicted, targets[:, 1:], delta=0.2).mean(axis=1)
    return classification + (regression * has_face).sum() / jnp.maximum(has_face.sum(), 1.0)


def with_backgrounds(faces: drawing.Renders, num_backgrounds: int, seed: int) -> drawing.Renders:
    """`faces` plus `num_backgrounds` background-only renders, shuffled (seeded): detector training data."""
    joined = drawing.concatenate([faces, world.background_renders(num_backgrounds, seed, faces.images.shape[1])])
    order = np.random.default_rng(seed).permutation(len(joined.images))
    return drawing.Renders(**{f: getattr(joined, f)[order] for f in drawing.Renders.__dataclass_fields__})


def train_detector(
    renders: drawing.Renders,
    steps: int,
    seed: int = 0,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    width: int = 32,
    log: Optional[Callable[[str], None]] = print,
) -> dict:
    """Trains DetectorNet on `renders` (with and without faces; augmented afresh every step) for
    `steps` Adam steps (warm-up, cosine decay); returns the params (numpy)."""
    image_size = renders.images.shape[1]
    images = jnp.asarray(renders.images)
    targets = jnp.asarray(detection_targets(renders))
    net = DetectorNet(width)
    key = jax.random.key(seed)
    params = net.init(key, images[:1])["params"]
    optimizer = optax.adam(optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, steps // 10), steps, 0.02 * learning_rate))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, key):
        k_batch, k_aug = jax.random.split(key)
        index = jax.random.randint(k_batch, (batch_size,), 0, images.shape[0])
        batch, batch_targets = _augment(k_aug, images[index], targets[index])
        loss_fn = lambda p: detection_loss(net.apply({"params": p}, batch), batch_targets, image_size)  # noqa: E731
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    start = time.time()
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, jax.random.fold_in(key, i))
        if log is not None and (i % max(steps // 10, 1) == 0 or i == steps - 1):
            log(f"detector step {i}/{steps} loss {float(loss):.4f} ({time.time() - start:.0f}s)")
    return jax.device_get(params)


# ----------------------------------------------------------------------------------------------
# Measuring


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N] IoU of boxes a, b [N, 4] (x1, y1, x2, y2)."""
    w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = w * h
    area = lambda r: (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def detection_accuracy(detector: MiniatureFaceDetector, renders: drawing.Renders) -> dict[str, float]:
    """On renders with ground truth: recall (faces found), false-positive rate (backgrounds called
    faces), and, over the faces found, mean box IoU, share with IoU > 0.8, mean and 95th-percentile
    landmark error (pixels, worst of the 5 points) and share with every landmark within 1 pixel
    (NaN where the renders hold no face, or no background)."""
    found = detector.detect(renders.images)
    faces = renders.has_face
    hit = faces & found.found
    iou = box_iou(found.boxes[hit], renders.boxes[hit])
    error = np.linalg.norm(found.landmarks[hit] - renders.landmarks[hit], axis=-1).max(axis=1)
    share = lambda x: float(x.mean()) if x.size else float("nan")  # noqa: E731
    return {
        "recall": share(found.found[faces]),
        "false_positive_rate": share(found.found[~faces]),
        "mean_iou": share(iou),
        "iou_above_0.8": share(iou > 0.8),
        "landmark_error_mean": share(error),
        "landmark_error_p95": float(np.percentile(error, 95)) if error.size else float("nan"),
        "landmarks_within_1px": share(error <= 1.0),
    }
