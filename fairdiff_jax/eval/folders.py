"""Image folders as `generate` writes them (images_dir/prompt_i/img_j.jpg), atomic writes, and the per-image
result cache that makes evaluation resumable.

    folders = prompt_folders(images_dir)              # {i: images_dir/prompt_i}
    paths = image_files(folders[0])                   # img_0.jpg, img_1.jpg, ... by j
    images = read_images(paths)                       # [N, H, W, 3] float32 in [-1, 1]

A `RowCache` keeps one prompt's per-image rows in an .npz, keyed by each file's name, size and mtime and by a
fingerprint of the settings they were computed with: a rerun after a crash, or after more images were generated,
computes only new or changed images.
"""

import hashlib
import io
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

PROMPT_FOLDER = re.compile(r"prompt_(\d+)")
IMAGE_FILE = re.compile(r"img_(\d+)\.(jpg|jpeg|png)")


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


def unreadable_images(paths: Sequence[Path]) -> list[tuple[Path, str]]:
    """[(path, why)] of the image files that do not decode (truncated, empty, not an image): decoding them whole
    is the only test a truncated JPEG fails."""
    bad = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as e:  # PIL raises OSError, SyntaxError, DecompressionBombError, ... by format
            bad.append((path, f"{type(e).__name__}: {e}"))
    return bad


def image_size(path: Path) -> int:
    """The side of a square image file (ValueError naming the file otherwise), without decoding it."""
    with Image.open(path) as image:
        width, height = image.size
    if width != height:
        raise ValueError(f"{path} is {width}x{height} pixels: the evaluation's image towers read square images")
    return width


def padded(images: np.ndarray, batch_size: int) -> np.ndarray:
    """Fills the batch up with black images (no faces, and one compiled shape for every batch)."""
    missing = batch_size - len(images)
    return np.concatenate([images, np.full((missing,) + images.shape[1:], -1.0, images.dtype)]) if missing else images


def file_signature(path: Path) -> tuple[int, int]:
    """(size, mtime in ns) of a file: a changed file gets a new signature."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def write_atomic(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Writes through a temporary file in the same folder and renames it: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fingerprint(*parts: Any) -> str:
    """sha256 over the leaves (arrays, numbers, strings) of `parts`: the settings a cache is valid for."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(parts):
        value = np.asarray(leaf)
        digest.update(f"{value.dtype}{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


Fields = Mapping[str, tuple[tuple[int, ...], Any]]  # {key: (row shape, dtype)}


class RowCache:
    """One prompt's per-image result rows, kept in an .npz (None: in memory only).

    A stored row is reused when its file name, its signature (size and mtime of every file it was
    computed from) and the settings fingerprint match; `todo` lists the indices still to compute.
    """

    def __init__(self, path: Optional[Path], settings: str, names: Sequence[str], signatures: np.ndarray, fields: Fields):
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

    @classmethod
    def for_files(cls, path: Optional[Path], settings: str, files: Sequence[Path | tuple[Path, ...]],
                  fields: Fields) -> "RowCache":
        """Rows named by the (first) file's name, signed by every file of the row."""
        groups = [f if isinstance(f, tuple) else (f,) for f in files]
        signatures = [sum((file_signature(p) for p in group), ()) for group in groups]
        width = len(signatures[0]) if signatures else 0
        return cls(path, settings, [group[0].name for group in groups],
                   np.array(signatures, np.int64).reshape(len(groups), width), fields)

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
            write_atomic(self.path, lambda f: np.savez(f, **arrays))

    def _stack(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        return {
            key: np.array([self.rows[name][key] for name in names], dtype).reshape((len(names),) + tuple(shape))
            for key, (shape, dtype) in self.fields.items()
        }

    def results(self) -> dict[str, np.ndarray]:
        """Every row, in `names` order (call when `todo` is empty)."""
        return self._stack(self.names)


def run_batches(caches: Mapping[int, RowCache], inputs: Mapping[int, Sequence], compute: Callable[[int, list], dict],
                batch_size: int, desc: str, progress: bool) -> None:
    """Calls compute(i, batch of inputs[i][k]) for every cache's todo indices, batch by batch, storing each
    batch's rows as soon as they exist (a crash loses at most one batch)."""
    total = sum(len(c.todo) for c in caches.values())
    with tqdm(total=total, unit="img", desc=desc, disable=not progress or total == 0) as bar:
        for i, cache in caches.items():
            todo = list(cache.todo)
            for start in range(0, len(todo), batch_size):
                indices = todo[start:start + batch_size]
                cache.store(indices, compute(i, [inputs[i][k] for k in indices]))
                bar.update(len(indices))
