"""`python -m fairdiff_jax.evaluate` and the folder evaluation on tiny inputs: 64-pixel JPEGs, random-weight
torchvision classifiers, a fake face detector (the real MTCNN runs in one CLI test), tiny CLIP/DINOv2.

- test_results.pkl loads with the original README's snippet, has its schema, and its logits are the
  PyTorch classifiers' logits of the original's face crop (slice, -1 pad, resize) of each image;
- the bias table equals a hand computation from chosen logits;
- a rerun computes nothing, an added image is the only one computed, a settings change recomputes;
- bad inputs stop the CLI with a message naming the flag and path;
- identical reference folders give CLIP-I = DINO = 1, swapped references give equal, lower values.
"""

import csv
import json
import math
import re
import shutil

import jax
import numpy as np
import pytest
import torch
import torchvision
import transformers
from face_torch_reference import reference_face_chip, reference_square_box
from PIL import Image
from test_clip import TINY_VISION, randomize_
from test_mobilenet_v3 import _torch_classifier

from fairdiff_jax.eval import cli, tables
from fairdiff_jax.eval import evaluate as ev
from fairdiff_jax.eval.evaluator import Evaluator, PromptResults, prompt_metrics
from fairdiff_jax.eval.face_analysis import load_test_classifiers
from fairdiff_jax.eval.folders import read_images
from fairdiff_jax.eval.similarity import load_similarity_nets
from fairdiff_jax.judging import clip_vision as clip_vision_lib
from fairdiff_jax.judging import detection, dinov2

SIZE = 64  # image side
FACE_SIZE = 64  # face chips (224 in real use; MobileNetV3 takes any size >= 32)
# The fake detector's face: 32 x 24, square-expanded (0.5) to [22, 8, 70, 56], past the right edge.
FACE_BOX = np.array([30.0, 20.0, 62.0, 44.0], np.float32)
CROP_BOX = [22, 8, 70, 56]
# Which images have a face (bright ones), per prompt folder.
LAYOUT = {0: [True, True, False], 1: [True, False, True]}


class BrightFaceDetector:
    """Finds FACE_BOX in every image brighter than mid-grey on average; counts the calls and the real
    (not all -1 padding) images it is shown."""

    def __init__(self):
        self.calls = 0
        self.images_seen = 0

    def detect(self, images):
        images = np.asarray(images)
        self.calls += 1
        self.images_seen += int((images > -1).any(axis=(1, 2, 3)).sum())
        found = images.mean(axis=(1, 2, 3)) > 0
        n = len(images)
        return detection.FaceDetections(
            found, np.where(found[:, None], FACE_BOX, -1).astype(np.float32),
            np.full((n, 5, 2), -1, np.float32), np.where(found, 0.99, -1).astype(np.float32),
        )


def bright_face_detector():
    """For --detector test_evaluate:bright_face_detector."""
    return BrightFaceDetector()


class FileDetector(BrightFaceDetector):
    def __init__(self, path):
        super().__init__()
        self.path = path

    @classmethod
    def from_file(cls, path):
        return cls(path)


def test_detector_specs(tmp_path):
    assert isinstance(detection.make_detector("test_evaluate:bright_face_detector"), BrightFaceDetector)
    weights = tmp_path / "detector.npz"
    detector = detection.make_detector("test_evaluate:FileDetector.from_file", weights)
    assert isinstance(detector, FileDetector) and detector.path == weights
    with pytest.raises(ValueError, match="unknown detector 'retinaface'.*mtcnn"):
        detection.make_detector("retinaface")
    with pytest.raises(ValueError, match="cannot load detector 'test_evaluate:NoSuch'"):
        detection.make_detector("test_evaluate:NoSuch")


def bright_evaluator(classifiers, detector=None, **settings):
    """The evaluator of these tests: the bright-image detector, the random test classifiers at FACE_SIZE."""
    return Evaluator(detector or BrightFaceDetector(), "bright", classifiers, face_size=FACE_SIZE, **settings)


def write_image(path, bright: bool, seed: int):
    """Blocky random pattern (8-pixel blocks), mean about +0.5 (bright) or -0.5, as a JPEG."""
    rng = np.random.default_rng(seed)
    blocks = rng.uniform(-0.4, 0.4, (SIZE // 8, SIZE // 8, 3)) + (0.5 if bright else -0.5)
    pixels = np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round((pixels + 1) * 127.5).astype(np.uint8)).save(path, quality=95)


def write_images(root, layout=LAYOUT, seed=0):
    for i, brights in layout.items():
        for j, bright in enumerate(brights):
            write_image(root / f"prompt_{i}" / f"img_{j}.jpg", bright, seed=100 * i + j + seed)
    return root


@pytest.fixture(scope="module")
def torch_classifiers(tmp_path_factory):
    """(gender, race, age) random torchvision models in eval mode, and their .pt files."""
    folder = tmp_path_factory.mktemp("classifiers")
    models, paths = [], []
    for name, k, seed in (("gender", 2, 0), ("race", 4, 1), ("age", 2, 2)):
        model = _torch_classifier(k, size=FACE_SIZE, seed=seed)
        torch.save(model.state_dict(), folder / f"{name}.pt")
        models.append(model)
        paths.append(folder / f"{name}.pt")
    return models, paths


@pytest.fixture(scope="module")
def classifiers(torch_classifiers):
    return load_test_classifiers(*torch_classifiers[1])


def load_with_readme_snippet(test_results_path):
    """The original README's loading code, verbatim apart from the path."""
    import pickle as pkl

    import torch  # noqa: F401  (the README imports it; the tensors need it)

    with open(test_results_path, "rb") as f:
        results = pkl.load(f)
    face_indicators_all, face_bboxs_all, gender_logits_all, race_logits_all, age_logits_all = results
    return face_indicators_all, face_bboxs_all, gender_logits_all, race_logits_all, age_logits_all


def test_results_pkl_has_the_original_schema_and_torch_logits(tmp_path, torch_classifiers, classifiers):
    images = write_images(tmp_path / "images")
    out = tmp_path / "out"
    evaluation = ev.evaluate(images, out, bright_evaluator(classifiers), batch_size=2,
                             prompt_texts=["a doctor", "a nurse"], progress=False)
    indicators, bboxs, gender, race, age = load_with_readme_snippet(out / "test_results.pkl")

    assert reference_square_box(FACE_BOX.tolist(), 0.5) == CROP_BOX
    torch_models = torch_classifiers[0]
    for i, brights in LAYOUT.items():
        assert set(indicators) == set(bboxs) == set(gender) == set(race) == set(age) == {0, 1}
        assert indicators[i].dtype == torch.bool and indicators[i].tolist() == brights
        assert bboxs[i].dtype == torch.int64
        assert bboxs[i].tolist() == [CROP_BOX if b else [-1, -1, -1, -1] for b in brights]
        # The original's pipeline in PyTorch: read, crop (slice + -1 pad + resize), classify; images without
        # a face are classified as the all -1 chip.
        pixels = np.stack([np.asarray(Image.open(images / f"prompt_{i}" / f"img_{j}.jpg")) for j in range(3)])
        image_chw = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 * 2 - 1
        chips = torch.stack([
            reference_face_chip(image_chw[j], CROP_BOX, FACE_SIZE) if b else torch.full((3, FACE_SIZE, FACE_SIZE), -1.0)
            for j, b in enumerate(brights)
        ])
        for got, model, k in zip((gender[i], race[i], age[i]), torch_models, (2, 4, 2)):
            assert got.dtype == torch.float32 and tuple(got.shape) == (3, k)
            with torch.no_grad():
                want = model(chips).numpy()
            # float32 MobileNetV3 parity is 2e-5 of the largest logit (test_mobilenet_v3).
            np.testing.assert_allclose(got.numpy(), want, atol=5e-5 * np.abs(want).max(), rtol=0)
        assert not np.allclose(gender[i][0].numpy(), gender[i][1].numpy()), "logits should depend on the image"

    # One grid per prompt: 3 tiles of 64 px images scaled to 256 px, + 2 bars of 25 px, border 5 (metrics).
    for i in LAYOUT:
        with Image.open(out / f"prompt_{i}.jpg") as grid:
            assert grid.size == (3 * (256 + 2 * 25 + 2 * 5), 256 + 2 * 5)
    with open(out / "per_prompt.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["prompt"] for r in rows] == ["a doctor", "a nurse"]
    assert [float(r["face_share"]) for r in rows] == pytest.approx([2 / 3, 2 / 3], abs=1e-6)
    assert [int(r["num_faces"]) for r in rows] == [2, 2]
    assert "gender x race bias" in (out / "summary.md").read_text()
    assert evaluation.summary["face_share"].mean == pytest.approx(2 / 3)


def _results(found, gender_preds, race_preds, age_preds):
    """PromptResults whose argmax predictions are the given classes (logits: 2.0 at the class, 0 elsewhere,
    plus small noise); rows without a face get logits for class 0 that must not count."""
    n = len(found)

    def logits(preds, k):
        out = np.random.default_rng(n).uniform(-0.1, 0.1, (n, k)).astype(np.float32)
        out[np.arange(n), preds] += 2.0
        return out

    return PromptResults(
        tuple(f"img_{j}.jpg" for j in range(n)), np.array(found), np.where(np.array(found)[:, None], 5, -1),
        np.zeros(n, bool), {"gender": logits(gender_preds, 2), "race": logits(race_preds, 4), "age": logits(age_preds, 2)},
    )


def test_bias_table_matches_hand_computation():
    results = {
        # Faces in 3 of 4: gender M M F, race 0 0 3, age old young young; the 4th (no face) would add F / race 1.
        0: _results([True, True, True, False], [1, 1, 0, 0], [0, 0, 3, 1], [1, 0, 0, 1]),
        # Faces in both: gender F M, race 1 2, age old old.
        3: _results([True, True], [0, 1], [1, 2], [1, 1]),
        # No face at all: every bias undefined, left out of the summary.
        5: _results([False, False], [0, 1], [0, 1], [0, 1]),
    }
    rows = tables.per_prompt_table({i: prompt_metrics(r) for i, r in results.items()}, {0: "a doctor", 3: "a nurse"})
    by_prompt = {r["prompt_index"]: r for r in rows}
    assert [r["prompt"] for r in rows] == ["a doctor", "a nurse", ""]
    r0, r3, r5 = by_prompt[0], by_prompt[3], by_prompt[5]
    assert (r0["num_images"], r0["num_faces"], r0["face_share"]) == (4, 3, 0.75)
    # Prompt 0. Gender freqs (1/3, 2/3): 1/3. Race freqs (2/3, 0, 0, 1/3): unordered pair gaps
    # 2/3, 2/3, 1/3, 0, 1/3, 1/3 = 7/3 over 6 pairs = 7/18. Joint (j = 4g + r): class 4 twice, class 3 once:
    # 6 x 2/3 + 6 x 1/3 against the six empty classes + 1/3 between them = 19/3 over 28 pairs = 19/84.
    assert r0["gender_bias"] == pytest.approx(1 / 3)
    assert r0["race_bias"] == pytest.approx(7 / 18)
    assert r0["gender_race_bias"] == pytest.approx(19 / 84)
    assert r0["old_share"] == pytest.approx(1 / 3)
    # Prompt 3. Gender (1/2, 1/2): 0. Race (0, 1/2, 1/2, 0): 4 gaps of 1/2 over 6 pairs = 1/3.
    # Joint classes 1 and 6 at 1/2: 12 gaps of 1/2 over 28 pairs = 3/14.
    assert r3["gender_bias"] == pytest.approx(0.0)
    assert r3["race_bias"] == pytest.approx(1 / 3)
    assert r3["gender_race_bias"] == pytest.approx(3 / 14)
    assert r3["old_share"] == pytest.approx(1.0)
    assert r5["face_share"] == 0.0
    assert all(math.isnan(r5[k]) for k in ("gender_bias", "race_bias", "gender_race_bias", "old_share"))

    summary = tables.summarize(rows)
    assert summary["gender_bias"] == pytest.approx((1 / 6, 1 / 6, 2))  # population std
    assert summary["race_bias"] == pytest.approx((13 / 36, 1 / 36, 2))
    assert summary["gender_race_bias"] == pytest.approx(((19 / 84 + 3 / 14) / 2, abs(19 / 84 - 3 / 14) / 2, 2))
    assert summary["face_share"] == pytest.approx(((0.75 + 1 + 0) / 3, np.std([0.75, 1, 0]), 3))
    assert "clip_i" not in summary
    assert "| gender bias | 0.167 ± 0.167 | 2 |" in tables.summary_markdown(summary)

    after = dict(summary, clip_i=tables.MeanStd(0.7, 0.05, 2))
    table = tables.comparison_markdown({"occupations": (summary, after)})
    assert "| prompts | gender bias | race bias | gender x race bias | face share | CLIP-I |" in table
    assert "| occupations | 0.167 ± 0.167 → 0.167 ± 0.167 | 0.361 ± 0.028 → 0.361 ± 0.028 |" in table
    assert table.rstrip().endswith("| 0.700 ± 0.050 |")


def test_bias_of_other_attributes_gender_and_age():
    """An evaluator debiasing gender x age reports their gaps instead of race's: prompt 0 above (faces: gender
    M M F, age old young young). Gender (1/3, 2/3): 1/3; age (2/3, 1/3): 1/3; joint (j = 2 g + a): classes 3, 2
    and 0 at 1/3 each, class 1 empty: 3 gaps of 1/3 over 6 unordered pairs = 1/6. The tables name them."""
    result = _results([True, True, True, False], [1, 1, 0, 0], [0, 0, 3, 1], [1, 0, 0, 1])
    row = prompt_metrics(result, bias_attributes=("gender", "age"))
    assert row["gender_bias"] == pytest.approx(1 / 3)
    assert row["age_bias"] == pytest.approx(1 / 3)
    assert row["gender_age_bias"] == pytest.approx(1 / 6)
    assert "race_bias" not in row and "gender_race_bias" not in row
    summary = tables.summarize(tables.per_prompt_table({0: row}))
    assert list(summary)[2:5] == ["gender_bias", "age_bias", "gender_age_bias"]  # after face and degenerate share
    markdown = tables.comparison_markdown({"all": (summary, summary)})
    assert "| prompts | gender bias | age bias | gender x age bias |" in markdown


def test_rerun_computes_only_new_or_changed_images(tmp_path, classifiers):
    images = write_images(tmp_path / "images")
    out = tmp_path / "out"
    run = lambda detector, **kw: ev.evaluate(  # noqa: E731
        images, out, bright_evaluator(classifiers, detector, **kw), batch_size=2, progress=False)

    first = BrightFaceDetector()
    before = run(first).results
    assert first.images_seen == 6
    caches = {i: out / "cache" / f"prompt_{i}.npz" for i in LAYOUT}
    stamps = lambda paths: [p.stat().st_mtime_ns for p in paths]  # noqa: E731
    watched = [*caches.values(), out / "prompt_0.jpg", out / "prompt_1.jpg"]
    watched_stamps = stamps(watched)

    second = BrightFaceDetector()
    again = run(second).results
    assert second.calls == 0 and stamps(watched) == watched_stamps
    for i in LAYOUT:
        for field in ("found", "boxes"):
            np.testing.assert_array_equal(getattr(again[i], field), getattr(before[i], field))
        for name in ("gender", "race", "age"):
            np.testing.assert_array_equal(again[i].logits[name], before[i].logits[name])

    # One more image in prompt_1: only it is computed; prompt_0's cache and grid stay as they were.
    write_image(images / "prompt_1" / "img_3.jpg", True, seed=7)
    third = BrightFaceDetector()
    grown = run(third).results
    assert third.images_seen == 1
    assert stamps(watched[::2]) == watched_stamps[::2]
    assert stamps(watched[1::2]) != watched_stamps[1::2]
    assert grown[1].image_names == ("img_0.jpg", "img_1.jpg", "img_2.jpg", "img_3.jpg")
    assert grown[1].found.tolist() == [True, False, True, True]
    np.testing.assert_array_equal(grown[1].logits["race"][:3], before[1].logits["race"])
    _, _, _, race, _ = load_with_readme_snippet(out / "test_results.pkl")
    assert tuple(race[1].shape) == (4, 4)

    # A rewritten image is recomputed; other settings recompute everything.
    write_image(images / "prompt_0" / "img_2.jpg", True, seed=8)
    fourth = BrightFaceDetector()
    assert run(fourth).results[0].found.tolist() == [True, True, True] and fourth.images_seen == 1
    fifth = BrightFaceDetector()
    run(fifth, expand_coef=0.25)
    assert fifth.images_seen == 7


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
def test_cli_runs_mtcnn_and_writes_everything(tmp_path, torch_classifiers, capsys):
    import skimage.data

    photo = Image.fromarray(skimage.data.astronaut()).resize((128, 128), Image.BILINEAR)
    (tmp_path / "images" / "prompt_0").mkdir(parents=True)
    photo.save(tmp_path / "images" / "prompt_0" / "img_0.jpg")
    Image.new("RGB", (128, 128), (90, 120, 150)).save(tmp_path / "images" / "prompt_0" / "img_1.jpg")
    prompt_file = tmp_path / "prompts.json"
    prompt_file.write_text(json.dumps({"train_prompts": ["x"], "val_prompts": ["y"], "test_prompts": ["an astronaut"]}))
    gender, race, age = torch_classifiers[1]
    cli.main(["--images", str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--gender_classifier", str(gender),
             "--race_classifier", str(race), "--age_classifier", str(age), "--prompts", str(prompt_file),
             "--face_size", str(FACE_SIZE), "--batch_size", "2"])
    printed = capsys.readouterr().out
    indicators, bboxs, *_ = load_with_readme_snippet(tmp_path / "out" / "test_results.pkl")
    assert indicators[0].tolist() == [True, False]
    assert bboxs[0][1].tolist() == [-1, -1, -1, -1] and (bboxs[0][0] >= 0).all()
    # One face: one class holds everything. Gender |1 - 0| = 1; race 3 of 6 pairs differ by 1 = 0.5;
    # gender x race 7 of 28 pairs = 0.25.
    assert "| gender bias | 1.000 ± 0.000 | 1 |" in printed
    assert "| race bias | 0.500 ± 0.000 | 1 |" in printed
    assert "| gender x race bias | 0.250 ± 0.000 | 1 |" in printed
    with open(tmp_path / "out" / "per_prompt.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["prompt"] == "an astronaut" and float(row["face_share"]) == 0.5
    assert (tmp_path / "out" / "prompt_0.jpg").is_file() and (tmp_path / "out" / "summary.csv").is_file()


@pytest.fixture(scope="module")
def good_args(tmp_path_factory, torch_classifiers):
    root = tmp_path_factory.mktemp("cli")
    write_images(root / "images", {0: [True]})
    gender, race, age = torch_classifiers[1]
    return root, ["--images", str(root / "images"), "--out", str(root / "out"), "--gender_classifier", str(gender),
                  "--race_classifier", str(race), "--age_classifier", str(age),
                  "--detector", "test_evaluate:bright_face_detector", "--face_size", str(FACE_SIZE), "--batch_size", "2"]


def _replace(args, flag, value):
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


@pytest.mark.parametrize("flag, bad, expected", [
    ("--images", "no_such_images", r"--images: folder not found: .*no_such_images"),
    ("--gender_classifier", "missing.pt", r"--gender_classifier: file not found: .*missing\.pt"),
    ("--race_classifier", "race3.pt", r"race classifier: .*race3\.pt: classifier\.3\.weight has 3 output classes, but 4"),
    ("--reference", "no_such_reference", r"--reference: folder not found: .*no_such_reference"),
    ("--clip_vision", "no_such_clip", r"--clip_vision: folder not found: .*no_such_clip"),
    ("--detector", "nonsense", r"unknown detector 'nonsense'"),
    ("--detector_path", "no_such_detector.npz", r"--detector_path: file not found: .*no_such_detector\.npz"),
])
def test_bad_inputs_stop_with_the_path_named(good_args, capsys, flag, bad, expected):
    root, args = good_args
    if bad == "race3.pt":
        torch.save(torchvision.models.mobilenet_v3_large(num_classes=3).state_dict(), root / bad)
    args = _replace(args, flag, str(root / bad) if flag != "--detector" else bad)
    with pytest.raises(SystemExit) as stop:
        cli.main(args)
    assert stop.value.code == 2
    assert re.search(expected, capsys.readouterr().err)
    assert not (root / "out" / "test_results.pkl").exists()


@pytest.fixture(scope="module")
def similarity_folders(tmp_path_factory):
    """Tiny random CLIPVisionModelWithProjection and Dinov2Model folders."""
    root = tmp_path_factory.mktemp("nets")
    torch.manual_seed(0)
    randomize_(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**TINY_VISION))).save_pretrained(
        root / "clip")
    dino_config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=14,
                                            image_size=14 * 37, mlp_ratio=4)
    randomize_(transformers.Dinov2Model(dino_config), seed=1).save_pretrained(root / "dino")
    return root / "clip", root / "dino"


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
def test_reference_similarity_is_one_for_identical_images(tmp_path, good_args, classifiers, similarity_folders, capsys):
    _, args = good_args
    images = write_images(tmp_path / "images")
    clip_folder, dino_folder = similarity_folders
    args = _replace(_replace(args, "--images", str(images)), "--out", str(tmp_path / "out"))
    cli.main(args + ["--reference", str(images), "--clip_vision", str(clip_folder), "--dinov2", str(dino_folder)])
    with open(tmp_path / "out" / "per_prompt.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        assert float(row["clip_i"]) == pytest.approx(1.0, abs=1e-5)
        assert float(row["dino"]) == pytest.approx(1.0, abs=1e-5)
    assert "| CLIP-I | 1.000 ± 0.000 | 2 |" in capsys.readouterr().out

    # Reference with prompt_0's img_0 and img_1 swapped and img_2 absent: cos(a, b) both ways, lower than 1;
    # img_2 has no reference (NaN), and the prompt's mean is over the two pairs.
    reference = tmp_path / "reference"
    (reference / "prompt_0").mkdir(parents=True)
    shutil.copy(images / "prompt_0" / "img_0.jpg", reference / "prompt_0" / "img_1.jpg")
    shutil.copy(images / "prompt_0" / "img_1.jpg", reference / "prompt_0" / "img_0.jpg")
    # prompt_1's one reference is a truncated file: skipped with a warning naming it, its pair NaN like a missing one.
    (reference / "prompt_1").mkdir()
    truncated = reference / "prompt_1" / "img_0.jpg"
    truncated.write_bytes((images / "prompt_1" / "img_0.jpg").read_bytes()[:200])
    nets = load_similarity_nets(clip_folder, dino_folder)
    results = ev.evaluate_folder(images, bright_evaluator(classifiers, similarity=nets), reference_dir=reference,
                                 batch_size=2, progress=False)
    assert f"warning: skipping unreadable reference image {truncated}" in capsys.readouterr().err
    pair = read_images([images / "prompt_0" / "img_0.jpg", images / "prompt_0" / "img_1.jpg"])
    for similarity, tower, embed in zip((results[0].clip_similarity, results[0].dino_similarity), nets,
                                        (clip_vision_lib.clip_image_embeds, dinov2.dino_image_embeds)):
        features = np.asarray(jax.jit(embed, static_argnums=0)(tower.module, tower.params, pair))
        cosine = float(features[0] @ features[1])
        assert cosine < 1 - 1e-4  # the two images are told apart (identical ones gave 1 within 1e-5)
        np.testing.assert_allclose(similarity[:2], [cosine, cosine], atol=1e-5)
        assert math.isnan(similarity[2])
    assert np.isnan(results[1].clip_similarity).all()
    row = prompt_metrics(results[0])
    assert row["clip_i"] == pytest.approx(results[0].clip_similarity[0])
    assert math.isnan(prompt_metrics(results[1])["dino"])


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
def test_cli_measures_fidelity_and_clip_t(tmp_path, good_args, similarity_folders, capsys):
    from fairdiff_jax.eval.consistency import ClipTextConsistency
    from fairdiff_jax.judging import tiny

    _, args = good_args
    images = write_images(tmp_path / "images")
    clip_model = tiny.build_clip_model(tmp_path / "clip_model", seed=0)
    prompt_file = tmp_path / "prompts.json"
    texts = ["a doctor", "a nurse"]
    prompt_file.write_text(json.dumps({"train_prompts": ["x"], "val_prompts": ["y"], "test_prompts": texts}))
    args = _replace(_replace(args, "--images", str(images)), "--out", str(tmp_path / "out"))
    _, dino_folder = similarity_folders
    cli.main(args + ["--prompts", str(prompt_file), "--fidelity_features", "dinov2", "--dinov2", str(dino_folder),
                     "--reference_set", str(images), "--fidelity_k", "1", "--consistency", "clip_t",
                     "--clip_model", str(clip_model)])
    printed = capsys.readouterr().out
    with open(tmp_path / "out" / "per_prompt.csv") as f:
        rows = list(csv.DictReader(f))
    # The set is its own reference: every image lies on the reference manifold and covers it.
    assert [(float(r["fidelity_precision"]), float(r["fidelity_recall"])) for r in rows] == [(1.0, 1.0), (1.0, 1.0)]
    judge = ClipTextConsistency(clip_model)
    for i, (row, text) in enumerate(zip(rows, texts)):
        paths = sorted((images / f"prompt_{i}").glob("img_*.jpg"))
        want = judge.scores(read_images(paths), text).mean()
        assert float(row["consistency"]) == pytest.approx(float(want), abs=1e-5)
    assert "| consistency (CLIP-T) |" in printed and "| fidelity precision | 1.000 ± 0.000 | 2 |" in printed


@pytest.mark.parametrize("extra, expected", [
    (["--fidelity_features", "dinov2"], "--fidelity_features needs --reference_set or --miniature_reference"),
    (["--reference_set", "."], "--reference_set / --miniature_reference need --fidelity_features"),
    (["--fidelity_features", "clip", "--reference_set", "."], "--fidelity_features clip needs --clip_vision"),
    (["--consistency", "clip_t"], "--consistency clip_t needs --prompts"),
])
def test_metric_flags_need_their_networks(good_args, capsys, extra, expected):
    _, args = good_args
    with pytest.raises(SystemExit):
        cli.main(args + extra)
    assert expected in capsys.readouterr().err


def test_an_unreadable_image_is_skipped_named_and_counted(tmp_path, classifiers, capsys):
    images = write_images(tmp_path / "images")
    truncated = images / "prompt_0" / "img_1.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])  # a generation killed while writing, a bad copy
    (images / "prompt_1" / "img_2.jpg").write_bytes(b"")  # an empty file
    evaluation = ev.evaluate(images, tmp_path / "out", bright_evaluator(classifiers), batch_size=2, progress=False)
    err = capsys.readouterr().err
    assert f"warning: skipping unreadable image {truncated}" in err and "prompt_1/img_2.jpg" in err
    assert evaluation.results[0].image_names == ("img_0.jpg", "img_2.jpg")
    assert evaluation.results[0].unreadable == ("img_1.jpg",)
    assert [(r["num_images"], r["num_unreadable"]) for r in evaluation.per_prompt] == [(2, 1), (2, 1)]
    assert evaluation.results[0].found.tolist() == [True, False]  # the readable images keep their own results
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "2 image files could not be read and were skipped" in summary and "2 (+1 unreadable)" in summary
