"""Evaluate generated image sets: faces, test classifiers, bias tables (SPEC 7 "Evaluate", SPEC 6 and 9).

    python -m fairdiff_jax.evaluate --images out/sd15 --out out/sd15_results \\
        --gender_classifier gender.pt --race_classifier race.pt --age_classifier age.pt \\
        --prompts fairdiff_jax/data/prompts/occupation.json \\
        [--reference out/sd15_original --clip_vision CLIP-ViT-H-14/ --dinov2 dinov2-base/]

Input: the layout `generate` writes, images_dir/prompt_i/img_j.jpg. For every prompt folder (by i), in
batches of --batch_size images: detect each image's largest face (--detector), crop a square chip around
it (`crops.square_boxes` with --expand_coef, then `crops.face_chips`, --face_size, fill -1) and run the
gender (0 female, 1 male), race (0 White/Middle-Eastern/Latino-Hispanic, 1 Black, 2 Indian, 3 Asian) and
age (0 young, 1 old) test classifiers. With --reference (the original model's images from the same seeds,
same layout), also the CLIP-I and DINO similarity of each image to the reference image of the same name.

Outputs in --out:
  test_results.pkl  the original's file: a pickle of [face_indicators, face_bboxs, gender_logits,
                    race_logits, age_logits], each {prompt index i: per-image torch tensor}: bool [N],
                    int64 [N, 4] (the square crop boxes, x1 y1 x2 y2; -1 where no face), float32 [N, 2],
                    [N, 4], [N, 2] (meaningless where no face). Torch tensors with the original's dtypes,
                    so that scripts written for the original's file run unchanged; loading needs torch.
                    Rows follow the image index j (the k-th row is the k-th image file by j).
  prompt_i.jpg      annotated grid of the prompt's first --grid_images images (default 64; shrunk to
                    GRID_TILE pixels), ordered by class: face box, gender and race bars (height =
                    confidence); redrawn only when the prompt's results changed.
  per_prompt.csv    per prompt: text (--prompts), images, faces, face share, gender / race /
                    gender x race bias, share predicted old, CLIP-I and DINO (with --reference).
  summary.csv, summary.md   mean +- std over prompts (population std; prompts without a face are
                    skipped), as the paper's tables report them; summary.md also lists every prompt.
  cache/            per-prompt results (.npz) keyed by image file name, size and mtime and by the
                    settings (classifier weights, detector, expand_coef, face_size; similarity nets):
                    a rerun, after a crash or after more images were generated, computes only new or
                    changed images. Every file is written to a temporary name and renamed.

From Python (e.g. the original model's images against the debiased model's, same seeds):
    classifiers = load_classifiers(gender_pt, race_pt, age_pt)
    detector = make_detector("mtcnn")
    before = evaluate(original_dir, out_before, classifiers, detector, prompt_texts=prompts)
    after = evaluate(debiased_dir, out_after, classifiers, detector, prompt_texts=prompts,
                     reference_dir=original_dir, similarity_nets=load_similarity_nets(clip_dir, dino_dir))
    print(comparison_markdown({"occupations": (before.summary, after.summary)}))
`evaluate_folder` alone gives the per-image results (optionally cached) without writing outputs;
`per_prompt_table` and `summarize` turn them into the tables.

Bias (SPEC 9) = mean over class pairs of |freq_i - freq_j| of the argmax predictions of the images with a
face (`bias_lib.bias`). The original's evaluation stopped at the logits; the tables are this project's.
"""

import argparse
import csv
import dataclasses
import functools
import hashlib
import io
import math
import os
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from fairdiff_jax import attributes
from fairdiff_jax import prompts as prompt_files
from fairdiff_jax.eval import bias as bias_lib
from fairdiff_jax.eval import grids as grids_lib
from fairdiff_jax.judging import clip_vision as clip_vision_lib
from fairdiff_jax.judging import crops, detection, dinov2
from fairdiff_jax.judging.detection import DETECTORS, make_detector
from fairdiff_jax.judging.mobilenet_v3 import MobileNetV3Large, load_mobilenet_v3
from fairdiff_jax.nn.weights import WeightLoadError

GENDER_CLASSES, RACE_CLASSES, AGE_CLASSES = (attributes.get(a).num_classes for a in ("gender", "race", "age"))
GRID_TILE = 256  # grid images are shrunk to this many pixels on their longer side

PROMPT_FOLDER = re.compile(r"prompt_(\d+)")
IMAGE_FILE = re.compile(r"img_(\d+)\.(jpg|jpeg|png)")

# Per-prompt metrics, in table order, and how the tables name them.
METRIC_LABELS = {
    "face_share": "face share",
    "gender_bias": "gender bias",
    "race_bias": "race bias",
    "gender_race_bias": "gender x race bias",
    "old_share": "old share",
    "clip_i": "CLIP-I",
    "dino": "DINO",
}
BIAS_METRICS = ("gender_bias", "race_bias", "gender_race_bias")


# ----------------------------------------------------------------------------------------------
# Models


class Classifier(NamedTuple):
    module: MobileNetV3Large
    variables: Any  # {'params', 'batch_stats'}, on device


class Classifiers(NamedTuple):
    gender: Classifier
    race: Classifier
    age: Classifier


def load_classifiers(gender: str | Path, race: str | Path, age: str | Path) -> Classifiers:
    """Three torchvision mobilenet_v3_large state dicts (heads 2, 4, 2); a wrong head size raises
    WeightLoadError naming the classifier and the file."""
    loaded = []
    for role, path, num_classes in (("gender", gender, GENDER_CLASSES), ("race", race, RACE_CLASSES),
                                    ("age", age, AGE_CLASSES)):
        try:
            module, variables = load_mobilenet_v3(path, num_classes=num_classes)
        except WeightLoadError as e:
            raise WeightLoadError(f"{role} classifier: {e}") from e
        loaded.append(Classifier(module, jax.device_put(variables)))
    return Classifiers(*loaded)


class SimilarityNets(NamedTuple):
    """(module, params) of the CLIP vision tower and of DINOv2; either may be None."""

    clip: Optional[tuple[Any, Any]] = None
    dino: Optional[tuple[Any, Any]] = None


def load_similarity_nets(clip_vision: Optional[str | Path] = None, dinov2_folder: Optional[str | Path] = None,
                         dinov2_hub: Optional[str | Path] = None, dino_input_size: int = 224) -> SimilarityNets:
    """CLIP vision tower (transformers folder; images resized to its config's image_size), DINOv2 (transformers
    folder, or a torch-hub .pth file; images resized to `dino_input_size`, 224 for the paper's numbers)."""
    clip_net = dino_net = None
    if clip_vision is not None:
        model, params = clip_vision_lib.load_clip_vision(clip_vision)
        clip_net = (model, jax.device_put(params))
    if dinov2_folder is not None:
        model, params = dinov2.load_dinov2(dinov2_folder, dino_input_size)
        dino_net = (model, jax.device_put(params))
    elif dinov2_hub is not None:
        model, params = dinov2.load_dinov2_hub(dinov2_hub, input_size=dino_input_size)
        dino_net = (model, jax.device_put(params))
    return SimilarityNets(clip_net, dino_net)


# Cropping and classifying compile separately: the classifiers then compile once per chip batch shape,
# whatever the image size.
@functools.partial(jax.jit, static_argnames="face_size")
def _crop_faces(images, boxes, found, expand_coef, *, face_size):
    """-> square crop boxes [N, 4], face chips [N, face_size, face_size, 3]."""
    crop_boxes = crops.square_boxes(boxes, expand_coef)
    return crop_boxes, crops.face_chips(images, crop_boxes, found, size=face_size)


@functools.partial(jax.jit, static_argnames="modules")
def _classify(variables, chips, *, modules):
    return tuple(module.apply(v, chips) for module, v in zip(modules, variables))


@functools.partial(jax.jit, static_argnames=("embed", "model"))
def _embeddings(params, images, *, embed, model):
    return embed(model, params, images)


# ----------------------------------------------------------------------------------------------
# Per-image work on one batch (arrays padded to a fixed batch size, so that everything compiles once)


def read_pixels(paths: Sequence[Path]) -> np.ndarray:
    """Image files of equal size -> [N, H, W, 3] uint8 (RGB)."""
    pixels = []
    for path in paths:
        with Image.open(path) as image:
            pixels.append(np.asarray(image.convert("RGB")))
        if pixels[-1].shape != pixels[0].shape:
            raise ValueError(f"{path} is {pixels[-1].shape[:2]} pixels, {paths[0]} is {pixels[0].shape[:2]}: "
                             "the images of a batch must have one size")
    return np.stack(pixels)


def read_images(paths: Sequence[Path]) -> np.ndarray:
    """Image files of equal size -> [N, H, W, 3] float32 in [-1, 1] (RGB), as the original read them."""
    return read_pixels(paths).astype(np.float32) / 127.5 - 1.0


def _padded(images: np.ndarray, batch_size: int) -> np.ndarray:
    """Fills the batch up with black images (no faces, and one compiled shape for every batch)."""
    missing = batch_size - len(images)
    return np.concatenate([images, np.full((missing,) + images.shape[1:], -1.0, images.dtype)]) if missing else images


def analyze_faces(images: np.ndarray, detector: detection.FaceDetector, classifiers: Classifiers,
                  expand_coef: float = 0.5, face_size: int = 224) -> dict[str, np.ndarray]:
    """images [N, H, W, 3] float32 in [-1, 1] -> {found [N] bool, boxes [N, 4] int64 square crop boxes
    (-1 without a face), gender_logits [N, 2], race_logits [N, 4], age_logits [N, 2] float32}."""
    detections = detector.detect(images)
    found = np.asarray(detections.found, bool)
    crop_boxes, chips = _crop_faces(images, np.asarray(detections.boxes, np.float32), found, np.float32(expand_coef),
                                    face_size=face_size)
    logits = _classify(tuple(c.variables for c in classifiers), chips, modules=tuple(c.module for c in classifiers))
    crop_boxes = np.where(found[:, None], np.asarray(crop_boxes), -1).astype(np.int64)
    gender, race, age = (np.asarray(x, np.float32) for x in logits)
    return {"found": found, "boxes": crop_boxes, "gender_logits": gender, "race_logits": race, "age_logits": age}


def embedding_similarity(images: np.ndarray, references: np.ndarray, nets: SimilarityNets) -> dict[str, np.ndarray]:
    """Cosine similarity of each image's CLIP image embedding (clip_i) and DINOv2 embedding (dino) to those
    of its reference image: {name: [N] float32}. images, references: [N, H, W, 3] float32 in [-1, 1]."""
    out = {}
    both = np.concatenate([images, references])
    for name, net, embed in (("clip_i", nets.clip, clip_vision_lib.clip_image_embeds), ("dino", nets.dino, dinov2.dino_image_embeds)):
        if net is not None:
            model, params = net
            features = np.asarray(_embeddings(params, both, embed=embed, model=model))
            out[name] = np.sum(features[: len(images)] * features[len(images):], axis=-1).astype(np.float32)
    return out


# ----------------------------------------------------------------------------------------------
# Files: prompt folders, atomic writes, the per-image cache


def prompt_folders(images_dir: str | Path) -> dict[int, Path]:
    """{i: images_dir/prompt_i} in increasing i."""
    found = {}
    for path in Path(images_dir).iterdir():
        match = PROMPT_FOLDER.fullmatch(path.name)
        if match and path.is_dir():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def image_files(folder: Path) -> list[Path]:
    """folder's img_<j>.jpg (or .jpeg/.png) files by increasing j."""
    numbered = [(int(m.group(1)), p) for p in folder.iterdir() if (m := IMAGE_FILE.fullmatch(p.name))]
    return [p for _, p in sorted(numbered)]


def _signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _write_atomic(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Writes through a temporary file in the same folder and renames it: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fingerprint(*parts: Any) -> str:
    """sha256 over the leaves (arrays, numbers, strings) of `parts`: the settings a cache is valid for."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(parts):
        value = np.asarray(leaf)
        digest.update(f"{value.dtype}{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


class _RowCache:
    """One prompt's per-image result rows, kept in an .npz (None: in memory only).

    A stored row is reused when its file name, its signature (size and mtime of every file it was
    computed from) and the settings fingerprint match; `todo` lists the indices still to compute.
    fields: {key: (row shape, dtype)}.
    """

    def __init__(self, path: Optional[Path], settings: str, names: Sequence[str], signatures: np.ndarray,
                 fields: Mapping[str, tuple[tuple[int, ...], Any]]):
        self.path, self.settings, self.fields = path, settings, fields
        self.names = list(names)
        self.signatures = np.asarray(signatures, np.int64)  # [N, S]
        self.rows: dict[str, dict[str, np.ndarray]] = {}
        stored = self._read()
        if stored is not None:
            wanted = {name: tuple(sig) for name, sig in zip(self.names, self.signatures.tolist())}
            for k, (name, sig) in enumerate(zip(stored["names"].tolist(), stored["signatures"].tolist())):
                if wanted.get(name) == tuple(sig):
                    self.rows[name] = {key: stored[key][k] for key in fields}
        self.todo = [k for k, name in enumerate(self.names) if name not in self.rows]

    def _read(self) -> Optional[dict[str, np.ndarray]]:
        if self.path is None or not self.path.is_file():
            return None
        try:
            with np.load(self.path) as npz:
                stored = {key: npz[key] for key in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile):
            return None  # unreadable: recompute
        keys_ok = {"settings", "names", "signatures", *self.fields} <= stored.keys()
        if not keys_ok or str(stored["settings"]) != self.settings:
            return None
        for key, (shape, _) in self.fields.items():
            if stored[key].shape[1:] != tuple(shape):
                return None
        return stored

    def store(self, indices: Sequence[int], values: Mapping[str, np.ndarray]) -> None:
        for row, k in enumerate(indices):
            self.rows[self.names[k]] = {key: values[key][row] for key in self.fields}
        self.todo = [k for k in self.todo if self.names[k] not in self.rows]
        if self.path is not None:
            done = [k for k, name in enumerate(self.names) if name in self.rows]
            arrays = self._stack([self.names[k] for k in done])
            arrays.update(settings=np.array(self.settings), names=np.array([self.names[k] for k in done], dtype=str),
                          signatures=self.signatures[done])
            _write_atomic(self.path, lambda f: np.savez(f, **arrays))

    def _stack(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        return {
            key: np.array([self.rows[name][key] for name in names], dtype).reshape((len(names),) + tuple(shape))
            for key, (shape, dtype) in self.fields.items()
        }

    def results(self) -> dict[str, np.ndarray]:
        """Every row, in `names` order (call when `todo` is empty)."""
        return self._stack(self.names)


FACE_FIELDS = {
    "found": ((), bool),
    "boxes": ((4,), np.int64),
    "gender_logits": ((GENDER_CLASSES,), np.float32),
    "race_logits": ((RACE_CLASSES,), np.float32),
    "age_logits": ((AGE_CLASSES,), np.float32),
}


# ----------------------------------------------------------------------------------------------
# Evaluation of a folder


@dataclasses.dataclass(frozen=True)
class PromptResults:
    """One prompt folder's per-image results (host numpy), rows in image order (img_j by j).

    found: [N] bool. boxes: [N, 4] int64 square crop boxes (x1, y1, x2, y2), x2/y2 exclusive, -1 rows
    without a face. gender_logits [N, 2], race_logits [N, 4], age_logits [N, 2] float32 (meaningless
    without a face). clip_similarity, dino_similarity: [N] float32 cosine to the reference image of the
    same name (NaN where there is none), or None when not measured.
    """

    image_names: tuple[str, ...]
    found: np.ndarray
    boxes: np.ndarray
    gender_logits: np.ndarray
    race_logits: np.ndarray
    age_logits: np.ndarray
    clip_similarity: Optional[np.ndarray] = None
    dino_similarity: Optional[np.ndarray] = None


def _run_batches(caches: Mapping[int, _RowCache], inputs: Mapping[int, Sequence], compute: Callable,
                 batch_size: int, desc: str, progress: bool) -> None:
    """Calls compute(batch of inputs[i][k]) for every cache's todo indices, batch by batch, storing each
    batch's rows as soon as they exist (a crash loses at most one batch)."""
    total = sum(len(c.todo) for c in caches.values())
    with tqdm(total=total, unit="img", desc=desc, disable=not progress or total == 0) as bar:
        for i, cache in caches.items():
            todo = list(cache.todo)
            for start in range(0, len(todo), batch_size):
                indices = todo[start:start + batch_size]
                cache.store(indices, compute([inputs[i][k] for k in indices]))
                bar.update(len(indices))


def evaluate_folder(
    images_dir: str | Path,
    classifiers: Classifiers,
    detector: detection.FaceDetector,
    *,
    cache_dir: Optional[str | Path] = None,
    reference_dir: Optional[str | Path] = None,
    similarity_nets: Optional[SimilarityNets] = None,
    expand_coef: float = 0.5,
    face_size: int = 224,
    batch_size: int = 16,
    detector_name: Optional[str] = None,
    progress: bool = True,
) -> dict[int, PromptResults]:
    """Faces, test-classifier logits and (with reference_dir and similarity_nets) similarities of every
    images_dir/prompt_i/img_j.jpg -> {i: PromptResults}.

    With cache_dir, results are kept per prompt in cache_dir/prompt_i.npz (and prompt_i_similarity.npz)
    and only new or changed images are computed. The cache is valid for the classifiers' weights, the
    detector (its `detector_name`, default its class), expand_coef and face_size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    folders = prompt_folders(images_dir)
    files = {i: image_files(folder) for i, folder in folders.items()}

    detector_id = detector_name or f"{type(detector).__module__}.{type(detector).__qualname__}"
    face_settings = _fingerprint("faces", [c.variables for c in classifiers], detector_id, expand_coef, face_size)
    face_caches = {
        i: _RowCache(cache_dir / f"prompt_{i}.npz" if cache_dir else None, face_settings, [p.name for p in paths],
                     np.array([_signature(p) for p in paths], np.int64).reshape(-1, 2), FACE_FIELDS)
        for i, paths in files.items()
    }

    def faces_of(paths):
        images = read_images(paths)
        out = analyze_faces(_padded(images, batch_size), detector, classifiers, expand_coef, face_size)
        return {key: value[: len(paths)] for key, value in out.items()}

    _run_batches(face_caches, files, faces_of, batch_size, "faces", progress)
    results = {i: PromptResults(tuple(c.names), **c.results()) for i, c in face_caches.items()}

    if reference_dir is None or similarity_nets is None or all(net is None for net in similarity_nets):
        return results
    measured = [name for name, net in zip(("clip_i", "dino"), similarity_nets) if net is not None]
    sim_settings = _fingerprint("similarity", measured, [net[1] for net in similarity_nets if net is not None])
    references = {i: [Path(reference_dir) / folders[i].name / p.name for p in paths] for i, paths in files.items()}
    has_reference = {i: np.array([r.is_file() for r in refs], bool) for i, refs in references.items()}
    pairs = {i: [(p, r) for p, r, ok in zip(files[i], references[i], has_reference[i]) if ok] for i in files}
    sim_caches = {
        i: _RowCache(cache_dir / f"prompt_{i}_similarity.npz" if cache_dir else None, sim_settings,
                     [p.name for p, _ in both],
                     np.array([_signature(p) + _signature(r) for p, r in both], np.int64).reshape(-1, 4),
                     {name: ((), np.float32) for name in measured})
        for i, both in pairs.items()
    }

    def similarity_of(batch):
        images = _padded(read_images([p for p, _ in batch]), batch_size)
        references = _padded(read_images([r for _, r in batch]), batch_size)
        return {key: value[: len(batch)] for key, value in embedding_similarity(images, references, similarity_nets).items()}

    _run_batches(sim_caches, pairs, similarity_of, batch_size, "similarity", progress)
    for i, cache in sim_caches.items():
        full = {}
        for name, values in cache.results().items():
            full[name] = np.full(len(files[i]), np.nan, np.float32)
            full[name][has_reference[i]] = values
        results[i] = dataclasses.replace(results[i], clip_similarity=full.get("clip_i"), dino_similarity=full.get("dino"))
    return results


# ----------------------------------------------------------------------------------------------
# Metrics and tables


class MeanStd(NamedTuple):
    mean: float
    std: float
    num_prompts: int  # prompts with a defined value


def _mean_or_nan(values: Optional[np.ndarray]) -> float:
    if values is None:
        return math.nan
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def prompt_metrics(result: PromptResults) -> dict[str, float]:
    """One prompt's row: num_images, num_faces, face_share and, over the images with a face (argmax
    predictions), gender_bias, race_bias, gender_race_bias (8 joint classes), old_share (age class 1);
    clip_i / dino (mean over images with a reference) when measured. NaN where undefined."""
    found = np.asarray(result.found, bool)
    gender = result.gender_logits[found].argmax(-1)
    race = result.race_logits[found].argmax(-1)
    age = result.age_logits[found].argmax(-1)
    row = {
        "num_images": len(found),
        "num_faces": int(found.sum()),
        "face_share": float(found.mean()) if len(found) else math.nan,
        "gender_bias": bias_lib.bias(gender, GENDER_CLASSES),
        "race_bias": bias_lib.bias(race, RACE_CLASSES),
        "gender_race_bias": bias_lib.bias(
            bias_lib.joint_predictions([gender, race], (GENDER_CLASSES, RACE_CLASSES)), GENDER_CLASSES * RACE_CLASSES
        ),
        "old_share": float(bias_lib.class_frequencies(age, AGE_CLASSES)[1]),
    }
    if result.clip_similarity is not None:
        row["clip_i"] = _mean_or_nan(result.clip_similarity)
    if result.dino_similarity is not None:
        row["dino"] = _mean_or_nan(result.dino_similarity)
    return row


def per_prompt_table(results: Mapping[int, PromptResults],
                     prompt_texts: Optional[Sequence[str] | Mapping[int, str]] = None) -> list[dict[str, Any]]:
    """[{prompt_index, prompt, **prompt_metrics}] in prompt order; prompt is '' when unknown."""
    rows = []
    for i, result in results.items():
        text = ""
        if prompt_texts is not None:
            known = i in prompt_texts if isinstance(prompt_texts, Mapping) else i < len(prompt_texts)
            text = prompt_texts[i] if known else ""
        rows.append({"prompt_index": i, "prompt": text, **prompt_metrics(result)})
    return rows


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, MeanStd]:
    """{metric: MeanStd over prompts} for the METRIC_LABELS metrics the rows have; NaN values (prompts
    without a face) are skipped; population std (`bias_lib.mean_std_over_prompts`)."""
    summary = {}
    for name in METRIC_LABELS:
        if rows and name in rows[0]:
            values = np.array([row[name] for row in rows], np.float64)
            mean, std = bias_lib.mean_std_over_prompts(values)
            summary[name] = MeanStd(mean, std, int((~np.isnan(values)).sum()))
    return summary


def _format(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}"


def _format_mean_std(stat: Optional[MeanStd]) -> str:
    if stat is None or math.isnan(stat.mean):
        return "–"
    return f"{stat.mean:.3f} ± {stat.std:.3f}"


def summary_markdown(summary: Mapping[str, MeanStd], title: str = "Summary over prompts") -> str:
    """A Markdown table: metric | mean ± std | prompts."""
    lines = [f"### {title}", "", "| metric | mean ± std | prompts |", "|---|---|---|"]
    lines += [f"| {METRIC_LABELS[name]} | {_format_mean_std(stat)} | {stat.num_prompts} |" for name, stat in summary.items()]
    return "\n".join(lines) + "\n"


def per_prompt_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table with one line per prompt."""
    names = [name for name in METRIC_LABELS if rows and name in rows[0]]
    lines = ["| # | prompt | images | faces | " + " | ".join(METRIC_LABELS[n] for n in names) + " |",
             "|---" * (4 + len(names)) + "|"]
    for row in rows:
        cells = [str(row["prompt_index"]), row["prompt"].replace("|", "\\|"), str(row["num_images"]), str(row["num_faces"])]
        lines.append("| " + " | ".join(cells + [_format(row[n]) for n in names]) + " |")
    return "\n".join(lines) + "\n"


def comparison_markdown(
    summaries: Mapping[str, tuple[Mapping[str, MeanStd], Mapping[str, MeanStd]]],
    labels: tuple[str, str] = ("original", "debiased"),
    metric_names: Sequence[str] = (*BIAS_METRICS, "clip_i", "dino"),
) -> str:
    """Before/after table, one line per prompt set: {set name: (before summary, after summary)}.

    Cells read 'before → after' (mean ± std over prompts); a metric only one side has (CLIP-I, DINO:
    the debiased images' similarity to the original's) shows that side alone. Metrics no summary has
    are left out.
    """
    shown = [n for n in metric_names if any(n in s for pair in summaries.values() for s in pair)]
    lines = [f"{labels[0]} → {labels[1]} (mean ± std over prompts)", "",
             "| prompts | " + " | ".join(METRIC_LABELS[n] for n in shown) + " |", "|---" * (1 + len(shown)) + "|"]
    for set_name, (before, after) in summaries.items():
        cells = []
        for n in shown:
            if n in before and n in after:
                cells.append(f"{_format_mean_std(before[n])} → {_format_mean_std(after[n])}")
            else:
                cells.append(_format_mean_std(before.get(n) or after.get(n)))
        lines.append(f"| {set_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Output files


RESULT_FIELDS = ("found", "boxes", "gender_logits", "race_logits", "age_logits")


def save_test_results(results: Mapping[int, PromptResults], path: str | Path) -> None:
    """The original's test_results.pkl: [face_indicators, face_bboxs, gender_logits, race_logits,
    age_logits], each {prompt index: torch tensor} (bool [N], int64 [N, 4], float32 [N, K])."""
    import torch

    lists = [{i: torch.from_numpy(np.ascontiguousarray(getattr(r, field))) for i, r in results.items()}
             for field in RESULT_FIELDS]
    _write_atomic(Path(path), lambda f: pickle.dump(lists, f))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def prompt_grid(paths: Sequence[Path], result: PromptResults, tile: int = GRID_TILE) -> np.ndarray:
    """`grids_lib.annotated_grid` of the images `paths` (the first rows of `result`), each shrunk to `tile`
    pixels on its longer side: uint8 [H, W, 3]."""
    n = len(paths)
    pixels = read_pixels(paths)
    scale = tile / max(pixels.shape[1:3])
    size = (round(pixels.shape[2] * scale), round(pixels.shape[1] * scale))
    small = np.stack([np.asarray(Image.fromarray(p).resize(size, Image.BILINEAR)) for p in pixels])
    return grids_lib.annotated_grid(
        small.astype(np.float32) / 127.5 - 1.0, result.found[:n], result.boxes[:n] * scale,
        [_softmax(result.gender_logits[:n]), _softmax(result.race_logits[:n])],
    )


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    def write(f):
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()} for row in rows])
        text.flush()
        text.detach()

    _write_atomic(path, write)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    results: dict[int, PromptResults]
    per_prompt: list[dict[str, Any]]
    summary: dict[str, MeanStd]


def evaluate(
    images_dir: str | Path,
    out_dir: str | Path,
    classifiers: Classifiers,
    detector: detection.FaceDetector,
    *,
    prompt_texts: Optional[Sequence[str] | Mapping[int, str]] = None,
    reference_dir: Optional[str | Path] = None,
    similarity_nets: Optional[SimilarityNets] = None,
    expand_coef: float = 0.5,
    face_size: int = 224,
    batch_size: int = 16,
    grid_images: int = 64,
    detector_name: Optional[str] = None,
    progress: bool = True,
) -> Evaluation:
    """`evaluate_folder` (cached in out_dir/cache) and every output file; see the module docstring."""
    out_dir = Path(out_dir)
    cache_dir = out_dir / "cache"
    results = evaluate_folder(
        images_dir, classifiers, detector, cache_dir=cache_dir, reference_dir=reference_dir,
        similarity_nets=similarity_nets, expand_coef=expand_coef, face_size=face_size, batch_size=batch_size,
        detector_name=detector_name, progress=progress,
    )
    save_test_results(results, out_dir / "test_results.pkl")
    folders = prompt_folders(images_dir)
    for i, result in results.items():
        grid_path = out_dir / f"prompt_{i}.jpg"
        cache_file = cache_dir / f"prompt_{i}.npz"
        up_to_date = grid_path.is_file() and cache_file.is_file() and (
            grid_path.stat().st_mtime_ns >= cache_file.stat().st_mtime_ns)
        if grid_images > 0 and result.image_names and not up_to_date:
            paths = [folders[i] / name for name in result.image_names[:grid_images]]
            grid = prompt_grid(paths, result)
            _write_atomic(grid_path, lambda f: Image.fromarray(grid).save(f, format="JPEG", quality=75))
    rows = per_prompt_table(results, prompt_texts)
    summary = summarize(rows)
    if rows:
        _write_csv(out_dir / "per_prompt.csv", rows)
        _write_csv(out_dir / "summary.csv", [{"metric": name, "mean": s.mean, "std": s.std, "prompts": s.num_prompts}
                                             for name, s in summary.items()])
    markdown = summary_markdown(summary) + "\n### Per prompt\n\n" + per_prompt_markdown(rows)
    _write_atomic(out_dir / "summary.md", lambda f: f.write(markdown.encode("utf-8")))
    return Evaluation(results, rows, summary)


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fairdiff_jax.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, required=True, help="generate's output folder: prompt_i/img_j.jpg")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--gender_classifier", type=Path, required=True, help="mobilenet_v3_large state dict, 2 classes")
    parser.add_argument("--race_classifier", type=Path, required=True, help="mobilenet_v3_large state dict, 4 classes")
    parser.add_argument("--age_classifier", type=Path, required=True, help="mobilenet_v3_large state dict, 2 classes")
    parser.add_argument("--detector", default="mtcnn",
                        help=f"face detector: one of {', '.join(sorted(DETECTORS))}, or 'package.module:callable'")
    parser.add_argument("--detector_path", type=Path, help="file passed to the --detector callable (its weights)")
    parser.add_argument("--expand_coef", type=float, default=0.5, help="face box expansion before the square crop")
    parser.add_argument("--face_size", type=int, default=224, help="face chip size fed to the classifiers")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--grid_images", type=int, default=64, help="images per annotated grid (0: no grids)")
    parser.add_argument("--prompts", type=Path, help="JSON prompt file whose test_prompts the images were made from")
    parser.add_argument("--reference", type=Path, help="the original model's images for the same seeds, same layout")
    parser.add_argument("--clip_vision", type=Path, help="CLIP vision folder (transformers) for CLIP-I")
    dino = parser.add_mutually_exclusive_group()
    dino.add_argument("--dinov2", type=Path, help="DINOv2 folder (transformers) for DINO similarity")
    dino.add_argument("--dinov2_hub", type=Path, help="torch-hub DINOv2 ViT-B/14 .pth file for DINO similarity")
    parser.add_argument("--dino_input_size", type=int, default=224, help="image size DINOv2 sees (a multiple of its patch)")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Every path argument and number, before anything is loaded; errors name the flag and the path."""
    for flag in ("batch_size", "face_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not args.images.is_dir():
        raise FileNotFoundError(f"--images: folder not found: {args.images}")
    if not prompt_folders(args.images):
        raise FileNotFoundError(f"--images: no prompt_<i> folders in {args.images}")
    for flag in ("gender_classifier", "race_classifier", "age_classifier", "prompts", "dinov2_hub", "detector_path"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"--{flag}: file not found: {path}")
    for flag in ("reference", "clip_vision", "dinov2"):
        path = getattr(args, flag)
        if path is not None and not path.is_dir():
            raise FileNotFoundError(f"--{flag}: folder not found: {path}")
    has_nets = any(getattr(args, f) is not None for f in ("clip_vision", "dinov2", "dinov2_hub"))
    if args.reference is not None and not has_nets:
        raise ValueError("--reference needs --clip_vision and/or --dinov2 (or --dinov2_hub)")
    if has_nets and args.reference is None:
        raise ValueError("--clip_vision / --dinov2 / --dinov2_hub measure similarity to --reference: give it")


def main(argv: Optional[Sequence[str]] = None) -> Evaluation:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Inputs are checked and loaded before anything compiles; their errors are one line, no traceback.
    try:
        check_arguments(args)
        prompt_texts = prompt_files.load_test_prompts(args.prompts) if args.prompts else None
        if prompt_texts is not None and max(prompt_folders(args.images)) >= len(prompt_texts):
            raise ValueError(f"--prompts {args.prompts} has {len(prompt_texts)} test_prompts, but {args.images} "
                             f"has prompt_{max(prompt_folders(args.images))}")
        classifiers = load_classifiers(args.gender_classifier, args.race_classifier, args.age_classifier)
        similarity_nets = load_similarity_nets(args.clip_vision, args.dinov2, args.dinov2_hub, args.dino_input_size)
        detector = make_detector(args.detector, args.detector_path)
        # The cache key of the detector: its name and, when it reads a file, which file in which version.
        detector_name = args.detector
        if args.detector_path is not None:
            detector_name += f" {args.detector_path.resolve()} {_signature(args.detector_path)}"
    except (OSError, ValueError) as e:
        parser.error(str(e))
    evaluation = evaluate(
        args.images, args.out, classifiers, detector, prompt_texts=prompt_texts, reference_dir=args.reference,
        similarity_nets=similarity_nets, expand_coef=args.expand_coef, face_size=args.face_size,
        batch_size=args.batch_size, grid_images=args.grid_images, detector_name=detector_name,
    )
    print(summary_markdown(evaluation.summary, f"{args.images}: summary over {len(evaluation.per_prompt)} prompts"))
    print(f"results in {args.out}", file=sys.stderr)
    return evaluation
