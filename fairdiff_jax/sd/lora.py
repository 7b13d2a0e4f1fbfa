"""LoRA as data: a pytree of (down, up) factors beside the frozen params, its merge, and its files.

The LoRA tree mirrors the frozen params' nesting: where the frozen tree holds a targeted Dense module
`{'kernel': [in, out], 'bias': [out]}`, the LoRA tree holds `{'down': [in, r], 'up': [r, out]}` at the
same path, float32, and nothing else. `merge(frozen, lora)` gives the params the unchanged Flax model
runs with, kernel -> kernel + down @ up (the original's y = W x + b + up(down(x)), scale 1, no alpha),
so inside a jitted loss the gradient reaches only the LoRA tree. The nesting keeps orbax checkpoints and
shardings simple (no '/' inside keys; `jax.tree.map` over a plain nested dict).

Orientation: Flax kernels are [in, out], so `down` here is the transpose of PyTorch's
`down.weight` [r, in] and `up` the transpose of `up.weight` [out, r]; the files hold PyTorch's layout.

Targets (docs/method.md#models): in the CLIP text encoder, every layer's self_attn q_proj, k_proj, v_proj,
out_proj and mlp fc1, fc2; in the UNet, to_q, to_k, to_v, to_out.0 of every attn1 and attn2 (down, mid
and up blocks).

Precision: `merge` computes kernel + down @ up in float32 (the product at HIGHEST precision: at default
precision TPUs round its inputs to bf16 and GPUs may use TF32) and returns float32 kernels for the
targeted modules, whatever the frozen dtype. The model then casts the merged kernel to its compute dtype,
and that cast alone sets how much of a small LoRA update survives: bf16 compute rounds kernel + delta as a
whole, so run the targeted linears in float32 where the LoRA's small early updates matter (cheap for the text
encoder; docs/method.md#differences-from-the-papers-code).

Files:
  - the original's `torch.save`d dicts (`text_encoder_lora.pth`, `unet_lora.pth`, and the _EMA twins);
    keys as diffusers 0.19 names them (read off the 0.19-era source of `LoraLoaderMixin._modify_text_encoder`,
    `PatchedLoraProjection`, `LoRALinearLayer`, `LoRAAttnProcessor` and `AttnProcsLayers`, and the original's
    export and gen-images scripts; `text_encoder.named_parameters()` and `AttnProcsLayers(...).state_dict()`):
      text_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.lora_linear_layer.{down,up}.weight
      text_model.encoder.layers.{i}.mlp.fc{1,2}.lora_linear_layer.{down,up}.weight
      <unet attention module>.processor.to_{q,k,v,out}_lora.{down,up}.weight
  - a PEFT-style safetensors file that current diffusers' `load_lora_weights` reads:
      text_encoder.text_model.encoder.layers.{i}.self_attn.q_proj.lora_A.weight (lora_B for up)
      unet.<unet attention module>.to_q.lora_A.weight ... unet.<...>.to_out.0.lora_B.weight
    with diffusers' adapter metadata r = lora_alpha = rank (scale 1).
"""

import json
import re
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fairdiff_jax.nn.weights import (
    WeightLoadError,
    read_state_dict,
    torch_key_to_flax_path,
)

Model = Literal["text_encoder", "unet"]
ModulePath = tuple[str, ...]
LoraTree = dict[str, Any]

# A targeted module's '/'-joined Flax path ends with one of these.
_TARGET_PATTERNS = {
    "text_encoder": re.compile(r"(^|/)layers_\d+/(self_attn/(q_proj|k_proj|v_proj|out_proj)|mlp/(fc1|fc2))$"),
    "unet": re.compile(r"(^|/)attn[12]/(to_q|to_k|to_v|to_out_0)$"),
}
# The original's text encoder names start here (transformers 4's CLIPTextModel.text_model).
_TEXT_MODEL_PREFIX = "text_model."
# diffusers' default file name for LoRA weights in a folder.
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"


def _natural_key(path: ModulePath) -> tuple:
    """Orders 'layers_2' before 'layers_10', so file order and init order read naturally."""
    return tuple(tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", part)) for part in path)


def _check_model(model: str) -> None:
    if model not in _TARGET_PATTERNS:
        raise ValueError(f"model must be one of {sorted(_TARGET_PATTERNS)}, got {model!r}")


def select_targets(frozen_params: Mapping[str, Any], model: Model) -> tuple[ModulePath, ...]:
    """Paths of the Dense modules that get a LoRA, in a fixed (natural-sorted) order.

    Args:
      frozen_params: the model's params tree (arrays or ShapeDtypeStructs; only shapes are read).
      model: "text_encoder" (CLIP text: q/k/v/out_proj, fc1, fc2) or "unet" (attn1/attn2: to_q, to_k,
        to_v, to_out_0).
    """
    _check_model(model)
    pattern = _TARGET_PATTERNS[model]
    flat = traverse_util.flatten_dict(dict(frozen_params))
    targets = [p[:-1] for p, leaf in flat.items() if p[-1] == "kernel" and len(leaf.shape) == 2 and pattern.search("/".join(p[:-1]))]
    if not targets:
        raise ValueError(f"no {model} LoRA targets in the params tree (top-level keys: {sorted(frozen_params)})")
    return tuple(sorted(targets, key=_natural_key))


def lora_modules(lora: Mapping[str, Any]) -> tuple[ModulePath, ...]:
    """The module paths a LoRA tree modifies, natural-sorted."""
    flat = traverse_util.flatten_dict(dict(lora))
    return tuple(sorted({p[:-1] for p in flat}, key=_natural_key))


def lora_rank(lora: Mapping[str, Any]) -> int:
    """The rank r shared by every (down [in, r], up [r, out]) pair."""
    ranks = {np.shape(leaf)[1] for p, leaf in traverse_util.flatten_dict(dict(lora)).items() if p[-1] == "down"}
    if len(ranks) != 1:
        raise ValueError(f"a LoRA tree has one rank, found {sorted(ranks)}")
    return ranks.pop()


def init(rng: jax.Array, frozen_params: Mapping[str, Any], targets: Sequence[ModulePath], rank: int) -> LoraTree:
    """A fresh LoRA: down ~ N(0, (1/rank)^2), up = 0 (so the merged model starts equal to the frozen one).

    A pure function of (rng, the targets' shapes, rank): target i draws from fold_in(rng, i) in the given
    order, so every device and host that calls it with the same key gets the same tree.

    Returns:
      Nested dict mirroring frozen_params at each target: {'down': [in, r], 'up': [r, out]} float32.
    """
    flat = traverse_util.flatten_dict(dict(frozen_params))
    out = {}
    for i, path in enumerate(targets):
        fan_in, fan_out = flat[path + ("kernel",)].shape
        out[path + ("down",)] = jax.random.normal(jax.random.fold_in(rng, i), (fan_in, rank), jnp.float32) / rank
        out[path + ("up",)] = jnp.zeros((rank, fan_out), jnp.float32)
    return traverse_util.unflatten_dict(out)


def merge(frozen_params: Mapping[str, Any], lora: Mapping[str, Any]) -> dict[str, Any]:
    """Params for the unchanged model: each targeted kernel becomes float32 kernel + down @ up.

    Every other leaf is passed through untouched (same object, same dtype). Differentiable in `lora`;
    call it inside the jitted loss so that only the LoRA tree is differentiated.
    """
    flat = traverse_util.flatten_dict(dict(frozen_params))
    for path in lora_modules(lora):
        factors = _get(lora, path)
        kernel_path = path + ("kernel",)
        if kernel_path not in flat:
            raise ValueError(f"LoRA names module {'/'.join(path)}, which has no kernel in the params")
        delta = jnp.matmul(factors["down"], factors["up"], precision=jax.lax.Precision.HIGHEST)
        flat[kernel_path] = flat[kernel_path].astype(jnp.float32) + delta
    return traverse_util.unflatten_dict(flat)


def _get(tree: Mapping[str, Any], path: ModulePath) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def _torch_layout(lora: Mapping[str, Any], path: ModulePath) -> tuple[np.ndarray, np.ndarray]:
    """(down.weight [r, in], up.weight [out, r]) of one module, float32 host arrays as PyTorch stores them."""
    factors = _get(lora, path)
    return tuple(np.ascontiguousarray(np.asarray(factors[f], np.float32).T) for f in ("down", "up"))


# ---- names in PyTorch files ------------------------------------------------------------------------

def _torch_module_name(path: ModulePath, model: Model) -> str:
    """Flax module path -> PyTorch module name, e.g. ('down_blocks_0', ..., 'to_out_0') -> 'down_blocks.0....to_out.0'.

    Text-encoder names always carry the `text_model.` prefix, as the original's files do, whether or not
    the Flax tree has a 'text_model' level.
    """
    name = ".".join(re.sub(r"_(\d+)$", r".\1", part) for part in path)
    if torch_key_to_flax_path(name) != tuple(path):  # a name such as 'linear_1' that is not a list index
        raise ValueError(f"no PyTorch name for Flax module path {'/'.join(path)}")
    if model == "text_encoder" and not name.startswith(_TEXT_MODEL_PREFIX):
        name = _TEXT_MODEL_PREFIX + name
    return name


def _original_keys(path: ModulePath, model: Model) -> tuple[str, str]:
    """(down key, up key) of one module in the original's .pth files."""
    name = _torch_module_name(path, model)
    if model == "text_encoder":
        stem = f"{name}.lora_linear_layer"
    else:  # LoRAAttnProcessor sits at <attention>.processor and names its layers to_{q,k,v,out}_lora.
        attention, projection = re.fullmatch(r"(.*)\.(to_q|to_k|to_v|to_out\.0)", name).groups()
        stem = f"{attention}.processor.{projection.removesuffix('.0')}_lora"
    return f"{stem}.down.weight", f"{stem}.up.weight"


def _peft_keys(path: ModulePath, model: Model) -> tuple[str, str]:
    """(lora_A key, lora_B key) of one module in diffusers' PEFT-style files."""
    name = f"{model}.{_torch_module_name(path, model)}"
    return f"{name}.lora_A.weight", f"{name}.lora_B.weight"


# ---- the original's .pth files ---------------------------------------------------------------------

def load_original(path: str | Path, frozen_params: Mapping[str, Any], model: Model) -> LoraTree:
    """Reads one of the original's LoRA files (`text_encoder_lora*.pth` or `unet_lora*.pth`).

    The rank comes from the file and must be the same for every module. A text-encoder key without
    the `text_model.` prefix is read as if it had it.

    Raises:
      WeightLoadError (a ValueError) naming the file and every key that names no target of the model,
      every target the file lacks, and every shape that does not fit the frozen kernel or the rank.
    """
    state_dict = read_state_dict(path)
    targets = select_targets(frozen_params, model)
    flat_frozen = traverse_util.flatten_dict(dict(frozen_params))
    wanted = {}
    for target in targets:
        down_key, up_key = _original_keys(target, model)
        wanted[down_key] = (target, "down")
        wanted[up_key] = (target, "up")

    def normalised(key: str) -> str:
        if model == "text_encoder" and not key.startswith(_TEXT_MODEL_PREFIX):
            return _TEXT_MODEL_PREFIX + key
        return key

    by_key = {normalised(k): (k, np.asarray(v)) for k, v in state_dict.items()}
    unexpected = sorted(file_key for key, (file_key, _) in by_key.items() if key not in wanted)
    missing = sorted(key for key in wanted if key not in by_key)
    ranks = {v.shape[0] for key, (_, v) in by_key.items() if key in wanted and wanted[key][1] == "down" and v.ndim == 2}
    rank = min(ranks) if ranks else None
    wrong_shape, flat_lora = [], {}
    for key, (file_key, value) in by_key.items():
        if key not in wanted:
            continue
        target, factor = wanted[key]
        fan_in, fan_out = flat_frozen[target + ("kernel",)].shape
        expected = (rank, fan_in) if factor == "down" else (fan_out, rank)  # PyTorch layout in the file
        if tuple(value.shape) != expected:
            wrong_shape.append(f"{file_key}: file {tuple(value.shape)} vs expected {expected} (module {'/'.join(target)})")
            continue
        flat_lora[target + (factor,)] = value.T.astype(np.float32)
    problems = []
    if len(ranks) > 1:
        problems.append(f"more than one rank: {sorted(ranks)}")
    if wrong_shape:
        problems.append("shape mismatch:\n    " + "\n    ".join(wrong_shape))
    if missing:
        problems.append("missing keys:\n    " + "\n    ".join(missing))
    if unexpected:
        problems.append(f"keys that name no {model} LoRA target:\n    " + "\n    ".join(unexpected))
    if problems:
        raise WeightLoadError(f"{path} is not a {model} LoRA of this model:\n  " + "\n  ".join(problems))
    return traverse_util.unflatten_dict(flat_lora)


def original_state_dict(lora: Mapping[str, Any], model: Model) -> dict[str, np.ndarray]:
    """{original key: float32 array in PyTorch layout} for a LoRA tree."""
    _check_model(model)
    out = {}
    for path in lora_modules(lora):
        down_key, up_key = _original_keys(path, model)
        out[down_key], out[up_key] = _torch_layout(lora, path)
    return out


def save_original(lora: Mapping[str, Any], path: str | Path, model: Model) -> None:
    """Writes a LoRA tree as the original's `torch.save`d dict of float32 tensors.

    The original's `gen-images.py` reads such a file with `load_state_dict(..., strict=False)` after
    patching the model the diffusers 0.19 way; use it for `text_encoder_lora[_EMA].pth` and
    `unet_lora[_EMA].pth`.
    """
    import torch

    tensors = {k: torch.from_numpy(v) for k, v in original_state_dict(lora, model).items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, str(path))


# ---- diffusers / PEFT safetensors ------------------------------------------------------------------

def save_diffusers(
    path: str | Path,
    *,
    unet: Mapping[str, Any] | None = None,
    text_encoder: Mapping[str, Any] | None = None,
) -> Path:
    """Writes a PEFT-style safetensors file for `StableDiffusionPipeline.load_lora_weights`.

    Args:
      path: a `.safetensors` file, or a folder that gets `pytorch_lora_weights.safetensors`.
      unet, text_encoder: LoRA trees (at least one).

    The file's adapter metadata says r = lora_alpha = rank for each part, so diffusers applies the
    LoRA with scale 1, as the original did. Returns the file written.
    """
    parts = {"unet": unet, "text_encoder": text_encoder}
    parts = {model: lora for model, lora in parts.items() if lora is not None}
    if not parts:
        raise ValueError("save_diffusers needs a unet or a text_encoder LoRA")
    tensors, metadata = {}, {}
    for model, lora in parts.items():
        modules = lora_modules(lora)
        for module in modules:
            a_key, b_key = _peft_keys(module, model)
            tensors[a_key], tensors[b_key] = _torch_layout(lora, module)
        rank = lora_rank(lora)
        # PEFT matches a target by name suffix; leaving out `text_model.` fits text encoders with and
        # without that level (transformers 5 dropped it).
        names = sorted(_torch_module_name(m, model).removeprefix(_TEXT_MODEL_PREFIX) for m in modules)
        metadata.update({f"{model}.r": rank, f"{model}.lora_alpha": rank, f"{model}.target_modules": names})
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / DIFFUSERS_WEIGHT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", _DIFFUSERS_METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    path.write_bytes(safetensors_bytes(tensors, metadata))
    return path


def safetensors_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """A safetensors file's bytes with its JSON header's keys sorted: the same tensors give the same bytes.

    The safetensors library keeps the metadata in a hash map whose order changes from process to process, so a
    resumed and an uninterrupted run would export the same weights as different files.
    """
    from safetensors.numpy import save

    raw = save(dict(tensors), metadata=dict(metadata))
    length = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads its header to 8 bytes
    return len(header).to_bytes(8, "little") + header + raw[8 + length :]
