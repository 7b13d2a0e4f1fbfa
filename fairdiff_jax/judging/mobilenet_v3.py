"""torchvision's `mobilenet_v3_large` in Flax: the gender / race / age classifiers of the face chips.

The network is torchvision's, layer for layer (its inverted-residual table, hardswish / ReLU,
squeeze-excitation with hardsigmoid, BatchNorm eps 0.001, classifier
Linear(960, 1280) + Hardswish + Dropout + Linear(1280, num_classes)); only the last layer's width
differs between the project's classifiers: 6 for the training classifier (logits[:, :2] gender,
logits[:, 2:6] race), 2 for the gender and age test classifiers, 4 for the race test classifier.

Inference by default: BatchNorm uses its running statistics and dropout is the identity. With
`train=True` (the classifier trainer, fairdiff_jax/classifier/) BatchNorm normalises with the
batch's statistics and updates the running ones (apply with `mutable=['batch_stats']`), with
torchvision's momentum (the `batch_norm_momentum` field; 0.0 stores each batch's own statistics), and
dropout needs a 'dropout' rng. The
running statistics live in the `batch_stats` collection, as Flax's BatchNorm keeps them, so the
variables are `{'params': ..., 'batch_stats': ...}` and convert one to one from a torchvision
state dict (no folding into the convolutions: the converted tree stays comparable key by key).

Submodules are named after torchvision's modules (`features_4/block_2/fc1`,
`classifier_3`), so the generic converter of `fairdiff_jax.nn.weights` maps the state dict with two
renaming rules that route each tensor to its collection.
"""

import re
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fairdiff_jax.nn import weights

BATCH_NORM_EPS = 1e-3  # torchvision's MobileNetV3 norm layer: BatchNorm2d(eps=0.001, momentum=0.01)
BATCH_NORM_MOMENTUM = 0.99  # Flax's momentum is the running statistics' decay: 1 - torchvision's 0.01
DROPOUT_RATE = 0.2  # torchvision's classifier_2
HEAD_KEY = "classifier.3.weight"
WIDTH_KEY = "classifier.0.weight"  # [1280 * width_mult, 960 * width_mult]
# torchvision's initialisation of the network (what a classifier trained from scratch starts from): every
# convolution Kaiming-normal over its fan-out (out channels x kernel area, also for the depthwise ones), every
# Linear N(0, 0.01), biases zero (Flax's default), BatchNorm scale 1 and offset 0 (Flax's default too).
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
DENSE_INIT = nn.initializers.normal(0.01)


class InvertedResidualConfig(NamedTuple):
    input_channels: int
    kernel: int
    expanded_channels: int
    out_channels: int
    use_se: bool
    use_hardswish: bool  # False: ReLU
    stride: int


# torchvision `_mobilenet_v3_conf("mobilenet_v3_large")` with width_mult 1, no reduced tail, no dilation.
LARGE_CONFIG = (
    InvertedResidualConfig(16, 3, 16, 16, False, False, 1),
    InvertedResidualConfig(16, 3, 64, 24, False, False, 2),
    InvertedResidualConfig(24, 3, 72, 24, False, False, 1),
    InvertedResidualConfig(24, 5, 72, 40, True, False, 2),
    InvertedResidualConfig(40, 5, 120, 40, True, False, 1),
    InvertedResidualConfig(40, 5, 120, 40, True, False, 1),
    InvertedResidualConfig(40, 3, 240, 80, False, True, 2),
    InvertedResidualConfig(80, 3, 200, 80, False, True, 1),
    InvertedResidualConfig(80, 3, 184, 80, False, True, 1),
    InvertedResidualConfig(80, 3, 184, 80, False, True, 1),
    InvertedResidualConfig(80, 3, 480, 112, True, True, 1),
    InvertedResidualConfig(112, 3, 672, 112, True, True, 1),
    InvertedResidualConfig(112, 5, 672, 160, True, True, 2),
    InvertedResidualConfig(160, 5, 960, 160, True, True, 1),
    InvertedResidualConfig(160, 5, 960, 160, True, True, 1),
)
LAST_CHANNEL = 1280


def _make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's channel rounding (nearest multiple of `divisor`, never more than 10% down)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def large_config(width_mult: float) -> tuple[InvertedResidualConfig, ...]:
    """LARGE_CONFIG with every width scaled as torchvision's `width_mult` does (then rounded)."""
    scale = lambda channels: _make_divisible(channels * width_mult)  # noqa: E731
    return tuple(
        cfg._replace(
            input_channels=scale(cfg.input_channels),
            expanded_channels=scale(cfg.expanded_channels),
            out_channels=scale(cfg.out_channels),
        )
        for cfg in LARGE_CONFIG
    )


def _conv_bn(
    module: nn.Module,
    x: jax.Array,
    prefix: str,
    features: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    activation: Optional[Callable[[jax.Array], jax.Array]] = None,
    train: bool = False,
) -> jax.Array:
    """torchvision's Conv2dNormActivation: `<prefix>_0` conv (no bias), `<prefix>_1` BatchNorm, activation.

    A function called from `module`'s compact method rather than a submodule, so that both layers
    sit directly under `module` as torch's `features.0.0` / `features.0.1` do; `module` carries the
    BatchNorm's `batch_norm_momentum`. PyTorch pads (k - 1) // 2 on every side; Flax's 'SAME' would pad asymmetrically at stride 2.
    """
    pad = (kernel - 1) // 2
    x = nn.Conv(
        features,
        (kernel, kernel),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=False,
        kernel_init=CONV_INIT,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        name=f"{prefix}_0",
    )(x)
    x = nn.BatchNorm(
        use_running_average=not train,
        momentum=module.batch_norm_momentum,
        epsilon=BATCH_NORM_EPS,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        name=f"{prefix}_1",
    )(x)
    return activation(x) if activation is not None else x


class SqueezeExcitation(nn.Module):
    """x * hardsigmoid(fc2(relu(fc1(mean_hw(x))))) with 1x1 convs `fc1`, `fc2` (with bias)."""

    squeeze_channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda features, name: nn.Conv(  # noqa: E731
            features, (1, 1), kernel_init=CONV_INIT, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        scale = jnp.mean(x, axis=(1, 2), keepdims=True)
        scale = nn.relu(conv(self.squeeze_channels, "fc1")(scale))
        scale = jax.nn.hard_sigmoid(conv(x.shape[-1], "fc2")(scale))
        return x * scale


class InvertedResidual(nn.Module):
    """torchvision's InvertedResidual: [expand 1x1] -> depthwise kxk -> [SE] -> project 1x1 (+ input)."""

    config: InvertedResidualConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    batch_norm_momentum: float = BATCH_NORM_MOMENTUM

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.config
        activation = jax.nn.hard_swish if cfg.use_hardswish else nn.relu
        # torchvision numbers the layers of `block` as a Sequential: the expand conv exists only when
        # it changes the width, so the indices shift with it.
        index = 0
        y = x
        if cfg.expanded_channels != cfg.input_channels:
            y = _conv_bn(self, y, f"block_{index}", cfg.expanded_channels, 1, activation=activation, train=train)
            index += 1
        y = _conv_bn(
            self, y, f"block_{index}", cfg.expanded_channels, cfg.kernel, cfg.stride,
            groups=cfg.expanded_channels, activation=activation, train=train,
        )
        index += 1
        if cfg.use_se:
            squeeze = _make_divisible(cfg.expanded_channels // 4)
            y = SqueezeExcitation(squeeze, self.dtype, self.param_dtype, name=f"block_{index}")(y)
            index += 1
        y = _conv_bn(self, y, f"block_{index}", cfg.out_channels, 1, train=train)
        if cfg.stride == 1 and cfg.input_channels == cfg.out_channels:
            y = y + x
        return y


class MobileNetV3Large(nn.Module):
    """Face-chip attribute classifier.

    Input: face chips [N, H, W, 3] in [-1, 1], fed as they are (no mean/std normalisation, as the
    original classifiers were trained); 224 x 224 in the project, any size of at least 32 works.
    Output: logits [N, num_classes] float32.
    """

    num_classes: int
    width_mult: float = 1.0  # torchvision's; the original classifiers use 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    # Flax's decay of the running statistics in train mode. 0.0: a train-mode apply stores each batch's own
    # statistics (mean, biased variance), what the trainer's BatchNorm recompute averages
    # (fairdiff_jax/classifier/batch_norm.py).
    batch_norm_momentum: float = BATCH_NORM_MOMENTUM

    @nn.compact
    def __call__(self, face_chips: jax.Array, features_only: bool = False, train: bool = False) -> jax.Array:
        """features_only: return the input of the last Linear instead ([N, 1280 * width_mult] float32).
        train: batch statistics in BatchNorm (mutable 'batch_stats') and dropout (a 'dropout' rng)."""
        table = large_config(self.width_mult)
        x = face_chips.astype(self.dtype)
        x = _conv_bn(self, x, "features_0", table[0].input_channels, 3, 2, activation=jax.nn.hard_swish, train=train)
        for i, cfg in enumerate(table, start=1):
            x = InvertedResidual(cfg, self.dtype, self.param_dtype, self.batch_norm_momentum,
                                 name=f"features_{i}")(x, train)
        last = len(table) + 1
        x = _conv_bn(self, x, f"features_{last}", 6 * table[-1].out_channels, 1, activation=jax.nn.hard_swish,
                     train=train)
        x = jnp.mean(x, axis=(1, 2))
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, kernel_init=DENSE_INIT, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        x = jax.nn.hard_swish(dense(_make_divisible(LAST_CHANNEL * self.width_mult), "classifier_0")(x))
        if features_only:
            return x.astype(jnp.float32)
        # classifier_2 is torchvision's Dropout(0.2): the identity at inference.
        x = nn.Dropout(DROPOUT_RATE, deterministic=not train, name="classifier_2")(x)
        return dense(self.num_classes, "classifier_3")(x).astype(jnp.float32)


def pooled_features(module: MobileNetV3Large, variables: dict, images: jax.Array) -> jax.Array:
    """The features the last Linear reads (after the pooled 960-wide map's Linear + hardswish):
    images [N, H, W, 3] in [-1, 1] -> [N, 1280 * width_mult] float32. A content feature space for
    classifiers trained on whole images (the miniature scene classifier's fidelity features)."""
    return module.apply(variables, images, features_only=True)


def variable_shapes(module: nn.Module, image_size: int) -> dict:
    """The module's variables as ShapeDtypeStructs (no initialisation is compiled)."""
    dummy = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return dict(jax.eval_shape(module.init, jax.random.key(0), dummy))


def load_mobilenet_v3(
    path: str | Path,
    num_classes: Optional[int] = None,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
) -> tuple[MobileNetV3Large, dict]:
    """A torchvision mobilenet_v3_large state dict saved with torch.save -> (module, variables).

    The file may hold the state dict itself or a dict wrapping it under 'state_dict' / 'model'
    (`weights.read_state_dict`). The head width is read from `classifier.3.weight`; when
    `num_classes` is given it must agree. The width multiplier is read from `classifier.0.weight`
    (1280 x width_mult rows), so narrower torchvision nets (`width_mult=0.25`) load too. Variables come back as numpy arrays
    (`{'params': ..., 'batch_stats': ...}`); put them on device with the sharding you need.
    """
    state_dict = weights.read_state_dict(path)
    if HEAD_KEY not in state_dict:
        raise weights.WeightLoadError(f"{path} has no {HEAD_KEY!r}: not a torchvision mobilenet_v3_large state dict")
    file_classes = state_dict[HEAD_KEY].shape[0]
    if num_classes is not None and num_classes != file_classes:
        raise weights.WeightLoadError(
            f"{path}: {HEAD_KEY} has {file_classes} output classes, but {num_classes} were asked for"
        )
    if WIDTH_KEY not in state_dict:
        raise weights.WeightLoadError(f"{path} has no {WIDTH_KEY!r}: not a torchvision mobilenet_v3_large state dict")
    width_mult = state_dict[WIDTH_KEY].shape[0] / LAST_CHANNEL
    module = MobileNetV3Large(file_classes, width_mult, dtype=dtype, param_dtype=param_dtype)
    variables = weights.convert_with_batch_stats(state_dict, variable_shapes(module, 32), source=str(path))
    return module, variables


def torchvision_state_dict(variables: dict) -> dict:
    """`{'params', 'batch_stats'}` of a MobileNetV3Large -> torchvision's mobilenet_v3_large state dict
    (torch tensors, float32), the inverse of `load_mobilenet_v3`'s conversion: `torch.save` it and
    `torchvision.models.mobilenet_v3_large(num_classes=..., width_mult=...).load_state_dict` takes it
    (strict), as do the debiasing configs' classifier paths.

    Module paths map back by the naming rule of the module docstring (`features_4/block_2/fc1` ->
    `features.4.block.2.fc1`); kernels go HWIO -> OIHW and [in, out] -> [out, in]; BatchNorm `scale` /
    `mean` / `var` become `weight` / `running_mean` / `running_var`, with a zero `num_batches_tracked`
    (torchvision reads it only when its BatchNorm momentum is None).
    """
    import numpy as np
    import torch
    from flax import traverse_util

    leaf_names = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
                  ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}
    state = {}
    for path, value in traverse_util.flatten_dict({k: variables[k] for k in ("params", "batch_stats")}).items():
        collection, modules, leaf = path[0], path[1:-1], path[-1]
        prefix = ".".join(re.sub(r"_(\d+)", r".\1", m) for m in modules)
        value = np.array(jax.device_get(value), np.float32)  # a writable copy: torch.from_numpy shares it
        if leaf == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        state[f"{prefix}.{leaf_names[collection, leaf]}"] = torch.from_numpy(np.ascontiguousarray(value))
        if leaf == "mean":
            state[f"{prefix}.num_batches_tracked"] = torch.zeros((), dtype=torch.int64)
    return state
