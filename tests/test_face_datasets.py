"""The TFDS face-chip builders on small fixture folders written by the tests (tfds.testing style: build
into a temporary data_dir, read back, compare with what went in)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from fairdiff_jax import attributes
from fairdiff_jax.classifier import face_datasets
from fairdiff_jax.miniature import world

DETECTOR = "assets/miniature/face_detector.safetensors"
FAIRFACE_RACE = {0: "White", 1: "Black", 2: "Indian", 3: "East Asian"}


def _chip_config():
    return dict(detector="fairdiff_jax.miniature.detector:MiniatureFaceDetector.from_file", detector_path=DETECTOR,
                size_face=32)


def _write_folder(root, n=6, seed=0):
    """n world renders as PNGs plus a FairFace-style train.csv (extra column, FairFace label names)."""
    _, renders = world.dataset(n, seed)
    (root / "train").mkdir(parents=True)
    lines = ["file,age,gender,race,service_test"]
    for i in range(n):
        Image.fromarray(np.round((renders.images[i] + 1) * 127.5).astype(np.uint8)).save(root / "train" / f"{i}.png")
        age = "60-69" if renders.age[i] == 1 else "20-29"
        lines.append(f"train/{i}.png,{age},{['Female', 'Male'][renders.gender[i]]},{FAIRFACE_RACE[renders.race[i]]},True")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return renders


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
def test_labelled_folder_builds_chips_with_fairface_labels(tmp_path):  # 24 s at load 12 on 2 cores
    renders = _write_folder(tmp_path / "manual")
    builder = face_datasets.LabelledFaceFolder(
        data_dir=str(tmp_path / "tfds"), config=face_datasets.LabelledFaceFolderConfig(name="mini", **_chip_config()))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual")))
    assert list(builder.info.splits) == ["train"]
    examples = list(builder.as_dataset(split="train").as_numpy_iterator())
    assert len(examples) >= 5  # the detector finds (nearly) every world face
    for example in examples:
        assert example["face_chip"].shape == (32, 32, 3) and example["face_chip"].dtype == np.uint8
        assert example["face_chip"].std() > 10  # a face, not the fill
    by_box = {tuple(np.round(e["box"], 3)): e for e in examples}
    assert len(by_box) == len(examples)
    # Labels read back as the project's classes: each example's labels are its render's.
    true = {(int(g), int(r), int(a)) for g, r, a in zip(renders.gender, renders.race, renders.age)}
    assert {(int(e["gender"]), int(e["race"]), int(e["age"])) for e in examples} <= true


def test_parse_label_maps_fairface_names():
    race = attributes.RACE.classes
    assert face_datasets.parse_label("race", "Latino_Hispanic", 40) == race.index("white")
    assert face_datasets.parse_label("race", "Southeast Asian", 40) == race.index("asian")
    assert face_datasets.parse_label("age", "more than 70", 40) == attributes.AGE.classes.index("old")
    assert face_datasets.parse_label("age", "30-39", 40) == attributes.AGE.classes.index("young")
    assert face_datasets.parse_label("gender", "MALE", 40) == attributes.GENDER.classes.index("male")


def test_bad_row_and_missing_image_name_file_and_row(tmp_path):
    _write_folder(tmp_path)
    csv_path = tmp_path / "train.csv"
    lines = csv_path.read_text().splitlines()
    lines[3] = lines[3].replace(",Male,", ",Robot,").replace(",Female,", ",Robot,")
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(face_datasets.FaceDataError, match=r"train\.csv, row 4: gender 'Robot' is not one of"):
        face_datasets.read_label_csv(csv_path, tmp_path, 40)
    lines = csv_path.read_text().splitlines()
    lines[3] = "train/missing.png,20-29,Male,White,True"
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(face_datasets.FaceDataError, match=r"train\.csv, row 4: image 'train/missing\.png' not found"):
        face_datasets.read_label_csv(csv_path, tmp_path, 40)
    csv_path.write_text("file,gender,race\nx.png,Male,White\n")
    with pytest.raises(face_datasets.FaceDataError, match=r"train\.csv: header .* no column age"):
        face_datasets.read_label_csv(csv_path, tmp_path, 40)


@pytest.mark.slow  # 28 s at load 12 on 2 cores (the VAE round trip loads diffusers and torch)
def test_miniature_builder_splits_truth_and_host_sharding(tmp_path):
    config = face_datasets.MiniatureFacesConfig(
        name="tiny", vae_path="assets/miniature/sd/vae", train_images=12, decoded_train_fraction=0.5,
        validation_images=4, test_images=6, **_chip_config())
    builder = face_datasets.MiniatureFaces(data_dir=str(tmp_path), config=config)
    builder.download_and_prepare()
    splits = builder.info.splits
    assert set(splits) == {"train", "validation", "test", "test_decoded"}
    assert 16 <= splits["train"].num_examples <= 18 and splits["test_decoded"].num_examples >= 5
    train = list(builder.as_dataset(split="train").as_numpy_iterator())
    assert sum(bool(e["decoded"]) for e in train) >= 5  # 6 decoded renders, the detector may miss one
    # The chip is the detected box's crop; the detected box is close to the true one.
    _, renders = world.dataset(12, config.seed * 1000 + 1)
    for e in train:
        assert np.abs(e["box"] - e["true_box"]).max() < 3.0
        match = np.flatnonzero(np.all(np.isclose(renders.boxes, e["true_box"]), axis=1))
        assert len(match) == 1 and e["gender"] == renders.gender[match[0]] and e["age"] == renders.age[match[0]]
    # Deterministic shuffled reading, and per-host splits that cover the split once.
    read = lambda: [e["true_box"][0] for e in builder.as_dataset(  # noqa: E731
        split="train", shuffle_files=True, read_config=tfds.ReadConfig(shuffle_seed=3)).as_numpy_iterator()]
    assert read() == read()
    # Two hosts' shares (what tfds.split_for_jax_process gives process 0 and 1 of 2) cover the split once.
    shares = [[e["true_box"][0] for e in builder.as_dataset(split=share).as_numpy_iterator()]
              for share in tfds.even_splits("train", 2)]
    assert sorted(shares[0] + shares[1]) == sorted(e["true_box"][0] for e in train) and all(shares)
    assert len(list(builder.as_dataset(split=tfds.split_for_jax_process("train")))) == len(train)  # one process
