"""PyTorch checkpoints -> Flax parameter trees.

Reading: safetensors files, and torch pickles (.bin/.pt/.pth, loaded with `weights_only=True`), into
flat `{torch_name: np.ndarray}` dicts.

Converting: one generic rule maps a PyTorch name onto a Flax path, and each model module adds its
own renaming rules (regular expressions applied first) next to the network they describe:

  - dotted names split into nested dicts, and a list index joins its parent:
    `down_blocks.0.attentions.1.proj_in.weight` -> `down_blocks_0/attentions_1/proj_in/<leaf>`;
  - `weight` becomes whichever of `kernel`, `scale`, `embedding` the Flax module has; `bias` stays;
  - a 2-D kernel is transposed ([out, in] -> [in, out]); a 4-D one goes OIHW -> HWIO (Flax is NHWC).

The target tree's shapes come from `jax.eval_shape(model.init, ...)`, so no real initialisation is
ever compiled. Every mismatch (missing, unexpected, wrong shape) raises `WeightLoadError` naming the
file and the keys.
"""

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
from flax import traverse_util

# (pattern, replacement) pairs applied with re.sub to a PyTorch key, in order.
RenameRules = Sequence[tuple[str, str]]


class WeightLoadError(ValueError):
    """A checkpoint does not fit the model: the message names the file and the keys."""


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a .safetensors file or a torch pickle (.bin/.pt/.pth) into {name: float32-or-native ndarray}.

    A pickle whose top level is a dict holding a 'state_dict' (or 'model') dict is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightLoadError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as e:  # safetensors raises its own error types for corrupt headers.
            raise WeightLoadError(f"cannot read safetensors file {path}: {e}") from e
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightLoadError(f"cannot read torch file {path}: {e}") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise WeightLoadError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    out = {}
    for name, tensor in obj.items():
        if not isinstance(tensor, torch.Tensor):
            raise WeightLoadError(f"{path}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
        # bfloat16 has no numpy dtype: widen it; every other dtype keeps its width.
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        out[name] = tensor.detach().cpu().numpy()
    return out


def find_weights_file(folder: str | Path, stems: Iterable[str]) -> Path:
    """The first existing `<stem>.safetensors` or `<stem>.bin` in `folder` (safetensors preferred)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightLoadError(f"model folder not found: {folder}")
    tried = []
    for stem in stems:
        for suffix in (".safetensors", ".bin"):
            candidate = folder / f"{stem}{suffix}"
            tried.append(candidate.name)
            if candidate.is_file():
                return candidate
    raise WeightLoadError(f"no weights file in {folder} (looked for {', '.join(tried)})")


def read_config_json(folder: str | Path) -> dict[str, Any]:
    """`folder/config.json` as a dict; WeightLoadError naming the folder or file when absent or malformed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightLoadError(f"model folder not found: {folder}")
    path = folder / "config.json"
    if not path.is_file():
        raise WeightLoadError(f"no config.json in {folder}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightLoadError(f"{path} is not valid JSON: {e}") from e


def torch_key_to_flax_path(key: str) -> tuple[str, ...]:
    """'down_blocks.0.attentions.1.proj_in.weight' -> ('down_blocks_0', 'attentions_1', 'proj_in', 'weight')."""
    path: list[str] = []
    for part in key.split("."):
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path)


def _flax_leaf_name(module: Mapping[str, Any], torch_leaf: str) -> Optional[str]:
    if torch_leaf != "weight":
        return torch_leaf if torch_leaf in module else None
    for name in ("kernel", "scale", "embedding"):
        if name in module:
            return name
    return None


def _to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    target_shapes: Mapping[str, Any],
    *,
    source: str,
    rename_rules: RenameRules = (),
    ignore: Sequence[str] = (),
    transforms: Optional[Mapping[str, Callable[[np.ndarray], np.ndarray]]] = None,
) -> dict[str, Any]:
    """Maps a PyTorch state dict onto a Flax params tree of known shapes.

    Args:
      state_dict: {torch_name: array}.
      target_shapes: the Flax `params` tree (leaves with .shape and .dtype, e.g. ShapeDtypeStruct).
      source: the file (or description) the weights came from; used in error messages.
      rename_rules: (regex, replacement) applied in order to each torch key before the generic rule.
      ignore: regexes of torch keys to drop silently (buffers such as position_ids, or parts of a
        checkpoint the Flax model does not build, such as the VAE encoder).
      transforms: {'/'-joined Flax path: fn} applied to the value after the layout change, for the
        rare weight whose layout the generic rule cannot know (e.g. a reshaped projection).

    Returns:
      A nested dict of numpy arrays with exactly the target's structure, shapes and dtypes.
    """
    transforms = transforms or {}
    flat_target = traverse_util.flatten_dict(dict(target_shapes))
    nested_modules = _module_index(flat_target)
    params: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, wrong_shape = [], []
    for key, value in state_dict.items():
        if any(re.search(p, key) for p in ignore):
            continue
        renamed = key
        for pattern, replacement in rename_rules:
            renamed = re.sub(pattern, replacement, renamed)
        path = torch_key_to_flax_path(renamed)
        module = nested_modules.get(path[:-1])
        leaf = _flax_leaf_name(module, path[-1]) if module is not None else None
        if leaf is None:
            unexpected.append(key)
            continue
        flax_path = path[:-1] + (leaf,)
        value = _to_flax_layout(leaf, np.asarray(value))
        transform = transforms.get("/".join(flax_path))
        if transform is not None:
            value = transform(value)
        expected = flat_target[flax_path]
        if tuple(value.shape) != tuple(expected.shape):
            wrong_shape.append(f"{key}: file {tuple(value.shape)} vs model {tuple(expected.shape)} ({'/'.join(flax_path)})")
            continue
        params[flax_path] = value.astype(expected.dtype)
    missing = ["/".join(p) for p in flat_target if p not in params]
    problems = []
    if wrong_shape:
        problems.append("shape mismatch:\n    " + "\n    ".join(wrong_shape))
    if missing:
        problems.append("missing weights (model paths):\n    " + "\n    ".join(missing))
    if unexpected:
        problems.append("unexpected weights (file keys):\n    " + "\n    ".join(unexpected))
    if problems:
        raise WeightLoadError(f"{source} does not fit the model:\n  " + "\n  ".join(problems))
    return traverse_util.unflatten_dict(params)


# Route each torch tensor to its Flax collection: BatchNorm running statistics to `batch_stats`
# (`running_mean` -> `mean`, `running_var` -> `var`), everything else to `params`.
BATCH_STATS_RENAME_RULES = (
    (r"^(.*)\.running_(mean|var)$", r"batch_stats.\1.\2"),
    (r"^(?!batch_stats\.)", "params."),
)
BATCH_STATS_IGNORE = (r"\.num_batches_tracked$",)


def convert_with_batch_stats(
    state_dict: dict, target_variables: dict, *, source: str, rename_rules: RenameRules = ()
) -> dict:
    """A torch state dict (BatchNorm buffers included) -> `{'params', ['batch_stats']}` of known shapes.

    `rename_rules` run first, on the torch names; then the collection routing above; then the
    generic rule of `weights.convert_state_dict`, whose errors name the file and every bad key.
    """
    return convert_state_dict(
        state_dict,
        target_variables,
        source=source,
        rename_rules=tuple(rename_rules) + BATCH_STATS_RENAME_RULES,
        ignore=BATCH_STATS_IGNORE,
    )


def _module_index(flat_target: Mapping[tuple[str, ...], Any]) -> dict[tuple[str, ...], dict[str, Any]]:
    """{module path: {leaf name: leaf}} for every module that owns leaves."""
    modules: dict[tuple[str, ...], dict[str, Any]] = {}
    for path, leaf in flat_target.items():
        modules.setdefault(path[:-1], {})[path[-1]] = leaf
    return modules
