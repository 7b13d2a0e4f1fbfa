"""Fidelity: improved precision and recall (Kynkaanniemi et al., 2019) of a generated image set against a
reference set, in the feature space of a network that sees content (host side: numpy).

Each set spans a manifold: the union of balls around its points, a point's radius the distance to its k-th
nearest neighbour within its own set.

    precision = share of generated points inside the reference manifold   (are the images like real ones?)
    recall    = share of reference points inside the generated manifold   (is the reference's variety covered?)

A destroyed image (noise, a blob, a scrambled face) lies far from every reference image, so precision falls
with the share of such images; a set that draws only part of the reference (one scene, one face) keeps its
precision and loses recall.
"""

import numpy as np
from numpy.typing import ArrayLike

DEFAULT_K = 3  # the paper's choice


def pairwise_distances(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Euclidean distances [M, N] between the rows of a [M, D] and b [N, D] (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(squared, 0.0))


def knn_radii(points: ArrayLike, k: int = DEFAULT_K) -> np.ndarray:
    """[M] distance of each point to its k-th nearest neighbour among the other points (M > k)."""
    points = np.asarray(points, np.float64)
    if len(points) <= k:
        raise ValueError(f"{len(points)} points have no k-th nearest neighbour for k = {k}: use more images or a smaller k")
    distances = pairwise_distances(points, points)
    # Sorted row: the point itself (distance 0) first, then its neighbours.
    return np.sort(distances, axis=1)[:, k]


def manifold_share(points: ArrayLike, manifold: ArrayLike, k: int = DEFAULT_K) -> float:
    """Share of `points` [N, D] within the k-NN ball of at least one point of `manifold` [M, D]. A non-finite
    point is in no ball."""
    radii = knn_radii(manifold, k)
    inside = pairwise_distances(points, manifold) <= radii[None, :]  # NaN compares False
    return float(inside.any(axis=1).mean())


def improved_precision_recall(reference: ArrayLike, generated: ArrayLike, k: int = DEFAULT_K) -> tuple[float, float]:
    """(precision, recall) of generated [N, D] against reference [M, D] features; both sets need more than k
    points."""
    return manifold_share(generated, reference, k), manifold_share(reference, generated, k)
