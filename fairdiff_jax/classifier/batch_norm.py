"""BatchNorm running statistics recomputed after training as exact averages over unaugmented chips.

Why: Flax's BatchNorm keeps exponential averages with decay 0.99 (torchvision's momentum 0.01), so after a
short run (400 steps) the stored statistics still carry the early weights' activations, and the exported
classifier normalises held-out faces with stale numbers. The torch build of the shipped classifiers
(scripts/build_miniature.py, `train_mobilenet`) therefore ends with `reset_running_stats()`, `momentum=None`
(torch's cumulative average) and train-mode forwards of the training chips; this module does the same.

What torch stores, and so what this stores: with momentum None, after k batches torch's running statistics
are the plain mean over the k batches (every batch weighs the same, whatever its size) of
- each batch's mean over (N, H, W), and
- each batch's UNBIASED variance over (N, H, W) (divided by n - 1, n = N * H * W).
Flax's BatchNorm stores the biased variance (divided by n); but the project's converters map Flax's `var`
one to one onto torchvision's `running_var` (`load_mobilenet_v3` and `torchvision_state_dict` in
fairdiff_jax/judging/mobilenet_v3.py), and the shipped torch classifiers' `running_var` is the unbiased one.
So the recompute stores the unbiased average in `var`: the exported `.pt` holds what torch's recompute
would hold for the same weights and chips, and a round trip Flax -> .pt -> Flax changes nothing.
"""

from typing import Callable, Iterable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from fairdiff_jax.judging.mobilenet_v3 import MobileNetV3Large
from fairdiff_jax.training import parallel


def _is_batch_norm(module: nn.Module, method_name: str) -> bool:
    return isinstance(module, nn.BatchNorm)


def _unbiased(batch_stats: dict, intermediates: dict) -> dict:
    """Each BatchNorm's biased `var` times n / (n - 1), n = N * H * W of that layer's input (the layers
    see different spatial sizes, read from the captured outputs' static shapes); `mean` unchanged."""
    flat = traverse_util.flatten_dict(batch_stats)
    outputs = traverse_util.flatten_dict(intermediates)
    corrected = {}
    for path, value in flat.items():
        if path[-1] == "var":
            (output,) = outputs[path[:-1] + ("__call__",)]
            n = int(np.prod(output.shape[:-1]))
            value = value * (n / max(n - 1, 1))
        corrected[path] = value
    return traverse_util.unflatten_dict(corrected)


def batch_statistics_step(module: MobileNetV3Large,
                          to_input: Callable[[jax.Array], jax.Array] = lambda chips: chips) -> Callable:
    """A jitted (variables, chips) -> batch_stats: every BatchNorm's statistics of this one batch, as torch
    accumulates them ({'mean': [C], 'var': unbiased [C]} per layer, float32).

    chips: [B, S, S, 3], whatever `to_input` maps to the model's input ([B, S, S, 3] float32 in [-1, 1]),
    split over the mesh's 'data' axis: as in the train step, the jitted function sees the whole batch, so
    the statistics are the global batch's. A train-mode forward of a clone with momentum 0.0: each layer
    normalises with the batch's own statistics (torch's train mode) and stores them.
    """
    per_batch = module.clone(batch_norm_momentum=0.0)

    def step(variables: dict, chips: jax.Array) -> dict:
        _, state = per_batch.apply(variables, to_input(chips), train=True,
                                   mutable=["batch_stats", "intermediates"], capture_intermediates=_is_batch_norm,
                                   rngs={"dropout": jax.random.key(0)})  # dropout follows the last BatchNorm
        return _unbiased(state["batch_stats"], state["intermediates"])

    return jax.jit(step)


def recompute_batch_stats(module: MobileNetV3Large, variables: dict, chip_batches: Iterable[np.ndarray],
                          mesh: Mesh, to_input: Callable[[jax.Array], jax.Array] = lambda chips: chips,
                          step: Optional[Callable] = None) -> tuple[dict, dict]:
    """(variables with `batch_stats` replaced by the mean over `chip_batches` of each batch's statistics,
    {'batches': how many, 'chips': how many over all processes}). chip_batches: this process's rows of each batch ([B_host, S, S, 3]); a smaller last
    batch weighs as much as the others, as in torch's cumulative average. `step`: a batch_statistics_step
    to reuse (compiled once per batch shape)."""
    step = step or batch_statistics_step(module, to_input)
    total, count, num_chips = None, 0, 0
    for chips in chip_batches:
        global_chips = parallel.shard_batch(chips, mesh)
        stats = step(variables, global_chips)
        total = stats if total is None else jax.tree.map(jnp.add, total, stats)
        count += 1
        num_chips += global_chips.shape[0]
    if total is None:
        raise ValueError("no chips to recompute the BatchNorm statistics from")
    averaged = jax.tree.map(lambda x: x / count, total)
    return {**variables, "batch_stats": averaged}, {"batches": count, "chips": num_chips}
