"""Evaluate folders of generated images with the one evaluator (eval/evaluator.py) and write the outputs.

Input: the layout `generate` writes, images_dir/prompt_i/img_j.jpg (an image file that does not decode is skipped
with a warning naming it, and counted: num_unreadable). For every prompt folder, in batches:
`Evaluator.judge` (faces, test classifiers, degenerate images, fidelity features, consistency); with a paired
reference folder (the original model's images from the same seeds, same layout) also CLIP-I and DINO.

Outputs in out_dir:
  test_results.pkl  the original's file: a pickle of [face_indicators, face_bboxs, gender_logits, race_logits,
                    age_logits], each {prompt index i: per-image torch tensor}: bool [N], int64 [N, 4] (the square
                    crop boxes, x1 y1 x2 y2; -1 where no face), float32 [N, 2], [N, 4], [N, 2] (meaningless where
                    no face). Torch tensors with the original's dtypes, so that scripts written for the original's
                    file run unchanged; loading needs torch. Rows follow the image index j.
  prompt_i.jpg      annotated grid of the prompt's first grid_images images, ordered by class: face box, gender
                    and race bars (height = confidence); redrawn only when the prompt's results changed.
  per_prompt.csv    per prompt: text, images, faces, every metric of `evaluator.prompt_metrics`.
  summary.csv, summary.md   mean +- std over prompts (population std; prompts without a face are skipped for
                    the bias), warnings about degenerate images; summary.md also lists every prompt.
  cache/            per-prompt results (.npz) keyed by image file name, size and mtime and by the settings (every
                    judge's weights): a rerun computes only new or changed images. Files are written atomically.
"""

import dataclasses
import pickle
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from fairdiff_jax import attributes as attributes_lib
from fairdiff_jax.eval import grids as grids_lib
from fairdiff_jax.eval import tables
from fairdiff_jax.eval.evaluator import BIAS_ATTRIBUTES, Evaluator, PromptResults, prompt_metrics
from fairdiff_jax.eval.folders import (
    RowCache,
    fingerprint,
    image_files,
    image_size,
    padded,
    prompt_folders,
    read_images,
    read_pixels,
    run_batches,
    unreadable_images,
    write_atomic,
)
from fairdiff_jax.eval.similarity import SIMILARITY_METRICS, embedding_similarity

GRID_TILE = 256  # grid images are shrunk to this many pixels on their longer side
RESULT_FIELDS = ("found", "boxes", "gender", "race", "age")  # test_results.pkl's lists, in order


def evaluate_folder(images_dir: str | Path, evaluator: Evaluator, *,
                    prompt_texts: tables.PromptTexts = None,
                    cache_dir: Optional[str | Path] = None, reference_dir: Optional[str | Path] = None,
                    batch_size: int = 16, progress: bool = True) -> dict[int, PromptResults]:
    """Every images_dir/prompt_i/img_j.jpg through `evaluator.judge` -> {i: PromptResults}; prompt_texts give each
    folder's prompt (needed for consistency). With reference_dir and the evaluator's similarity towers, also the
    CLIP-I / DINO similarity to reference_dir/prompt_i/<same name> (NaN where that file is missing).

    With cache_dir, results are kept per prompt in cache_dir/prompt_i.npz (and prompt_i_similarity.npz) and only
    new or changed images are computed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    folders = prompt_folders(images_dir)
    files = {i: image_files(folder) for i, folder in folders.items()}
    first = _first_readable(files)
    feature_dim = evaluator.fidelity_tower.feature_dim(image_size(first)) if evaluator.fidelity_tower is not None and first else 0
    fields = evaluator.fields(feature_dim)
    settings = evaluator.settings()

    caches, unreadable = _readable_caches(
        files, lambda i, paths: RowCache.for_files(cache_dir / f"prompt_{i}.npz" if cache_dir else None, settings, paths, fields))

    def judge(i, paths):
        out = evaluator.judge(padded(read_images(paths), batch_size), tables.prompt_text(prompt_texts, i))
        return {key: value[: len(paths)] for key, value in out.items()}

    run_batches(caches, files, judge, batch_size, "evaluate", progress)
    results = {i: dataclasses.replace(PromptResults.from_rows(c.names, c.results()), unreadable=unreadable[i])
               for i, c in caches.items()}
    if reference_dir is None or all(tower is None for tower in evaluator.similarity):
        return results
    return _with_similarity(results, files, Path(reference_dir), evaluator, cache_dir, batch_size, progress)


def _readable_caches(files: dict[int, list[Path]], cache_of) -> tuple[dict[int, RowCache], dict[int, tuple[str, ...]]]:
    """({i: cache_of(i, readable files)}, {i: names of unreadable files}); drops the unreadable from `files`, each
    with a warning naming it. Only images without stored results are decoded here: a cached one has not changed."""
    caches, unreadable = {}, {}
    for i, paths in files.items():
        caches[i] = cache_of(i, paths)
        bad = unreadable_images([paths[k] for k in caches[i].todo])
        for path, why in bad:
            print(f"warning: skipping unreadable image {path} ({why})", file=sys.stderr)
        unreadable[i] = tuple(path.name for path, _ in bad)
        if bad:
            files[i] = [p for p in paths if p.name not in unreadable[i]]
            caches[i] = cache_of(i, files[i])
    return caches, unreadable


def _first_readable(files: Mapping[int, Sequence[Path]]) -> Optional[Path]:
    """The first image file whose size can be read (None when there is none)."""
    for paths in files.values():
        for path in paths:
            try:
                image_size(path)
            except OSError:
                continue
            return path
    return None


def _with_similarity(results, files, reference_dir, evaluator, cache_dir, batch_size, progress):
    nets = evaluator.similarity
    measured = [name for name, tower in zip(SIMILARITY_METRICS, nets) if tower is not None]
    settings = fingerprint("similarity", measured, [tower.params for tower in nets if tower is not None])
    references = {i: [reference_dir / paths[0].parent.name / p.name for p in paths] if paths else [] for i, paths in files.items()}
    has_reference = {i: np.array([r.is_file() for r in refs], bool) for i, refs in references.items()}
    for i, refs in references.items():  # an unreadable reference image leaves its pair's similarity NaN, as a missing one
        bad = {path for path, why in unreadable_images([r for r, ok in zip(refs, has_reference[i]) if ok])}
        for path in sorted(bad):
            print(f"warning: skipping unreadable reference image {path}", file=sys.stderr)
        has_reference[i] &= np.array([r not in bad for r in refs], bool)
    pairs = {i: [(p, r) for p, r, ok in zip(files[i], references[i], has_reference[i]) if ok] for i in files}
    caches = {i: RowCache.for_files(cache_dir / f"prompt_{i}_similarity.npz" if cache_dir else None, settings, both,
                                    {name: ((), np.float32) for name in measured})
              for i, both in pairs.items()}

    def similarity_of(i, batch):
        images = padded(read_images([p for p, _ in batch]), batch_size)
        references = padded(read_images([r for _, r in batch]), batch_size)
        return {key: value[: len(batch)] for key, value in embedding_similarity(images, references, nets).items()}

    run_batches(caches, pairs, similarity_of, batch_size, "similarity", progress)
    for i, cache in caches.items():
        full = {}
        for name, values in cache.results().items():
            full[name] = np.full(len(files[i]), np.nan, np.float32)
            full[name][has_reference[i]] = values
        results[i] = dataclasses.replace(results[i], clip_similarity=full.get("clip_i"), dino_similarity=full.get("dino"))
    return results


def folder_features(images_dir: str | Path, evaluator: Evaluator, cache_dir: Optional[str | Path] = None,
                    batch_size: int = 16, progress: bool = True) -> dict[int, np.ndarray]:
    """{i: [M, D] fidelity features of images_dir/prompt_i's images}: a reference set for fidelity, cached in
    cache_dir/reference_prompt_i.npz."""
    folders = prompt_folders(images_dir)
    files = {i: image_files(folder) for i, folder in folders.items()}
    first = _first_readable(files)
    if first is None:
        raise FileNotFoundError(f"no images in the reference set {images_dir}")
    fields = {"features": ((evaluator.fidelity_tower.feature_dim(image_size(first)),), np.float32)}
    settings = fingerprint("reference features", evaluator.fidelity_tower.params)
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    caches, _ = _readable_caches(files, lambda i, paths: RowCache.for_files(
        cache_dir / f"reference_prompt_{i}.npz" if cache_dir else None, settings, paths, fields))
    run_batches(caches, files, lambda i, paths: {"features": evaluator.features(padded(read_images(paths), batch_size))[: len(paths)]},
                batch_size, "reference features", progress)
    return {i: cache.results()["features"] for i, cache in caches.items()}


def save_test_results(results: Mapping[int, PromptResults], path: str | Path) -> None:
    """The original's test_results.pkl: [face_indicators, face_bboxs, gender_logits, race_logits,
    age_logits], each {prompt index: torch tensor} (bool [N], int64 [N, 4], float32 [N, K])."""
    import torch

    def field(result: PromptResults, name: str) -> np.ndarray:
        return getattr(result, name) if name in ("found", "boxes") else result.logits[name]

    lists = [{i: torch.from_numpy(np.ascontiguousarray(field(r, name))) for i, r in results.items()} for name in RESULT_FIELDS]
    write_atomic(Path(path), lambda f: pickle.dump(lists, f))


def prompt_grid(paths: Sequence[Path], result: PromptResults, tile: int = GRID_TILE,
                bias_attributes: Sequence[str] = BIAS_ATTRIBUTES) -> np.ndarray:
    """`grids_lib.annotated_grid` of the images `paths` (the first rows of `result`), each shrunk to `tile`
    pixels on its longer side, with bars of the `bias_attributes`' probabilities: uint8 [H, W, 3]."""
    n = len(paths)
    pixels = read_pixels(paths)
    scale = tile / max(pixels.shape[1:3])
    size = (round(pixels.shape[2] * scale), round(pixels.shape[1] * scale))
    small = np.stack([np.asarray(Image.fromarray(p).resize(size, Image.BILINEAR)) for p in pixels])
    return grids_lib.annotated_grid(
        small.astype(np.float32) / 127.5 - 1.0, result.found[:n], result.boxes[:n] * scale,
        [result.probs(a)[:n] for a in bias_attributes], attributes_lib.colors(bias_attributes),
    )


@dataclasses.dataclass(frozen=True)
class Evaluation:
    results: dict[int, PromptResults]
    per_prompt: list[dict[str, Any]]
    summary: dict[str, tables.MeanStd]


def evaluate(images_dir: str | Path, out_dir: str | Path, evaluator: Evaluator, *,
             prompt_texts: tables.PromptTexts = None, reference_dir: Optional[str | Path] = None,
             reference_features: Optional[Mapping[int, np.ndarray]] = None, batch_size: int = 16, grid_images: int = 64,
             progress: bool = True) -> Evaluation:
    """`evaluate_folder` (cached in out_dir/cache), the metrics (fidelity against reference_features[i], the
    reference set's features for prompt i, where given) and every output file; see the module docstring."""
    out_dir = Path(out_dir)
    cache_dir = out_dir / "cache"
    results = evaluate_folder(images_dir, evaluator, prompt_texts=prompt_texts, cache_dir=cache_dir,
                              reference_dir=reference_dir, batch_size=batch_size, progress=progress)
    save_test_results(results, out_dir / "test_results.pkl")
    folders = prompt_folders(images_dir)
    for i, result in results.items():
        grid_path = out_dir / f"prompt_{i}.jpg"
        cache_file = cache_dir / f"prompt_{i}.npz"
        up_to_date = grid_path.is_file() and cache_file.is_file() and (
            grid_path.stat().st_mtime_ns >= cache_file.stat().st_mtime_ns)
        if grid_images > 0 and result.image_names and not up_to_date:
            grid = prompt_grid([folders[i] / name for name in result.image_names[:grid_images]], result,
                               bias_attributes=evaluator.bias_attributes)
            write_atomic(grid_path, lambda f: Image.fromarray(grid).save(f, format="JPEG", quality=75))
    metrics = {i: prompt_metrics(r, (reference_features or {}).get(i), evaluator.fidelity_k, evaluator.confidence_level,
                                 evaluator.bias_attributes) for i, r in results.items()}
    rows = tables.per_prompt_table(metrics, prompt_texts)
    summary = tables.summarize(rows)
    notes = tables.warnings(rows)
    for line in notes:
        print(f"{images_dir}: {line}", file=sys.stderr)
    if rows:
        tables.write_csv(out_dir / "per_prompt.csv", rows)
        tables.write_csv(out_dir / "summary.csv", [{"metric": name, "mean": s.mean, "std": s.std, "prompts": s.num_prompts}
                                                   for name, s in summary.items()])
    name = evaluator.consistency_name
    markdown = (tables.summary_markdown(summary, consistency_name=name, notes=notes) + "\n### Per prompt\n\n"
                + tables.per_prompt_markdown(rows, name))
    write_atomic(out_dir / "summary.md", lambda f: f.write(markdown.encode("utf-8")))
    return Evaluation(results, rows, summary)
