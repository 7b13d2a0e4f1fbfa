"""Evaluation that a destroyed image cannot pass, in the miniature world (configs/miniature.py's evaluator).

- Every ruin of eval/ruins.py applied to world renders of a prompt ranks below the renders themselves on each
  new metric: fidelity precision, prompt consistency and face share (margins below), as judged by the miniature
  world's evaluation judges (assets/miniature/scene_classifier.pt + .json, eval_detector.safetensors).
- A set of NaN or black images is reported as degenerate with no face and no bias, never as a plausible row,
  even with a detector that boxes black images (the training detector does).
- The reference set is balanced over gender x race and shows the prompt's scene.
"""

from pathlib import Path

import numpy as np
import pytest

from fairdiff_jax import config_cli
from fairdiff_jax.eval import from_config, ruins, tables
from fairdiff_jax.eval.evaluator import PromptResults, prompt_metrics
from fairdiff_jax.judging import tiny
from fairdiff_jax.judging.detection import make_detector
from fairdiff_jax.miniature import detector as detector_lib
from fairdiff_jax.miniature import reference, world

ROOT = Path(__file__).resolve().parents[1]
MINIATURE = ROOT / "assets" / "miniature"
PROMPTS = ("a photo of the face of a judge, a person", "a watercolor painting of the face of a baker at night")
NUM_IMAGES = 32
# Drops a ruin must cause (real minus ruined, absolute): a destroyed image set must lose at least this much.
MARGINS = {"fidelity_precision": 0.5, "consistency": 0.3, "face_share": 0.5}
SCENE_JUDGE = ("--config.eval.fidelity_features=scene_classifier", "--config.eval.consistency=scene_classifier")


def miniature_config(*overrides):
    config, _ = config_cli.parse_config_args(["test", "--config", str(ROOT / "configs" / "miniature.py"),
                                              f"--config.assets_dir={MINIATURE}", *overrides])
    return config


def measure(evaluator, images, prompt, reference_features):
    result = PromptResults.from_rows([str(j) for j in range(len(images))], evaluator.judge(images, prompt))
    return prompt_metrics(result, reference_features, evaluator.fidelity_k)


@pytest.mark.xfail(strict=True, reason=(
    "judges trained on every style x context find the faces (face share 0.97-1.00 on both prompts) but the scene "
    "classifier still reads the night watercolour prompt's real renders poorly (consistency 0.27, a drop of "
    "0.27 < 0.3 when ruined), and blurred photo renders keep fidelity precision 0.56 (a drop of 0.41 < 0.5)"))
def test_every_ruin_ranks_below_the_real_renders():
    config = miniature_config()  # its evaluation judges: eval_detector.safetensors, scene_classifier.pt
    from_config.check_eval_assets(config)
    evaluator = from_config.load_evaluator(config)
    drops = {}
    for p, prompt in enumerate(PROMPTS):
        features = from_config.world_reference_features(evaluator, prompt, config.eval.reference_images_per_prompt)
        real = world.render_prompts([prompt] * NUM_IMAGES, np.random.default_rng(100 + p)).images
        real_row = measure(evaluator, real, prompt, features)
        for name, ruin in ruins.RUINS.items():
            row = measure(evaluator, ruin(real, np.random.default_rng(p)), prompt, features)
            drops[prompt, name] = {m: real_row[m] - row[m] for m in MARGINS}
            print(f"{name:15s} " + " ".join(f"{m} {real_row[m]:.2f} -> {row[m]:.2f}" for m in MARGINS))
    failed = {key: d for key, d in drops.items() if any(d[m] < MARGINS[m] for m in MARGINS)}
    assert not failed, f"ruins that did not drop every metric by {MARGINS}: {failed}"


@pytest.fixture(scope="module")
def stand_in_evaluator(tmp_path_factory):
    """configs/miniature.py's evaluator with a random stand-in scene classifier and, as evaluation detector, the
    training detector with its threshold at 0 (it finds a face in every image, black ones included)."""
    folder = tmp_path_factory.mktemp("scene")
    heads = [("subject", list(world.SUBJECTS)), ("style", list(world.STYLES)), ("context", list(world.CONTEXTS))]
    path = tiny.build_scene_classifier(folder / "scene_classifier.pt", 0, heads)
    params, image_size = detector_lib.load_detector(MINIATURE / "face_detector.safetensors")
    accepting = detector_lib.save_detector(params, image_size, folder / "accepting_detector.safetensors", threshold=0.0)
    config = miniature_config(*SCENE_JUDGE, f"--config.eval.scene_classifier_path={path}",
                              f"--config.eval.detector_path={accepting}")
    from_config.check_eval_assets(config)
    return config, from_config.load_evaluator(config)


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
def test_nan_and_black_sets_are_reported_as_degenerate(stand_in_evaluator):
    config, evaluator = stand_in_evaluator
    prompt = PROMPTS[0]
    real = world.render_prompts([prompt] * 8, np.random.default_rng(0)).images
    black = np.full_like(real, -1.0)
    nan = np.full_like(real, np.nan)
    half_nan = np.concatenate([real[:4], nan[:4]])
    # The guard is needed: this detector puts a face on black images.
    assert make_detector(config.eval.detector, config.eval.detector_path).detect(black).found.mean() > 0.5
    features = from_config.world_reference_features(evaluator, prompt, 16)
    rows = {name: measure(evaluator, images, prompt, features)
            for name, images in (("real", real), ("black", black), ("nan", nan), ("half nan", half_nan))}
    assert rows["real"]["degenerate_share"] == 0 and rows["real"]["face_share"] > 0.5
    for name in ("black", "nan"):
        row = rows[name]
        assert row["degenerate_share"] == 1 and row["face_share"] == 0 and row["num_faces"] == 0, name
        biases = [m for m in tables.BIAS_METRICS if m in row]
        assert biases == ["gender_bias", "race_bias", "gender_race_bias"], name
        assert all(np.isnan(row[m]) for m in biases), name
        assert row["fidelity_precision"] == 0, name  # a black image lies on no render's manifold
    assert rows["half nan"]["degenerate_share"] == 0.5 and rows["half nan"]["face_share"] <= 0.5
    assert np.isfinite(rows["half nan"]["consistency"])  # the judges saw black images, not NaN

    table_rows = tables.per_prompt_table({0: rows["black"], 1: rows["real"]}, ["black", "real"])
    markdown = tables.per_prompt_markdown(table_rows)
    assert "| 0 | black | 8 | 0 | 0.000 | 1.000 | – | – | – |" in markdown
    notes = tables.warnings(table_rows)
    assert any("8 of 16 images are degenerate" in n for n in notes) and any("no face in any image of ['black']" in n for n in notes)


def test_reference_renders_are_balanced_and_show_the_scene():
    prompt = PROMPTS[1]
    renders = reference.balanced_renders(prompt, 64, seed=3)
    joint = 4 * renders.gender + renders.race
    assert np.bincount(joint, minlength=8).tolist() == [8] * 8
    again = reference.balanced_renders(prompt, 64, seed=3)
    np.testing.assert_array_equal(renders.images, again.images)
    assert reference.scene_truth(prompt) == {"subject": "baker", "style": "watercolor painting", "context": "at night"}
    with pytest.raises(ValueError, match="fixes gender, race or age"):
        reference.class_prompt("a photo of the face of a female doctor", 0, 0)


def test_reference_renders_balanced_in_age_too():
    """balance_age: the 16 gender x race x age classes equally often, whatever the subject's own share of old faces
    (a judge: mostly young); without it, the same renders as before (the subject's ages)."""
    prompt = "a photo of the face of a judge"
    renders = reference.balanced_renders(prompt, 64, seed=3, balance_age=True)
    assert np.bincount(8 * renders.age + 4 * renders.gender + renders.race, minlength=16).tolist() == [4] * 16
    plain = reference.balanced_renders(prompt, 64, seed=3)
    assert np.bincount(4 * plain.gender + plain.race, minlength=8).tolist() == [8] * 8
    assert plain.age.mean() != 0.5
    with pytest.raises(ValueError, match="fixes gender, race or age"):
        reference.class_prompt("a photo of the face of an old doctor", 0, 0, 1)


@pytest.mark.parametrize("override, expected", [
    (("eval.consistency=scene_classifier", "eval.scene_classifier_path=/no/scene.pt"),
     r"config.eval.scene_classifier_path: file not found: /no/scene.pt"),
    (("eval.fidelity_features=vgg",), r"config.eval.fidelity_features = 'vgg': use one of"),
    (("eval.fidelity_k=16",), r"config.eval.fidelity_k = 16: must be >= 1 and below config.eval.images_per_prompt = 16"),
    (("test_classifiers.age=/no/age.pt",), r"config.test_classifiers.age: file not found"),
    (("eval.detector=nonsense",), r"config.eval.detector: unknown detector 'nonsense'"),
])
def test_eval_config_errors_name_the_key(override, expected):
    with pytest.raises((ValueError, FileNotFoundError), match=expected):
        from_config.check_eval_assets(miniature_config(*(f"--config.{o}" for o in override)))
