"""Face-attribute data as TensorFlow Datasets: the face chips the debiasing loss sees, with labels.

Two builders, both cutting chips exactly as training does (docs/method.md: detect with the project's
detector interface, keep the largest face, `crops.square_boxes` + `crops.face_chips` at `size_face`):

  LabelledFaceFolder  a folder of face images plus one CSV per split (FairFace's layout), read from
                      `manual_dir`, nothing downloaded:
                          <manual_dir>/train.csv, validation.csv, test.csv (any that exist; FairFace's own
                          fairface_label_train.csv / fairface_label_val.csv count as train / validation)
                          columns (by header, any order, extra columns ignored): file, gender, race, age
                          file: a path relative to manual_dir.
                      Labels are the project's class names (fairdiff_jax/attributes.py, any case) or
                      FairFace's: race 'White', 'Middle Eastern', 'Latino_Hispanic' -> white, 'East Asian',
                      'Southeast Asian' -> asian (the original classifiers' four races); age a FairFace bin
                      ('20-29', 'more than 70') -> old when its lower bound is >= config.old_from_age.
                      A bad row or a missing image raises FaceDataError naming the CSV file and row.
  MiniatureFaces      the miniature world's renders (fairdiff_jax/miniature/world.py) with their true
                      attributes, boxes and landmarks; the training split mixes renders with their VAE
                      reconstructions (what generated faces look like); test_decoded holds the test renders
                      after the VAE, the held-out set the shipped classifier's accuracy is stated on.

Images where the detector finds no face are left out (counted in the log): the loss never sees them.
Chips are stored as PNG (uint8), read back as [size_face, size_face, 3] in [-1, 1] by
fairdiff_jax/classifier/pipeline.py.

    builder = MiniatureFaces(data_dir="/tmp/tfds", config=MiniatureFacesConfig(name="default", ...))
    builder.download_and_prepare()
    ds = builder.as_dataset(split="train")
"""

import csv
import dataclasses
import logging
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

from fairdiff_jax import attributes

log = logging.getLogger(__name__)

# FairFace's names for the original classifiers' classes (docs/method.md#attribute-classifiers).
FAIRFACE_RACES = {"middle eastern": "white", "latino_hispanic": "white", "latino hispanic": "white",
                  "east asian": "asian", "southeast asian": "asian"}
FAIRFACE_SPLIT_FILES = {"fairface_label_train.csv": "train", "fairface_label_val.csv": "validation"}
SPLITS = ("train", "validation", "test")
LABELS = ("gender", "race", "age")


class FaceDataError(ValueError):
    """A labelled face folder that cannot be read: the message names the file and the row."""


@dataclasses.dataclass
class FaceChipsConfig(tfds.core.BuilderConfig):
    """How chips are cut. detector: a detection.make_detector spec ('mtcnn' or 'module:callable');
    detector_path: its weights file ('' for none); size_face, expand_coef: config.faces' values."""

    detector: str = "mtcnn"
    detector_path: str = ""
    size_face: int = 224
    expand_coef: float = 0.5
    batch_size: int = 256


def _features(config: FaceChipsConfig, image_shape: Optional[tuple] = None) -> tfds.features.FeaturesDict:
    size = config.size_face
    features = {
        "face_chip": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
        "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),  # detected (x1, y1, x2, y2), pixels
        "landmarks": tfds.features.Tensor(shape=(5, 2), dtype=np.float32),  # detected (x, y)
        **{name: tfds.features.ClassLabel(names=attributes.get(name).classes) for name in LABELS},
    }
    if image_shape is not None:
        features["image"] = tfds.features.Image(shape=image_shape, encoding_format="png")
    return tfds.features.FeaturesDict(features)


class ChipCutter:
    """images [N, H, W, 3] float32 in [-1, 1] -> (found [N] bool, chips [N, S, S, 3] uint8, boxes [N, 4],
    landmarks [N, 5, 2]): the detector's largest face, cut as the loss cuts it."""

    def __init__(self, config: FaceChipsConfig):
        import jax

        from fairdiff_jax.judging import crops, detection

        self.detector = detection.make_detector(config.detector, config.detector_path or None)
        size, expand = config.size_face, config.expand_coef
        self._cut = jax.jit(lambda x, b, f: crops.face_chips(x, crops.square_boxes(b, expand), f, size))

    def __call__(self, images: np.ndarray):
        faces = self.detector.detect(images)
        chips = np.asarray(self._cut(images, faces.boxes, faces.found))
        chips = np.clip(np.round((chips + 1.0) * 127.5), 0, 255).astype(np.uint8)
        return faces.found, chips, faces.boxes, faces.landmarks


def _examples(cutter: ChipCutter, keys: Sequence[str], images: np.ndarray, labels: dict, extra: dict,
              what: str) -> Iterator[tuple[str, dict]]:
    """(key, example) for the images whose face was found; logs how many were left out."""
    found, chips, boxes, landmarks = cutter(images)
    for i in np.flatnonzero(found):
        yield keys[i], {"face_chip": chips[i], "box": boxes[i], "landmarks": landmarks[i],
                        **{name: int(labels[name][i]) for name in LABELS},
                        **{name: value[i] for name, value in extra.items()}}
    if not found.all():
        missed = [keys[i] for i in np.flatnonzero(~found)]
        log.warning("%s: no face found in %d of %d images (left out), e.g. %s", what, len(missed), len(found),
                    ", ".join(missed[:3]))


# ------------------------------------------------------------------------------------------------
# A labelled face folder (FairFace's layout)


@dataclasses.dataclass
class LabelledFaceFolderConfig(FaceChipsConfig):
    old_from_age: int = 40  # an age bin whose lower bound is at least this is 'old'


def parse_label(attribute: str, value: str, old_from_age: int) -> int:
    """A CSV label -> the project's class index; ValueError saying what is accepted."""
    classes = attributes.get(attribute).classes
    text = value.strip().lower()
    if attribute == "race":
        text = FAIRFACE_RACES.get(text, text)
    if attribute == "age" and text not in classes:
        bound = text.replace("more than", "").split("-")[0].strip()
        if bound.isdigit():
            return classes.index("old") if int(bound) >= old_from_age else classes.index("young")
    if text in classes:
        return classes.index(text)
    raise ValueError(f"{attribute} {value!r} is not one of {', '.join(classes)}"
                     + (" or a FairFace race" if attribute == "race" else "")
                     + (" or an age bin such as '20-29'" if attribute == "age" else ""))


def read_label_csv(csv_path: Path, root: Path, old_from_age: int) -> list[tuple[str, Path, dict]]:
    """[(key, image path, {attribute: class index})] of a split's CSV, every image checked to exist.

    FaceDataError names the CSV file and row (1 = the header) of a missing column, an empty or unknown
    label, or an image file that is not there."""
    rows = []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip().lower() for h in reader.fieldnames or []]
        missing = [c for c in ("file",) + LABELS if c not in header]
        if missing:
            raise FaceDataError(f"{csv_path}: header {reader.fieldnames} has no column {', '.join(missing)} "
                                f"(needs file, gender, race, age)")
        reader.fieldnames = header
        for row_number, row in enumerate(reader, start=2):
            where = f"{csv_path}, row {row_number}"
            if any(row.get(c) is None for c in ("file",) + LABELS):
                raise FaceDataError(f"{where}: too few fields ({row})")
            try:
                labels = {name: parse_label(name, row[name], old_from_age) for name in LABELS}
            except ValueError as e:
                raise FaceDataError(f"{where}: {e}") from None
            image_path = root / row["file"].strip()
            if not image_path.is_file():
                raise FaceDataError(f"{where}: image {row['file']!r} not found ({image_path})")
            rows.append((row["file"].strip(), image_path, labels))
    return rows


def split_csvs(manual_dir: Path) -> dict[str, Path]:
    """{split: csv path} of the splits present in manual_dir; FaceDataError when there is none."""
    found = {split: manual_dir / f"{split}.csv" for split in SPLITS if (manual_dir / f"{split}.csv").is_file()}
    for name, split in FAIRFACE_SPLIT_FILES.items():
        if split not in found and (manual_dir / name).is_file():
            found[split] = manual_dir / name
    if not found:
        raise FaceDataError(f"no label CSV in {manual_dir}: expected one of "
                            f"{', '.join(f'{s}.csv' for s in SPLITS)}, {', '.join(FAIRFACE_SPLIT_FILES)}")
    return found


class LabelledFaceFolder(tfds.core.GeneratorBasedBuilder):
    """Face chips and gender / race / age labels of a labelled face folder (FairFace's layout)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the images and the label CSVs (train.csv / validation.csv / test.csv with columns file, gender, "
        "race, age; or FairFace's fairface_label_train.csv / fairface_label_val.csv) in manual_dir.")
    BUILDER_CONFIGS = [LabelledFaceFolderConfig(name="mtcnn_224", description="MTCNN, 224 x 224 chips")]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Face chips cut as the debiasing loss cuts them, with gender / race / age labels.",
            features=_features(self.builder_config), supervised_keys=None)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = Path(dl_manager.manual_dir)
        cutter = ChipCutter(self.builder_config)
        return {split: self._generate_examples(csv_path, manual_dir, cutter)
                for split, csv_path in split_csvs(manual_dir).items()}

    def _generate_examples(self, csv_path: Path, root: Path, cutter: ChipCutter):
        from fairdiff_jax.eval import folders

        rows = read_label_csv(csv_path, root, self.builder_config.old_from_age)
        step = self.builder_config.batch_size
        for start in range(0, len(rows), step):
            part = rows[start:start + step]
            # Images of one size per detector call (FairFace's are all 224 x 224; other sets may mix sizes).
            by_size: dict[tuple, list[int]] = {}
            pixels = []
            for i, (_, path, _) in enumerate(part):
                try:
                    pixels.append(folders.read_images([path])[0])
                except Exception as e:  # PIL's errors vary by format
                    raise FaceDataError(f"{csv_path}, row {start + i + 2}: cannot read image {path}: {e}") from e
                by_size.setdefault(pixels[-1].shape, []).append(i)
            for index in by_size.values():
                labels = {name: [part[i][2][name] for i in index] for name in LABELS}
                yield from _examples(cutter, [part[i][0] for i in index], np.stack([pixels[i] for i in index]),
                                     labels, {}, f"{csv_path}")


# ------------------------------------------------------------------------------------------------
# The miniature world


@dataclasses.dataclass
class MiniatureFacesConfig(FaceChipsConfig):
    """vae_path: the world's diffusers VAE folder (e.g. assets/miniature/sd/vae); '' builds no decoded
    images. split sizes: renders drawn per split (the training split adds `decoded_train_fraction`
    of them again, VAE-decoded). seed: the world's draws."""

    detector: str = "fairdiff_jax.miniature.detector:MiniatureFaceDetector.from_file"
    detector_path: str = "assets/miniature/face_detector.safetensors"
    size_face: int = 64
    vae_path: str = "assets/miniature/sd/vae"
    train_images: int = 10000
    decoded_train_fraction: float = 0.5
    validation_images: int = 1000
    test_images: int = 2000
    seed: int = 0


def vae_reconstructions(vae_path: str, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """images [N, S, S, 3] in [-1, 1] -> the world's autoencoder's reconstructions (posterior mean, decoded,
    clamped): what the generator's decoder draws."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_path).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size].transpose(0, 3, 1, 2)))
            out.append(vae.decode(vae.encode(x.float()).latent_dist.mean).sample.clamp(-1, 1).numpy())
    return np.concatenate(out).transpose(0, 2, 3, 1)


class MiniatureFaces(tfds.core.GeneratorBasedBuilder):
    """Face chips of the miniature world's renders, with true attributes, boxes and landmarks."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [MiniatureFacesConfig(name="default", description="The shipped world's detector and VAE.")]

    def _info(self) -> tfds.core.DatasetInfo:
        from fairdiff_jax.miniature import world

        features = _features(self.builder_config, (world.IMAGE_SIZE, world.IMAGE_SIZE, 3))
        features = tfds.features.FeaturesDict({
            **features,
            "true_box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
            "true_landmarks": tfds.features.Tensor(shape=(5, 2), dtype=np.float32),
            "decoded": tfds.features.Tensor(shape=(), dtype=np.bool_),
        })
        return self.dataset_info_from_configs(
            description="The miniature world's faces as the debiasing loss sees them.", features=features)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        config = self.builder_config
        cutter = ChipCutter(config)
        splits = {"train": (config.train_images, config.decoded_train_fraction, False),
                  "validation": (config.validation_images, 0.0, False),
                  "test": (config.test_images, 0.0, False)}
        if config.vae_path:
            splits["test_decoded"] = (config.test_images, 0.0, True)
        return {name: self._generate_examples(name, n, fraction, decoded_only, cutter)
                for name, (n, fraction, decoded_only) in splits.items() if n}

    def _generate_examples(self, split: str, num_images: int, decoded_fraction: float, decoded_only: bool,
                           cutter: ChipCutter):
        from fairdiff_jax.miniature import drawing, world

        config = self.builder_config
        # test and test_decoded are the same renders; each split has its own seed otherwise.
        seed = config.seed * 1000 + {"train": 1, "validation": 2, "test": 3, "test_decoded": 3}[split]
        _, renders = world.dataset(num_images, seed)
        parts = [] if decoded_only else [("r", renders, False)]
        num_decoded = num_images if decoded_only else int(round(decoded_fraction * num_images))
        if num_decoded and config.vae_path:
            first = drawing.Renders(**{f: getattr(renders, f)[:num_decoded] for f in drawing.Renders.__dataclass_fields__})
            parts.append(("d", dataclasses.replace(first, images=vae_reconstructions(config.vae_path, first.images)), True))
        for tag, part, decoded in parts:
            for start in range(0, len(part.images), config.batch_size):
                rows = slice(start, start + config.batch_size)
                images = part.images[rows]
                keys = [f"{split}_{tag}{i}" for i in range(start, start + len(images))]
                pixels = np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
                extra = {"image": pixels, "true_box": part.boxes[rows], "true_landmarks": part.landmarks[rows],
                         "decoded": np.full(len(images), decoded)}
                labels = {name: getattr(part, name)[rows] for name in LABELS}
                yield from _examples(cutter, keys, images, labels, extra, f"miniature {split}")
