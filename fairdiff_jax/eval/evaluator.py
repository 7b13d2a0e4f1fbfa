"""The one evaluator: what training's periodic evaluation, `python -m fairdiff_jax.evaluate` and
`python -m fairdiff_jax.before_after` measure on a set of images of one prompt.

    evaluator = Evaluator(detector, "mtcnn", classifiers, fidelity_tower=..., consistency=...)
    per_image = evaluator.judge(images, prompt)                       # {found, boxes, <attr>_logits, ...}
    results = PromptResults.from_rows(names, per_image)
    row = prompt_metrics(results, reference_features=evaluator.features(reference_images))

Per image: the evaluation detector's largest face, the attribute classifiers' logits on its chip, whether the
image is degenerate (`face_analysis`), the fidelity tower's features, the consistency judge's score. Per prompt
(`prompt_metrics`): face share, bias over the images with a face, fidelity (improved precision / recall against
the prompt's reference set), consistency, and CLIP-I / DINO to paired references when measured.
"""

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from fairdiff_jax import attributes
from fairdiff_jax.eval import bias as bias_lib
from fairdiff_jax.eval import face_analysis, fidelity
from fairdiff_jax.eval.folders import Fields, fingerprint
from fairdiff_jax.eval.similarity import ImageTower, SimilarityNets
from fairdiff_jax.judging import detection

# The attributes whose bias the tables report by default, jointly too (experiment 5); a config's evaluator reports
# its debiased attributes (config.target.attributes). With an age head, the old share is reported as well.
BIAS_ATTRIBUTES = ("gender", "race")


@dataclasses.dataclass(frozen=True, eq=False)
class Evaluator:
    """The evaluation's judges and settings.

    detector: the evaluation detector (it should reject non-faces); detector_id names it in cache keys.
    classifiers: face-chip attribute classifiers (their heads must include every one of bias_attributes).
    bias_attributes: the attributes whose bias (each, and jointly) the rows report, in joint-class order.
    fidelity_tower: features for fidelity (None: no fidelity). consistency: a judge with `name`, `weights` and
    `scores(images, prompt)` (eval/consistency.py), None for none. similarity: CLIP-I / DINO towers.
    """

    detector: detection.FaceDetector
    detector_id: str
    classifiers: tuple[face_analysis.AttributeClassifier, ...]
    expand_coef: float = 0.5
    face_size: int = 224
    fidelity_tower: Optional[ImageTower] = None
    fidelity_k: int = fidelity.DEFAULT_K
    consistency: Any = None
    similarity: SimilarityNets = SimilarityNets()
    confidence_level: float = 0.8
    bias_attributes: tuple[str, ...] = BIAS_ATTRIBUTES

    def __post_init__(self):
        heads = dict(face_analysis.classifier_heads(self.classifiers))
        missing = [a for a in self.bias_attributes if a not in heads]
        if missing:
            raise ValueError(f"the evaluation's classifiers have no {missing} head (they give {sorted(heads)})")

    @property
    def consistency_name(self) -> Optional[str]:
        return self.consistency.name if self.consistency is not None else None

    def fields(self, feature_dim: int) -> Fields:
        """{per-image field: (row shape, dtype)} that `judge` returns; feature_dim: the fidelity features' width."""
        fields = {"found": ((), bool), "boxes": ((4,), np.int64), "degenerate": ((), bool)}
        fields.update({f"{name}_logits": ((k,), np.float32) for name, k in face_analysis.classifier_heads(self.classifiers)})
        if self.fidelity_tower is not None:
            fields["features"] = ((feature_dim,), np.float32)
        if self.consistency is not None:
            fields["consistency"] = ((), np.float32)
        return fields

    def settings(self) -> str:
        """Fingerprint of everything `judge`'s results depend on (the cache key of stored rows)."""
        return fingerprint(
            "judge", self.detector_id, self.expand_coef, self.face_size, [c.variables for c in self.classifiers],
            self.fidelity_tower.params if self.fidelity_tower is not None else "no fidelity",
            (self.consistency_name, self.consistency.weights) if self.consistency is not None else "no consistency",
        )

    def features(self, images: np.ndarray) -> np.ndarray:
        """[N, D] fidelity features of images [N, H, W, 3] in [-1, 1] (degenerate ones seen as black)."""
        if self.fidelity_tower is None:
            raise ValueError("this evaluator measures no fidelity (no fidelity feature network)")
        return self.fidelity_tower(face_analysis.blacken(images, face_analysis.degenerate_images(images)))

    def judge(self, images: np.ndarray, prompt: Optional[str]) -> dict[str, np.ndarray]:
        """images [N, H, W, 3] float32 in [-1, 1] of `prompt` -> the `fields` per image."""
        out = face_analysis.analyze_faces(images, self.detector, self.classifiers, self.expand_coef, self.face_size)
        clean = face_analysis.blacken(images, out["degenerate"])
        if self.fidelity_tower is not None:
            out["features"] = self.fidelity_tower(clean).astype(np.float32)
        if self.consistency is not None:
            if prompt is None:
                raise ValueError(f"{self.consistency_name} needs each image set's prompt")
            out["consistency"] = self.consistency.scores(clean, prompt)
        return out


@dataclasses.dataclass(frozen=True)
class PromptResults:
    """One prompt's per-image results (host numpy), rows in image order.

    found: [N] bool. boxes: [N, 4] int64 square crop boxes (x1, y1, x2, y2; x2/y2 exclusive), -1 rows without a
    face. degenerate: [N] bool. logits: {attribute: [N, K] float32} (meaningless without a face). features:
    [N, D] float32 fidelity features, consistency: [N] float32, clip_similarity / dino_similarity: [N] float32
    cosine to the paired reference (NaN where there is none); None when not measured. unreadable: the names of
    the prompt's image files that did not decode (not among the N rows).
    """

    image_names: tuple[str, ...]
    found: np.ndarray
    boxes: np.ndarray
    degenerate: np.ndarray
    logits: Mapping[str, np.ndarray]
    features: Optional[np.ndarray] = None
    consistency: Optional[np.ndarray] = None
    clip_similarity: Optional[np.ndarray] = None
    dino_similarity: Optional[np.ndarray] = None
    unreadable: tuple[str, ...] = ()

    def probs(self, attribute: str) -> np.ndarray:
        """[N, K] softmax of the attribute's logits."""
        logits = self.logits[attribute]
        shifted = np.exp(logits - logits.max(-1, keepdims=True))
        return shifted / shifted.sum(-1, keepdims=True)

    @classmethod
    def from_rows(cls, image_names: Sequence[str], rows: Mapping[str, np.ndarray]) -> "PromptResults":
        """From `Evaluator.judge`'s dict (or a cache's rows of the same fields)."""
        logits = {key[: -len("_logits")]: value for key, value in rows.items() if key.endswith("_logits")}
        return cls(tuple(image_names), np.asarray(rows["found"], bool), np.asarray(rows["boxes"], np.int64),
                   np.asarray(rows["degenerate"], bool), logits, rows.get("features"), rows.get("consistency"))


def _mean_or_nan(values: Optional[np.ndarray]) -> float:
    if values is None:
        return math.nan
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def prompt_metrics(result: PromptResults, reference_features: Optional[np.ndarray] = None, k: int = fidelity.DEFAULT_K,
                   confidence_level: float = 0.8, bias_attributes: Sequence[str] = BIAS_ATTRIBUTES) -> dict[str, float]:
    """One prompt's row; NaN where undefined.

    num_images, num_faces, face_share (share of images with a face), degenerate_share, num_unreadable (image
    files skipped, not among num_images); over the images with a
    face (argmax predictions, `bias_lib.bias_metrics` of `bias_attributes`): gender_bias, race_bias,
    gender_race_bias (8 joint classes) and gender/race_pred_below_<level> by default (gender_bias, age_bias,
    gender_age_bias, ... for others), and old_share (age class 1) when an age head is there;
    fidelity_precision / fidelity_recall against `reference_features` [M, D] when the results have features;
    consistency (mean score); clip_i / dino (mean over images with a paired reference) when measured.
    """
    found = np.asarray(result.found, bool)
    row: dict[str, float] = {
        "num_images": len(found),
        "num_faces": int(found.sum()),
        "face_share": float(found.mean()) if len(found) else math.nan,
        "degenerate_share": float(result.degenerate.mean()) if len(found) else math.nan,
        "num_unreadable": len(result.unreadable),
    }
    probs = [result.probs(a) for a in bias_attributes]
    row.update(bias_lib.bias_metrics(probs, found, bias_attributes, confidence_level))
    if attributes.AGE.name in result.logits:
        age = result.logits[attributes.AGE.name][found].argmax(-1)
        row["old_share"] = float(bias_lib.class_frequencies(age, attributes.AGE.num_classes)[1])
    if result.features is not None and reference_features is not None:
        row["fidelity_precision"], row["fidelity_recall"] = fidelity.improved_precision_recall(
            reference_features, result.features, k)
    if result.consistency is not None:
        row["consistency"] = _mean_or_nan(result.consistency)
    if result.clip_similarity is not None:
        row["clip_i"] = _mean_or_nan(result.clip_similarity)
    if result.dino_similarity is not None:
        row["dino"] = _mean_or_nan(result.dino_similarity)
    return row
