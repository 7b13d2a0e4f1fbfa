"""The miniature world: determinism, exact geometry, visible attributes, the configured biases, and
its prompt files (docs/method.md#prompts schema, every prompt readable by the world)."""

import json
from pathlib import Path

import numpy as np
import pytest

from fairdiff_jax import prompts
from fairdiff_jax.miniature import drawing, world

PROMPT_DIR = Path(__file__).resolve().parents[1] / "assets" / "miniature" / "prompts"  # written by build_miniature
PHOTO = "a photo of the face of a {}, a person"


def _cheek_crown_and_beside(r: drawing.Renders):
    """Per image, colours [N, 3] in [0, 1] read at the nearest pixel: the cheeks (mean of both), the
    crown of the head, and beside the face at mouth height (where long hair falls). The face frame
    is recovered from the landmarks (drawing.LANDMARK_TEMPLATE)."""
    n = len(r.images)
    pixels = (r.images + 1) / 2
    eyes, mouth = r.landmarks[:, :2], r.landmarks[:, 3:]
    across = (eyes[:, 1] - eyes[:, 0]) / np.linalg.norm(eyes[:, 1] - eyes[:, 0], axis=1, keepdims=True)
    down = np.stack([-across[:, 1], across[:, 0]], axis=1)
    half_w = np.linalg.norm(eyes[:, 1] - eyes[:, 0], axis=1) / 0.8  # eyes sit at u = +-0.40
    half_h = np.einsum("nd,nd->n", mouth.mean(1) - eyes.mean(1), down) / 0.64  # from v = -0.12 to 0.52
    center = eyes.mean(1) + 0.12 * half_h[:, None] * down

    def read(u, v):
        point = center + u * half_w[:, None] * across + v * half_h[:, None] * down
        col = np.clip(np.round(point[:, 0]).astype(int), 0, r.images.shape[2] - 1)
        row = np.clip(np.round(point[:, 1]).astype(int), 0, r.images.shape[1] - 1)
        return pixels[np.arange(n), row, col]

    cheeks = (read(-0.6, 0.15) + read(0.6, 0.15)) / 2
    return cheeks, read(0.0, -0.8), (read(-1.12, 0.5) + read(1.12, 0.5)) / 2


def test_deterministic_by_seed():
    prompts_a, a = world.dataset(48, seed=3)
    prompts_b, b = world.dataset(48, seed=3)
    _, c = world.dataset(48, seed=4)
    assert prompts_a == prompts_b
    for field in drawing.Renders.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.images, c.images)
    # The chunking of the drawing changes nothing.
    rng = lambda: np.random.default_rng(9)  # noqa: E731
    np.testing.assert_array_equal(world.render_prompts(prompts_a, rng(), chunk=7).images,
                                  world.render_prompts(prompts_a, rng(), chunk=1000).images)


def test_images_and_geometry():
    _, r = world.dataset(400, seed=0)
    assert r.images.shape == (400, world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and r.images.dtype == np.float32
    assert r.images.min() >= -1 and r.images.max() <= 1
    assert r.has_face.all()
    x, y = r.landmarks[..., 0], r.landmarks[..., 1]
    inside = ((x > r.boxes[:, None, 0]) & (x < r.boxes[:, None, 2]) & (y > r.boxes[:, None, 1]) & (y < r.boxes[:, None, 3]))
    assert inside.all()
    assert ((r.boxes >= 0) & (r.boxes <= world.IMAGE_SIZE - 1)).all()  # faces lie inside the image
    assert (x[:, 0] < x[:, 1]).all() and (x[:, 3] < x[:, 4]).all()  # "left" = smaller x
    assert (y[:, :2].max(1) < y[:, 2]).all() and (y[:, 2] < y[:, 3:].min(1)).all()  # eyes, nose, mouth top-down
    width, height = r.boxes[:, 2] - r.boxes[:, 0], r.boxes[:, 3] - r.boxes[:, 1]
    assert width.min() > 0.25 * world.IMAGE_SIZE and height.max() < 0.6 * world.IMAGE_SIZE
    # Position, size and roll vary (detection is not a constant).
    assert r.boxes[:, 0].std() > 1.5 and width.std() > 0.8
    roll = np.degrees(np.arctan2(y[:, 1] - y[:, 0], x[:, 1] - x[:, 0]))
    assert roll.min() < -10 and roll.max() > 10


def test_eyes_are_drawn_at_their_landmarks():
    """The pixel nearest each eye landmark is much darker than the cheeks."""
    r = world.render_prompts([PHOTO.format("doctor")] * 64, np.random.default_rng(1))
    pixels = (r.images + 1) / 2
    eye = np.round(r.landmarks[:, :2]).astype(int)
    eye_brightness = pixels[np.arange(64)[:, None], eye[..., 1], eye[..., 0]].mean(-1)
    cheek_brightness = _cheek_crown_and_beside(r)[0].mean(-1)
    assert (eye_brightness < 0.7 * cheek_brightness[:, None]).all()


def test_attributes_are_visible():
    """Plain photos: cheek colour names the race (nearest skin tone), crown brightness the age,
    hair beside the chin the gender."""
    texts, r = world.dataset(600, seed=5)
    specs = [world.parse_prompt(p) for p in texts]
    photo = np.array([spec.style == "photo" and spec.context == "" for spec in specs])
    cheeks, crown, beside = _cheek_crown_and_beside(r)
    nearest_tone = np.argmin(((cheeks[:, None] - world.SKIN_TONES[None]) ** 2).sum(-1), axis=1)
    assert (nearest_tone[photo] == r.race[photo]).mean() > 0.97
    assert ((crown[photo].mean(-1) > 0.5) == (r.age[photo] == 1)).mean() > 0.97
    hair_beside = np.abs(beside - crown).max(-1) < 0.12
    assert (hair_beside[photo] == (r.gender[photo] == 0)).mean() > 0.9
    # Across every style and context the races still differ in mean cheek colour.
    means = np.stack([cheeks[r.race == k].mean(0) for k in range(4)])
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert distances[~np.eye(4, dtype=bool)].min() > 0.15


@pytest.mark.parametrize("prompt", [PHOTO.format("nurse"), "a watercolor painting of the face of a judge at night",
                                    "a photo of the face of a happy person", "a photo of the face of a polo player, a person"])
def test_sampled_attributes_follow_the_configured_bias(prompt):
    n = 6000
    r = world.render_prompts([prompt] * n, np.random.default_rng(2), size=8)  # attributes do not depend on size
    spec = world.parse_prompt(prompt)
    joint = world.joint_distribution(spec)
    observed = np.bincount(4 * r.gender + r.race, minlength=8).reshape(2, 4) / n
    tolerance = 4 * np.sqrt(joint * (1 - joint) / n) + 1e-3
    assert (np.abs(observed - joint) <= tolerance).all(), (observed, joint)
    assert abs(r.age.mean() - spec.subject.p_old) < 4 * np.sqrt(0.25 / n)
    # Strongly biased: the dominant joint class holds 60-85% of the mass.
    assert 0.6 <= joint.max() <= 0.85 + 1e-9


def test_attribute_words_condition():
    spec = world.parse_prompt("a photo of the face of an old female asian doctor")
    assert (spec.gender, spec.race, spec.age) == (0, 3, 1)
    r = world.render_prompts(["a photo of the face of a male tennis player"] * 200, np.random.default_rng(0), size=8)
    assert (r.gender == 1).all()
    joint = world.joint_distribution(world.parse_prompt("a photo of the face of a black doctor"))
    assert joint[:, 1].sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="several subjects"):
        world.parse_prompt("a photo of the face of a doctor and a nurse")
    with pytest.raises(ValueError, match="names no subject"):
        world.parse_prompt("a photo of a cat")


def test_background_renders_have_no_face():
    r = world.background_renders(16, seed=0)
    assert not r.has_face.any() and (r.boxes == -1).all() and (r.gender == -1).all()
    # The no-face render is the scene the face render is drawn on (same random draws): it differs
    # at the face, not in the upper left corner.
    face = world.render_prompts([PHOTO.format("doctor")], np.random.default_rng(0))
    empty = world.render_prompts([PHOTO.format("doctor")], np.random.default_rng(0), has_face=np.zeros(1, bool))
    changed = np.abs(face.images[0] - empty.images[0]).max(-1) > 1e-6
    x1, y1, x2, y2 = face.boxes[0]
    assert changed[int(y1) + 2, int((x1 + x2) / 2)] and not changed[:2, :2].any()


def test_prompt_files_match_the_world_and_the_schema():
    files = {kind: f"{PROMPT_DIR}/{kind}.json" for kind in prompts.PROMPT_KINDS}
    loaded = prompts.load_prompt_sets(files)
    built = world.prompt_sets()
    for kind in prompts.PROMPT_KINDS:
        with open(files[kind]) as f:
            assert json.load(f) == built[kind], f"{files[kind]} is stale: rewrite it from world.prompt_sets()"
    train = prompts.training_prompts(loaded)
    tests = [p for kind in prompts.PROMPT_KINDS for p in loaded[kind]["test_prompts"]]
    for prompt in train + prompts.validation_prompts(loaded) + tests:
        world.parse_prompt(prompt)
    # Held out: no test prompt's subject is trained on.
    train_subjects = {world.parse_prompt(p).subject.name for p in train}
    assert not train_subjects & {world.parse_prompt(p).subject.name for p in tests}
    assert "an architect" in loaded["occupation"]["test_prompts"][0]


def _build_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "build_miniature.py"
    spec = importlib.util.spec_from_file_location("build_miniature", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tokenizer_has_one_token_per_world_word():
    build = _build_script()
    tokenizer, vocab, merges = build.build_tokenizer(world.vocabulary())
    texts, _ = world.dataset(300, seed=0)
    files = world.prompt_sets()
    texts += [p for content in files.values() for key, values in content.items() if "prompts" in key for p in values]
    for text in texts:
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])[1:-1]
        words = text.replace(",", " ,").split()
        assert tokens == [w + "</w>" for w in words], text


@pytest.mark.slow
def test_build_script_writes_loadable_assets(tmp_path):
    """scripts/build_miniature.py end to end on a tiny budget (nothing is trained to quality): every
    file is written and loads through the production loaders. About a minute on 2 cores."""
    import jax.numpy as jnp

    from fairdiff_jax.judging.clip_vision import clip_image_embeds, load_clip_vision
    from fairdiff_jax.judging.dinov2 import dino_image_embeds, load_dinov2
    from fairdiff_jax.judging.face_bank import load_face_bank
    from fairdiff_jax.judging.mobilenet_v3 import load_mobilenet_v3
    from fairdiff_jax.miniature.detector import MiniatureFaceDetector
    from fairdiff_jax.sd.loader import load_stable_diffusion

    build = _build_script()
    out = tmp_path / "miniature"
    guardrails = dict(tower_images=16, tower_steps=2, sfnet_images=32, sfnet_steps=2, bank_per_class=3,
                      detector_images=32, detector_steps=2)
    manifest = build.build(out, seed=0, num_images=400, vae_steps=2, generator_steps=2, classifier_steps=2,
                           classifier_images=100, check_images=2, guardrail_sizes=guardrails, held_out_size=16)
    assert json.loads((out / "manifest.json").read_text())["files"] == manifest["files"]
    config = manifest["config"]
    sd = load_stable_diffusion(out / config["sd_path"])
    assert sd.image_size == world.IMAGE_SIZE and sd.latent_shape == (8, 8, 4)
    for path, classes in ((config["classifier_path"], 6), (config["test_classifiers"]["gender"], 2),
                          (config["test_classifiers"]["race"], 4), (config["test_classifiers"]["age"], 2)):
        module, _ = load_mobilenet_v3(out / path)
        assert module.num_classes == classes
    assert load_face_bank(out / config["face_bank_path"]).shape == (8 * 3, build.SFNET_FEATURE_DIM)
    images = jnp.zeros((2, world.IMAGE_SIZE, world.IMAGE_SIZE, 3))
    clip, clip_params = load_clip_vision(out / config["clip_vision_path"])
    assert clip_image_embeds(clip, clip_params, images).shape[0] == 2
    dino, dino_params = load_dinov2(out / config["dinov2_path"], input_size=config["img_size_small"])
    assert dino_image_embeds(dino, dino_params, images).shape[0] == 2
    detector = MiniatureFaceDetector.from_file(out / config["detector_path"])
    assert detector.detect(np.zeros((3, world.IMAGE_SIZE, world.IMAGE_SIZE, 3), np.float32)).found.shape == (3,)
    for kind in prompts.PROMPT_KINDS:
        prompts.load_prompt_file(out / config["prompts_dir"] / f"{kind}.json", kind)
    assert len(manifest["generated_check"]) == 8
