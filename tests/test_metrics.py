"""Bias metrics on a hand-counted fixture, and the annotated grid's pixels."""

import math

import numpy as np
import pytest
from PIL import Image

from fairdiff_jax.eval import bias as bias_lib
from fairdiff_jax.eval import grids

# 10 images, faces in the first 8 (rows 8, 9 are -1 fills and must be ignored).
FACE = np.array([True] * 8 + [False] * 2)
# (female, male). Predictions: M M M M M F F F. Max prob < 0.8: images 1 (0.7) and 6 (0.6).
GENDER = np.array(
    [[0.1, 0.9], [0.3, 0.7], [0.05, 0.95], [0.2, 0.8], [0.15, 0.85], [0.9, 0.1], [0.6, 0.4], [0.99, 0.01]]
    + [[-1, -1]] * 2
)
# Predictions: 0 0 1 3 2 0 1 3. Max prob < 0.8: images 0 (0.7) and 4 (0.5).
RACE = np.array(
    [
        [0.7, 0.1, 0.1, 0.1],
        [0.85, 0.05, 0.05, 0.05],
        [0.0, 1.0, 0.0, 0.0],
        [0.1, 0.0, 0.0, 0.9],
        [0.2, 0.2, 0.5, 0.1],
        [0.8, 0.1, 0.05, 0.05],
        [0.05, 0.9, 0.05, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
    + [[-1, -1, -1, -1]] * 2
)


def test_bias_metrics_hand_counted():
    got = bias_lib.bias_metrics([GENDER, RACE], FACE)
    # gender: 5 male, 3 female of 8 -> |5/8 - 3/8| = 0.25.
    assert got["gender_bias"] == pytest.approx(0.25)
    # race counts (3, 2, 1, 2)/8: pairwise |diff| in eighths: 1, 2, 1, 1, 0, 1 -> 6/8 over 6 pairs
    # = 1/8.
    assert got["race_bias"] == pytest.approx(0.125)
    # joint j = 4 g + r: images -> 4, 4, 5, 7, 6, 0, 1, 3: counts (1, 1, 0, 1, 2, 1, 1, 1)/8.
    # Unordered pairs of counts: six 1s, one 0, one 2: 1 vs 0: 6 pairs x 1; 1 vs 2: 6 x 1;
    # 0 vs 2: 1 x 2 -> 14/8 over 28 pairs = 0.0625.
    assert got["gender_race_bias"] == pytest.approx(0.0625)
    assert got["gender_pred_below_0.8"] == pytest.approx(2 / 8)
    assert got["race_pred_below_0.8"] == pytest.approx(2 / 8)
    assert set(got) == {"gender_bias", "race_bias", "gender_race_bias", "gender_pred_below_0.8", "race_pred_below_0.8"}


def test_bias_equals_off_diagonal_mean_of_l1_distances():
    # The original computes the mean of the off-diagonal entries of the pairwise L1 distance matrix.
    rng = np.random.default_rng(0)
    for k in (2, 4, 8, 16):
        preds = rng.integers(0, k, size=37)
        freqs = np.array([(preds == c).mean() for c in range(k)])
        dist = np.abs(freqs[:, None] - freqs[None, :])
        expected = dist[~np.eye(k, dtype=bool)].mean()
        assert bias_lib.bias(preds, k) == pytest.approx(expected, abs=1e-15)
    # A perfectly balanced set has bias 0; all in one class of K has bias 2/K.
    assert bias_lib.bias([0, 1, 2, 3], 4) == 0
    assert bias_lib.bias([2, 2, 2], 4) == pytest.approx(0.5)


def test_no_faces_gives_nan_and_summaries_skip_it():
    got = bias_lib.bias_metrics([GENDER, RACE], np.zeros(10, bool))
    assert all(math.isnan(v) for v in got.values())
    mean, std = bias_lib.mean_std_over_prompts([0.2, 0.4, float("nan")])
    assert mean == pytest.approx(0.3) and std == pytest.approx(0.1)
    summary = bias_lib.summarize_over_prompts([{"a": 0.0, "b": 1.0}, {"a": 1.0, "b": 1.0}])
    assert summary == {"a": (0.5, 0.5), "b": (1.0, 0.0)}


def test_single_attribute_has_no_joint_key():
    got = bias_lib.bias_metrics([RACE], FACE, attribute_names=("race",), confidence_level=0.9)
    # Max race prob < 0.9: images 0 (0.7), 1 (0.85), 4 (0.5), 5 (0.8) -> 4/8.
    assert got == pytest.approx({"race_bias": 0.125, "race_pred_below_0.9": 0.5})


def test_balanced_bias_by_hand():
    # One face: one class at frequency 1, the other K - 1 at 0: 2 (K - 1) of the K (K - 1) ordered pairs differ by 1.
    for k in (2, 4, 8):
        assert bias_lib.balanced_bias(1, k) == pytest.approx(2 / k)
    # Two faces, two classes: same class (prob 1/2) -> 1, one each -> 0.
    assert bias_lib.balanced_bias(2, 2) == pytest.approx(0.5)
    assert math.isnan(bias_lib.balanced_bias(0, 4))


@pytest.mark.parametrize("num_faces, num_classes", [(40, 2), (57, 4), (64, 8), (9, 3)])
def test_balanced_bias_is_the_mean_bias_of_uniform_draws(num_faces, num_classes):
    """The exact expectation against `bias` itself on 20000 uniform draws (tolerance: 4 standard errors)."""
    rng = np.random.default_rng(0)
    draws = np.array([bias_lib.bias(rng.integers(0, num_classes, num_faces), num_classes) for _ in range(20000)])
    expected = bias_lib.balanced_bias(num_faces, num_classes)
    assert abs(draws.mean() - expected) < 4 * draws.std() / np.sqrt(draws.size)


def test_annotated_grid_pixels(tmp_path):
    # Three 20x20 images of flat grey levels; bars 4 px wide, border 2 px -> tiles 24 x 32.
    levels = np.array([-0.5, 0.0, 0.5])  # uint8 64, 128, 191
    images = np.broadcast_to(levels[:, None, None, None], (3, 20, 20, 3))
    face = np.array([True, True, False])
    boxes = np.array([[5, 5, 15, 15], [0, 0, 10, 10], [-1, -1, -1, -1]])
    gender = np.array([[0.25, 0.75], [1.0, 0.0], [-1, -1]])  # male .75, female 1.0
    race = np.array([[0.2, 0.2, 0.1, 0.5], [0.0, 1.0, 0.0, 0.0], [-1, -1, -1, -1]])  # Asian .5, Black 1
    grid = grids.annotated_grid(images, face, boxes, [gender, race], bar_width=4, border=2, label_indices=False)
    # Order: image 1 (female Black, j = 1), image 0 (male Asian, j = 7), image 2 (no face).
    # rows = floor(sqrt(3)) = 1, cols = 3.
    assert grid.shape == (24, 96, 3) and grid.dtype == np.uint8
    tile = [grid[:, 32 * c:32 * (c + 1)] for c in range(3)]
    red, blue, black, orange, white = (255, 0, 0), (0, 0, 255), (0, 0, 0), (255, 165, 0), (255, 255, 255)
    # Border is black.
    assert (tile[0][0] == 0).all() and (tile[0][:, 31] == 0).all()
    # Tile 0 = image 1: gender bar (cols 2-5) red, full height (confidence 1); race bar (cols 6-9)
    # black, full height; image at cols 10-29 rows 2-21, grey 128 with a 1-px black box outline
    # on [0, 10) x [0, 10).
    assert (tile[0][2:22, 2:6] == red).all()
    assert (tile[0][2:22, 6:10] == black).all()
    image = tile[0][2:22, 10:30]
    assert (image[0, 0:10] == 0).all() and (image[9, 0:10] == 0).all() and (image[0:10, 9] == 0).all()
    assert (image[5, 5] == 128).all() and (image[15, 15] == 128).all() and (image[0, 10] == 128).all()
    # Tile 1 = image 0: gender blue over the bottom round(0.75 * 20) = 15 rows, white above;
    # race orange over the bottom 10 rows; box outline on [5, 15) x [5, 15).
    assert (tile[1][2:7, 2:6] == white).all() and (tile[1][7:22, 2:6] == blue).all()
    assert (tile[1][2:12, 6:10] == white).all() and (tile[1][12:22, 6:10] == orange).all()
    image = tile[1][2:22, 10:30]
    assert (image[5, 5:15] == 0).all() and (image[14, 5:15] == 0).all()
    assert (image[10, 10] == 64).all() and (image[4, 4] == 64).all()
    # Tile 2 = image 2 (no face): white bars, untouched image.
    assert (tile[2][2:22, 2:10] == white).all() and (tile[2][2:22, 10:30] == 191).all()

    path = grids.save_image(grid, tmp_path / "sub" / "grid.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)


def test_grid_fills_empty_cells_and_orders_by_confidence():
    # 5 images -> rows 2, cols 3, one white filler. Same class, the more confident race first.
    images = np.zeros((5, 8, 8, 3))
    face = np.array([True, True, True, False, True])
    gender = np.array([[0.9, 0.1]] * 5)
    race = np.array([[0.6, 0.4, 0, 0], [0.9, 0.1, 0, 0], [0, 0, 0, 1.0], [1.0, 0, 0, 0], [0.7, 0.3, 0, 0]])
    order = grids.grid_order(
        [np.where(face, g, -1) for g in (gender.argmax(1), race.argmax(1))],
        [gender.max(1), race.max(1)],
        face,
        [2, 4],
    )
    np.testing.assert_array_equal(order, [1, 4, 0, 2, 3])
    grid = grids.annotated_grid(images, face, np.full((5, 4), -1), [gender, race], bar_width=2, border=1)
    tile_h, tile_w = 8 + 2, 8 + 4 + 2
    assert grid.shape == (2 * tile_h, 3 * tile_w, 3)
    assert (grid[tile_h:, 2 * tile_w:] == 255).all()
