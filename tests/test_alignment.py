"""Distributional alignment: OT targets against a plain POT reference, hand-checked weights, scales,
the face-region gradient VJP and the losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest

from fairdiff_jax import attributes
from fairdiff_jax.training import alignment as al
from fairdiff_jax.training import ot_targets as targets_lib

UNIFORM_8 = np.full(8, 1 / 8)


# ----------------------------------------------------------------------------------------------
# Optimal-transport targets
# ----------------------------------------------------------------------------------------------


def reference_targets(probs, face_found, counts, threshold, num_classes):
    """The OT targets (docs/method.md#ot-targets) written plainly: explicit loops over images and joint classes, one ot.emd per
    sample, marginals by explicit index sums."""
    idx = [i for i in range(len(face_found)) if face_found[i]]
    shape = tuple(num_classes)
    num_joint = int(np.prod(shape))
    cost = np.zeros((len(idx), num_joint))
    for row, i in enumerate(idx):
        for j in range(num_joint):
            classes = np.unravel_index(j, shape)
            total = 0.0
            for a, k in enumerate(num_classes):
                onehot = np.zeros(k)
                onehot[classes[a]] = 1.0
                total += np.sum((np.asarray(probs[a][i], np.float64) - onehot) ** 2)
            cost[row, j] = math.sqrt(total)
    plan_sum = np.zeros((len(idx), num_joint))
    for b in counts:
        plan_sum += ot.emd(np.ones(len(idx)), b.astype(np.float64), cost)
    q = plan_sum / len(counts)
    n_all = len(face_found)
    targets = [np.full(n_all, -1) for _ in num_classes]
    uncert = [np.full(n_all, -1.0) for _ in num_classes]
    joint = np.zeros((n_all, num_joint))
    for row, i in enumerate(idx):
        joint[i] = q[row]
        for a, k in enumerate(num_classes):
            marginal = np.zeros(k)
            for j in range(num_joint):
                marginal[np.unravel_index(j, shape)[a]] += q[row, j]
            uncert[a][i] = 1 - marginal.max()
            targets[a][i] = marginal.argmax() if uncert[a][i] <= threshold else -1
    return targets, uncert, joint


def random_probs(rng, n, num_classes):
    return [rng.dirichlet(np.full(k, 0.7), size=n) for k in num_classes]


@pytest.mark.parametrize(
    "marginals",
    [
        targets_lib.DEFAULT_TARGET_MARGINALS,  # gender x race (experiment 5)
        (attributes.uniform("race"),),  # race only
        (attributes.uniform("gender"), attributes.uniform("race"), attributes.YOUNG_OLD_TARGET),  # 16 joint classes
    ],
)
def test_ot_targets_match_plain_pot_reference(marginals):
    rng = np.random.default_rng(0)
    num_classes = [len(m) for m in marginals]
    n_all, samples, seed = 24, 30, 123
    probs = random_probs(rng, n_all, num_classes)
    face_found = rng.random(n_all) < 0.8
    n = int(face_found.sum())
    # The reference draws the same count vectors: same seed, one multinomial call.
    joint = np.ones(())
    for m in marginals:
        joint = np.multiply.outer(joint, np.asarray(m))
    counts = np.random.default_rng(seed).multinomial(n, joint.reshape(-1), size=samples)

    got = targets_lib.optimal_transport_targets(
        probs, face_found, np.random.default_rng(seed), num_samples=samples, threshold=0.2,
        target_marginals=marginals,
    )
    targets, uncert, joint_probs = reference_targets(probs, face_found, counts, 0.2, num_classes)
    np.testing.assert_allclose(got.joint_probs, joint_probs, atol=1e-12)
    for a in range(len(marginals)):
        np.testing.assert_array_equal(got.targets[a], targets[a])
        np.testing.assert_allclose(got.uncertainties[a], uncert[a], atol=1e-12)
    # Random continuous inputs: both kept (-1 rate < 100 %) and dropped targets occur in the
    # gender x race case, so the threshold path is exercised.
    if len(marginals) == 2:
        kept = got.targets[1][face_found]
        assert (kept == -1).any() and (kept != -1).any()
    assert (got.joint_probs[~face_found] == 0).all()
    np.testing.assert_allclose(got.joint_probs[face_found].sum(1), 1.0, atol=1e-12)


def test_target_count_sampler_matches_joint_distribution():
    # 16 classes of gender x race x age (P = 1/2 * 1/4 * {3/4, 1/4}); 4000 draws of 10 labels:
    # the mean count n * P_j has standard error sqrt(n P (1-P) / 4000) <= 0.02; allow 6 of those.
    joint = targets_lib.joint_target_distribution((attributes.uniform("gender"), attributes.uniform("race"), attributes.YOUNG_OLD_TARGET))
    assert joint[0] == 0.5 * 0.25 * 0.75 and joint[1] == 0.5 * 0.25 * 0.25  # j = 8g + 2r + a
    counts = targets_lib.sample_target_counts(np.random.default_rng(1), 10, joint, 4000)
    assert counts.shape == (4000, 16) and (counts.sum(1) == 10).all()
    np.testing.assert_allclose(counts.mean(0), 10 * joint, atol=6 * 0.02)


def test_joint_class_order_and_cost():
    onehots = targets_lib.joint_class_onehots([2, 4])
    # j = 4 g + r: j = 6 is male (1), Indian (2).
    np.testing.assert_array_equal(onehots[0][6], [0, 1])
    np.testing.assert_array_equal(onehots[1][6], [0, 0, 1, 0])
    # p_gender = (0.25, 0.75), p_race = (0.1, 0.2, 0.3, 0.4):
    # C[0, 6] = sqrt(0.25^2 + 0.25^2 + 0.1^2 + 0.2^2 + 0.7^2 + 0.4^2) = sqrt(0.825).
    cost = targets_lib.transport_cost([np.array([[0.25, 0.75]]), np.array([[0.1, 0.2, 0.3, 0.4]])])
    assert cost.shape == (1, 8)
    np.testing.assert_allclose(cost[0, 6], math.sqrt(0.825), rtol=1e-12)


def test_one_hot_images_of_distinct_classes_keep_their_classes():
    # One image of each of the 8 joint classes, exactly one-hot. In any optimal plan no class has
    # both outflow and inflow (the cost is a Euclidean distance between distinct vertices, so the
    # triangle inequality is strict and such flows can always be shortcut). Hence in sample s the
    # image of class c stays in c iff b_s[c] >= 1, whatever the tie-breaking among equal costs:
    #     q_i[c_i] = #{s : b_s[c_i] >= 1} / S      exactly.
    # Its expectation is 1 - (7/8)^8 = 0.656; with S = 2000 the standard error is 0.011, so each
    # own-class marginal (>= q_i[c_i]) stays far above 0.5 and the argmax is the own class.
    probs_gender = np.eye(2)[np.arange(8) // 4]
    probs_race = np.eye(4)[np.arange(8) % 4]
    samples, seed = 2000, 7
    counts = np.random.default_rng(seed).multinomial(8, UNIFORM_8, size=samples)
    got = targets_lib.optimal_transport_targets(
        [probs_gender, probs_race], np.ones(8, bool), seed, num_samples=samples, threshold=1.0
    )
    stay = (counts >= 1).mean(axis=0)
    np.testing.assert_allclose(np.diag(got.joint_probs), stay, atol=1e-12)
    assert abs(stay.mean() - (1 - (7 / 8) ** 8)) < 0.02
    np.testing.assert_array_equal(got.targets[0], np.arange(8) // 4)
    np.testing.assert_array_equal(got.targets[1], np.arange(8) % 4)


def test_one_hot_classes_with_several_images_keep_class_mass():
    # k = 3 one-hot images per joint class (n = 24): which of a class's identical images moves is a
    # tie, but the mass that stays in class c in sample s is exactly min(k, b_s[c]) (same argument
    # as above), so the class-average of q_i[c] is sum_s min(k, b_s[c]) / (k S).
    k, samples, seed = 3, 300, 11
    classes = np.repeat(np.arange(8), k)
    probs = [np.eye(2)[classes // 4], np.eye(4)[classes % 4]]
    counts = np.random.default_rng(seed).multinomial(8 * k, UNIFORM_8, size=samples)
    got = targets_lib.optimal_transport_targets(probs, np.ones(8 * k, bool), seed, num_samples=samples)
    own = got.joint_probs[np.arange(8 * k), classes].reshape(8, k).mean(1)
    np.testing.assert_allclose(own, np.minimum(k, counts).mean(0) / k, atol=1e-12)


def test_no_faces_at_all():
    probs = [np.full((5, 2), -1.0), np.full((5, 4), -1.0)]
    got = targets_lib.optimal_transport_targets(probs, np.zeros(5, bool), 0)
    for a in range(2):
        np.testing.assert_array_equal(got.targets[a], -1)
        np.testing.assert_array_equal(got.uncertainties[a], -1.0)
    assert got.joint_probs.shape == (5, 8) and (got.joint_probs == 0).all()


def test_every_target_uncertain():
    # A single face: each b_s is the one-hot of one drawn label, so q = the mean of S one-hot draws
    # (whatever the image's probabilities). Gender marginal ~ Bin(S, 1/2)/S, race ~ 1/4 each: with
    # S = 400 both maxima are far below 0.8 (6+ standard errors), so both uncertainties > 0.2.
    samples, seed = 400, 3
    probs = [np.array([[0.9, 0.1], [-1, -1]]), np.array([[0.7, 0.1, 0.1, 0.1], [-1, -1, -1, -1]])]
    got = targets_lib.optimal_transport_targets(probs, np.array([True, False]), seed, num_samples=samples)
    counts = np.random.default_rng(seed).multinomial(1, UNIFORM_8, size=samples)
    np.testing.assert_allclose(got.joint_probs[0], counts.mean(0), atol=1e-12)
    gender_max = counts.mean(0).reshape(2, 4).sum(1).max()
    np.testing.assert_allclose(got.uncertainties[0][0], 1 - gender_max, atol=1e-12)
    assert got.uncertainties[0][0] > 0.2 and got.uncertainties[1][0] > 0.2
    np.testing.assert_array_equal(got.targets[0], [-1, -1])
    np.testing.assert_array_equal(got.targets[1], [-1, -1])


def test_target_shares_hand_checked():
    # 4 images: gender targets (0, 1, -1, 1) against predictions (0, 0, 1, 1); race targets all -1 but one.
    targets = targets_lib.OTTargets(
        (np.array([0, 1, -1, 1]), np.array([-1, 2, -1, -1])), (np.zeros(4), np.zeros(4)), np.zeros((4, 8)))
    gender = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
    race = np.tile([0.7, 0.1, 0.1, 0.1], (4, 1))
    got = targets_lib.target_shares(targets, [gender, race], ("gender", "race"))
    assert got == {"targets_gender": 0.75, "targets_gender_changed": 0.25,
                   "targets_race": 0.25, "targets_race_changed": 0.25}


def test_few_images_leave_most_race_targets_uncertain():
    # Why the batch size matters for race (docs/method.md#ot-targets): 16 confident race-0 faces with noisy
    # logits get a race target far less often than 64 do (measured 2026-12-03: 35% vs 69% of images).
    def shares(n, seed):
        rng = np.random.default_rng(seed)
        gender = np.stack([rng.normal(3, 2, n), np.zeros(n)], 1)
        race = np.concatenate([np.full((n, 1), 6.0), rng.normal(0, 1, (n, 3))], 1)
        probs = [np.exp(z) / np.exp(z).sum(1, keepdims=True) for z in (gender, race)]
        got = targets_lib.optimal_transport_targets(probs, np.ones(n, bool), seed, num_samples=200)
        return targets_lib.target_shares(got, probs, ("gender", "race"))["targets_race"]
    few, many = np.mean([shares(16, s) for s in range(3)]), np.mean([shares(64, s) for s in range(3)])
    assert few < 0.45 and many > 0.55, (few, many)


def test_targets_stop_short_of_balance_below_the_uncertainty_threshold():
    # The dead zone near balance (docs/method.md#ot-targets): 31 confident faces, 20 of one gender. Balancing
    # needs 4.5 of them to change; the sampled balanced counts vary by about 2.8 faces, so at threshold 0.2 only
    # the faces that most draws send over get a target (0.8 of 4.5 over these 5 seeds), while every other face
    # is told to stay. At 0.5 (every gender argmax is a target) most of the surplus is asked to change (3.6).
    def changed(threshold, seed):
        rng = np.random.default_rng(seed)
        male = np.concatenate([rng.uniform(0.85, 0.99, 20), rng.uniform(0.01, 0.15, 11)])
        gender = np.stack([male, 1 - male], 1)
        race = np.full((31, 4), 0.02)
        race[np.arange(31), rng.integers(0, 4, 31)] = 0.94
        got = targets_lib.optimal_transport_targets([gender, race], np.ones(31, bool), seed, num_samples=200,
                                                    threshold=threshold)
        return np.sum((got.targets[0] >= 0) & (got.targets[0] != gender.argmax(1)))
    strict, loose = (np.mean([changed(t, s) for s in range(5)]) for t in (0.2, 0.5))
    assert strict < 1.5 and loose > 3.0, (strict, loose)


def test_bad_arguments_raise():
    probs = [np.full((3, 2), 0.5), np.full((3, 4), 0.25)]
    with pytest.raises(ValueError, match="attributes"):
        targets_lib.optimal_transport_targets(probs[:1], np.ones(3, bool), 0)
    with pytest.raises(ValueError, match=r"probs_per_attribute\[1\]"):
        targets_lib.optimal_transport_targets([probs[0], probs[1][:, :3]], np.ones(3, bool), 0)
    with pytest.raises(ValueError, match="not a distribution"):
        targets_lib.joint_target_distribution([(0.5, 0.6)])


# ----------------------------------------------------------------------------------------------
# Dynamic weights and face-region gradient scale
# ----------------------------------------------------------------------------------------------

# (gender, race) targets vs original predictions, one case per image:
#   0 all agree            1 race differs        2 gender differs      3 both differ
#   4 no face              5 gender target -1    6 targets -1 and original had no face (-1)
#   7 race target -1
TARGETS = (np.array([1, 1, 0, 0, 1, -1, -1, 1]), np.array([2, 3, 2, 3, 2, 2, -1, -1]))
ORIGINAL = (np.array([1, 1, 1, 1, 1, 1, -1, 1]), np.array([2, 2, 2, 2, 2, 2, -1, 2]))
FACE = np.array([True, True, True, True, False, True, True, True])


def test_dynamic_image_weights_hand_checked():
    # factor1 = (gender 0.2, race 0.6): 1 | 0.6 | 0.2 | min(0.2, 0.6) | min | gender "differs" ->
    # 0.2 | both "differ" -> 0.2 | race "differs" -> 0.6.
    weights = al.dynamic_image_weights(TARGETS, ORIGINAL, FACE, (0.2, 0.6))
    np.testing.assert_allclose(weights, [1, 0.6, 0.2, 0.2, 0.2, 0.2, 0.2, 0.6], rtol=1e-7)
    # The rule for three attributes (gender 0.2, race 0.6, age 0.4): only race and age differ ->
    # min(0.6, 0.4) = 0.4; only age differs -> 0.4; none -> 1; no face -> 0.2.
    targets = (np.array([1, 1, 1, 1]), np.array([3, 2, 2, 2]), np.array([1, 1, 0, 0]))
    original = (np.array([1, 1, 1, 1]), np.array([2, 2, 2, 2]), np.array([0, 0, 0, 0]))
    weights = al.dynamic_image_weights(targets, original, np.array([1, 1, 1, 0], bool), (0.2, 0.6, 0.4))
    np.testing.assert_allclose(weights, [0.4, 0.4, 1, 0.2], rtol=1e-7)


def test_face_region_gradient_scale_hand_checked():
    # factor2 = (gender 0.2, race 0.3): same rule, but 1 where there is no face (nothing to scale).
    scales = al.face_region_gradient_scale(TARGETS, ORIGINAL, FACE, (0.2, 0.3))
    np.testing.assert_allclose(scales, [1, 0.3, 0.2, 0.2, 1, 0.2, 0.2, 0.3], rtol=1e-7)
    # Works inside jit as well.
    jitted = jax.jit(al.face_region_gradient_scale, static_argnums=3)(TARGETS, ORIGINAL, FACE, (0.2, 0.3))
    np.testing.assert_allclose(jitted, scales)


def test_face_region_intersection():
    boxes = np.array([[10, 20, 50, 60], [10, 20, 50, 60], [-1, -1, -1, -1], [-8, 5, 30, 40]])
    original = np.array([[30, 0, 70, 40], [-1, -1, -1, -1], [0, 0, 9, 9], [-4, -3, 20, 70]])
    face = np.array([True, True, False, True])
    face_ori = np.array([True, False, True, True])
    got = al.face_region_intersection(boxes, original, face, face_ori)
    # 0: x in [30, 50), y in [20, 40). 1, 2: one image has no face -> empty. 3: partly outside.
    np.testing.assert_array_equal(got, [[30, 20, 50, 40], [0, 0, 0, 0], [0, 0, 0, 0], [-4, 5, 20, 40]])


def test_face_region_mask_matches_slices():
    boxes = np.array([[2, 1, 5, 4], [-3, 6, 20, 30], [0, 0, 0, 0], [6, 2, 3, 7]])
    mask = np.asarray(al.face_region_mask(boxes, 8, 10))
    expected = np.zeros((4, 8, 10))
    expected[0, 1:4, 2:5] = 1
    expected[1, 6:, 0:] = 1  # clipped to the image
    # 2: empty box; 3: inverted box -> empty.
    np.testing.assert_array_equal(mask, expected)


def test_scale_face_region_gradient_vjp():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(3, 8, 10, 3)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(3, 8, 10, 3)), jnp.float32)
    boxes = jnp.array([[2, 1, 5, 4], [-2, 5, 4, 12], [0, 0, 0, 0]])
    scales = jnp.array([0.3, 0.5, 0.2])

    def loss(x):
        return jnp.sum(al.scale_face_region_gradient(x, boxes, scales) * weight)

    np.testing.assert_array_equal(al.scale_face_region_gradient(images, boxes, scales), images)
    grad = np.asarray(jax.jit(jax.grad(loss))(images))
    expected = np.asarray(weight).copy()
    expected[0, 1:4, 2:5] *= np.float32(0.3)
    expected[1, 5:8, 0:4] *= np.float32(0.5)
    np.testing.assert_array_equal(grad, expected)
    # Untouched outside the boxes, exactly.
    outside = np.asarray(al.face_region_mask(boxes, 8, 10))[..., None] == 0
    np.testing.assert_array_equal(np.where(outside, grad, 0), np.where(outside, weight, 0))

    # vmapped over single images gives the same.
    per_image = jax.vmap(jax.grad(lambda x, b, s, w: jnp.sum(al.scale_face_region_gradient(x, b, s) * w)))
    np.testing.assert_array_equal(per_image(images, boxes, scales, weight), expected)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def test_fairness_cross_entropy_hand_checked():
    # logits (0, ln 3) -> probs (1/4, 3/4): CE to 1 = ln(4/3), CE to 0 = ln 4.
    logits = jnp.array([[0.0, math.log(3)], [0.0, math.log(3)], [5.0, 1.0], [2.0, 2.0]])
    targets = jnp.array([1, 0, -1, 0])
    face = jnp.array([True, True, True, False])
    ce, present = al.fairness_cross_entropy(logits, targets, face)
    np.testing.assert_allclose(ce, [math.log(4 / 3), math.log(4), 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(present, [True, True, False, False])
    grad = jax.grad(lambda l: al.fairness_cross_entropy(l, targets, face)[0].sum())(logits)
    # d CE / d logits = softmax - onehot; zero where absent.
    np.testing.assert_allclose(grad[:2], [[0.25, -0.25], [-0.75, 0.75]], atol=1e-6)
    np.testing.assert_array_equal(grad[2:], 0)


def test_face_feature_target_selection():
    targets = (jnp.array([1, 1, 1, 0, -1]), jnp.array([2, 2, 2, 2, 2]))
    original_preds = (jnp.array([1, 1, 1, 1, 1]), jnp.array([2, 2, 2, 2, 2]))
    original_probs = (
        jnp.array([[0.1, 0.9], [0.15, 0.85], [0.1, 0.9], [0.1, 0.9], [0.1, 0.9]]),
        jnp.array([[0, 0, 0.8, 0.2], [0, 0, 0.9, 0.1], [0.25, 0.25, 0.3, 0.2]] + [[0, 0, 1, 0]] * 2),
    )
    # 0: agree, confidences 0.9 / 0.8 (>= 0.8) -> original. 1: 0.85 / 0.9 -> original.
    # 2: race confidence 0.3 -> bank. 3: gender differs -> bank. 4: target -1 -> bank.
    use = al.use_original_face_feature(targets, original_preds, original_probs, 0.8)
    np.testing.assert_array_equal(use, [True, True, False, False, False])

    bank = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    feats = jnp.array([[0.6, 0.8], [0.9, -0.1], [-0.8, 0.6], [0.1, 0.99], [0.7, 0.1]])
    original = jnp.full((5, 2), 7.0)
    got = al.face_feature_targets(feats, original, bank, use)
    # Rows 2-4 pick the bank row with the largest dot product: (-1,0), (0,1), (1,0).
    np.testing.assert_array_equal(got, [[7, 7], [7, 7], [-1, 0], [0, 1], [1, 0]])


def test_alignment_loss_hand_checked():
    logits_gender = jnp.array([[0.0, math.log(3)], [1.0, 2.0], [3.0, 0.0]])
    logits_race = jnp.array([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(2), 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    targets = (jnp.array([1, -1, -1]), jnp.array([2, 1, -1]))
    face = jnp.array([True, True, False])
    clip = jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    clip_ori = jnp.array([[0.6, 0.8], [0.0, 3.0], [-1.0, 0.0]])
    dino = jnp.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    dino_ori = jnp.array([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    face_feats = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
    face_targets = jnp.array([[0.8, 0.6, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    weights = jnp.array([1.0, 0.6, 0.2])
    per_image, terms = al.alignment_loss(al.paper_terms(
        (logits_gender, logits_race), targets, face, clip, clip_ori, dino, dino_ori,
        face_feats, face_targets, weights, weight_loss_img=8.0, weight_loss_face=0.1,
    ))
    logs = al.term_means(terms)
    # Image 0: CE_g = ln(4/3); CE_r = ln 4 (uniform over 4); CLIP 1 - 0.6 = 0.4; DINO 0;
    #          face 1 - 0.8 = 0.2 -> ln(4/3) + ln 4 + 8 * 1 * 0.4 + 0.1 * 0.2.
    # Image 1: CE_g absent; CE_r: probs (1, 2, 1, 1)/5 -> ln(5/2); CLIP 0; DINO 1;
    #          face 0 -> ln 2.5 + 8 * 0.6 * 1.
    # Image 2: no face: only semantics: CLIP 1 - (-1) = 2, DINO 0 -> 8 * 0.2 * 2.
    expected = [
        math.log(4 / 3) + math.log(4) + 3.2 + 0.02,
        math.log(2.5) + 4.8,
        3.2,
    ]
    np.testing.assert_allclose(per_image, expected, rtol=1e-6)
    jitted, _ = jax.jit(lambda *args: al.alignment_loss(al.paper_terms(*args)))(
        (logits_gender, logits_race), targets, face, clip, clip_ori, dino, dino_ori,
        face_feats, face_targets, weights,
    )
    np.testing.assert_allclose(jitted, expected, rtol=1e-6)
    np.testing.assert_allclose(logs["loss_fair_gender"], math.log(4 / 3), rtol=1e-6)
    assert int(terms["loss_fair_gender"][1].sum()) == 1
    np.testing.assert_allclose(logs["loss_fair_race"], (math.log(4) + math.log(2.5)) / 2, rtol=1e-6)
    np.testing.assert_allclose(logs["loss_CLIP"], (0.4 + 0 + 2) / 3, rtol=1e-6)
    np.testing.assert_allclose(logs["loss_DINO"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(logs["loss_face"], 0.1, rtol=1e-6)  # (0.2 + 0) / 2 faces
    np.testing.assert_allclose(logs["loss"], sum(expected) / 3, rtol=1e-6)

    # Gradient w.r.t. the face features is zero for the image without a face, and the face target
    # receives no gradient.
    def total(ff, ft):
        loss, _ = al.alignment_loss(al.paper_terms(
            (logits_gender, logits_race), targets, face, clip, clip_ori, dino, dino_ori,
            ff, ft, weights,
        ))
        return loss.mean()

    g_feats, g_targets = jax.grad(total, argnums=(0, 1))(face_feats, face_targets)
    np.testing.assert_array_equal(g_feats[2], 0)
    assert np.abs(g_feats[0]).sum() > 0
    np.testing.assert_array_equal(g_targets, 0)

    # Merging two micro-batches weights each mean by its count: a second batch with one
    # gender term of value 2 -> (ln(4/3) * 1 + 2 * 1) / 2.
    other = dict(terms, loss_fair_gender=(jnp.array([2.0, 0.0, 0.0]), jnp.array([True, False, False])))
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), terms, other)
    merged = al.term_means(both)
    np.testing.assert_allclose(merged["loss_fair_gender"], (math.log(4 / 3) + 2) / 2, rtol=1e-6)
    empty = jax.tree.map(jnp.zeros_like, terms)
    assert "loss_face" not in al.term_means(empty)
