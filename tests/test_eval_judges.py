"""The miniature world's evaluation judges (assets/miniature, scripts/build_eval_judges.py): the evaluation detector
finds held-out world faces and rejects every ruin kind of eval/ruins.py at its stored threshold; the scene
classifier names held-out scenes and calls ruins "(no scene)"; the threshold travels in the detector file (older
files, without one, load with the default); the threshold rule and the ruin negatives do what they say."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairdiff_jax.eval import ruins
from fairdiff_jax.judging import scene_classifier as scene_lib
from fairdiff_jax.miniature import detector as detector_lib
from fairdiff_jax.miniature import eval_judges, world

MINIATURE = Path(__file__).resolve().parents[1] / "assets" / "miniature"
NUM_IMAGES = 128
# Held-out bounds, set below what the committed judges measure (manifest.json "eval_judges") with room for the
# smaller sample here: a judge that misses faces or passes ruins fails them.
MIN_RECALL = 0.9
MAX_FALSE_POSITIVE_RATE = 0.05
MIN_SCENE_ACCURACY = {"subject": 0.7, "style": 0.7, "context": 0.7}  # measured 0.81, 0.80, 0.80 on 1000
MAX_RUIN_CONSISTENCY = 0.1
# Per style x context cell (32 renders of the test occupations each), below the committed judges' weakest cells
# (watercolour at night: face share 0.81, consistency 0.38; the judges trained on the photo-heavy world mix
# measured 0.22 and 0.07 there).
MIN_CELL_FACE_SHARE = 0.75
MIN_CELL_CONSISTENCY = 0.3


@pytest.fixture(scope="module")
def held_out():
    prompts, renders = world.dataset(NUM_IMAGES, seed=4242)
    return prompts, renders.images


def test_eval_detector_finds_faces_and_rejects_every_ruin(held_out):
    _, images = held_out
    detector = detector_lib.MiniatureFaceDetector.from_file(MINIATURE / "eval_detector.safetensors")
    assert detector.threshold == detector_lib.stored_threshold(MINIATURE / "eval_detector.safetensors")
    recall = detector.detect(images).found.mean()
    scenes = detector.detect(world.background_renders(NUM_IMAGES, seed=4243).images).found.mean()
    passed = {name: float(detector.detect(ruin(images, np.random.default_rng(k))).found.mean())
              for k, (name, ruin) in enumerate(ruins.RUINS.items())}
    print(f"recall {recall:.3f}, scenes called faces {scenes:.3f}, ruins called faces {passed}")
    assert recall >= MIN_RECALL
    assert scenes <= MAX_FALSE_POSITIVE_RATE
    assert all(rate <= MAX_FALSE_POSITIVE_RATE for rate in passed.values()), passed


def test_scene_classifier_names_scenes_and_rejects_ruins(held_out):
    prompts, images = held_out
    scene, variables = scene_lib.load_scene_classifier(MINIATURE / "scene_classifier.pt")
    assert scene.heads == eval_judges.SCENE_HEADS

    def predict(x):
        return {h: np.asarray(l.argmax(-1)) for h, l in scene_lib.scene_logits(scene, variables, x).items()}

    labels = eval_judges.scene_labels(prompts)
    accuracy = eval_judges.scene_report(predict, images, labels)
    ruined = {name: eval_judges.scene_report(predict, ruin(images, np.random.default_rng(k)), labels)
              for k, (name, ruin) in enumerate(ruins.RUINS.items())}
    print(f"accuracy {accuracy}, on ruins {ruined}")
    assert all(accuracy[h] >= bound for h, bound in MIN_SCENE_ACCURACY.items()), accuracy
    # Consistency (the mean over heads of a right answer) of a ruined set must be near none.
    consistency = {name: np.mean([r[h] for h, _ in eval_judges.SCENE_HEADS]) for name, r in ruined.items()}
    assert all(c <= MAX_RUIN_CONSISTENCY for c in consistency.values()), consistency


@pytest.fixture(scope="module")
def every_style_and_context():
    """{(style, context): (prompts, images)}: 32 held-out renders (4 of each test occupation) per combination."""
    cells = {}
    for style in world.STYLES:
        for context in world.CONTEXTS:
            prompts = [world.style_context_prompt(style, o, context) for o in world.OCCUPATIONS_TEST] * 4
            cells[style, context] = prompts, world.render_prompts(prompts, np.random.default_rng(1)).images
    return cells


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
def test_judges_read_every_style_and_context(every_style_and_context):
    """The judges are trained on every style x context in equal shares: a watercolour night scene must be found
    and named about as surely as a photo (the before/after tables score prompts of every style and context)."""
    detector = detector_lib.MiniatureFaceDetector.from_file(MINIATURE / "eval_detector.safetensors")
    scene, variables = scene_lib.load_scene_classifier(MINIATURE / "scene_classifier.pt")

    def predict(x):
        return {h: np.asarray(l.argmax(-1)) for h, l in scene_lib.scene_logits(scene, variables, x).items()}

    measured = {}
    for cell, (prompts, images) in every_style_and_context.items():
        accuracy = eval_judges.scene_report(predict, images, eval_judges.scene_labels(prompts))
        measured[cell] = (float(detector.detect(images).found.mean()),
                          float(np.mean([accuracy[h] for h, _ in eval_judges.SCENE_HEADS])))
    print({f"{s} / {c or 'none'}": f"face {f:.2f} consistency {k:.2f}" for (s, c), (f, k) in measured.items()})
    low = {cell: m for cell, m in measured.items() if m[0] < MIN_CELL_FACE_SHARE or m[1] < MIN_CELL_CONSISTENCY}
    assert not low, f"style x context cells below face share {MIN_CELL_FACE_SHARE} / consistency {MIN_CELL_CONSISTENCY}: {low}"


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
def test_threshold_travels_in_the_file_and_old_files_keep_the_default(tmp_path):
    params = jax.device_get(detector_lib.DetectorNet(8).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])
    images = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    old = detector_lib.save_detector(params, 32, tmp_path / "old.safetensors")
    assert detector_lib.stored_threshold(old) is None
    assert detector_lib.MiniatureFaceDetector.from_file(old).threshold == detector_lib.DEFAULT_THRESHOLD
    half = detector_lib.save_detector(params, 32, tmp_path / "half.safetensors", threshold=0.25, dtype=np.float16)
    detector = detector_lib.MiniatureFaceDetector.from_file(half)
    assert detector.threshold == 0.25
    assert detector_lib.MiniatureFaceDetector.from_file(half, threshold=0.7).threshold == 0.7
    loaded, _ = detector_lib.load_detector(half)
    assert loaded["conv0"]["kernel"].dtype == np.float32
    np.testing.assert_array_equal(loaded["conv0"]["kernel"], np.asarray(params["conv0"]["kernel"], np.float16))
    probs = detector.face_probability(images)
    np.testing.assert_array_equal(detector.detect(images).found, probs > 0.25)


def test_choose_threshold_puts_every_negative_kind_below():
    rng = np.random.default_rng(0)
    faces = rng.uniform(0.8, 1.0, 1000)
    negatives = {"a": rng.uniform(0.0, 0.1, 1000), "b": rng.uniform(0.0, 0.4, 1000)}
    threshold = eval_judges.choose_threshold(faces, negatives)
    assert 0.59 < threshold < 0.61  # halfway between b's 99th percentile (~0.396) and the faces' 1st (~0.802)
    # When faces and a negative kind overlap, rejecting the negatives wins.
    overlapping = rng.uniform(0.0, 0.95, 1000)
    assert eval_judges.choose_threshold(faces, {"c": overlapping}) == np.quantile(overlapping, 0.99)


def test_ruin_negatives_cover_every_kind_and_carry_no_face():
    images = world.dataset(14, seed=0)[1].images
    ruined, kind = eval_judges.ruin_negatives(images, seed=0)
    assert np.bincount(kind).tolist() == [2] * len(ruins.RUINS)
    assert (ruined[kind == list(ruins.RUINS).index("black")] == -1).all()
    renders = eval_judges.without_faces(ruined)
    assert not renders.has_face.any() and (renders.boxes == -1).all() and renders.images.shape == images.shape
    labels = eval_judges.no_scene_labels(3)
    assert all(dict(eval_judges.SCENE_HEADS)[h][labels[h][0]] == eval_judges.NO_SCENE for h in labels)
