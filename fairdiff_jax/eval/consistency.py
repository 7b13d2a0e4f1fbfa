"""Prompt consistency: does each image show what its prompt asks for? Two judges, one interface
(`scores(images, prompt) -> [N] float32`, higher = more consistent):

- `ClipTextConsistency` (Stable Diffusion): CLIP-T, the cosine between the image's CLIP image embedding and the
  prompt's CLIP text embedding, both towers and the tokenizer from one transformers CLIPModel folder (the paper
  reports CLIP-T with the same CLIP release as its CLIP-I).
- `SceneConsistency` (miniature world): a scene classifier's accuracy against the scene the prompt asks for
  (`miniature.reference.scene_truth`): per image, the share of its heads (subject, style, context) it gets right.
"""

import functools
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fairdiff_jax.eval.similarity import ImageTower, clip_tower
from fairdiff_jax.judging import scene_classifier as scene_lib
from fairdiff_jax.miniature import reference
from fairdiff_jax.sd import clip_text

SCENE_HEADS = ("subject", "style", "context")


class ClipTextConsistency:
    """CLIP-T of a CLIPModel folder (vision tower, text tower with projection, tokenizer)."""

    name = "CLIP-T"

    def __init__(self, folder: str | Path):
        from transformers import CLIPTokenizer

        self.image_tower: ImageTower = clip_tower(folder)
        self.text_model, text_params = clip_text.load_clip_text_with_projection(folder)
        self.text_params = jax.device_put(text_params)
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError, TypeError) as e:
            raise FileNotFoundError(f"{folder}: no CLIP tokenizer (vocab.json + merges.txt or tokenizer.json): {e}") from e
        self.weights = (self.image_tower.params, self.text_params)
        self._text_embeds: dict[str, np.ndarray] = {}
        self._embed_text = jax.jit(functools.partial(clip_text.clip_text_embeds, self.text_model))

    def text_embedding(self, prompt: str) -> np.ndarray:
        """[P] unit-norm text feature of `prompt` (padded to the tower's length, with its mask)."""
        if prompt not in self._text_embeds:
            length = self.text_model.config.max_position_embeddings
            tokens = self.tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="np")
            self._text_embeds[prompt] = np.asarray(self._embed_text(
                self.text_params, tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(np.int32)))[0]
        return self._text_embeds[prompt]

    def scores(self, images: np.ndarray, prompt: str) -> np.ndarray:
        """images [N, H, W, 3] in [-1, 1] -> [N] float32 cosine to the prompt."""
        return (self.image_tower(images) @ self.text_embedding(prompt)).astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _scene_predictions(scene: scene_lib.SceneClassifier, variables: Any, images: jax.Array) -> dict[str, jax.Array]:
    return {head: logits.argmax(-1) for head, logits in scene_lib.scene_logits(scene, variables, images).items()}


class SceneConsistency:
    """The miniature world's scene classifier as a consistency judge."""

    name = "scene accuracy"

    def __init__(self, scene: scene_lib.SceneClassifier, variables: Any):
        missing = [h for h in SCENE_HEADS if h not in dict(scene.heads)]
        if missing:
            raise ValueError(f"the scene classifier lacks the heads {missing} (it has {[h for h, _ in scene.heads]})")
        self.scene, self.variables = scene, variables
        self.weights = variables

    def scores(self, images: np.ndarray, prompt: str) -> np.ndarray:
        """images [N, H, W, 3] in [-1, 1] -> [N] float32 share of the heads that name the prompt's scene."""
        truth = reference.scene_truth(prompt)
        wanted = {head: self.scene.class_index(head, truth[head]) for head in SCENE_HEADS}
        predictions = _scene_predictions(self.scene, self.variables, images)
        correct = [np.asarray(predictions[head]) == wanted[head] for head in SCENE_HEADS]
        return np.mean(correct, axis=0).astype(np.float32)
