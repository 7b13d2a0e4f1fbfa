"""MTCNN's three networks (Zhang et al. 2016, "Joint Face Detection and Alignment using Multi-task
Cascaded Convolutional Networks") in Flax, and the loader of the trained weights that ship inside
the `mtcnn` pip package (MIT; `mtcnn/assets/weights/{pnet,rnet,onet}.lz4`).

Those files are joblib pickles (lz4-compressed) of the Keras models' `get_weights()` lists; reading
them needs joblib and lz4, not TensorFlow. They hold the same numbers as facenet-pytorch's
`data/{pnet,rnet,onet}.pt` (both descend from the original Caffe models), already laid out for
untransposed NHWC images: conv kernels HWIO, dense kernels [in, out], PReLU slopes per channel.

Inputs are NHWC RGB images scaled as MTCNN was trained: (pixel_0_255 - 127.5) / 128.
The pipeline around the networks (image pyramid, NMS, box regression) lives in `fairdiff_jax.faces`.
"""

import importlib.util
from pathlib import Path
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.nn.weights import WeightLoadError


class PReLU(nn.Module):
    """max(x, 0) + alpha * min(x, 0) with one learned slope per channel (Caffe/Keras PReLU)."""

    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        alpha = self.param("alpha", nn.initializers.constant(0.25), (x.shape[-1],), self.param_dtype)
        return jnp.where(x >= 0, x, alpha.astype(x.dtype) * x)


def max_pool_ceil(x: jax.Array, window: int, stride: int) -> jax.Array:
    """Max pooling whose last window may run past the edge (Caffe / PyTorch `ceil_mode=True`).

    For every input size MTCNN meets this equals Keras' "same" pooling of the `mtcnn` package's models
    wherever they pad, and "valid" pooling where they do not.
    """
    pads = []
    for size in x.shape[1:3]:
        out = -(-(size - window) // stride) + 1
        pads.append((0, max((out - 1) * stride + window - size, 0)))
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)


def _conv(features: int, kernel: int, name: str, module: nn.Module) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), padding="VALID", dtype=module.dtype, param_dtype=module.param_dtype,
                   name=name)


def _dense(features: int, name: str, module: nn.Module) -> nn.Dense:
    return nn.Dense(features, dtype=module.dtype, param_dtype=module.param_dtype, name=name)


def _flatten_width_major(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, W*H*C] in (W, H, C) order: the trained dense layers expect Caffe's
    column-major flattening (the Keras models' `Permute((2, 1, 3))`)."""
    return jnp.transpose(x, (0, 2, 1, 3)).reshape(x.shape[0], -1)


class PNet(nn.Module):
    """Proposal network, fully convolutional: a 12x12 window per output cell, stride 2.

    __call__(x: [B, H, W, 3] normalised) -> (box_offsets [B, h, w, 4], face_prob [B, h, w]),
    h = ceil((H - 2) / 2) - 4 (likewise w).
    """

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = PReLU(self.param_dtype, name="prelu1")(_conv(10, 3, "conv1", self)(x))
        x = max_pool_ceil(x, 2, 2)
        x = PReLU(self.param_dtype, name="prelu2")(_conv(16, 3, "conv2", self)(x))
        x = PReLU(self.param_dtype, name="prelu3")(_conv(32, 3, "conv3", self)(x))
        box_offsets = _conv(4, 1, "conv4_1", self)(x)
        logits = _conv(2, 1, "conv4_2", self)(x)
        return box_offsets.astype(jnp.float32), jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1]


class RNet(nn.Module):
    """Refinement network on 24x24 crops.

    __call__(x: [B, 24, 24, 3] normalised) -> (box_offsets [B, 4], face_prob [B]).
    """

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = PReLU(self.param_dtype, name="prelu1")(_conv(28, 3, "conv1", self)(x))
        x = max_pool_ceil(x, 3, 2)
        x = PReLU(self.param_dtype, name="prelu2")(_conv(48, 3, "conv2", self)(x))
        x = max_pool_ceil(x, 3, 2)
        x = PReLU(self.param_dtype, name="prelu3")(_conv(64, 2, "conv3", self)(x))
        x = PReLU(self.param_dtype, name="prelu4")(_dense(128, "fc4", self)(_flatten_width_major(x)))
        box_offsets = _dense(4, "fc5_1", self)(x)
        logits = _dense(2, "fc5_2", self)(x)
        return box_offsets.astype(jnp.float32), jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1]


class ONet(nn.Module):
    """Output network on 48x48 crops; adds the five landmarks.

    __call__(x: [B, 48, 48, 3] normalised) -> (box_offsets [B, 4], landmarks [B, 10], face_prob [B]).
    landmarks: x of the 5 points, then y of the 5 points, as fractions of the crop's width/height
    (left eye, right eye, nose, left mouth corner, right mouth corner; "left" = smaller image x).
    """

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = PReLU(self.param_dtype, name="prelu1")(_conv(32, 3, "conv1", self)(x))
        x = max_pool_ceil(x, 3, 2)
        x = PReLU(self.param_dtype, name="prelu2")(_conv(64, 3, "conv2", self)(x))
        x = max_pool_ceil(x, 3, 2)
        x = PReLU(self.param_dtype, name="prelu3")(_conv(64, 3, "conv3", self)(x))
        x = max_pool_ceil(x, 2, 2)
        x = PReLU(self.param_dtype, name="prelu4")(_conv(128, 2, "conv4", self)(x))
        x = PReLU(self.param_dtype, name="prelu5")(_dense(256, "fc5", self)(_flatten_width_major(x)))
        box_offsets = _dense(4, "fc6_1", self)(x)
        landmarks = _dense(10, "fc6_2", self)(x)
        logits = _dense(2, "fc6_3", self)(x)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1]
        return box_offsets.astype(jnp.float32), landmarks.astype(jnp.float32), probs


NETWORKS = {"pnet": (PNet, 12), "rnet": (RNet, 24), "onet": (ONet, 48)}

# The order of the arrays in each .lz4 file (the Keras models' layer order), as Flax paths.
_WEIGHT_ORDER = {
    "pnet": ["conv1", "prelu1", "conv2", "prelu2", "conv3", "prelu3", "conv4_1", "conv4_2"],
    "rnet": ["conv1", "prelu1", "conv2", "prelu2", "conv3", "prelu3", "fc4", "prelu4", "fc5_1", "fc5_2"],
    "onet": ["conv1", "prelu1", "conv2", "prelu2", "conv3", "prelu3", "conv4", "prelu4", "fc5", "prelu5",
             "fc6_1", "fc6_2", "fc6_3"],
}


def weight_names(network: str) -> list[tuple[str, str]]:
    """The Flax (layer, leaf) of each array of a network's .lz4 list, in file order."""
    return [(layer, leaf) for layer in _WEIGHT_ORDER[network]
            for leaf in (("alpha",) if layer.startswith("prelu") else ("kernel", "bias"))]


def param_shapes(network: str) -> dict:
    """The Flax params tree of one network as ShapeDtypeStructs (no initialisation compiled)."""
    module, size = NETWORKS[network]
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(module().init, jax.random.key(0), x)["params"]


def default_weights_dir() -> Path:
    """The weights folder of the installed `mtcnn` package (found without importing it: its
    `__init__` imports TensorFlow)."""
    spec = importlib.util.find_spec("mtcnn")
    if spec is None or not spec.submodule_search_locations:
        raise WeightLoadError(
            "the `mtcnn` package (which ships MTCNN's weights) is not installed: pip install mtcnn==1.0.0")
    return Path(next(iter(spec.submodule_search_locations))) / "assets" / "weights"


def load_network_params(network: str, path: str | Path) -> dict:
    """Reads one `<network>.lz4` weights list into the Flax params of PNet / RNet / ONet."""
    import joblib

    path = Path(path)
    if not path.is_file():
        raise WeightLoadError(f"MTCNN weights file not found: {path}")
    try:
        arrays = joblib.load(path)
    except Exception as e:  # joblib raises pickle/lz4 errors of many types for a damaged file.
        raise WeightLoadError(f"cannot read MTCNN weights file {path}: {e}") from e
    targets = param_shapes(network)
    names = weight_names(network)
    if not isinstance(arrays, (list, tuple)) or len(arrays) != len(names):
        count = len(arrays) if isinstance(arrays, (list, tuple)) else type(arrays).__name__
        raise WeightLoadError(f"{path}: expected a list of {len(names)} arrays for {network}, found {count}")
    params: dict = {}
    for index, ((layer, leaf), value) in enumerate(zip(names, arrays)):
        want = targets[layer][leaf]
        value = np.asarray(value, np.float32)
        if leaf == "alpha":  # Keras keeps PReLU slopes as [1, 1, C] (shared over H, W) or [C].
            value = value.reshape(-1)
        if value.shape != want.shape:
            raise WeightLoadError(
                f"{path}: array {index} ({layer}/{leaf}) has shape {value.shape}, the model needs {want.shape}")
        params.setdefault(layer, {})[leaf] = value.astype(want.dtype)
    return params


def load_mtcnn_params(weights_dir: Optional[str | Path] = None) -> dict[str, dict]:
    """{'pnet': params, 'rnet': params, 'onet': params} from `weights_dir` (default: the `mtcnn`
    package's own weights)."""
    folder = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    return {name: load_network_params(name, folder / f"{name}.lz4") for name in NETWORKS}
