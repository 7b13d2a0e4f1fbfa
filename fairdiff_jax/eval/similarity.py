"""Image towers for evaluation (CLIP image embeddings, DINOv2, the miniature scene classifier's features) and
CLIP-I / DINO: each image's cosine similarity to its reference image of the same seed.

    nets = load_similarity_nets(clip_folder, dinov2_folder)
    similarity = embedding_similarity(images, references, nets)   # {'clip_i': [N], 'dino': [N]}
"""

import functools
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np

from fairdiff_jax.judging import clip_vision as clip_vision_lib
from fairdiff_jax.judging import dinov2
from fairdiff_jax.judging import scene_classifier as scene_lib


@functools.partial(jax.jit, static_argnames=("embed", "model"))
def _embeddings(params, images, *, embed, model):
    return embed(model, params, images)


class ImageTower(NamedTuple):
    """A network that maps images to feature vectors: embed(module, params, images [N, H, W, 3] in [-1, 1]) ->
    [N, D] float32 (module and embed static, hashable)."""

    module: Any
    params: Any
    embed: Callable[[Any, Any, jax.Array], jax.Array]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(_embeddings(self.params, images, embed=self.embed, model=self.module))

    def feature_dim(self, image_size: int) -> int:
        """D for square images of side `image_size` (from shapes alone: nothing runs)."""
        images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
        return jax.eval_shape(lambda p, x: self.embed(self.module, p, x), self.params, images).shape[-1]


def clip_tower(folder: str | Path) -> ImageTower:
    """CLIP image_embeds (unit norm) of a transformers CLIPVisionModelWithProjection or CLIPModel folder; images
    are resized to its config's image_size."""
    model, params = clip_vision_lib.load_clip_vision(folder)
    return ImageTower(model, jax.device_put(params), clip_vision_lib.clip_image_embeds)


def dino_tower(path: str | Path, input_size: int = 224) -> ImageTower:
    """DINOv2 CLS embeddings (unit norm) of a transformers Dinov2Model folder, or of a torch-hub .pth file; images
    resized to `input_size` (224 for the paper's numbers)."""
    path = Path(path)
    if path.is_dir():
        model, params = dinov2.load_dinov2(path, input_size)
    else:
        model, params = dinov2.load_dinov2_hub(path, input_size=input_size)
    return ImageTower(model, jax.device_put(params), dinov2.dino_image_embeds)


def scene_tower(scene: scene_lib.SceneClassifier, variables: Any) -> ImageTower:
    """The scene classifier's pooled features (the input of its last Linear)."""
    return ImageTower(scene, variables, scene_lib.scene_features)


class SimilarityNets(NamedTuple):
    """The CLIP image tower and DINOv2 of CLIP-I and DINO; either may be None."""

    clip: Optional[ImageTower] = None
    dino: Optional[ImageTower] = None


def load_similarity_nets(clip_vision: Optional[str | Path] = None, dinov2_path: Optional[str | Path] = None,
                         dino_input_size: int = 224) -> SimilarityNets:
    """CLIP vision tower (`clip_tower`), DINOv2 (`dino_tower`: a folder or a torch-hub .pth file)."""
    return SimilarityNets(clip_tower(clip_vision) if clip_vision is not None else None,
                          dino_tower(dinov2_path, dino_input_size) if dinov2_path is not None else None)


SIMILARITY_METRICS = ("clip_i", "dino")  # in SimilarityNets order


def embedding_similarity(images: np.ndarray, references: np.ndarray, nets: SimilarityNets) -> dict[str, np.ndarray]:
    """Cosine similarity of each image's CLIP image embedding (clip_i) and DINOv2 embedding (dino) to those
    of its reference image: {name: [N] float32}. images, references: [N, H, W, 3] float32 in [-1, 1]."""
    out = {}
    both = np.concatenate([images, references])
    for name, tower in zip(SIMILARITY_METRICS, nets):
        if tower is not None:
            features = tower(both)
            out[name] = np.sum(features[: len(images)] * features[len(images):], axis=-1).astype(np.float32)
    return out
