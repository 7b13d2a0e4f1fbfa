"""A whole-image classifier of what a prompt asks for (subject, style, context): the miniature world's
prompt-consistency judge, and its pooled features the fidelity metric's feature space.

Files: a torchvision `mobilenet_v3_large` state dict (`scene_classifier.pt`) whose last Linear gives the
heads' logits concatenated in order, and beside it a JSON file of the same stem (`scene_classifier.json`):

    {"heads": [["subject", ["doctor", ...]], ["style", ["photo", ...]], ["context", ["", "at night", ...]]],
     "image_size": 32}

Input: the whole image in [-1, 1], resized to image_size. A context name "" means "no context".

    scene, variables = load_scene_classifier("assets/miniature/scene_classifier.pt")
    logits = scene_logits(scene, variables, images)       # {head: [N, K_head]}
    features = scene_features(scene, variables, images)   # [N, D] (D = 1280 * width_mult)
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from fairdiff_jax.judging import mobilenet_v3
from fairdiff_jax.nn.transformer import resize_bilinear
from fairdiff_jax.nn.weights import WeightLoadError


@dataclasses.dataclass(frozen=True)
class SceneClassifier:
    """The network (static, hashable: a jit argument), heads ((name, (class names...)), ...) in logit order, and
    the image size it reads; its variables travel separately."""

    module: mobilenet_v3.MobileNetV3Large
    heads: tuple[tuple[str, tuple[str, ...]], ...]
    image_size: int

    def class_index(self, head: str, name: str) -> int:
        """The index of class `name` in head `head`; ValueError naming both when the head has no such class."""
        names = dict(self.heads)[head]
        if name not in names:
            raise ValueError(f"the scene classifier's {head!r} head has no class {name!r} (it knows {list(names)})")
        return names.index(name)


def heads_file(path: str | Path) -> Path:
    """The JSON file that describes the classifier file `path`: same folder, same stem, .json."""
    return Path(path).with_suffix(".json")


def _read_heads(path: Path) -> tuple[tuple[tuple[str, tuple[str, ...]], ...], int]:
    if not path.is_file():
        raise FileNotFoundError(f"scene classifier: {path} not found (the heads and image_size of the classifier)")
    try:
        spec = json.loads(path.read_text())
        heads = tuple((str(name), tuple(str(c) for c in classes)) for name, classes in spec["heads"])
        image_size = int(spec["image_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: expected {{'heads': [[name, [classes...]], ...], 'image_size': int}} ({e})") from e
    if not heads or any(not classes for _, classes in heads):
        raise ValueError(f"{path}: every head needs at least one class")
    return heads, image_size


def load_scene_classifier(path: str | Path) -> tuple[SceneClassifier, Any]:
    """(SceneClassifier, variables as jax arrays) from the state dict at `path` and the JSON beside it
    (`heads_file`); the heads' class counts must add up to the last Linear's width (WeightLoadError naming the
    file otherwise)."""
    heads, image_size = _read_heads(heads_file(path))
    num_classes = sum(len(classes) for _, classes in heads)
    try:
        module, variables = mobilenet_v3.load_mobilenet_v3(path, num_classes)
    except WeightLoadError as e:
        raise WeightLoadError(f"scene classifier (heads {[(n, len(c)) for n, c in heads]}): {e}") from e
    return SceneClassifier(module, heads, image_size), jax.tree.map(jnp.asarray, variables)


def _input(scene: SceneClassifier, images: jax.Array) -> jax.Array:
    return resize_bilinear(jnp.asarray(images, jnp.float32), scene.image_size)


def scene_logits(scene: SceneClassifier, variables: Any, images: jax.Array) -> dict[str, jax.Array]:
    """images [N, H, W, 3] in [-1, 1] (square) -> {head: [N, K_head] float32 logits}."""
    logits = scene.module.apply(variables, _input(scene, images))
    out, start = {}, 0
    for name, classes in scene.heads:
        out[name] = logits[:, start:start + len(classes)]
        start += len(classes)
    return out


def scene_features(scene: SceneClassifier, variables: Any, images: jax.Array) -> jax.Array:
    """images [N, H, W, 3] in [-1, 1] (square) -> [N, D] float32, the input of the classifier's last Linear."""
    return mobilenet_v3.pooled_features(scene.module, variables, _input(scene, images))
