"""The miniature world: a procedural, strongly biased "text-to-image" ground truth (numpy).

Every prompt names a subject (an occupation, a sport player, a personal descriptor, or just "a
person"), optionally a style, a context and attribute words. An image is a small portrait
(`IMAGE_SIZE` x `IMAGE_SIZE` RGB in [-1, 1]) of a face-like figure on the subject's scene:

  scene     the subject's background colour and pattern (plain, stripes, checker, diagonal,
            dots; at a fixed place per subject, give or take half a pixel), a prop (disc or
            square in an upper corner) and clothing colour; a context
            changes the background ("by the sea": a sea band, "in a forest": trunks and canopy,
            "in the snow": snowflakes, "at night": everything darker and bluer); a style is a
            post-process ("watercolor painting": softened and paler, "pop art portrait":
            saturated, "charcoal drawing": half desaturated, darker).
  figure    torso, neck, an oval face with two eyes, a nose and a mouth, hair; position, size,
            aspect and roll (+-15 degrees) are jittered, so the 5 landmarks (left eye, right
            eye, nose, left and right mouth corner) and the face box are known exactly.
  attributes  gender: long hair falling beside the face (female) vs short hair on top (male);
            race: skin tone (4 well separated tones); age: dark hair (young) vs grey (old).

Each subject has a fixed, strongly biased joint distribution over gender x race (joint class
j = 4 g + r, the classes of fairdiff_jax/attributes.py: gender 0 female, 1 male; race 0 White, 1 Black, 2 Indian,
3 Asian): one joint class holds 60-85% of the mass (male for 60% of the subjects, White for half),
the rest is spread at random; and a probability of "old" (15-55%). Attribute words in a prompt
("female", "asian", "old", ...) condition on that attribute.

Images are 32 x 32, not 64: the diffusion model, detector and classifiers are trained on 2 CPU
cores in minutes, and the debiasing loop differentiates through every sampling step; at 32 pixels
a face is still about 14 x 18 pixels, with every attribute plainly visible. Everything is a pure function of the module's constants and the
caller's seed; the subject tables come from `WORLD_SEED`.

    batch = render_prompts(["a photo of the face of a doctor, a person"] * 8, np.random.default_rng(0))
    batch.images  # [8, 32, 32, 3] float32 in [-1, 1]
"""

import dataclasses
import itertools
import re
from typing import Optional, Sequence

import numpy as np

from fairdiff_jax import attributes
from fairdiff_jax.prompts import article, fill_template

IMAGE_SIZE = 32
WORLD_SEED = 20231113

GENDERS = attributes.GENDER.classes
RACES = attributes.RACE.classes
AGES = attributes.AGE.classes
NUM_JOINT = len(GENDERS) * len(RACES)

# Skin tone per race, RGB in [0, 1]: far apart in every channel pair, so a style or the night
# context moves all tones together without merging two of them.
SKIN_TONES = np.array([
    [0.98, 0.78, 0.74],  # white: light, pink
    [0.33, 0.21, 0.15],  # black: dark brown
    [0.68, 0.44, 0.28],  # indian: medium brown
    [0.95, 0.84, 0.44],  # asian: light, yellow
], np.float32)
YOUNG_HAIR = np.array([[0.07, 0.05, 0.05], [0.24, 0.14, 0.07], [0.38, 0.22, 0.10], [0.42, 0.15, 0.06]], np.float32)
OLD_HAIR = np.array([[0.70, 0.70, 0.72], [0.84, 0.84, 0.84], [0.60, 0.60, 0.62]], np.float32)
EYE_COLOR = np.array([0.06, 0.05, 0.08], np.float32)
MOUTH_COLOR = np.array([0.55, 0.12, 0.14], np.float32)

# Landmarks in the face's own frame, in units of its half-width (u, right) and half-height (v, down):
# left eye, right eye, nose, left mouth corner, right mouth corner (proportions of ArcFace's template).
LANDMARK_TEMPLATE = np.array([[-0.40, -0.12], [0.40, -0.12], [0.0, 0.22], [-0.34, 0.52], [0.34, 0.52]], np.float32)

PATTERNS = ("plain", "horizontal stripes", "vertical stripes", "checker", "diagonal stripes", "dots")
PROP_SHAPES = ("none", "disc", "square")
STYLES = ("photo", "watercolor painting", "pop art portrait", "charcoal drawing")
CONTEXTS = ("", "at night", "by the sea", "in a forest", "in the snow")

OCCUPATIONS_TRAIN = (
    "doctor", "nurse", "teacher", "chef", "pilot", "engineer", "farmer", "lawyer", "baker", "painter",
    "dancer", "singer", "plumber", "carpenter", "mechanic", "librarian", "scientist", "cashier", "surgeon",
    "soldier",
)
OCCUPATIONS_VAL = ("janitor", "tailor", "dentist", "waiter")
OCCUPATIONS_TEST = ("architect", "pharmacist", "banker", "firefighter", "photographer", "judge", "gardener", "accountant")
SPORTS_TRAIN = ("tennis", "soccer", "hockey", "golf", "rugby", "cricket", "baseball", "basketball", "volleyball", "polo")
SPORTS_VAL = ("badminton", "handball", "softball")
SPORTS_TEST = ("chess", "lacrosse", "squash")
DESCRIPTORS_TRAIN = ("happy", "sad", "wealthy", "poor", "strong", "friendly", "angry", "famous", "lonely", "brave")
DESCRIPTORS_VAL = ("shy", "kind", "serious")
DESCRIPTORS_TEST = ("calm", "clever", "proud")

OCCUPATIONS = OCCUPATIONS_TRAIN + OCCUPATIONS_VAL + OCCUPATIONS_TEST
SPORTS = SPORTS_TRAIN + SPORTS_VAL + SPORTS_TEST
DESCRIPTORS = DESCRIPTORS_TRAIN + DESCRIPTORS_VAL + DESCRIPTORS_TEST

# Prompt forms (docs/method.md#prompts: the four kinds in miniature). Occupation templates keep "a {occupation}" so that
# prompts.fill_template can turn it into "an" before a vowel.
OCCUPATION_TEMPLATES_TRAIN = ("a photo of the face of a {occupation}, a person", "a portrait of a {occupation}, a person")
OCCUPATION_TEMPLATES_TEST = ("a photo of the face of a {occupation}, a person",)
SPORT_TEMPLATE = "a photo of the face of a {sport} player, a person"
DESCRIPTOR_TEMPLATE = "a photo of the face of a {descriptor} person"


@dataclasses.dataclass(frozen=True)
class Subject:
    """What a prompt is about: its scene and its attribute distribution.

    joint: [2, 4] float64, P(gender, race), sums to 1. p_old: P(age = old), independent of the rest.
    Colours are RGB in [0, 1].
    """

    kind: str  # "occupation" | "sport" | "descriptor" | "person"
    name: str
    joint: np.ndarray
    p_old: float
    background: np.ndarray
    pattern: int
    pattern_color: np.ndarray
    clothing: np.ndarray
    prop_shape: int
    prop_color: np.ndarray
    prop_corner: int  # 0: upper left, 1: upper right
    pattern_phase: np.ndarray  # [2] pixels: where the pattern starts (jittered a little per image)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV ([n] each, in [0, 1]) -> [n, 3] RGB."""
    i = np.floor(h * 6.0).astype(int) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return table[i, np.arange(len(h))].astype(np.float32)


def _biased_joint(rng: np.random.Generator, dominant: int, p_dominant: float) -> np.ndarray:
    """[2, 4]: p_dominant on joint class `dominant`, the rest spread over the other 7 at random."""
    rest = rng.dirichlet(np.ones(NUM_JOINT - 1)) * (1.0 - p_dominant)
    joint = np.insert(rest, dominant, p_dominant)
    return joint.reshape(len(GENDERS), len(RACES))


def _subject_tables() -> dict[str, Subject]:
    """Every subject of the world, keyed by name ("doctor", "tennis", "happy", "person")."""
    rng = np.random.default_rng(WORLD_SEED)
    groups = (("occupation", OCCUPATIONS), ("sport", SPORTS), ("descriptor", DESCRIPTORS))
    names = [(kind, name) for kind, members in groups for name in members]
    n = len(names)
    # Dominant joint classes: 60% male; White dominant for half, each other race for a sixth (as
    # SD v1-5's occupations lean); shuffled jointly over all subjects.
    genders = np.resize([1, 1, 1, 0, 0], n)
    races = np.resize([0, 1, 0, 2, 0, 3], n)
    dominant = rng.permutation(4 * genders + races)
    p_dominant = rng.uniform(0.6, 0.85, n)
    p_old = rng.uniform(0.15, 0.55, n)
    # Scene colours: any hue, clearly saturated, so no background looks like skin or hair.
    background = _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0.5, 0.85, n), rng.uniform(0.5, 0.9, n))
    pattern_color = _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0.3, 0.9, n), rng.uniform(0.3, 1.0, n))
    clothing = _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0.4, 0.9, n), rng.uniform(0.2, 0.9, n))
    prop_color = _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0.6, 1.0, n), rng.uniform(0.6, 1.0, n))
    patterns = rng.integers(0, len(PATTERNS), n)
    prop_shapes = rng.integers(0, len(PROP_SHAPES), n)
    prop_corners = rng.integers(0, 2, n)
    # A fixed pattern position per subject: the scene is then mostly a function of the prompt.
    pattern_phases = rng.uniform(0, IMAGE_SIZE, (n, 2)).astype(np.float32)
    subjects = {}
    for i, (kind, name) in enumerate(names):
        subjects[name] = Subject(
            kind, name, _biased_joint(rng, int(dominant[i]), float(p_dominant[i])), float(p_old[i]),
            background[i], int(patterns[i]), pattern_color[i], clothing[i], int(prop_shapes[i]), prop_color[i],
            int(prop_corners[i]), pattern_phases[i],
        )
    # "a person" with no other subject: White male leaning, plain grey-blue room.
    subjects["person"] = Subject(
        "person", "person", _biased_joint(rng, 4, 0.45), 0.3, np.array([0.45, 0.5, 0.6], np.float32), 0,
        np.array([0.5, 0.5, 0.5], np.float32), np.array([0.3, 0.3, 0.35], np.float32), 0,
        np.zeros(3, np.float32), 0, np.zeros(2, np.float32),
    )
    return subjects


SUBJECTS = _subject_tables()


# ----------------------------------------------------------------------------------------------
# Prompts


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """A parsed prompt: subject, style, context, and the attributes its words fix (None: free)."""

    subject: Subject
    style: str = "photo"
    context: str = ""
    gender: Optional[int] = None
    race: Optional[int] = None
    age: Optional[int] = None


_STYLE_WORDS = {"photo": "photo", "portrait": "photo", "watercolor": "watercolor painting", "pop": "pop art portrait",
                "charcoal": "charcoal drawing"}
_CONTEXT_PATTERNS = {c: re.compile(r"\b" + c + r"\b") for c in CONTEXTS if c}


def parse_prompt(prompt: str) -> PromptSpec:
    """Reads a prompt of the world's forms (case and punctuation ignored). Raises ValueError, naming
    the prompt, when it names no subject or several."""
    text = prompt.lower()
    words = re.findall(r"[a-z]+", text)
    found = [w for w in words if w in SUBJECTS and w != "person"]
    if len(set(found)) > 1:
        raise ValueError(f"prompt {prompt!r} names several subjects: {sorted(set(found))}")
    if not found and "person" not in words:
        raise ValueError(f"prompt {prompt!r} names no subject of the miniature world (occupation, sport, descriptor, person)")
    subject = SUBJECTS[found[0] if found else "person"]
    style = next((_STYLE_WORDS[w] for w in words if w in _STYLE_WORDS), "photo")
    context = next((c for c, pattern in _CONTEXT_PATTERNS.items() if pattern.search(text)), "")
    # "black" and "white" name races only as attribute words, never inside a context or style phrase.
    pick = lambda names: next((names.index(w) for w in words if w in names), None)  # noqa: E731
    return PromptSpec(subject, style, context, pick(("female", "male")), pick(RACES), pick(AGES))


def joint_distribution(spec: PromptSpec) -> np.ndarray:
    """[2, 4] P(gender, race) of a prompt: the subject's, conditioned on the attribute words."""
    joint = spec.subject.joint.copy()
    if spec.gender is not None:
        joint[1 - spec.gender] = 0.0
    if spec.race is not None:
        joint[:, np.arange(len(RACES)) != spec.race] = 0.0
    return joint / joint.sum()


def old_probability(spec: PromptSpec) -> float:
    """P(age = old) of a prompt: the subject's, or 0 / 1 when the prompt says "young" / "old"."""
    return spec.subject.p_old if spec.age is None else float(spec.age)


def style_context_prompt(style: str, occupation: str, context: str) -> str:
    """'a watercolor painting of the face of a doctor at night' (no context: ends at the occupation)."""
    prompt = f"{article(style)} {style} of the face of {article(occupation)} {occupation}"
    return f"{prompt} {context}" if context else prompt


def attribute_prompt(subject: str, gender: Optional[int], race: Optional[int], age: Optional[int]) -> str:
    """A prompt that fixes some attributes, e.g. 'a photo of the face of an old female asian doctor'
    (for training the generator: it learns what the attribute words look like)."""
    words = [AGES[age]] if age is not None else []
    words += [GENDERS[gender]] if gender is not None else []
    words += [RACES[race]] if race is not None else []
    kind = SUBJECTS[subject].kind
    noun = {"occupation": subject, "sport": f"{subject} player", "descriptor": f"{subject} person", "person": "person"}[kind]
    phrase = " ".join(words + [noun])
    return f"a photo of the face of {article(phrase)} {phrase}"


def prompt_sets() -> dict[str, dict[str, list[str]]]:
    """The four prompt files (docs/method.md#prompts) for this world, {kind: {key: prompts}} (build_miniature writes them to assets/miniature/prompts/)."""
    style_rng = np.random.default_rng(WORLD_SEED + 1)
    combos = [(style, context) for style in STYLES for context in CONTEXTS if (style, context) != ("photo", "")]

    def style_prompts(occupations: Sequence[str], count: int) -> list[str]:
        """`count` prompts: occupations in turn, style x context combinations in a fresh random order."""
        picks = itertools.cycle([combos[k] for k in style_rng.permutation(len(combos))])
        return [style_context_prompt(style, occupations[i % len(occupations)], context)
                for i, (style, context) in zip(range(count), picks)]

    def listed(template: str, field: str, names: Sequence[str]) -> list[str]:
        return [template.format(**{field: name}) for name in names]

    return {
        "occupation": {
            "prompt_templates_train": list(OCCUPATION_TEMPLATES_TRAIN),
            "prompt_templates_test": list(OCCUPATION_TEMPLATES_TEST),
            "occupations_train_set": list(OCCUPATIONS_TRAIN),
            "occupations_val_set": list(OCCUPATIONS_VAL),
            "test_prompts": [fill_template(OCCUPATION_TEMPLATES_TEST[0], o) for o in OCCUPATIONS_TEST],
        },
        "occupation_w_style_and_context": {
            "train_prompts": style_prompts(OCCUPATIONS_TRAIN, 24),
            "val_prompts": style_prompts(OCCUPATIONS_VAL, 4),
            "test_prompts": style_prompts(OCCUPATIONS_TEST, 8),
        },
        "personal_descriptor": {
            "train_prompts": listed(DESCRIPTOR_TEMPLATE, "descriptor", DESCRIPTORS_TRAIN),
            "val_prompts": listed(DESCRIPTOR_TEMPLATE, "descriptor", DESCRIPTORS_VAL),
            "test_prompts": listed(DESCRIPTOR_TEMPLATE, "descriptor", DESCRIPTORS_TEST),
        },
        "sports": {
            "train_prompts": listed(SPORT_TEMPLATE, "sport", SPORTS_TRAIN),
            "val_prompts": listed(SPORT_TEMPLATE, "sport", SPORTS_VAL),
            "test_prompts": listed(SPORT_TEMPLATE, "sport", SPORTS_TEST),
        },
    }


def vocabulary() -> list[str]:
    """Every word the world's prompts can hold (for a word-level tokenizer), sorted."""
    phrases = (OCCUPATION_TEMPLATES_TRAIN + OCCUPATION_TEMPLATES_TEST + (SPORT_TEMPLATE, DESCRIPTOR_TEMPLATE)
               + STYLES + CONTEXTS + tuple(SUBJECTS) + GENDERS + RACES + AGES + ("a", "an", "player", "of the face of"))
    return sorted({w for phrase in phrases for w in re.findall(r"[a-z]+", re.sub(r"\{\w+\}", "", phrase))})


# ----------------------------------------------------------------------------------------------
# Drawing (vectorised over the batch: every layer is a soft mask [N, S, S] composited at once)


@dataclasses.dataclass(frozen=True)
class Renders:
    """A batch of world images and their ground truth.

    images: [N, S, S, 3] float32 in [-1, 1].
    has_face: [N] bool (False: background-only render).
    gender, race, age: [N] int (-1 where there is no face).
    boxes: [N, 4] float32 (x1, y1, x2, y2): the tight box of the face oval (-1 without a face).
    landmarks: [N, 5, 2] float32 (x, y): left eye, right eye, nose, left and right mouth corner.
    Coordinates are pixel-index coordinates: the centre of pixel (row r, column c) is (c, r).
    """

    images: np.ndarray
    has_face: np.ndarray
    gender: np.ndarray
    race: np.ndarray
    age: np.ndarray
    boxes: np.ndarray
    landmarks: np.ndarray


def concatenate(parts: Sequence[Renders]) -> Renders:
    """The renders of `parts`, one after the other."""
    return Renders(**{f: np.concatenate([getattr(r, f) for r in parts]) for f in Renders.__dataclass_fields__})


def face_landmarks(center: np.ndarray, half_axes: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """[N, 5, 2] landmark positions of faces with centre [N, 2], half-axes (a, b) [N, 2] and roll [N] radians."""
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    u = LANDMARK_TEMPLATE[None, :, 0] * half_axes[:, :1]
    v = LANDMARK_TEMPLATE[None, :, 1] * half_axes[:, 1:]
    return np.stack([center[:, :1] + cos * u - sin * v, center[:, 1:] + sin * u + cos * v], axis=-1).astype(np.float32)


def face_boxes(center: np.ndarray, half_axes: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """[N, 4] tight axis-aligned boxes of the rotated face ovals."""
    a, b = half_axes[:, 0], half_axes[:, 1]
    cos2, sin2 = np.cos(angle) ** 2, np.sin(angle) ** 2
    extent = np.stack([np.sqrt(a * a * cos2 + b * b * sin2), np.sqrt(a * a * sin2 + b * b * cos2)], axis=1)
    return np.concatenate([center - extent, center + extent], axis=1).astype(np.float32)


def _soft(signed_distance: np.ndarray) -> np.ndarray:
    """Coverage of a pixel by a shape from its centre's signed distance (pixels) to the edge."""
    return np.clip(0.5 - signed_distance, 0.0, 1.0)


def _ellipse_distance(u: np.ndarray, v: np.ndarray, a, b) -> np.ndarray:
    """Approximate signed distance (pixels) to an axis-aligned ellipse with half-axes a, b at (u, v) offsets."""
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    gradient = np.sqrt((u / (a * a)) ** 2 + (v / (b * b)) ** 2) / np.maximum(r, 1e-6)
    return (r - 1.0) / np.maximum(gradient, 1e-6)


def _paint(canvas: np.ndarray, alpha: np.ndarray, color: np.ndarray) -> np.ndarray:
    """canvas [N, S, S, 3], alpha [N, S, S], color [N, 3] or [3] -> composited canvas."""
    alpha = alpha[..., None]
    return canvas * (1.0 - alpha) + np.asarray(color, np.float32).reshape(-1, 1, 1, 3) * alpha


def _by_kind(kind: np.ndarray, functions: Sequence, shape: tuple, *args) -> np.ndarray:
    """out[i] = functions[kind[i]](*(a[i] for a in args)), each function run once on its own rows."""
    out = np.zeros(shape, np.float32)
    for k, function in enumerate(functions):
        rows = np.flatnonzero(kind == k)
        if rows.size:
            out[rows] = function(*(a[rows] for a in args))
    return out


def _pattern_mask(kind: np.ndarray, x: np.ndarray, y: np.ndarray, phase: np.ndarray, period: float) -> np.ndarray:
    """[N, S, S] in [0, 1]: where the background's pattern colour shows. kind [N] indexes PATTERNS."""
    k = 2 * np.pi / period
    px = x + phase[:, 0, None, None]  # [N, 1, S]
    py = y + phase[:, 1, None, None]  # [N, S, 1]
    sharpen = lambda t: np.clip(0.5 + 2.0 * t, 0.0, 1.0)  # noqa: E731
    patterns = (
        lambda px, py: np.zeros(np.broadcast_shapes(px.shape, py.shape)),
        lambda px, py: sharpen(np.sin(k * py)) + 0 * px,
        lambda px, py: sharpen(np.sin(k * px)) + 0 * py,
        lambda px, py: sharpen(np.sin(k * px) * np.sin(k * py)),
        lambda px, py: sharpen(np.sin(k * (px + py) / np.sqrt(2))),
        lambda px, py: sharpen(np.cos(k * px) * np.cos(k * py) - 0.6),
    )
    return _by_kind(kind, patterns, (len(kind), y.shape[1], x.shape[2]), px, py)


def _blur(images: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur with edge replication; images [N, S, S, 3]."""
    for axis in (1, 2):
        padded = np.concatenate([np.take(images, [0], axis), images, np.take(images, [-1], axis)], axis)
        n = images.shape[axis]
        images = (np.take(padded, range(0, n), axis) + 2 * np.take(padded, range(1, n + 1), axis)
                  + np.take(padded, range(2, n + 2), axis)) / 4
    return images


def _apply_style(images: np.ndarray, style: np.ndarray) -> np.ndarray:
    """Per-image STYLES post-process of [N, S, S, 3] images in [0, 1]."""
    grey = lambda im: im.mean(axis=-1, keepdims=True)  # noqa: E731
    styles = (
        lambda im: im,
        lambda im: 0.88 * _blur(im) + 0.12,
        lambda im: np.clip(grey(im) + 1.7 * (im - grey(im)), 0.0, 1.0),
        lambda im: 0.85 * (grey(im) + 0.5 * (im - grey(im))),
    )
    return _by_kind(style, styles, images.shape, images)


NUM_SNOWFLAKES = 14


def _draw(p: dict, size: int) -> np.ndarray:
    """Images [N, S, S, 3] in [0, 1] from the per-image parameters `p` (see `_sample_parameters`)."""
    n = len(p["has_face"])
    grid = np.arange(size, dtype=np.float32)
    x, y = grid[None, None, :], grid[None, :, None]  # pixel-index coordinates, broadcast to [N, S, S]
    col = lambda a: np.asarray(a, np.float32)[:, None, None]  # noqa: E731

    # Scene: background and pattern, context scenery, prop.
    canvas = np.broadcast_to(p["background"][:, None, None, :], (n, size, size, 3)).astype(np.float32)
    # Patterns coarser than the latent grid (8 pixels a latent cell at most) and half-strength.
    pattern = _pattern_mask(p["pattern"], x, y, p["pattern_phase"], size / 3.0)
    canvas = _paint(canvas, 0.6 * pattern, p["pattern_color"])
    context = p["context"]
    sea = _soft(0.72 * size + 0.6 * np.sin(x * 1.3 + col(p["pattern_phase"][:, 0])) - y)
    canvas = _paint(canvas, sea * col(context == 2), [0.10, 0.33, 0.70])
    trunks = _soft(np.minimum(np.abs(x - 0.07 * size), np.abs(x - 0.93 * size)) - 0.06 * size)
    canopy = _soft(y - 0.14 * size + 0.8 * np.cos(x * 0.9))
    canvas = _paint(canvas, trunks * col(context == 3), [0.30, 0.19, 0.09])
    canvas = _paint(canvas, canopy * col(context == 3), [0.10, 0.42, 0.14])
    snowy = np.flatnonzero(context == 4)
    snow = p["snow"][snowy]
    flakes = np.sqrt((x[..., None] - snow[:, None, None, :, 0]) ** 2 + (y[..., None] - snow[:, None, None, :, 1]) ** 2)
    canvas[snowy] = _paint(canvas[snowy], _soft(flakes.min(axis=-1) - 0.045 * size), [0.97, 0.97, 1.0])
    corner_x = np.where(p["prop_corner"] == 0, 0.13 * size, 0.87 * size)
    prop_dx, prop_dy = np.abs(x - col(corner_x)), np.abs(y - 0.13 * size)
    radius = 0.085 * size
    prop = np.where(col(p["prop_shape"] == 1), _soft(np.sqrt(prop_dx ** 2 + prop_dy ** 2) - radius),
                    _soft(np.maximum(prop_dx, prop_dy) - radius)) * col(p["prop_shape"] > 0)
    canvas = _paint(canvas, prop, p["prop_color"])

    # Figure, back to front. Face frame: u along the face's width, v down its height (pixels).
    face = col(p["has_face"])
    cx, cy = col(p["center"][:, 0]), col(p["center"][:, 1])
    a, b = col(p["half_axes"][:, 0]), col(p["half_axes"][:, 1])
    cos, sin = col(np.cos(p["angle"])), col(np.sin(p["angle"]))
    u, v = cos * (x - cx) + sin * (y - cy), -sin * (x - cx) + cos * (y - cy)
    torso = _soft(_ellipse_distance(x - cx, y - (cy + 2.3 * b), 2.3 * a, 1.15 * b))
    canvas = _paint(canvas, torso * face, p["clothing"])
    long_hair = np.minimum(_ellipse_distance(u, v + 0.05 * b, 1.25 * a, 1.2 * b),
                           np.maximum(np.abs(u) - 1.22 * a, np.abs(v - 0.6 * b) - 0.85 * b))
    canvas = _paint(canvas, _soft(long_hair) * face * col(p["gender"] == 0), p["hair"])
    neck = _soft(np.maximum(np.abs(x - cx) - 0.38 * a, np.abs(y - (cy + 1.3 * b)) - 0.6 * b))
    canvas = _paint(canvas, neck * face, 0.85 * p["skin"])
    canvas = _paint(canvas, _soft(_ellipse_distance(u, v, a, b)) * face, p["skin"])
    cap = np.maximum(_ellipse_distance(u, v + 0.06 * b, 1.12 * a, 1.12 * b), v + 0.42 * b)
    canvas = _paint(canvas, _soft(cap) * face, p["hair"])
    marks = p["landmarks"]
    dist = lambda k: np.sqrt((x - col(marks[:, k, 0])) ** 2 + (y - col(marks[:, k, 1])) ** 2)  # noqa: E731
    canvas = _paint(canvas, _soft(dist(2) - np.maximum(0.1 * a, 0.45)) * face, 0.72 * p["skin"])
    eye_radius = np.maximum(0.16 * a, 0.75)
    canvas = _paint(canvas, _soft(np.minimum(dist(0), dist(1)) - eye_radius) * face, EYE_COLOR)
    # Mouth: the segment between the mouth corners.
    left, right = marks[:, 3], marks[:, 4]
    seg = right - left
    t = ((x - col(left[:, 0])) * col(seg[:, 0]) + (y - col(left[:, 1])) * col(seg[:, 1])) / col((seg ** 2).sum(1))
    t = np.clip(t, 0.0, 1.0)
    mouth = np.sqrt((x - col(left[:, 0]) - t * col(seg[:, 0])) ** 2 + (y - col(left[:, 1]) - t * col(seg[:, 1])) ** 2)
    canvas = _paint(canvas, _soft(mouth - np.maximum(0.07 * b, 0.45)) * face, MOUTH_COLOR)

    # Lighting and style.
    night = (context == 1)[:, None, None, None]
    canvas = np.where(night, 0.7 * canvas + np.array([0.0, 0.02, 0.08], np.float32), canvas)
    return np.clip(_apply_style(canvas, p["style"]), 0.0, 1.0)


def _sample_parameters(specs: Sequence[PromptSpec], rng: np.random.Generator, size: int, has_face: np.ndarray) -> dict:
    """Per-image drawing parameters (arrays over the batch) and ground truth for parsed prompts."""
    n = len(specs)
    subjects = [s.subject for s in specs]
    joint = np.stack([joint_distribution(s).ravel() for s in specs])
    joint_class = np.minimum((rng.uniform(size=(n, 1)) > np.cumsum(joint, axis=1)).sum(axis=1), NUM_JOINT - 1)
    gender, race = joint_class // len(RACES), joint_class % len(RACES)
    age = (rng.uniform(size=n) < np.array([old_probability(s) for s in specs])).astype(np.int64)
    young_hair = YOUNG_HAIR[rng.integers(0, len(YOUNG_HAIR), n)]
    old_hair = OLD_HAIR[rng.integers(0, len(OLD_HAIR), n)]
    jitter = lambda scale: rng.normal(0.0, scale, (n, 3)).astype(np.float32)  # noqa: E731
    half_h = size * rng.uniform(0.19, 0.26, n)
    half_axes = np.stack([half_h * rng.uniform(0.72, 0.84, n), half_h], axis=1).astype(np.float32)
    center = np.stack([size * rng.uniform(0.36, 0.64, n), size * rng.uniform(0.34, 0.50, n)], axis=1).astype(np.float32)
    angle = np.deg2rad(rng.uniform(-15.0, 15.0, n)).astype(np.float32)
    scene = lambda field: np.stack([getattr(s, field) for s in subjects])  # noqa: E731
    return {
        "has_face": has_face,
        "gender": gender, "race": race, "age": age,
        "skin": np.clip(SKIN_TONES[race] + jitter(0.02), 0, 1),
        "hair": np.clip(np.where(age[:, None] == 1, old_hair, young_hair) + jitter(0.02), 0, 1),
        "center": center, "half_axes": half_axes, "angle": angle,
        "landmarks": face_landmarks(center, half_axes, angle),
        "boxes": face_boxes(center, half_axes, angle),
        "background": np.clip(scene("background") + jitter(0.03), 0, 1),
        "pattern": scene("pattern"),
        "pattern_color": np.clip(scene("pattern_color") + jitter(0.03), 0, 1),
        "pattern_phase": (scene("pattern_phase") * size / IMAGE_SIZE + rng.normal(0, 0.5, (n, 2))).astype(np.float32),
        "clothing": np.clip(scene("clothing") + jitter(0.03), 0, 1),
        "prop_shape": scene("prop_shape"),
        "prop_color": scene("prop_color"),
        "prop_corner": scene("prop_corner"),
        "snow": rng.uniform(0, size, (n, NUM_SNOWFLAKES, 2)).astype(np.float32),
        "style": np.array([STYLES.index(s.style) for s in specs]),
        "context": np.array([CONTEXTS.index(s.context) for s in specs]),
    }


def render_prompts(prompts: Sequence[str], rng: np.random.Generator, size: int = IMAGE_SIZE,
                   has_face: Optional[np.ndarray] = None, chunk: int = 1024) -> Renders:
    """One image per prompt. has_face: [N] bool (default all True); False draws the scene alone.

    Every random choice is made up front from `rng`, so the result does not depend on `chunk`.
    """
    parsed = {prompt: parse_prompt(prompt) for prompt in dict.fromkeys(prompts)}
    specs = [parsed[prompt] for prompt in prompts]
    has_face = np.ones(len(prompts), bool) if has_face is None else np.asarray(has_face, bool)
    p = _sample_parameters(specs, rng, size, has_face)
    images = np.concatenate([
        _draw({k: v[start:start + chunk] for k, v in p.items()}, size) for start in range(0, len(prompts), chunk)
    ]) if len(prompts) else np.zeros((0, size, size, 3), np.float32)
    no_face = ~has_face
    fill = lambda a: np.where(no_face.reshape((-1,) + (1,) * (a.ndim - 1)), -1, a)  # noqa: E731
    return Renders(
        images=(2.0 * images - 1.0).astype(np.float32),
        has_face=has_face,
        gender=fill(p["gender"]), race=fill(p["race"]), age=fill(p["age"]),
        boxes=fill(p["boxes"]).astype(np.float32), landmarks=fill(p["landmarks"]).astype(np.float32),
    )


def sample(prompt: str, rng: np.random.Generator, size: int = IMAGE_SIZE):
    """One image of `prompt` -> (image [S, S, 3] in [-1, 1], {'gender', 'race', 'age'}: int,
    box [4], landmarks [5, 2])."""
    r = render_prompts([prompt], rng, size)
    return r.images[0], {"gender": int(r.gender[0]), "race": int(r.race[0]), "age": int(r.age[0])}, r.boxes[0], r.landmarks[0]


# The generator's training mix over prompt forms (shares of images).
TRAINING_MIX = {"occupation": 0.3, "style_context": 0.2, "descriptor": 0.12, "sport": 0.12, "person": 0.04,
                "attribute_words": 0.22}


def training_prompts(n: int, rng: np.random.Generator) -> list[str]:
    """n prompts drawn from every form the world knows, with `TRAINING_MIX` shares: all subjects
    (train, val and test ones: the generator is the "pretrained" model that knows every word),
    every template, random style x context combinations, and prompts with attribute words."""
    forms = list(TRAINING_MIX)
    form = rng.choice(len(forms), n, p=np.array(list(TRAINING_MIX.values())))
    templates = OCCUPATION_TEMPLATES_TRAIN + OCCUPATION_TEMPLATES_TEST
    subjects = [name for name in SUBJECTS]
    prompts = []
    for f in form:
        kind = forms[f]
        if kind == "occupation":
            prompts.append(fill_template(templates[rng.integers(len(templates))], OCCUPATIONS[rng.integers(len(OCCUPATIONS))]))
        elif kind == "style_context":
            style = STYLES[rng.integers(len(STYLES))]
            context = CONTEXTS[rng.integers(1 if style == "photo" else 0, len(CONTEXTS))]
            prompts.append(style_context_prompt(style, OCCUPATIONS[rng.integers(len(OCCUPATIONS))], context))
        elif kind == "descriptor":
            prompts.append(DESCRIPTOR_TEMPLATE.format(descriptor=DESCRIPTORS[rng.integers(len(DESCRIPTORS))]))
        elif kind == "sport":
            prompts.append(SPORT_TEMPLATE.format(sport=SPORTS[rng.integers(len(SPORTS))]))
        elif kind == "person":
            prompts.append("a photo of the face of a person")
        else:
            fixed = rng.uniform(size=3) < 0.5
            gender, race, age = (int(rng.integers(k)) if keep else None
                                 for keep, k in zip(fixed, (len(GENDERS), len(RACES), len(AGES))))
            prompts.append(attribute_prompt(subjects[rng.integers(len(subjects))], gender, race, age))
    return prompts


def dataset(n: int, seed: int, size: int = IMAGE_SIZE) -> tuple[list[str], Renders]:
    """n (prompt, image) training pairs of the world's mix (`training_prompts`), deterministic by seed."""
    rng = np.random.default_rng(seed)
    prompts = training_prompts(n, rng)
    return prompts, render_prompts(prompts, rng, size)


def background_renders(n: int, seed: int, size: int = IMAGE_SIZE) -> Renders:
    """n images of the world's scenes with no figure (has_face False), deterministic by seed."""
    rng = np.random.default_rng(seed)
    prompts = training_prompts(n, rng)
    return render_prompts(prompts, rng, size, has_face=np.zeros(n, bool))
