"""The miniature world's evaluation judges: the data they learn from and how they are measured.

Two judges, independent of the networks the debiasing loss uses (scripts/build_eval_judges.py trains them):

- an evaluation face detector (`detector.DetectorNet`, another seed and data draw than the training detector),
  trained with HARD NEGATIVES: every ruin of `eval.ruins` (noise, coloured noise, blobs, scrambled faces,
  blurred, constant and black images) applied to world renders, as well as face-less scenes, so that a
  destroyed image is not counted as a face; its face-probability threshold is chosen on held-out data
  (`choose_threshold`) and stored in the file.
- a scene classifier (torchvision mobilenet_v3_large, heads subject / style / context, `SCENE_HEADS`) trained on
  world renders of every gender x race combination. Each head has one class more than the world: `NO_SCENE`,
  the label of ruined images, so that a ruin is not read as the closest scene (and its pooled features, the
  fidelity metric's feature space, lie apart from every real scene's).

    prompts, renders = judge_dataset(1000, seed=0)           # 40% the world's mix, 60% every style x context
    negatives = ruin_negatives(renders, seed=0)              # drawing.Renders, has_face False, one ruin per image
    labels = scene_labels(prompts)                           # {head: [N] int}
    threshold = choose_threshold(face_probs, {"blobs": probs, ...}, max_false_positive_rate=0.01)
"""

from typing import Callable, Sequence

import numpy as np

from fairdiff_jax.eval import ruins
from fairdiff_jax.miniature import drawing, reference, world

NO_SCENE = "(no scene)"
SCENE_HEADS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("subject", tuple(world.SUBJECTS) + (NO_SCENE,)),
    ("style", world.STYLES + (NO_SCENE,)),
    ("context", world.CONTEXTS + (NO_SCENE,)),
)


# The share of a judge's data drawn with every style x context combination equally often (the rest follows the
# world's own mix, which is ~80% photos without context): the judges must read a watercolour night scene as
# surely as a photo, since the before/after tables score prompts of every style and context.
BALANCED_SHARE = 0.6


def judge_prompts(n: int, rng: np.random.Generator, balanced_share: float = BALANCED_SHARE) -> list[str]:
    """n prompts in random order: round(balanced_share * n) of them cycle through every (style, context) of the
    world (photo without context included) with a random occupation, the rest are `world.training_prompts`
    (every subject and prompt form)."""
    num_balanced = int(round(balanced_share * n))
    combos = [(style, context) for style in world.STYLES for context in world.CONTEXTS]
    occupations = rng.integers(len(world.OCCUPATIONS), size=num_balanced)
    balanced = [world.style_context_prompt(combos[i % len(combos)][0], world.OCCUPATIONS[o], combos[i % len(combos)][1])
                for i, o in enumerate(occupations)]
    prompts = world.training_prompts(n - num_balanced, rng) + balanced
    return [prompts[i] for i in rng.permutation(n)]


def judge_dataset(n: int, seed: int, with_faces: bool = True) -> tuple[list[str], drawing.Renders]:
    """n (prompt, render) pairs of `judge_prompts` (with_faces False: the same scenes with no figure),
    deterministic by seed."""
    rng = np.random.default_rng(seed)
    prompts = judge_prompts(n, rng)
    return prompts, world.render_prompts(prompts, rng, has_face=None if with_faces else np.zeros(n, bool))


def scene_labels(prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """{head: [N] int64 class index in SCENE_HEADS} of the scene each prompt asks for (`reference.scene_truth`)."""
    truths = {p: reference.scene_truth(p) for p in dict.fromkeys(prompts)}
    return {head: np.array([classes.index(truths[p][head]) for p in prompts], np.int64) for head, classes in SCENE_HEADS}


def no_scene_labels(n: int) -> dict[str, np.ndarray]:
    """{head: [n] int64}: the NO_SCENE class of every head (the label of a ruined image)."""
    return {head: np.full(n, classes.index(NO_SCENE), np.int64) for head, classes in SCENE_HEADS}


def without_faces(images: np.ndarray) -> drawing.Renders:
    """Images [N, S, S, 3] as face-less renders (has_face False, -1 ground truth): detector negatives."""
    n = len(images)
    return drawing.Renders(images=images.astype(np.float32), has_face=np.zeros(n, bool), gender=np.full(n, -1),
                         race=np.full(n, -1), age=np.full(n, -1), boxes=np.full((n, 4), -1, np.float32),
                         landmarks=np.full((n, 5, 2), -1, np.float32))


def ruin_negatives(images: np.ndarray, seed: int, kinds: Sequence[str] = tuple(ruins.RUINS)) -> tuple[np.ndarray, np.ndarray]:
    """Every image ruined by one ruin kind, the kinds in equal shares over consecutive slices:
    (ruined images [N, S, S, 3] float32 in [-1, 1], kind index [N] into `kinds`). Deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    kind = np.arange(len(images)) * len(kinds) // max(len(images), 1)
    out = np.empty_like(images, dtype=np.float32)
    for k, name in enumerate(kinds):
        rows = kind == k
        if rows.any():
            out[rows] = ruins.RUINS[name](images[rows], rng)
    return out, kind


def choose_threshold(face_probs: np.ndarray, negative_probs: dict[str, np.ndarray],
                     max_false_positive_rate: float = 0.01, max_miss_rate: float = 0.01) -> float:
    """A face-probability threshold from held-out data: every negative kind must stay at or below
    `max_false_positive_rate` (a quantile of each kind's probabilities), and, where the faces allow it, the
    threshold sits halfway between that and the `max_miss_rate` quantile of the faces' probabilities (room on
    both sides for images unlike the held-out ones). Rejecting non-faces comes first: when the two overlap, the
    negatives' bound wins."""
    negative_bound = max(float(np.quantile(p, 1.0 - max_false_positive_rate)) for p in negative_probs.values())
    face_bound = float(np.quantile(face_probs, max_miss_rate))
    return 0.5 * (negative_bound + face_bound) if face_bound > negative_bound else negative_bound


def detector_report(face_probability: Callable[[np.ndarray], np.ndarray], threshold: float,
                    faces: dict[str, np.ndarray], negatives: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """{"recall": {set: share of face images found}, "false_positive_rate": {set: share of non-face images called a
    face}} for named image sets [N, S, S, 3] (e.g. held-out renders, their VAE reconstructions, each ruin kind)."""
    rate = lambda images: round(float((face_probability(images) > threshold).mean()), 4)  # noqa: E731
    return {"recall": {name: rate(images) for name, images in faces.items()},
            "false_positive_rate": {name: rate(images) for name, images in negatives.items()}}


def scene_report(predict: Callable[[np.ndarray], dict[str, np.ndarray]], images: np.ndarray,
                 labels: dict[str, np.ndarray]) -> dict[str, float]:
    """{head: accuracy} of `predict` (images -> {head: [N] class index}) against `labels`, and "all": the share
    of images with every head right."""
    predicted = predict(images)
    right = {head: np.asarray(predicted[head]) == labels[head] for head, _ in SCENE_HEADS}
    report = {head: round(float(r.mean()), 4) for head, r in right.items()}
    report["all"] = round(float(np.mean(np.all(list(right.values()), axis=0))), 4)
    return report
