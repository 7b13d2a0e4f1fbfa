"""The distributional alignment loss on the device (pure jnp, usable inside a jitted step): dynamic weights,
face-region gradient scaling and the per-image loss terms (docs/method.md#dynamic-weights, #the-loss).

Per-attribute quantities travel as sequences in the attribute order: `targets[a]` / `original_preds[a]` are
[N] int with -1 (`NO_TARGET`) for "none", `factors[a]` a float. Boxes are [x_min, y_min, x_max, y_max] in
pixels of the image, max exclusive; a box may extend past the image edges.
"""

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from fairdiff_jax.judging.face_bank import nearest_bank_features
from fairdiff_jax.nn.layers import l2_normalize
from fairdiff_jax.training.ot_targets import NO_TARGET

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
    """[N] float32 weight w_i of the image-semantics loss ("factor1", docs/method.md#dynamic-weights).

    w_i = 1                                   if every target agrees with the original prediction,
        = min{factor_a : attribute a differs}  otherwise (e.g. factor1_race if only race differs,
                                               min(gender, race) if both differ),
        = min_a factor_a                       if image i has no face.
    "Agrees" follows `targets_agree`: a target of -1 counts as differing, for factor2 alike
    (docs/method.md#differences-from-the-papers-code).

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
    The result is the all-zero (empty) box where either image has no face
    (docs/method.md#differences-from-the-papers-code).
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
