"""Prompt consistency (eval/consistency.py): CLIP-T against transformers' CLIPModel, and the scene classifier's
accuracy against the world's reading of the prompt, by hand."""

import numpy as np
import pytest
import torch
import transformers

from fairdiff_jax.eval.consistency import ClipTextConsistency, SceneConsistency, _scene_predictions
from fairdiff_jax.judging import scene_classifier as scene_lib
from fairdiff_jax.judging import tiny
from fairdiff_jax.judging.clip_vision import CLIP_MEAN, CLIP_STD
from fairdiff_jax.miniature import world


def test_clip_t_matches_transformers(tmp_path):
    folder = tiny.build_clip_model(tmp_path / "clip", seed=3)
    judge = ClipTextConsistency(folder)
    size = tiny.CLIP_VISION_CONFIG["image_size"]  # at the tower's size the resize is the identity
    images = np.random.default_rng(0).uniform(-1, 1, (3, size, size, 3)).astype(np.float32)
    prompt = "a photo of the face of a doctor, a person"
    got = judge.scores(images, prompt)

    model = transformers.CLIPModel.from_pretrained(folder).eval()
    tokens = transformers.CLIPTokenizer.from_pretrained(folder)(prompt, padding="max_length", max_length=77,
                                                                return_tensors="pt")
    pixels = ((torch.from_numpy(images).permute(0, 3, 1, 2) + 1) / 2 - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(
        CLIP_STD)[:, None, None]
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=pixels).pooler_output
        text_features = model.get_text_features(**tokens).pooler_output
    want = torch.nn.functional.cosine_similarity(image_features, text_features).numpy()
    print(f"CLIP-T: max abs diff {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.ptp(want) > 1e-3  # the scores depend on the image
    other = judge.scores(images, "a watercolor painting of the face of a judge")
    assert np.abs(other - got).max() > 1e-3  # and on the prompt


def test_scene_accuracy_counts_the_heads_that_name_the_prompts_scene(tmp_path):
    heads = [("subject", ["judge", "baker", "person"]), ("style", list(world.STYLES)), ("context", list(world.CONTEXTS))]
    path = tiny.build_scene_classifier(tmp_path / "scene.pt", 1, heads)
    scene, variables = scene_lib.load_scene_classifier(path)
    judge = SceneConsistency(scene, variables)
    images = world.render_prompts(["a photo of the face of a judge, a person"] * 6, np.random.default_rng(0)).images
    predictions = {h: np.asarray(p) for h, p in _scene_predictions(scene, variables, images).items()}
    for prompt, truth in (("a photo of the face of a judge, a person", ("judge", "photo", "")),
                          ("a watercolor painting of the face of a baker at night", ("baker", "watercolor painting", "at night"))):
        wanted = [dict(heads)[h].index(t) for h, t in zip(("subject", "style", "context"), truth)]
        by_hand = np.mean([predictions[h] == w for h, w in zip(("subject", "style", "context"), wanted)], axis=0)
        np.testing.assert_array_equal(judge.scores(images, prompt), by_hand.astype(np.float32))
    with pytest.raises(ValueError, match="'subject' head has no class 'doctor'"):
        judge.scores(images, "a photo of the face of a doctor, a person")
    lacking = scene_lib.SceneClassifier(scene.module, heads[:2], scene.image_size)
    with pytest.raises(ValueError, match=r"lacks the heads \['context'\]"):
        SceneConsistency(lacking, variables)


def test_scene_classifier_files_are_checked(tmp_path):
    path = tiny.build_scene_classifier(tmp_path / "scene.pt", 2, [("subject", ["a", "b"]), ("style", ["c"])])
    scene, _ = scene_lib.load_scene_classifier(path)
    assert scene.heads == (("subject", ("a", "b")), ("style", ("c",))) and scene.image_size == 32
    (tmp_path / "scene.json").write_text('{"heads": [["subject", ["a", "b", "c"]], ["style", ["c"]]], "image_size": 32}')
    with pytest.raises(Exception, match=r"scene classifier .*3 output classes, but 4"):
        scene_lib.load_scene_classifier(path)
    (tmp_path / "scene.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"scene\.json not found"):
        scene_lib.load_scene_classifier(path)
