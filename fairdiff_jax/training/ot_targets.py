"""Optimal-transport targets of the fairness loss (docs/method.md#ot-targets). Host side: numpy + POT (an exact
LP per sample, not differentiable).

Attributes. An experiment debiases A attributes (gender, race, age, ...). Each attribute a has K_a classes and
a target marginal distribution `target_marginals[a]` (a 1-D sequence summing to 1); the attributes are
independent under the target, so the joint target over J = prod(K_a) classes is the outer product of the
marginals, flattened row-major (first attribute slowest): for gender x race, j = 4 * g + r; for
gender x race x age, j = 8 * g + 2 * r + a. The sibling experiments are therefore arguments, not code:

    gender only            ((0.5, 0.5),)
    race only              ((0.25, 0.25, 0.25, 0.25),)
    gender x race (exp 5)  ((0.5, 0.5), (0.25, 0.25, 0.25, 0.25))             <- the default
    gender x race x age    ((0.5, 0.5), (0.25, 0.25, 0.25, 0.25), (0.75, 0.25))

Per-attribute quantities travel as sequences in that attribute order: `probs_per_attribute[a]` is [N, K_a],
targets are [N] int with -1 (`NO_TARGET`) for "none". Class conventions: `fairdiff_jax/attributes.py`.
"""

import os
from typing import NamedTuple, Sequence

import numpy as np
from numpy.typing import ArrayLike

# POT probes every array backend it can import at `import ot`. With TensorFlow installed (clu's
# dependency) that loads TF beside torch, which crashed test processes; only numpy is used here.
os.environ.setdefault("POT_BACKEND_DISABLE_TENSORFLOW", "1")
os.environ.setdefault("POT_BACKEND_DISABLE_PYTORCH", "1")
import ot  # noqa: E402

from fairdiff_jax import attributes

# Marks "no target" / "no prediction" (no face, or a target too uncertain to train on).
NO_TARGET = -1

DEFAULT_TARGET_MARGINALS = (attributes.uniform("gender"), attributes.uniform("race"))


class OTTargets(NamedTuple):
    """Result of `optimal_transport_targets` for a batch of N images (numpy arrays).

    targets: one [N] int64 array per attribute: argmax of the target marginal, or -1 where the image
        has no face or the attribute's uncertainty exceeds the threshold.
    uncertainties: one [N] float64 array per attribute: 1 - max of the target marginal; -1 where the
        image has no face.
    joint_probs: [N, J] float64, the transport-derived target distribution q_i over joint classes
        (rows sum to 1); rows of images without a face are 0.
    """

    targets: tuple[np.ndarray, ...]
    uncertainties: tuple[np.ndarray, ...]
    joint_probs: np.ndarray


def _check_marginals(target_marginals: Sequence[ArrayLike]) -> list[np.ndarray]:
    marginals = [np.asarray(m, dtype=np.float64) for m in target_marginals]
    if not marginals:
        raise ValueError("target_marginals is empty: give one marginal distribution per attribute")
    for a, m in enumerate(marginals):
        if m.ndim != 1 or m.size < 2 or (m < 0).any() or abs(m.sum() - 1.0) > 1e-6:
            raise ValueError(
                f"target_marginals[{a}] = {m.tolist()} is not a distribution over >= 2 classes"
            )
    return marginals


def joint_target_distribution(target_marginals: Sequence[ArrayLike]) -> np.ndarray:
    """[J] float64: outer product of the attributes' target marginals, flattened row-major.

    P(j) = prod_a target_marginals[a][class_a(j)], with (class_0(j), class_1(j), ...) =
    np.unravel_index(j, (K_0, K_1, ...)).
    """
    joint = np.ones(())
    for m in _check_marginals(target_marginals):
        joint = np.multiply.outer(joint, m)
    return joint.reshape(-1)


def joint_class_onehots(num_classes: Sequence[int]) -> list[np.ndarray]:
    """One [J, K_a] float64 array per attribute: row j = onehot(class_a(j)), J = prod(num_classes)."""
    classes = np.unravel_index(np.arange(int(np.prod(num_classes))), tuple(num_classes))
    return [np.eye(k)[c] for k, c in zip(num_classes, classes)]


def transport_cost(probs_per_attribute: Sequence[ArrayLike]) -> np.ndarray:
    """[n, J] float64 cost C[i, j] = sqrt(sum_a ||p_a[i] - onehot(class_a(j))||^2).

    probs_per_attribute: one [n, K_a] array of class probabilities per attribute.
    """
    probs = [np.asarray(p, dtype=np.float64) for p in probs_per_attribute]
    onehots = joint_class_onehots([p.shape[-1] for p in probs])
    squared = sum(
        ((p[:, None, :] - onehot[None, :, :]) ** 2).sum(-1) for p, onehot in zip(probs, onehots)
    )
    return np.sqrt(squared)


def sample_target_counts(
    rng: np.random.Generator, n: int, joint_probs: np.ndarray, num_samples: int
) -> np.ndarray:
    """[num_samples, J] int64: class counts b_s of n labels drawn i.i.d. from `joint_probs`.

    A multinomial draw equals independent per-attribute draws tallied per joint class
    (docs/method.md#differences-from-the-papers-code).
    """
    return rng.multinomial(n, joint_probs, size=num_samples)


def optimal_transport_targets(
    probs_per_attribute: Sequence[ArrayLike],
    face_found: ArrayLike,
    rng: np.random.Generator | int | None,
    num_samples: int = 100,
    threshold: float = 0.2,
    target_marginals: Sequence[ArrayLike] = DEFAULT_TARGET_MARGINALS,
) -> OTTargets:
    """Dynamic fairness targets by exact optimal transport (docs/method.md#ot-targets).

    Over the n images with a face:
        b_s ~ Multinomial(n, P_joint),  s = 1..S               (S = num_samples)
        T_s = argmin_{T >= 0, T 1 = 1_n, T^T 1 = b_s} <T, C>    (exact EMD, POT `ot.emd`)
        q_i = (sum_s T_s)[i] / S                                  ([J], sums to 1)
        q_a[i] = marginal of q_i on attribute a
        target_a[i] = argmax q_a[i],  uncertainty_a[i] = 1 - max q_a[i]
        target_a[i] = -1  where uncertainty_a[i] > threshold
    with C = `transport_cost(probs)` and P_joint = `joint_target_distribution(target_marginals)`.
    Images without a face get target -1 and uncertainty -1 for every attribute.

    The S exact LPs are a loop over samples (each is an independent network-simplex solve);
    everything else is vectorised.

    Computed once over the whole gathered batch (`num_samples = 100 * D` matches the paper's 100 per
    device: docs/method.md#differences-from-the-papers-code). On several hosts, give every host the same
    `rng` seed (e.g. derived from the step) so all compute identical targets.

    Args:
        probs_per_attribute: one [N, K_a] array of class probabilities per attribute (values in rows
            without a face are ignored).
        face_found: [N] bool.
        rng: numpy Generator or seed for the label draws.
        num_samples: S, the number of sampled count vectors.
        threshold: uncertainty above which a target becomes -1 (0.2 in experiment 5).
        target_marginals: one target marginal per attribute, same order as probs_per_attribute.
    """
    marginals = _check_marginals(target_marginals)
    probs = [np.asarray(p, dtype=np.float64) for p in probs_per_attribute]
    face_found = np.asarray(face_found, dtype=bool)
    num_images = face_found.shape[0]
    if len(probs) != len(marginals):
        raise ValueError(
            f"{len(probs)} attributes of probabilities but {len(marginals)} target marginals"
        )
    for a, (p, m) in enumerate(zip(probs, marginals)):
        if p.shape != (num_images, m.size):
            raise ValueError(
                f"probs_per_attribute[{a}] has shape {p.shape}, expected ({num_images}, {m.size})"
            )
    num_classes = [m.size for m in marginals]
    num_joint = int(np.prod(num_classes))

    joint_probs = np.zeros((num_images, num_joint))
    with_face = np.flatnonzero(face_found)
    n = with_face.size
    if n > 0:
        rng = np.random.default_rng(rng)
        cost = transport_cost([p[with_face] for p in probs])
        counts = sample_target_counts(rng, n, joint_target_distribution(marginals), num_samples)
        source_mass = np.ones(n)
        plan_sum = np.zeros((n, num_joint))
        for target_mass in counts.astype(np.float64):
            plan_sum += ot.emd(source_mass, target_mass, cost)
        joint_probs[with_face] = plan_sum / plan_sum.sum(axis=1, keepdims=True)

    joint_grid = joint_probs.reshape((num_images, *num_classes))
    targets, uncertainties = [], []
    for a in range(len(num_classes)):
        other_axes = tuple(1 + b for b in range(len(num_classes)) if b != a)
        marginal = joint_grid.sum(axis=other_axes)
        uncertainty = np.where(face_found, 1.0 - marginal.max(axis=1), float(NO_TARGET))
        target = np.where(face_found & (uncertainty <= threshold), marginal.argmax(axis=1), NO_TARGET)
        targets.append(target.astype(np.int64))
        uncertainties.append(uncertainty)
    return OTTargets(tuple(targets), tuple(uncertainties), joint_probs)


def target_shares(targets: OTTargets, probs_per_attribute: Sequence[ArrayLike],
                  attribute_names: Sequence[str]) -> dict[str, float]:
    """What the fairness term asks of a batch of N images, for the training log (values in [0, 1]):

        "targets_<name>"          share of the N images with a target for that attribute (not -1)
        "targets_<name>_changed"  share of the N images whose target differs from the class predicted now

    Few targets mean little fairness gradient: with a handful of images and many classes, the sampled label
    counts vary so much between draws that most images' targets are too uncertain (docs/method.md#ot-targets).
    """
    shares = {}
    for name, target, probs in zip(attribute_names, targets.targets, probs_per_attribute):
        has_target = target != NO_TARGET
        shares[f"targets_{name}"] = float(has_target.mean())
        shares[f"targets_{name}_changed"] = float((has_target & (target != np.argmax(probs, axis=-1))).mean())
    return shares
