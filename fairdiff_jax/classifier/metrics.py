"""clu metrics of a multi-head classifier: per head, accuracy and per-class recall; and the loss.

Metrics are built inside the jitted step from (logits, labels, mask) and merged on the host across
steps; `compute` gives {'loss', '<head>_accuracy', '<head>_recall/<class>'} as Python floats.
"""

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from fairdiff_jax import attributes


@flax.struct.dataclass
class ClassRecall(clu_metrics.Metric):
    """Per class k: (rows of class k predicted k) / (rows of class k). correct, total: [K] int32."""

    correct: jax.Array
    total: jax.Array

    @classmethod
    def from_model_output(cls, *, logits: jax.Array, labels: jax.Array, mask: jax.Array, **_) -> "ClassRecall":
        num_classes = logits.shape[-1]
        of_class = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32) * mask[:, None].astype(jnp.int32)
        hit = (jnp.argmax(logits, -1) == labels)[:, None].astype(jnp.int32)
        return cls(correct=(of_class * hit).sum(0), total=of_class.sum(0))

    def merge(self, other: "ClassRecall") -> "ClassRecall":
        return type(self)(correct=self.correct + other.correct, total=self.total + other.total)

    def compute(self) -> jax.Array:
        """[K] float32 recall; NaN for a class with no rows."""
        return jnp.where(self.total > 0, self.correct / jnp.maximum(self.total, 1), jnp.nan)


def head_slices(heads: Sequence[tuple[str, int]]) -> dict[str, slice]:
    """{head: its logits' columns}: the heads side by side in config order (as the .pt files lay them out)."""
    offsets = np.cumsum([0] + [k for _, k in heads])
    return {name: slice(int(offsets[i]), int(offsets[i + 1])) for i, (name, _) in enumerate(heads)}


def from_outputs(heads: Sequence[tuple[str, int]], logits: jax.Array, labels: dict, mask: jax.Array,
                 loss: jax.Array) -> dict[str, clu_metrics.Metric]:
    """The metrics of one batch (traced). logits [B, sum K]; labels {head: [B] int}; mask [B] bool; loss []."""
    out = {"loss": clu_metrics.Average.from_model_output(loss)}
    for name, columns in head_slices(heads).items():
        out[f"{name}_accuracy"] = clu_metrics.Accuracy.from_model_output(
            logits=logits[:, columns], labels=labels[name], mask=mask)
        out[f"{name}_recall"] = ClassRecall.from_model_output(logits=logits[:, columns], labels=labels[name], mask=mask)
    return out


def merge(total: dict | None, batch: dict) -> dict:
    return batch if total is None else {k: total[k].merge(batch[k]) for k in total}


def compute(heads: Sequence[tuple[str, int]], merged: dict) -> dict[str, float]:
    """Flat {name: float}; each recall is spread over '<head>_recall/<class name>' (class index when the head
    is not one of the project's attributes)."""
    out = {}
    for key, metric in merged.items():
        value = np.asarray(jax.device_get(metric.compute()))
        if value.ndim == 0:
            out[key] = float(value)
            continue
        head = key[: -len("_recall")]
        names = attributes.ATTRIBUTES[head].classes if head in attributes.ATTRIBUTES else range(len(value))
        out.update({f"{key}/{name}": float(v) for name, v in zip(names, value)})
    return out
