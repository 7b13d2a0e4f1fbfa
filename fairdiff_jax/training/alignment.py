"""Distributional alignment (SPEC 5, steps 5 and 7): optimal-transport targets, dynamic weights,
face-region gradient scaling and the per-image losses.

Attributes. An experiment debiases A attributes (gender, race, age, ...). Each attribute a has K_a
classes and a target marginal distribution `target_marginals[a]` (a 1-D sequence summing to 1); the
attributes are independent under the target, so the joint target over J = prod(K_a) classes is the
outer product of the marginals, flattened row-major (first attribute slowest): for gender x race,
j = 4 * g + r; for gender x race x age, j = 8 * g + 2 * r + a (the original's orders). The sibling
experiments of the original are therefore arguments, not code:

    gender only            ((0.5, 0.5),)
    race only              ((0.25, 0.25, 0.25, 0.25),)
    gender x race (exp 5)  ((0.5, 0.5), (0.25, 0.25, 0.25, 0.25))             <- the default
    gender x race x age    ((0.5, 0.5), (0.25, 0.25, 0.25, 0.25), (0.75, 0.25))

The cost is the plain Euclidean one of SPEC 5 for every attribute (the original's experiment 4
weighted its age term asymmetrically; that variant is not reproduced).

Per-attribute quantities travel as sequences in that attribute order: `probs_per_attribute[a]` is
[N, K_a], `targets[a]` / `original_preds[a]` are [N] int with -1 for "none", `factors[a]` a float.

Host / device split. `optimal_transport_targets` is host-side numpy + POT (an exact LP per sample,
not differentiable). Everything else is a pure jnp function usable inside a jitted train step.

Class conventions (SPEC 1): gender 0 female, 1 male; race 0 White/Middle-Eastern/Latino-Hispanic,
1 Black, 2 Indian, 3 Asian; age 0 young, 1 old. Boxes are [x_min, y_min, x_max, y_max] in pixels of
the image (the insightface order), max exclusive; a box may extend past the image edges.
"""

import os
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# POT probes every array backend it can import at `import ot`. With TensorFlow installed (clu's
# dependency) that loads TF beside torch, which crashed test processes; only numpy is used here.
os.environ.setdefault("POT_BACKEND_DISABLE_TENSORFLOW", "1")
os.environ.setdefault("POT_BACKEND_DISABLE_PYTORCH", "1")
import ot  # noqa: E402
from numpy.typing import ArrayLike

from fairdiff_jax import attributes
from fairdiff_jax.judging.face_bank import nearest_bank_features
from fairdiff_jax.nn.layers import l2_normalize

# Marks "no target" / "no prediction" (no face, or a target too uncertain to train on).
NO_TARGET = -1

DEFAULT_TARGET_MARGINALS = (attributes.uniform("gender"), attributes.uniform("race"))


# --------------------------------------------------------------------------------------------------
# Optimal-transport targets (host side)
# --------------------------------------------------------------------------------------------------


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

    A multinomial draw equals the original's per-attribute independent draws tallied per joint class.
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
    """Dynamic fairness targets by exact optimal transport (SPEC 5, step 5).

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

    Several devices: the original draws S = 100 samples on each of D devices and sums all plans,
    i.e. it uses S * D independent samples over the gathered batch. Compute the targets once over
    the whole gathered batch with `num_samples = 100 * D` to reproduce that. On several hosts, give
    every host the same `rng` seed (e.g. derived from the step) so all compute identical targets.

    Args:
        probs_per_attribute: one [N, K_a] array of class probabilities per attribute (values in rows
            without a face are ignored).
        face_found: [N] bool.
        rng: numpy Generator or seed for the label draws.
        num_samples: S, the number of sampled count vectors.
        threshold: uncertainty above which a target becomes -1 (SPEC: 0.2).
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


# --------------------------------------------------------------------------------------------------
# Dynamic weights and face-region gradient scale (device side, jnp)
# --------------------------------------------------------------------------------------------------


def targets_agree(targets: Sequence[jax.Array], original_preds: Sequence[jax.Array]) -> jax.Array:
    """[A, N] bool: target_a[i] != -1 and target_a[i] == original_pred_a[i].

    A target of -1 never agrees (it counts as differing), also where the original image had no face
    (original prediction -1).
    """
    targets = jnp.stack([jnp.asarray(t) for t in targets])
    original_preds = jnp.stack([jnp.asarray(p) for p in original_preds])
    return (targets != NO_TARGET) & (targets == original_preds)


def _disagreement_factor(agree: jax.Array, factors: Sequence[float]) -> jax.Array:
    """[N] float32: 1 if every attribute agrees, else the min of the factors of those that differ."""
    factors = jnp.asarray(factors, dtype=jnp.float32)[:, None]
    smallest_differing = jnp.min(jnp.where(agree, jnp.inf, factors), axis=0)
    return jnp.where(agree.all(axis=0), 1.0, smallest_differing)


def dynamic_image_weights(
    targets: Sequence[jax.Array],
    original_preds: Sequence[jax.Array],
    face_found: jax.Array,
    factors: Sequence[float],
) -> jax.Array:
    """[N] float32 weight w_i of the image-semantics loss (SPEC 5 step 7, "factor1").

    w_i = 1                                   if every target agrees with the original prediction,
        = min{factor_a : attribute a differs}  otherwise (e.g. factor1_race if only race differs,
                                               min(gender, race) if both differ),
        = min_a factor_a                       if image i has no face.
    "Agrees" follows `targets_agree`: a target of -1 counts as differing. (The original compared
    -1 == -1 as equal where the original image had no face either; this is the only case where the
    two differ, and SPEC's rule for factor2 - "a target of -1 counts as differing" - is applied to
    both factors here.)

    Args:
        targets: per attribute [N] int, -1 for none (from `optimal_transport_targets`).
        original_preds: per attribute [N] int, the original model's predictions, -1 without face.
        face_found: [N] bool, whether image i (of the model being trained) has a face.
        factors: per attribute, e.g. (0.2, 0.6) for (gender, race).
    """
    weights = _disagreement_factor(targets_agree(targets, original_preds), factors)
    return jnp.where(jnp.asarray(face_found), weights, jnp.min(jnp.asarray(factors, jnp.float32)))


def face_region_gradient_scale(
    targets: Sequence[jax.Array],
    original_preds: Sequence[jax.Array],
    face_found: jax.Array,
    factors: Sequence[float],
) -> jax.Array:
    """[N] float32 factor applied to the image-semantics gradient inside the face region ("factor2").

    scale_i = 1 if every target agrees with the original prediction, else the min of the factors of
    the attributes that differ (a target of -1 counts as differing); 1 where image i has no face
    (there is no region to scale). With factor2 = (0.2, 0.3) the gradient that keeps the image close
    to the original is damped to 0.3x in the face when only race must change, 0.2x when gender must.
    (SPEC's "1 / factor2_race / factor2_gender / the min of both" lists the four alternatives of
    this rule, as the original multiplies the gradient by the factor itself.)
    """
    scales = _disagreement_factor(targets_agree(targets, original_preds), factors)
    return jnp.where(jnp.asarray(face_found), scales, 1.0)


def face_region_intersection(
    boxes: jax.Array,
    original_boxes: jax.Array,
    face_found: jax.Array,
    original_face_found: jax.Array,
) -> jax.Array:
    """[N, 4] intersection of each image's face box with the original image's face box.

    boxes, original_boxes: [N, 4] [x_min, y_min, x_max, y_max] (ints or floats; -1 fills allowed).
    The result is the all-zero (empty) box where either image has no face - unlike the original,
    whose -1 bounds became slices running to the image edge.
    """
    boxes, original_boxes = jnp.asarray(boxes), jnp.asarray(original_boxes)
    lower = jnp.maximum(boxes[:, :2], original_boxes[:, :2])
    upper = jnp.minimum(boxes[:, 2:], original_boxes[:, 2:])
    both = (jnp.asarray(face_found) & jnp.asarray(original_face_found))[:, None]
    return jnp.where(both, jnp.concatenate([lower, upper], axis=1), 0)


def face_region_mask(boxes: jax.Array, height: int, width: int) -> jax.Array:
    """[..., H, W] float32 mask: 1 at pixel (row y, column x) iff x_min <= x < x_max, y_min <= y < y_max.

    boxes: [..., 4] [x_min, y_min, x_max, y_max]; parts outside the image fall away, an empty or
    inverted box gives an empty mask. For integer boxes this is exactly the slice
    image[y_min:y_max, x_min:x_max] (with bounds clipped to the image).
    """
    boxes = jnp.asarray(boxes)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]

    def bound(k):
        return boxes[..., k][..., None, None]

    inside = (cols >= bound(0)) & (cols < bound(2)) & (rows >= bound(1)) & (rows < bound(3))
    return inside.astype(jnp.float32)


@jax.custom_vjp
def scale_face_region_gradient(images: jax.Array, boxes: jax.Array, scales: jax.Array) -> jax.Array:
    """Identity on images [..., H, W, C]; its backward multiplies the pixel cotangent by scales[...]
    inside each image's box and leaves it unchanged outside.

    Apply it only on the path to the image-semantics loss:
        semantics_images = scale_face_region_gradient(images, region_boxes, scales)
    with region_boxes from `face_region_intersection` and scales from `face_region_gradient_scale`.
    boxes: [..., 4], scales: [...] (same leading dims as images). No gradient flows to boxes/scales.
    Works under jit and vmap.
    """
    return images


def _scale_face_region_gradient_fwd(images, boxes, scales):
    return images, (boxes, scales)


def _scale_face_region_gradient_bwd(residuals, cotangent):
    boxes, scales = residuals
    inside = face_region_mask(boxes, cotangent.shape[-3], cotangent.shape[-2])[..., None] > 0
    scales = jnp.asarray(scales, cotangent.dtype)[..., None, None, None]
    return jnp.where(inside, cotangent * scales, cotangent), None, None


scale_face_region_gradient.defvjp(_scale_face_region_gradient_fwd, _scale_face_region_gradient_bwd)


# --------------------------------------------------------------------------------------------------
# Losses (device side, per image)
# --------------------------------------------------------------------------------------------------


def fairness_cross_entropy(
    logits: jax.Array, targets: jax.Array, face_found: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per-image cross-entropy of one attribute's logits to its dynamic target.

    CE_i = logsumexp(logits_i) - logits_i[target_i], present where face_found_i and target_i != -1.

    Args:
        logits: [N, K] float (with gradient); targets: [N] int, -1 for none; face_found: [N] bool.
    Returns:
        (loss [N] float32 with 0 where absent, present [N] bool).
    """
    targets = jnp.asarray(targets)
    present = jnp.asarray(face_found) & (targets != NO_TARGET)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
    return jnp.where(present, -picked, 0.0), present


def image_semantics_terms(
    clip_feats: jax.Array,
    original_clip_feats: jax.Array,
    dino_feats: jax.Array,
    original_dino_feats: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """(1 - cos(CLIP(X), CLIP(X0)), 1 - cos(DINO(X), DINO(X0))), each [N] float32.

    Features [N, D]; they are L2-normalised here (idempotent if already normalised).
    """

    def one_minus_cos(a, b):
        a, b = l2_normalize(a.astype(jnp.float32)), l2_normalize(jnp.asarray(b, jnp.float32))
        return 1.0 - jnp.sum(a * b, axis=-1)

    return one_minus_cos(clip_feats, original_clip_feats), one_minus_cos(dino_feats, original_dino_feats)


def use_original_face_feature(
    targets: Sequence[jax.Array],
    original_preds: Sequence[jax.Array],
    original_probs: Sequence[jax.Array],
    confidence_level: float = 0.8,
) -> jax.Array:
    """[N] bool: the face-realism target is the original image's own face feature.

    True iff for every attribute the target agrees with the original prediction (`targets_agree`)
    and the original's max class probability >= confidence_level
    (face_gender_race_confidence_level, 0.8). Otherwise the nearest face-bank feature is the target.
    original_probs: per attribute [N, K_a] (any fill, e.g. -1, where the original had no face).
    """
    agree = targets_agree(targets, original_preds)
    confident = jnp.stack([jnp.max(jnp.asarray(p), axis=-1) >= confidence_level for p in original_probs])
    return (agree & confident).all(axis=0)


def face_feature_targets(
    face_feats: jax.Array,
    original_face_feats: jax.Array,
    face_bank: jax.Array,
    use_original: jax.Array,
) -> jax.Array:
    """[N, D] float32 face-realism targets (no gradient): the original image's face feature where
    `use_original`, else the face-bank feature nearest (by dot product) to the image's own feature.

    face_feats: [N, D] normalised face features of X; original_face_feats: [N, D] of X0;
    face_bank: [M, D] L2-normalised (`face_bank.load_face_bank`).
    """
    nearest = nearest_bank_features(face_bank, face_feats)
    original = jnp.asarray(original_face_feats, jnp.float32)
    return jax.lax.stop_gradient(jnp.where(jnp.asarray(use_original)[:, None], original, nearest))


def face_realism_term(
    face_feats: jax.Array, target_feats: jax.Array, face_found: jax.Array
) -> jax.Array:
    """[N] float32: 1 - <normalize(f_i), normalize(target_i)> where face_found_i, else 0.

    face_feats: [N, D] SFNet features of X (with gradient), target_feats: [N, D] (treated as constants).
    """
    target = jax.lax.stop_gradient(l2_normalize(jnp.asarray(target_feats, jnp.float32)))
    term = 1.0 - jnp.sum(l2_normalize(face_feats.astype(jnp.float32)) * target, axis=-1)
    return jnp.where(jnp.asarray(face_found), term, 0.0)


def alignment_loss(
    attribute_logits: Sequence[jax.Array],
    targets: Sequence[jax.Array],
    face_found: jax.Array,
    clip_feats: jax.Array,
    original_clip_feats: jax.Array,
    dino_feats: jax.Array,
    original_dino_feats: jax.Array,
    face_feats: jax.Array,
    face_target_feats: jax.Array,
    image_weights: jax.Array,
    weight_loss_img: float = 8.0,
    weight_loss_face: float = 0.1,
    attribute_names: Sequence[str] = ("gender", "race"),
) -> tuple[jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
    """Per-image training loss (docs/method.md#the-loss) and each of its terms, computed once.

    loss_i = sum_a CE_a,i [face found, target_a,i != -1]
             + weight_loss_img * w_i * ((1 - cos CLIP_i) + (1 - cos DINO_i))
             + weight_loss_face * (1 - <f_i, target_i>) [face found]
    Absent terms contribute 0. The fairness cross-entropies are per image (not averaged over attributes or
    present images); the train step differentiates the MEAN OVER ALL IMAGES, faces or not.

    Args:
        attribute_logits: per attribute [N, K_a] (with gradient, from the chips of X).
        targets: per attribute [N] int, -1 for none.
        face_found: [N] bool, faces of X.
        clip_feats, original_clip_feats: [N, Dc] CLIP image embeddings of X (after
            `scale_face_region_gradient`) and of X0. Likewise dino_feats, original_dino_feats [N, Dd].
        face_feats: [N, Df] face features of X; face_target_feats: [N, Df] from `face_feature_targets`.
        image_weights: [N] from `dynamic_image_weights`.
        attribute_names: names used in the term names.
    Returns:
        per_image_loss: [N] float32 (with gradient).
        terms: {name: (values [N] float32, present [N] bool)} without gradient, for "loss_fair_<name>",
            "loss_CLIP", "loss_DINO", "loss_face" (unweighted) and "loss" (the total); `term_means`
            turns them into the logged means.
    """
    face_found = jnp.asarray(face_found)
    everywhere = jnp.ones(face_found.shape, dtype=bool)
    per_image = jnp.zeros(face_found.shape, jnp.float32)
    terms = {}
    for name, logits, target in zip(attribute_names, attribute_logits, targets):
        ce, present = fairness_cross_entropy(logits, target, face_found)
        per_image = per_image + ce
        terms[f"loss_fair_{name}"] = (ce, present)
    clip_term, dino_term = image_semantics_terms(
        clip_feats, original_clip_feats, dino_feats, original_dino_feats
    )
    image_weights = jnp.asarray(image_weights, jnp.float32)
    per_image = per_image + weight_loss_img * image_weights * (clip_term + dino_term)
    face_term = face_realism_term(face_feats, face_target_feats, face_found)
    per_image = per_image + weight_loss_face * face_term
    terms["loss_CLIP"] = (clip_term, everywhere)
    terms["loss_DINO"] = (dino_term, everywhere)
    terms["loss_face"] = (face_term, face_found)
    terms["loss"] = (per_image, everywhere)
    return per_image, jax.lax.stop_gradient(terms)


def term_means(terms: Mapping[str, tuple[ArrayLike, ArrayLike]]) -> dict[str, float]:
    """Host side: {name: mean of values over the images where present} from `alignment_loss`'s terms (any
    leading shape, e.g. several micro-batches or devices concatenated); terms present nowhere are left out."""
    means = {}
    for name, (values, present) in terms.items():
        values, present = np.asarray(values, np.float64), np.asarray(present, bool)
        if present.any():
            means[name] = float(values[present].mean())
    return means
