"""Improved precision and recall (eval/fidelity.py) on hand-made point sets, checked by hand."""

import numpy as np
import pytest

from fairdiff_jax.eval import fidelity


def column(*values):
    return np.array(values, np.float64)[:, None]


def test_one_dimensional_sets_by_hand():
    reference = column(0, 1, 3, 10)
    generated = column(0.5, 4.5, 25, 30)
    # k = 1 radii. Reference: 0 -> 1, 1 -> 1, 3 -> 2, 10 -> 7. Generated: 0.5 -> 4, 4.5 -> 4, 25 -> 5, 30 -> 5.
    np.testing.assert_allclose(fidelity.knn_radii(reference, 1), [1, 1, 2, 7])
    np.testing.assert_allclose(fidelity.knn_radii(generated, 1), [4, 4, 5, 5])
    # Precision: 0.5 is within 1 of 0; 4.5 within 2 of 3; 25 is 15 from 10 (radius 7); 30 too far: 2 of 4.
    # Recall: 0, 1, 3 lie within 4 of 0.5 or 4.5; 10 is 5.5 from 4.5 (radius 4) and 15 from 25 (radius 5): 3 of 4.
    assert fidelity.improved_precision_recall(reference, generated, k=1) == (0.5, 0.75)


def test_two_dimensional_square_with_k_two():
    reference = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.float64)
    # Each corner's neighbours lie at 1, 1 and sqrt 2: its k = 2 radius is 1.
    np.testing.assert_allclose(fidelity.knn_radii(reference, 2), [1, 1, 1, 1])
    # (0.5, 0.5) is 0.71 from every corner, (2, 0) exactly 1 from (1, 0) (the ball is closed), (2.1, 0) 1.1 away,
    # (5, 5) far: precision 2 / 4. The generated set's radii (k = 2) are 1.68, 1.58, 1.68, 5.83, so the centre point
    # alone covers every corner: recall 1.
    generated = np.array([[0.5, 0.5], [2, 0], [2.1, 0], [5, 5]], np.float64)
    precision, recall = fidelity.improved_precision_recall(reference, generated, k=2)
    assert precision == 0.5 and recall == 1.0


def test_a_set_against_itself_and_a_far_set():
    points = np.random.default_rng(0).normal(size=(40, 5))
    assert fidelity.improved_precision_recall(points, points) == (1.0, 1.0)
    assert fidelity.improved_precision_recall(points, points + 100.0) == (0.0, 0.0)
    # Half the generated set destroyed (far away): precision halves, recall stays (the other half covers it).
    mixed = np.concatenate([points[:20], points[20:] + 100.0])
    precision, _ = fidelity.improved_precision_recall(points, mixed)
    assert precision == 0.5


def test_non_finite_points_are_outside_and_small_sets_refused():
    reference = column(0, 1, 2, 3, 4)
    assert fidelity.manifold_share(column(0.5, np.nan), reference, k=1) == 0.5
    with pytest.raises(ValueError, match="3 points have no k-th nearest neighbour for k = 3"):
        fidelity.knn_radii(column(0, 1, 2), 3)
