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
from fairdiff_jax.miniature.drawing import NUM_SNOWFLAKES, Renders, draw, face_boxes, face_landmarks
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
    return render_parameters(sample_parameters(prompts, rng, size, has_face), size, chunk)


def sample_parameters(prompts: Sequence[str], rng: np.random.Generator, size: int = IMAGE_SIZE,
                      has_face: Optional[np.ndarray] = None) -> dict:
    """The per-image drawing parameters and ground truth of `render_prompts` (arrays over the batch), for callers
    that redraw one image with a part of it changed (the same figure on a re-jittered scene, another gender)."""
    parsed = {prompt: parse_prompt(prompt) for prompt in dict.fromkeys(prompts)}
    specs = [parsed[prompt] for prompt in prompts]
    has_face = np.ones(len(prompts), bool) if has_face is None else np.asarray(has_face, bool)
    return _sample_parameters(specs, rng, size, has_face)


def render_parameters(p: dict, size: int = IMAGE_SIZE, chunk: int = 1024) -> Renders:
    """The images and ground truth drawn from `sample_parameters`' output."""
    n = len(p["has_face"])
    images = np.concatenate([
        draw({k: v[start:start + chunk] for k, v in p.items()}, size) for start in range(0, n, chunk)
    ]) if n else np.zeros((0, size, size, 3), np.float32)
    no_face = ~p["has_face"]
    fill = lambda a: np.where(no_face.reshape((-1,) + (1,) * (a.ndim - 1)), -1, a)  # noqa: E731
    return Renders(
        images=(2.0 * images - 1.0).astype(np.float32),
        has_face=p["has_face"],
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
