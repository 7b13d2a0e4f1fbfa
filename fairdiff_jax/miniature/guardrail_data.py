"""What the debiasing loss's guardrails (the similarity towers, the face feature net, the training detector; built by
scripts/build_guardrails.py) learn from in the miniature world: an image's mild variants, which the guard must let
pass, its attribute-changed twin, which it must let pass at a cost, and its ruins, which it must not.

    variants = scene_variants(prompts, seed=0)   # SceneVariants: image, same_figure, other_attributes (Renders)
    wiped = face_wiped(images, boxes, rng)       # the face region blurred, filled with skin colour or scrambled
    moved = shifted(images, rng)                 # +-1 pixel
    jittered = colour_jittered(images, rng)      # slight gain / offset per channel
    identity = identity_classes(params)          # [N] int: gender x race x hair colour x face shape

Images are [N, S, S, 3] float32 in [-1, 1] throughout.
"""

import dataclasses
from typing import Sequence

import numpy as np

from fairdiff_jax.eval import ruins
from fairdiff_jax.miniature import drawing, eval_judges, world

# Drawing parameters that belong to the scene and are jittered per image (world.sample_parameters): a fresh draw of
# them, with the figure's kept, is the same prompt's scene with the same figure.
SCENE_JITTER = ("background", "pattern_color", "pattern_phase", "clothing", "snow")


@dataclasses.dataclass(frozen=True)
class SceneVariants:
    """Three renders of the same prompts, row by row.

    image: the renders. same_figure: the same figure on a re-jittered draw of the same scene (a mild variant).
    other_attributes: the same scene and figure with another gender x race class (a changed attribute).
    params: the drawing parameters of `image` (world.sample_parameters).
    """

    image: drawing.Renders
    same_figure: drawing.Renders
    other_attributes: drawing.Renders
    params: dict


def scene_variants(prompts: Sequence[str], seed: int) -> SceneVariants:
    """`SceneVariants` of `prompts` (one figure each), deterministic by seed. The other gender x race class is drawn
    uniformly among the seven the image does not have (the skin tone follows the race, the hair style the gender)."""
    rng = np.random.default_rng(seed)
    params = world.sample_parameters(prompts, rng)
    fresh = world.sample_parameters(prompts, rng)
    same_figure = {**params, **{k: fresh[k] for k in SCENE_JITTER}}
    joint = 4 * params["gender"] + params["race"]
    other = (joint + rng.integers(1, world.NUM_JOINT, len(joint))) % world.NUM_JOINT
    gender, race = other // len(world.RACES), other % len(world.RACES)
    skin = np.clip(world.SKIN_TONES[race] + rng.normal(0.0, 0.02, (len(race), 3)).astype(np.float32), 0, 1)
    changed = {**params, "gender": gender, "race": race, "skin": skin}
    return SceneVariants(world.render_parameters(params), world.render_parameters(same_figure),
                         world.render_parameters(changed), params)


def identity_classes(params: dict) -> np.ndarray:
    """[N] int64 identity class of each figure (world.sample_parameters): gender (2) x race (4) x hair colour (the 4
    young and 3 old tones of world.YOUNG_HAIR / OLD_HAIR, 7) x face shape (narrow / wide: the half-axes ratio below
    or above the middle of its range), NUM_IDENTITIES classes; what tells two world faces apart."""
    palette = np.concatenate([world.YOUNG_HAIR, world.OLD_HAIR])
    hair = np.argmin(np.square(params["hair"][:, None] - palette[None]).sum(-1), axis=1)
    ratio = params["half_axes"][:, 0] / params["half_axes"][:, 1]
    wide = (ratio > 0.78).astype(np.int64)
    return ((params["gender"] * len(world.RACES) + params["race"]) * len(palette) + hair) * 2 + wide


NUM_IDENTITIES = 2 * len(world.RACES) * (len(world.YOUNG_HAIR) + len(world.OLD_HAIR)) * 2


def shifted(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image moved by one pixel (up, down, left or right, at random), the edge row or column repeated."""
    out = np.empty_like(images)
    direction = rng.integers(4, size=len(images))
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    size = images.shape[1]
    offsets = ((0, 1), (2, 1), (1, 0), (1, 2))  # (row, column) start in `padded`
    for d, (r, c) in enumerate(offsets):
        rows = direction == d
        out[rows] = padded[rows, r:r + size, c:c + size]
    return out


def colour_jittered(images: np.ndarray, rng: np.random.Generator, gain: float = 0.06, offset: float = 0.05) -> np.ndarray:
    """Images x U(1 - gain, 1 + gain) + U(-offset, offset) per channel: a slight colour cast."""
    n = len(images)
    g = rng.uniform(1 - gain, 1 + gain, (n, 1, 1, 3)).astype(np.float32)
    b = rng.uniform(-offset, offset, (n, 1, 1, 3)).astype(np.float32)
    return np.clip(images * g + b, -1.0, 1.0)


def _face_region(boxes: np.ndarray, size: int, grow: float = 0.15) -> np.ndarray:
    """[N, S, S] bool: pixels inside each face box grown by `grow` of its size on every side."""
    margin = grow * (boxes[:, 2:] - boxes[:, :2])
    low, high = boxes[:, :2] - margin, boxes[:, 2:] + margin
    grid = np.arange(size, dtype=np.float32)
    inside_x = (grid[None] >= low[:, :1]) & (grid[None] <= high[:, :1])
    inside_y = (grid[None] >= low[:, 1:]) & (grid[None] <= high[:, 1:])
    return inside_y[:, :, None] & inside_x[:, None, :]


WIPES = ("blurred", "skin", "scrambled")


def face_wiped(images: np.ndarray, boxes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The face region (its box grown by 15%) of each image wiped, what an over-driven debiasing run draws while
    the scene survives: in equal shares over consecutive slices, blurred (ruins.blurred), filled with the colour
    at its centre (a blank skin oval: no eyes, no mouth) or its pixels shuffled. boxes: [N, 4] face boxes."""
    n, size = images.shape[:2]
    region = _face_region(boxes, size)
    kind = np.arange(n) * len(WIPES) // max(n, 1)
    wiped = np.array(images, np.float32)
    blurred = ruins.blurred(images[kind == 0], rng)
    wiped[kind == 0] = np.where(region[kind == 0, ..., None], blurred, images[kind == 0])
    centre = np.clip(np.round(0.5 * (boxes[:, :2] + boxes[:, 2:])).astype(int), 0, size - 1)
    for i in np.flatnonzero(kind == 1):
        wiped[i][region[i]] = images[i, centre[i, 1], centre[i, 0]]
    for i in np.flatnonzero(kind == 2):
        pixels = wiped[i][region[i]]
        wiped[i][region[i]] = pixels[rng.permutation(len(pixels))]
    return wiped


RUIN_KINDS = tuple(ruins.RUINS) + ("face_wiped",)


def ruined(images: np.ndarray, boxes: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """{kind: every image ruined by it} for every kind of RUIN_KINDS: each ruin of `eval.ruins`, and "face_wiped"
    (`face_wiped`; boxes [N, 4] the faces' boxes)."""
    sets = {name: ruin(images, np.random.default_rng([seed, k])) for k, (name, ruin) in enumerate(ruins.RUINS.items())}
    sets["face_wiped"] = face_wiped(images, boxes, np.random.default_rng([seed, len(ruins.RUINS)]))
    return sets


def ruin_each(images: np.ndarray, boxes: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image ruined by one kind of RUIN_KINDS, the kinds in equal shares over consecutive slices (the last
    slice face-wiped, the rest by `eval_judges.ruin_negatives`): (ruined images, kind index [N] into RUIN_KINDS)."""
    n = len(images)
    kind = np.arange(n) * len(RUIN_KINDS) // max(n, 1)
    wiped = kind == len(RUIN_KINDS) - 1
    out = np.empty_like(images, dtype=np.float32)
    out[~wiped], kind[~wiped] = eval_judges.ruin_negatives(images[~wiped], seed)
    out[wiped] = face_wiped(images[wiped], boxes[wiped], np.random.default_rng([seed, len(RUIN_KINDS)]))
    return out, kind
