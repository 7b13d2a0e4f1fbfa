"""Deliberately ruined image sets: the failures an evaluation metric must catch before its good value counts,
and the hard negatives the miniature world's detectors and towers are trained against.

Every function maps images [N, H, W, 3] float32 in [-1, 1] (and a numpy Generator) to a ruined set of the
same shape and range. `RUINS` names them all:

    noisy = RUINS["coloured_noise"](images, np.random.default_rng(0))

- gaussian_noise  pixels replaced by N(0, 0.5) noise (no trace of the image)
- coloured_noise  the image's colours per pixel, shuffled over the image, at the resolution of blocks:
                  what an over-driven debiasing run draws (the palette survives, the content does not)
- blobs           smooth random colour fields (low-frequency noise): no edges, no face
- scrambled       the image cut in 4x4 tiles, shuffled: local texture and colour survive, layout does not
- blurred         a box blur as wide as a quarter of the image: the coarse layout survives, no detail
- constant        every pixel the image's mean colour
- black           every pixel -1 (what NaN weights decode to after clipping)
"""

from typing import Callable

import numpy as np

Ruin = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def gaussian_noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(rng.normal(0.0, 0.5, images.shape), -1.0, 1.0).astype(np.float32)


def _tiles(images: np.ndarray, tile: int) -> np.ndarray:
    """[N, H, W, C] -> [N, H/tile * W/tile, tile, tile, C] (H, W divisible by tile)."""
    n, h, w, c = images.shape
    tiles = images.reshape(n, h // tile, tile, w // tile, tile, c).transpose(0, 1, 3, 2, 4, 5)
    return tiles.reshape(n, (h // tile) * (w // tile), tile, tile, c)


def _untile(tiles: np.ndarray, height: int, width: int) -> np.ndarray:
    n, _, tile, _, c = tiles.shape
    grid = tiles.reshape(n, height // tile, width // tile, tile, tile, c).transpose(0, 1, 3, 2, 4, 5)
    return grid.reshape(n, height, width, c)


def _shuffle_tiles(images: np.ndarray, rng: np.random.Generator, tile: int) -> np.ndarray:
    n, h, w, _ = images.shape
    tiles = _tiles(images, tile)
    order = rng.permuted(np.tile(np.arange(tiles.shape[1]), (n, 1)), axis=1)
    return _untile(np.take_along_axis(tiles, order[:, :, None, None, None], axis=1), h, w)


def coloured_noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """2x2 blocks of the image's own pixels at random places of the same image."""
    return _shuffle_tiles(images, rng, tile=2 if images.shape[1] % 2 == 0 else 1).astype(np.float32)


def scrambled(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    tile = max(1, images.shape[1] // 4)
    return _shuffle_tiles(images, rng, tile).astype(np.float32)


def _upsample(fields: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of [N, h, w, C] fields to [N, height, width, C] (separable interpolation)."""
    n, h, w, c = fields.shape
    rows = np.linspace(0, h - 1, height)
    cols = np.linspace(0, w - 1, width)
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    r1, c1 = np.minimum(r0 + 1, h - 1), np.minimum(c0 + 1, w - 1)
    fr, fc = (rows - r0)[None, :, None, None], (cols - c0)[None, None, :, None]
    top = fields[:, r0][:, :, c0] * (1 - fc) + fields[:, r0][:, :, c1] * fc
    bottom = fields[:, r1][:, :, c0] * (1 - fc) + fields[:, r1][:, :, c1] * fc
    return top * (1 - fr) + bottom * fr


def blobs(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n, h, w, c = images.shape
    coarse = rng.uniform(-1.0, 1.0, (n, 4, 4, c))
    return _upsample(coarse, h, w).astype(np.float32)


def blurred(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    del rng  # deterministic
    n, h, w, c = images.shape
    k = max(1, h // 4)
    padded = np.pad(images, ((0, 0), (k // 2, k - 1 - k // 2), (k // 2, k - 1 - k // 2), (0, 0)), mode="edge")
    summed = np.cumsum(np.cumsum(np.pad(padded, ((0, 0), (1, 0), (1, 0), (0, 0))), axis=1), axis=2)
    box = summed[:, k:, k:] - summed[:, :-k, k:] - summed[:, k:, :-k] + summed[:, :-k, :-k]
    return (box / (k * k)).astype(np.float32)


def constant(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    del rng
    return np.broadcast_to(images.mean(axis=(1, 2), keepdims=True), images.shape).astype(np.float32)


def black(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    del rng
    return np.full(images.shape, -1.0, np.float32)


RUINS: dict[str, Ruin] = {
    "gaussian_noise": gaussian_noise,
    "coloured_noise": coloured_noise,
    "blobs": blobs,
    "scrambled": scrambled,
    "blurred": blurred,
    "constant": constant,
    "black": black,
}
