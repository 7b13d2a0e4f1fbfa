"""What made the images of a folder: `save_dir/generation.json`, checked before a rerun adds to or reuses them.

    files = manifest.ModelFiles(model_dir, "float32", {"text_encoder": te_lora_path, "unet": None})
    made_by = manifest.recipe(files, seed=0, guidance=7.5, steps=30, latent_shape=sd.latent_shape)
    manifest.claim_folder(save_dir, made_by, prompts, overwrite=False)   # StaleImagesError on a mismatch

Generation skips images that exist (so an interrupted run resumes), which is only right when they came from the
same model, LoRA files, seed, guidance, steps and size. The manifest records those (files by content hash) and
the prompt texts by index; a folder made otherwise, or holding images with no manifest, is refused with a message
that names what differs, unless `overwrite` (its prompt_<i> folders are then deleted first). More images per prompt,
or more prompts, extend a folder: they do not change what made the images already there.
"""

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

MANIFEST_NAME = "generation.json"
_EDGE_BYTES = 1 << 20  # of each model file, the first and last MiB are hashed (with its size): fast on 4 GB of weights


class StaleImagesError(ValueError):
    """The folder holds images that another model, LoRA or sampling setting made; the message says which."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over every file of a model folder: relative name, size, first and last MiB. Content-based (a copied
    or moved model keeps it), and a retrained or replaced weight file changes it."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(model_dir).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as f:
            digest.update(f.read(_EDGE_BYTES))
            if size > 2 * _EDGE_BYTES:
                f.seek(size - _EDGE_BYTES)
                digest.update(f.read())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """The files a model is made of: a diffusers folder, its compute dtype, {part: LoRA file or None}."""

    model_dir: Path
    dtype: str
    loras: Mapping[str, Optional[Path]] = dataclasses.field(default_factory=dict)


def recipe(files: ModelFiles, *, seed: int, guidance: float, steps: int, latent_shape: Sequence[int]) -> dict[str, Any]:
    """Everything the images depend on besides the prompt: model and LoRA files by content, dtype, sampling."""
    return {
        "model_sha256": model_fingerprint(files.model_dir),
        "dtype": str(files.dtype),
        "lora_sha256": {name: file_sha256(Path(path)) for name, path in sorted(files.loras.items()) if path is not None},
        "seed": int(seed),
        "guidance_scale": float(guidance),
        "num_denoising_steps": int(steps),
        "latent_shape": [int(n) for n in latent_shape],
    }


def _has_images(save_dir: Path) -> bool:
    return any(save_dir.glob("prompt_*/img_*"))


def _differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(stored) | set(wanted))
    return [f"{key}: {stored.get(key)!r} there, {wanted.get(key)!r} now" for key in keys if stored.get(key) != wanted.get(key)]


def _prompt_differences(stored: Sequence[str], wanted: Sequence[str]) -> list[str]:
    return [f"prompt_{i}: {a!r} there, {b!r} now" for i, (a, b) in enumerate(zip(stored, wanted)) if a != b]


def _write_json(path: Path, content: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def claim_folder(save_dir: str | Path, made_by: Mapping[str, Any], prompts: Sequence[str], overwrite: bool = False) -> None:
    """Makes save_dir the folder of `made_by` and `prompts` (index i: prompt_i): creates it with its manifest,
    accepts a folder whose manifest agrees (its prompt list may be shorter or longer), and otherwise raises
    StaleImagesError naming the differences, or with `overwrite` deletes its prompt_<i> folders and starts afresh."""
    save_dir = Path(save_dir)
    if save_dir.exists() and not save_dir.is_dir():
        raise StaleImagesError(f"--save_dir {save_dir} is a file, not a folder")
    path = save_dir / MANIFEST_NAME
    problems, stored_prompts = [], []
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            stored_prompts = list(stored["prompts"])
            problems = _differences(stored["made_by"], made_by) + _prompt_differences(stored_prompts, prompts)
        except (ValueError, KeyError, TypeError) as e:
            problems = [f"unreadable {MANIFEST_NAME} ({type(e).__name__}: {e})"]
    elif _has_images(save_dir):
        problems = [f"images but no {MANIFEST_NAME}: nothing says what made them"]
    if problems:
        if not overwrite:
            raise StaleImagesError(f"{save_dir} holds images made otherwise ({'; '.join(problems)}): pass --overwrite to "
                                   "delete them, or choose another output folder")
        for folder in save_dir.glob("prompt_*"):
            shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
        stored_prompts = []
    save_dir.mkdir(parents=True, exist_ok=True)
    longest = list(prompts) if len(prompts) >= len(stored_prompts) else stored_prompts
    _write_json(path, {"made_by": dict(made_by), "prompts": longest})
