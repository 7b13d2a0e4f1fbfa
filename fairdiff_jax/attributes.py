"""The attribute vocabulary, written once: every attribute the project debiases or measures, its classes in
the classifiers' logit order, each class's colour in annotated grids, and the target marginals of the
experiments (docs/method.md, "Attributes and targets").

    attributes.get("race").num_classes        # 4
    attributes.uniform("gender")               # (0.5, 0.5)
    attributes.colors(("gender", "race"))      # the grid bar colours, per attribute

Class 0 of race covers White, Middle-Eastern and Latino-Hispanic faces, as in the FairFace-trained classifier
the original experiments use.
"""

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Attribute:
    """One attribute: `classes` in logit order, `colors` (a PIL colour name per class) for grid bars."""

    name: str
    classes: tuple[str, ...]
    colors: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


GENDER = Attribute("gender", ("female", "male"), ("red", "blue"))
RACE = Attribute("race", ("white", "black", "indian", "asian"), ("limegreen", "black", "brown", "orange"))
AGE = Attribute("age", ("young", "old"), ("gold", "purple"))
ATTRIBUTES = {a.name: a for a in (GENDER, RACE, AGE)}

# The training classifier's logit layout: logits[0:2] gender, logits[2:6] race.
GENDER_RACE_HEADS = ((GENDER.name, GENDER.num_classes), (RACE.name, RACE.num_classes))
# The evaluation's three test classifiers, one attribute each.
TEST_CLASSIFIER_HEADS = GENDER_RACE_HEADS + ((AGE.name, AGE.num_classes),)

# The age experiment's target: 75% young, 25% old.
YOUNG_OLD_TARGET = (0.75, 0.25)


def get(name: str) -> Attribute:
    """The attribute called `name`; ValueError naming the known ones otherwise."""
    if name not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {name!r}: known attributes are {', '.join(ATTRIBUTES)}")
    return ATTRIBUTES[name]


def uniform(name: str) -> tuple[float, ...]:
    """The balanced target marginal of attribute `name` (1/K per class)."""
    k = get(name).num_classes
    return (1.0 / k,) * k


def colors(names: Sequence[str]) -> list[tuple[str, ...]]:
    """Grid bar colours of each named attribute; an attribute outside the vocabulary (a classifier head a user
    added) gets a cycle of neutral colours."""
    neutral = ("gold", "purple", "teal", "gray", "pink", "navy", "olive", "cyan", "maroon", "silver")
    return [ATTRIBUTES[n].colors if n in ATTRIBUTES else neutral for n in names]
