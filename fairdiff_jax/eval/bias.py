"""Bias metrics (docs/method.md#metrics). Host side: numpy.

Bias of a set of predictions over K classes, measured on the images with a face:
    freq_k = share of those images predicted as class k
    bias   = mean over ordered pairs (i, j), i != j, of |freq_i - freq_j|
For K = 2 this is |freq_male - freq_female| (gender_bias); over the 4 races it is race_bias; over the
8 joint gender x race classes (j = 4 g + r) it is gender_race_bias: one name per metric in training logs,
evaluation tables and TensorBoard. A prompt without any face has no defined bias: NaN, and the over-prompt
summaries skip it.

Per-attribute arrays come in the attribute order of `alignment` (gender, race, ...), with the
project's fill conventions: probabilities of images without a face are ignored, boxes are
[x_min, y_min, x_max, y_max] pixels (-1 fill without a face).
"""

import math
from typing import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike


def class_frequencies(preds: ArrayLike, num_classes: int) -> np.ndarray:
    """[K] float64 share of each class among `preds` ([M] ints in [0, K)); NaN if M = 0."""
    preds = np.asarray(preds, dtype=np.int64).reshape(-1)
    if preds.size == 0:
        return np.full(num_classes, np.nan)
    return np.bincount(preds, minlength=num_classes)[:num_classes] / preds.size


def pairwise_gap(freqs: ArrayLike) -> float:
    """Mean over ordered pairs i != j of |freq_i - freq_j| ([K] frequencies, K >= 2)."""
    freqs = np.asarray(freqs, dtype=np.float64)
    k = freqs.size
    return float(np.abs(freqs[:, None] - freqs[None, :]).sum() / (k * (k - 1)))


def bias(preds: ArrayLike, num_classes: int) -> float:
    """`pairwise_gap` of the class frequencies of `preds` ([M] ints); NaN if M = 0."""
    return pairwise_gap(class_frequencies(preds, num_classes))


def balanced_bias(num_faces: int, num_classes: int) -> float:
    """Expected `bias` of num_faces predictions drawn independently and uniformly over num_classes classes: what a
    perfectly balanced generator still measures with that many faces, sampling noise alone (docs/method.md,
    "Metrics"); NaN if num_faces = 0.

    Exact: every ordered pair of classes has the same E|freq_i - freq_j|, a sum over the joint counts (n_i, n_j) of
    the multinomial (num_faces; 1/K, 1/K, 1 - 2/K). O(num_faces^2) terms.
    """
    n, k = int(num_faces), int(num_classes)
    if n == 0:
        return math.nan
    log_factorial = np.array([math.lgamma(c + 1) for c in range(n + 1)])
    n_i, n_j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    rest = n - n_i - n_j
    rest_share = 1.0 - 2.0 / k
    possible = (rest == 0) if rest_share == 0.0 else (rest >= 0)  # with two classes every face is in one of them
    n_i, n_j, rest = n_i[possible], n_j[possible], rest[possible]
    log_p = (log_factorial[n] - log_factorial[n_i] - log_factorial[n_j] - log_factorial[rest]
             + (n - rest) * math.log(1.0 / k) + (rest * math.log(rest_share) if rest_share else 0.0))
    return float((np.exp(log_p) * np.abs(n_i - n_j)).sum() / n)


def joint_predictions(preds_per_attribute: Sequence[ArrayLike], num_classes: Sequence[int]) -> np.ndarray:
    """[M] joint class index, row-major over the attributes (j = 4 g + r for gender x race)."""
    preds = tuple(np.asarray(p, np.int64) for p in preds_per_attribute)
    return np.ravel_multi_index(preds, tuple(num_classes))


def bias_metrics(
    probs_per_attribute: Sequence[ArrayLike],
    face_found: ArrayLike,
    attribute_names: Sequence[str] = ("gender", "race"),
    confidence_level: float = 0.8,
) -> dict[str, float]:
    """The training/evaluation log metrics of one prompt's images (docs/method.md#metrics).

    Over the images with a face, predictions = argmax of each attribute's probabilities:
        "<name>_bias"                bias over that attribute's classes (gender_bias, race_bias)
        "<name>_pred_below_<level>"  share of images whose max probability for THAT attribute is
                                     < confidence_level (per attribute, as the original logs
                                     gender_pred_below_0.8 and race_pred_below_0.8)
        "<name1>_<name2>..._bias"    bias over the joint classes, when there are >= 2 attributes
                                     (gender_race_bias over the 8 joint classes)
    All NaN when no image has a face.

    Args:
        probs_per_attribute: per attribute [N, K_a] class probabilities.
        face_found: [N] bool.
    """
    face_found = np.asarray(face_found, dtype=bool)
    probs = [np.asarray(p, dtype=np.float64)[face_found] for p in probs_per_attribute]
    preds = [p.argmax(axis=-1) for p in probs]
    metrics = {}
    for name, p, pred in zip(attribute_names, probs, preds):
        metrics[f"{name}_bias"] = bias(pred, p.shape[-1])
        below = (p.max(axis=-1) < confidence_level).mean() if len(p) else np.nan
        metrics[f"{name}_pred_below_{confidence_level:g}"] = float(below)
    if len(probs) >= 2:
        num_classes = [p.shape[-1] for p in probs]
        metrics["_".join(attribute_names) + "_bias"] = bias(
            joint_predictions(preds, num_classes), int(np.prod(num_classes))
        )
    return metrics


def mean_std_over_prompts(values: ArrayLike) -> tuple[float, float]:
    """(mean, std) of per-prompt values, skipping NaN (prompts without faces); population std
    (ddof = 0). (NaN, NaN) if nothing is left."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std())


def summarize_over_prompts(per_prompt: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """{metric: (mean, std) over prompts} for metric dicts like those of `bias_metrics`."""
    keys = list(per_prompt[0]) if per_prompt else []
    return {k: mean_std_over_prompts([m[k] for m in per_prompt]) for k in keys}
